"""Time to step 1 of `jaxtrain train`, with a cold and a warm compilation cache.

    python benchmarks/startup.py [--config=gpt_pysource.py] [--repeats=3] [--set KEY=VALUE]

    python benchmarks/startup.py --checkouts=/tmp/old,. [--repeats=5]

Each repeat launches the command twice on a fresh, empty cache directory (cold: it
compiles and stores the train step; warm: a second launch, which loads it), each in a new
workdir, and measures the wall time from launching the process to two points: the start
of step 1 (the line "train step compiled in ...", printed as the loop starts) and the
first logged training step (`log_every_steps=1`; step 1 is read one step late, after
step 2 was dispatched); then it kills the process. Cold and warm launches alternate, so
load on the machine falls on both alike. The data set must be built already (run the
job once).

`--checkouts` compares jaxtrain checkouts (e.g. `git worktree add /tmp/old COMMIT`): each
repeat runs every checkout's cold and warm launch in turn (the order reversed on odd
repeats), each importing jaxtrain from its own directory.
"""

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time


def time_to_step_1(
    config: str, workdir: str, cache_home: str, settings: list[str], checkout: str | None = None
):
    """Seconds from launch to the start of step 1 and to its logged line, and the seconds
    the run printed for compiling the train step."""
    env = {**os.environ, "XDG_CACHE_HOME": cache_home}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if checkout:  # its jaxtrain, not the installed one: `python -m` puts the cwd first
        env["PYTHONPATH"] = os.path.abspath(checkout)
    command = [
        sys.executable,
        "-m",
        "jaxtrain",
        "train",
        f"--config={config}",
        f"--workdir={workdir}",
        "--config.log_every_steps=1",
        *(f"--config.{s}" for s in settings),
    ]
    start = time.perf_counter()
    process = subprocess.Popen(
        command,
        env=env,
        cwd=checkout,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    compile_s = None
    for line in process.stdout:
        if match := re.search(r"train step compiled in ([\d.]+) s", line):
            compile_s = float(match[1])
            started = time.perf_counter() - start
        if re.match(r"step\s+1 train", line):
            seconds = time.perf_counter() - start
            break
    else:
        raise RuntimeError(f"the run ended before step 1 (status {process.wait()})")
    process.send_signal(signal.SIGKILL)
    process.wait()
    return started, seconds, compile_s


def main(config: str, repeats: int, settings: list[str], checkouts: list[str | None]):
    results = {checkout: {"cold": [], "warm": []} for checkout in checkouts}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            for index in range(len(checkouts))[:: 1 if repeat % 2 == 0 else -1]:
                checkout = checkouts[index]
                cache = os.path.join(tmp, f"cache{repeat}_{index}")
                for name in ("cold", "warm"):
                    workdir = os.path.join(tmp, f"run{repeat}_{index}_{name}")
                    started, logged, compile_s = time_to_step_1(
                        config, workdir, cache, settings, checkout
                    )
                    results[checkout][name].append((started, logged, compile_s))
                    print(
                        f"repeat {repeat}{f' {checkout}' if checkout else ''} {name}: step 1 "
                        f"starts at {started:.2f} s, logged at {logged:.2f} s (train step "
                        f"compiled in {compile_s} s)"
                    )
    for checkout, runs in results.items():
        if checkout:
            print(f"{checkout}:")
        for index, what in enumerate(("start of step 1", "step 1 logged", "compiling the step")):
            cold_s = statistics.median(r[index] for r in runs["cold"])
            warm_s = statistics.median(r[index] for r in runs["warm"])
            print(
                f"median {what}: cold {cold_s:.2f} s, warm {warm_s:.2f} s ({warm_s / cold_s:.0%})"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="gpt_pysource.py")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE override")
    parser.add_argument(
        "--checkouts", default="", help="comma-separated jaxtrain checkouts to compare"
    )
    args = parser.parse_args()
    checkouts = [c for c in args.checkouts.split(",") if c] or [None]
    main(args.config, args.repeats, args.set, checkouts)
