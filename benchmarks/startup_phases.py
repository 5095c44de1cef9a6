"""Where the time to step 1 of `jaxtrain train` goes, cold and warm, phase by phase.

    python benchmarks/startup_phases.py [--config=gpt_pysource.py] [--repeats=3]

Each repeat launches the job twice on a fresh cache directory (cold, then warm), like
benchmarks/startup.py, but in a child process that wraps each phase of
`train_and_evaluate` with a clock (seconds since the process began) and stops once the
train step is ready. It prints the median of each phase and splits a start in two: what
every launch spends whatever the compilation cache holds (Python starting and importing,
tracing and lowering the step and the init, the start-up lines) and the rest (XLA's
compiles, or the cache's loads, and the waits on them). The first part, over the cold
start, is the least warm/cold ratio a compilation cache can give this job on this machine.

The state's creation is timed in three parts (traced and lowered, compiled or loaded, run)
by doing what `jaxtrain.create_state` does in those three steps. The data set must be
built already (run the job once).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

PHASES = {  # name: (what it is, paid whatever the cache holds)
    "imports": ("Python started, jax and jaxtrain's libraries imported", True),
    "setup": ("config checked, cache enabled, task made, mesh and optimizer", True),
    "layout": ("the state's abstract layout (the model traced for shapes)", True),
    "data": ("the data sets opened, the batch's shape and shardings", True),
    "workdir": ("workdir locked, checkpoint looked for, config written, checkpointer", True),
    "step_traced": ("the train step traced and lowered", True),
    "init_traced": ("the state's init traced and lowered", True),
    "init_compiled": ("the init compiled by XLA, or loaded from the cache", False),
    "init_ran": ("the init run", False),
    "step_wait": ("waiting for the step's compile (or load) in the background", False),
    "stats": ("the step's FLOPs and memory read for the start-up lines", True),
}


def _since_process_start() -> float:
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def child(args: list[str]) -> None:
    """Runs `jaxtrain train args`, prints its phases as JSON, and exits before step 1."""
    origin = time.perf_counter() - _since_process_start()
    import jax

    from jaxtrain import cli, steps, train

    marks = {"imports": time.perf_counter() - origin}
    clock = {"last": time.perf_counter()}

    def phase(name):  # the time since the previous mark goes to `name`
        now = time.perf_counter()
        marks[name] = marks.get(name, 0.0) + now - clock["last"]
        clock["last"] = now

    def before(module, function, name):  # time up to the call goes to `name`
        original = getattr(module, function)

        def wrapped(*a, **k):
            phase(name)
            return original(*a, **k)

        setattr(module, function, wrapped)

    def after(module, function, name):  # time up to the return goes to `name`
        original = getattr(module, function)

        def wrapped(*a, **k):
            result = original(*a, **k)
            phase(name)
            return result

        setattr(module, function, wrapped)

    before(train.state_lib, "make_state_layout", "setup")
    after(train.state_lib, "make_state_layout", "layout")
    before(train.steps, "make_train_step", "data")  # the step is traced before the workdir

    traced = steps.trace_train_step

    def trace_train_step(*a, **k):
        result = traced(*a, **k)
        lower = result.lower

        class Traced:  # its lower() ends the step's tracing
            def __getattr__(self, name):
                return getattr(result, name)

            def lower(self, *a, **k):
                lowered = lower(*a, **k)
                phase("step_traced")
                return lowered

        return Traced()

    train.steps.trace_train_step = trace_train_step
    before(train.futures, "ThreadPoolExecutor", "workdir")  # the compile thread starts
    step_compile = {}

    def timed(function):
        start = time.perf_counter()
        result = train_timed(function)
        step_compile["seconds"] = time.perf_counter() - start
        return result

    train_timed, train._timed = train._timed, timed

    def create_state(layout, seed):  # jaxtrain.create_state, in its three steps
        lowered = jax.jit(layout.init, out_shardings=layout.shardings).lower(jax.random.key(seed))
        phase("init_traced")
        compiled = lowered.compile()
        phase("init_compiled")
        state = jax.block_until_ready(compiled(jax.random.key(seed)))
        phase("init_ran")
        return state

    train.state_lib.create_state = create_state
    before(train.steps, "jit_eval_step", "step_wait")

    def describe_run(*a, **k):
        phase("stats")
        marks["total"] = time.perf_counter() - origin
        marks["step_compile_background"] = step_compile["seconds"]
        print("PHASES " + json.dumps(marks), flush=True)
        os._exit(0)  # step 1 would start here

    train._describe_run = describe_run
    sys.argv = ["jaxtrain", "train", *args]
    cli.run()  # as the `jaxtrain` command runs (gc.freeze() after the imports included)


def launch(config: str, workdir: str, cache_home: str) -> dict:
    env = {**os.environ, "XDG_CACHE_HOME": cache_home}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    out = subprocess.run(
        [sys.executable, __file__, "--child", f"--config={config}", f"--workdir={workdir}"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    for line in out.stdout.splitlines():
        if line.startswith("PHASES "):
            return json.loads(line[len("PHASES ") :])
    raise RuntimeError(f"no phases (status {out.returncode}): {out.stderr[-2000:]}")


def main(config: str, repeats: int) -> None:
    runs = {"cold": [], "warm": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            cache = os.path.join(tmp, f"cache{repeat}")
            for name in ("cold", "warm"):
                marks = launch(config, os.path.join(tmp, f"run{repeat}_{name}"), cache)
                runs[name].append(marks)
                print(f"repeat {repeat} {name}: step ready at {marks['total']:.2f} s", flush=True)
    median = {
        name: {key: statistics.median(m[key] for m in marks) for key in marks[0]}
        for name, marks in runs.items()
    }
    print(f"\n{'phase (median seconds)':<78} {'cold':>6} {'warm':>6}")
    for key, (what, fixed) in PHASES.items():
        label = f"{key}: {what}" + ("" if fixed else " *")
        print(f"{label:<78} {median['cold'][key]:6.2f} {median['warm'][key]:6.2f}")
    print(
        f"{'(the step compiled or loaded in the background meanwhile)':<78} "
        f"{median['cold']['step_compile_background']:6.2f} "
        f"{median['warm']['step_compile_background']:6.2f}"
    )
    print(f"{'step 1 starts':<78} {median['cold']['total']:6.2f} {median['warm']['total']:6.2f}")
    fixed = {
        name: statistics.median(sum(m[k] for k, (_, paid) in PHASES.items() if paid) for m in marks)
        for name, marks in runs.items()
    }
    cold, warm = median["cold"]["total"], median["warm"]["total"]
    print(
        f"\n* depends on the cache. Paid whatever the cache holds: {fixed['cold']:.2f} s "
        f"cold, {fixed['warm']:.2f} s warm (medians). Warm / cold: {warm / cold:.0%}; "
        f"the least a cache could give (the warm launch's fixed part over the cold "
        f"start): {fixed['warm'] / cold:.0%}."
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="gpt_pysource.py")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    main(args.config, args.repeats)
