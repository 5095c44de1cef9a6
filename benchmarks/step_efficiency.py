"""Where the main job's train step spends its time on this CPU, and what a user can turn on.

    python benchmarks/step_efficiency.py profile [--config=gpt_pysource.py] [--steps=5]
    python benchmarks/step_efficiency.py compare [--config=gpt_pysource.py] [--rounds=3]
        [--steps=20] [--variants=baseline,no_eigen_threads,...]

profile: runs `train_and_evaluate` with `config.profile` (a trace of `steps` steps after 5
of warm-up, each step annotated) and reads the trace it wrote (jax.profiler.ProfileData):
the busiest trace lines and the HLO ops' time by kind (dot, fusion kinds, copy, ...).

compare: each variant runs in a fresh process (XLA flags and the allocator are read at
start-up) that compiles the step with jaxtrain's functions and times `steps` steps on
premade device batches; the variants run in turn, `rounds` times, so load on the machine
falls on all of them alike. Prints the median tokens/s of each and its ratio to baseline.
"""

import argparse
import collections
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TCMALLOC = sorted(glob.glob("/usr/lib/x86_64-linux-gnu/libtcmalloc*.so*"))

# name -> (extra XLA_FLAGS, extra environment, config settings)
VARIANTS = {
    "baseline": ("", {}, []),
    # XLA:CPU runs big dots and convolutions on a multi-threaded Eigen pool by default.
    "no_eigen_threads": ("--xla_cpu_multi_thread_eigen=false", {}, []),
    # Two CPU devices, the batch split over them (data parallel inside one process).
    "two_cpu_devices": ("--xla_force_host_platform_device_count=2", {}, ["mesh.data=2"]),
    # The older XLA:CPU runtime (one compiled function, no thunks), where still present.
    "no_thunk_runtime": ("--xla_cpu_use_thunk_runtime=false", {}, []),
    # oneDNN for matmuls instead of XLA's own (Eigen / YNNPACK) kernels.
    "onednn": ("--xla_cpu_use_onednn=true", {}, []),
    "tcmalloc": ("", {"LD_PRELOAD": TCMALLOC[0]} if TCMALLOC else None, []),
    "scan_layers": ("", {}, ["model.scan_layers=True"]),
    "tcmalloc_two_cpu_devices": (
        "--xla_force_host_platform_device_count=2",
        {"LD_PRELOAD": TCMALLOC[0]} if TCMALLOC else None,
        ["mesh.data=2"],
    ),
}


def worker(spec, steps_, settings):
    sys.path.insert(0, HERE)
    import jax
    from overhead import load, setup

    from jaxtrain import state

    config = load(spec, settings)
    mesh, layout, step, batches, _ = setup(config, 5 + steps_)
    with jax.set_mesh(mesh):
        train_state = state.create_state(layout, config.seed)
        for batch in batches[:5]:
            train_state, metrics = step(train_state, batch)
        jax.block_until_ready((train_state, metrics))
        start = time.perf_counter()
        for batch in batches[5:]:
            train_state, metrics = step(train_state, batch)
        jax.block_until_ready((train_state, metrics))
        seconds = (time.perf_counter() - start) / steps_
    tokens = config.global_batch_size * config.data.seq_len
    print(json.dumps({"step_s": seconds, "tokens_per_s": tokens / seconds}))


def compare(spec, rounds, steps_, names, settings):
    results = collections.defaultdict(list)
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            flags, env, extra = VARIANTS[name]
            if env is None:
                print(f"{name}: not available on this machine")
                continue
            environ = {**os.environ, **env}
            environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
            command = [sys.executable, __file__, "worker", f"--config={spec}"]
            command += [f"--set={s}" for s in [*settings, *extra]]
            run = subprocess.run(command, env=environ, capture_output=True, text=True)
            if run.returncode:
                print(f"{name}: failed: {run.stderr.strip().splitlines()[-1]}")
                continue
            result = json.loads(run.stdout.strip().splitlines()[-1])
            results[name].append(result["tokens_per_s"])
            load = " ".join(f"{x:.2f}" for x in os.getloadavg())
            print(
                f"round {round_} {name}: {result['tokens_per_s']:.0f} tokens/s "
                f"({result['step_s']:.4f} s/step; load average {load})",
                flush=True,
            )
    base = statistics.median(results["baseline"]) if results["baseline"] else None
    for name in names:
        if results[name]:
            median = statistics.median(results[name])
            ratio = f", {median / base:.3f}x baseline" if base else ""
            print(f"{name}: median {median:.0f} tokens/s over {len(results[name])}{ratio}")


def profile(spec, steps_, settings):
    """Runs `jaxtrain train`'s loop with `config.profile` and reads the trace it wrote."""
    sys.path.insert(0, HERE)
    import jax
    from overhead import load

    from jaxtrain.train import train_and_evaluate

    config = load(spec, settings)
    skip = 5
    config.num_train_steps = skip + steps_ + 1
    config.log_every_steps = config.num_train_steps
    config.eval_every_steps = config.checkpoint_every_steps = config.num_train_steps
    config.profile.num_steps, config.profile.skip_steps = steps_, skip
    with tempfile.TemporaryDirectory() as workdir:
        train_and_evaluate(config, workdir)
        (path,) = glob.glob(f"{workdir}/profile/plugins/profile/*/*.xplane.pb")
        planes = jax.profiler.ProfileData.from_file(path).planes
        by_kind, by_line, step_ns = collections.Counter(), collections.Counter(), []
        for plane in planes:
            for line in plane.lines:
                for event in line.events:
                    name, ns = event.name, event.duration_ns
                    by_line[f"{plane.name} / {line.name}"] += ns / 1e9
                    if name == "train":
                        step_ns.append(ns)
                    elif "XLA" in line.name and name.replace(".", "").replace("_", "").isalnum():
                        by_kind[name.split(".")[0]] += ns / 1e9  # an HLO op: dot.57 -> dot
    print(
        f"{len(step_ns)} steps traced; the host spent {statistics.mean(step_ns) / 1e6:.1f} ms "
        "per step inside the step annotation (input + dispatch)"
    )
    print("busiest trace lines (s, summed event time, nested events counted in each):")
    for name, seconds in by_line.most_common(6):
        print(f"  {seconds:8.3f}  {name}")
    total = sum(by_kind.values())
    print(f"HLO ops: {total:.3f} s in all over {steps_} steps; by kind (share of that):")
    for kind, seconds in by_kind.most_common(15):
        print(f"  {seconds:8.3f}  {100 * seconds / total:5.1f}%  {kind}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("profile", "compare", "worker"))
    parser.add_argument("--config", default="gpt_pysource.py")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--set", action="append", default=[], help="dotted.key=literal")
    args = parser.parse_args()
    if args.mode == "worker":
        worker(args.config, args.steps, args.set)
    elif args.mode == "profile":
        profile(args.config, args.steps, args.set)
    else:
        compare(args.config, args.rounds, args.steps, args.variants.split(","), args.set)
