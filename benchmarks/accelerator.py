"""One call that measures jaxtrain on an accelerator (issue 24): MFU, memory, saves, resume.

On the GPU machine, from the checkout, with the wheels `accelerator_wheels.sh` downloaded
into `.whl/` (the machine has no network; the command is the one BENCHMARKS.md "GPU" gives):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site && \
        PYTHONUNBUFFERED=1 python3 benchmarks/accelerator.py --out $OUT --trace

    python benchmarks/accelerator.py --smoke --out /tmp/acc     # CPU, tiny sizes, < 2 min

Parts, in order (`--parts=1,3` picks some):
  1. configs/gpt_1b.py on one device, `--batch` sequences of 2,048 tokens per step, no
     gradient accumulation, in the compute dtype "auto" gives there (bfloat16 on an H100):
     compile time, step time over `steps` steps after a warm-up, tokens/s, MFU, peak memory
     (the runtime's `peak_bytes_in_use`, and `compiled.memory_analysis()`), for cuDNN
     attention with the remat policies save_dots and full, XLA attention at the better of
     those two, then cuDNN with remat none (last: the likeliest not to fit). `--trace`
     writes a jax.profiler trace of one step of the first variant as DIR/trace_part1.tgz.
  2. The main job's model (configs/gpt_pysource.py): tokens/s against the CPU figure.
  3. An asynchronous Orbax save's cost to training at the 1B size (as
     benchmarks/checkpoint_cost.py measures it): windows of steps with and without a save.
  4. Exact resume: `jaxtrain train` of the main job's model, killed with SIGKILL after a
     checkpoint commits and rerun, against an uninterrupted run: final parameters bitwise
     equal or not. If not (on a GPU), both again with XLA_FLAGS
     --xla_gpu_deterministic_ops=true, and that flag's cost in step time.
  5. The persistent compilation cache: a second launch's time to step 1 against the first
     (benchmarks/startup.py's measurement), on the 1B.

MFU is jaxtrain's own (`steps.flops_per_device_step` over `hardware.peak_flops`, as the run
logs it): model FLOPs by PaLM's count, 6 per weight per token plus 12 * layers * heads *
head_dim * length per token for attention, which counts the whole score matrix. `mfu_causal`
is the same with that attention term halved, since the causal mask leaves half of it: the
figure the issue asks for. Data are jaxtrain's synthetic tokens (`data.name="synthetic"`):
the step's cost does not depend on their values, and nothing is read from disk.

Every part runs in its own process group with a time budget (`--budgets=1=200,3=60`, in
seconds): a part that overruns is killed and recorded as "timeout" with what it had
finished, an exception as "error", and the next part runs. DIR/accelerator.json is
rewritten after every part, so a kill of the whole command still leaves the parts done;
the table is printed at the end. The heavy work runs in child processes, so that each
variant starts with the whole device memory (jax takes 75% of a GPU at start-up) and the
parent never holds the device. Each `jaxtrain train` here sets energy.device_watts (the
chip table, not codecarbon, which the GPU machine lacks).
"""

import argparse
import contextlib
import ctypes
import datetime
import hashlib
import json
import os
import platform as platform_lib
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULT_FILE = "accelerator.json"
MARK = "ACCELERATOR_RESULT "  # a child's last stdout line: MARK + its JSON result
SCRATCH = "ACCELERATOR_SCRATCH"  # environment: where children keep caches and checkpoints
MEMORY_LIMIT = "ACCELERATOR_MEMORY_LIMIT_BYTES"  # environment: device memory to pretend

PART_NAMES = {
    1: "1B GPT: step time, MFU, memory by attention and remat",
    2: "main job's model: tokens/s",
    3: "asynchronous checkpoint save's cost at 1B",
    4: "exact resume after SIGKILL",
    5: "compilation cache: time to step 1",
}
# Seconds per part on an H100: 465 in all, under 8 minutes with the probe; what a part
# leaves unused goes to the next. In --smoke on CPU, caps for a loaded 2-core machine.
BUDGETS = {1: 165, 2: 25, 3: 70, 4: 115, 5: 90}
SMOKE_BUDGETS = {1: 120, 2: 60, 3: 60, 4: 240, 5: 120}
PROBE_BUDGET = 60

# Every jaxtrain run here: random tokens (no data set to build), no evaluation and no
# periodic checkpoint inside the measured steps, and energy from the chip table (a watt
# figure turns codecarbon off: the GPU machine has no codecarbon).
COMMON = ["data.name=synthetic", "energy.device_watts=1.0", "eval_every_steps=100000"]
# The main job's CPU figure (BENCHMARKS.md, "CPU", "Training", 2026-11-30: 2 vCPUs, batch
# 32 x 128 bytes, `jaxtrain train --config=configs/gpt_pysource.py`).
CPU_MAIN_JOB_TOKENS_PER_S = (9_800, 11_000)
DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def _sizes(smoke: bool, batch: int) -> dict:
    """Config specs and settings per part: the real sizes, or tiny ones for --smoke."""
    if smoke:
        return dict(
            one_b="gpt_1b.py:smoke",
            one_b_set=["global_batch_size=4", "microbatches=1"],
            main="gpt_pysource.py:smoke",
            remats=["save_dots", "full"],
            warmup=2,
            steps=3,
            main_steps=5,
            window=4,
            repeats=1,
        )
    return dict(
        one_b="gpt_1b.py",
        one_b_set=[f"global_batch_size={batch}", "microbatches=1"],
        main="gpt_pysource.py",
        remats=["save_dots", "full", "none"],
        warmup=3,
        steps=10,
        main_steps=50,
        window=15,
        repeats=1,  # each save writes 13 GB: one pair of windows fits the part's budget
    )


# --- The parent: runs each part in its own process group, records it --------------------


def _kill_group(process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _own_group_dying_with_parent(death_signal: int):
    """For Popen's preexec_fn: a process group of its own, and `death_signal` when the
    parent dies (Linux), so that a kill of this script leaves nothing on the device."""

    def setup():
        os.setpgrp()
        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(1, death_signal, 0, 0, 0)  # PDEATHSIG

    return setup


def run_child(
    argv: list[str], timeout: float, env: dict | None = None, death_signal=signal.SIGKILL
) -> tuple[int | None, str]:
    """Runs `argv` in a new process group for at most `timeout` s; (status or None, output).

    On timeout the whole group (the child and whatever it started) is killed. A child
    that starts processes of its own takes `death_signal=signal.SIGTERM` and kills its
    group on it (`_kill_own_group_on_sigterm`): its children then die with this process.
    """
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
            preexec_fn=_own_group_dying_with_parent(death_signal),
        )
        try:
            status = process.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            status = None
        finally:
            _kill_group(process)  # a finished child's own children, too
        log.seek(0)
        return status, log.read()


def _kill_own_group_on_sigterm() -> None:
    signal.signal(signal.SIGTERM, lambda *_: os.killpg(0, signal.SIGKILL))


def _child_result(output: str) -> dict | None:
    for line in reversed(output.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    return None


def _tail(output: str, lines: int = 8) -> str:
    return "\n".join(output.strip().splitlines()[-lines:])


def _write(out_dir: str, record: dict) -> None:
    path = os.path.join(out_dir, RESULT_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def _installed_jaxtrain_matches_tree() -> bool | None:
    """Whether the jaxtrain the children import has the checkout's sources (the device
    runs an installed wheel: a stale one would measure old code)."""
    import importlib.util

    spec = importlib.util.find_spec("jaxtrain")
    if spec is None or not spec.origin:
        return None
    installed = os.path.dirname(spec.origin)
    tree = os.path.join(ROOT, "jaxtrain")
    if os.path.realpath(installed) == os.path.realpath(tree):
        return True

    def digest(directory, skip=()):
        h = hashlib.sha256()
        for base, dirs, names in os.walk(directory):  # in order: dirs sorted in place
            dirs[:] = sorted(d for d in dirs if os.path.join(base, d) not in skip)
            for name in sorted(n for n in names if n.endswith(".py")):
                rel = os.path.relpath(os.path.join(base, name), directory)
                h.update(rel.encode())
                with open(os.path.join(base, name), "rb") as f:
                    h.update(f.read())
        return h.hexdigest()

    configs = os.path.join(installed, "configs")  # setup.py installs configs/ there
    return digest(installed, skip=(configs,)) == digest(tree) and digest(configs) == digest(
        os.path.join(ROOT, "configs")
    )


def _meta(args) -> dict:
    meta = {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "smoke": args.smoke,
        "python": platform_lib.python_version(),
        "host": platform_lib.node(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
        "jaxtrain_matches_checkout": _installed_jaxtrain_matches_tree(),
    }
    with contextlib.suppress(Exception):
        meta["git_commit"] = subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    with contextlib.suppress(Exception):
        query = "--query-gpu=name,driver_version,memory.total"
        smi = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True
        )
        meta["nvidia_smi"] = smi.stdout.strip()
    return meta


def main(args) -> int:
    os.makedirs(args.out, exist_ok=True)
    # jax takes 75% of a GPU's memory by default: the 1B may use up to 92% here, in every
    # process (the measurements and part 5's `jaxtrain train` alike).
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    with tempfile.TemporaryDirectory(prefix="accelerator-") as scratch:
        os.environ[SCRATCH] = scratch
        return _main(args)


def _main(args) -> int:
    budgets = dict(SMOKE_BUDGETS if args.smoke else BUDGETS)
    for item in filter(None, args.budgets.split(",")):
        part, seconds = item.split("=")
        budgets[int(part)] = float(seconds)
    record = {"meta": _meta(args), "parts": {}}
    me = [sys.executable, os.path.abspath(__file__)]
    flags = [f"--batch={args.batch}"] + ["--smoke"] * args.smoke + ["--trace"] * args.trace
    flags += [f"--out={os.path.abspath(args.out)}"]

    status, output = run_child([*me, "--probe"], PROBE_BUDGET)
    record["meta"]["device"] = _child_result(output) or {"error": _tail(output), "status": status}
    _write(args.out, record)
    platform = record["meta"]["device"].get("platform", "unknown")
    flags.append(f"--platform={platform}")

    saved = 0.0  # seconds earlier parts left of their budgets
    for part in args.parts:
        name = PART_NAMES[part]
        budget = budgets[part] + saved
        print(f"part {part} ({name}): budget {budget:.0f} s", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            result_path = os.path.join(tmp, "part.json")
            argv = [*me, f"--run-part={part}", f"--result={result_path}", *flags]
            argv += [f"--fail={args.fail}"] if args.fail else []
            argv.append(f"--deadline={time.time() + budget}")
            start = time.monotonic()
            status, output = run_child(argv, budget, death_signal=signal.SIGTERM)
            used = time.monotonic() - start
            saved = max(budget - used, 0.0)
            entry = {"name": name, "seconds": round(used, 2), "budget_s": round(budget, 1)}
            results = {}
            if os.path.exists(result_path):
                with open(result_path) as f:
                    results = json.load(f)
            error = results.pop("_error", None)
            if status is None:
                entry["status"] = "timeout"
                entry["error"] = f"stopped after its budget of {budget:.0f} s"
            elif status or error:
                entry["status"] = "error"
                entry["error"] = error or f"exit status {status}: {_tail(output)}"
            else:
                entry["status"] = "ok"
            entry["results"] = results
            if entry["status"] != "ok":
                entry["output_tail"] = _tail(output, 30)
        record["parts"][str(part)] = entry
        _write(args.out, record)
        fitted = results.get("best", {}).get("global_batch_size")
        if part == 1 and fitted and fitted != args.batch:  # parts 3 and 5: what fitted
            flags = [f"--batch={fitted}" if f.startswith("--batch=") else f for f in flags]
        print(f"part {part}: {entry['status']} in {entry['seconds']:.1f} s", flush=True)
    print(table(record))
    print(f"written: {os.path.join(args.out, RESULT_FILE)}")
    return 0 if all(p["status"] == "ok" for p in record["parts"].values()) else 1


def _fmt(value, unit: str = "", scale: float = 1.0, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value * scale:.{digits}g}{unit}"


def table(record: dict) -> str:
    """The results as text: one line per measurement, failures with their reason."""
    device = record["meta"].get("device", {})
    lines = [
        f"device: {device.get('device_kind', '?')} x{device.get('device_count', '?')} "
        f"({device.get('platform', '?')}), jax {device.get('jax', '?')}, "
        f"{record['meta'].get('nvidia_smi') or 'no nvidia-smi'}, {record['meta']['date_utc']}"
    ]
    for key, part in record["parts"].items():
        lines.append(f"part {key}: {part['name']}: {part['status']} ({part['seconds']:.1f} s)")
        if part["status"] != "ok":
            lines.append(f"  {part['error'].splitlines()[-1] if part['error'] else ''}")
        results = part["results"]
        for variant in results.get("variants", []):
            lines.append(
                f"  attention={variant.get('attention')} remat={variant.get('remat')} "
                f"batch={variant.get('global_batch_size')}: "
                + (
                    f"{_fmt(variant.get('step_s'), ' s/step')}, "
                    f"{_fmt(variant.get('tokens_per_s'), ' tokens/s')}, MFU "
                    f"{_fmt(variant.get('mfu_causal'), '%', 100)} causal / "
                    f"{_fmt(variant.get('mfu'), '%', 100)} full-attention count, peak "
                    f"{_fmt(variant.get('peak_memory_bytes'), ' GiB', 2**-30)}, compile "
                    f"{_fmt(variant.get('compile_s'), ' s')}"
                    if "step_s" in variant
                    else variant.get("error", variant.get("skipped", "?")).splitlines()[-1]
                )
            )
        if "best" in results:
            lines.append(f"  best: {results['best']}")
        for name in ("tokens_per_s", "vs_cpu", "save_cost_s", "amortised_percent"):
            if name in results:
                lines.append(f"  {name}: {results[name]}")
        for name in ("bitwise_equal", "bitwise_equal_deterministic", "deterministic_cost"):
            if name in results:
                lines.append(f"  {name}: {results[name]}")
        for name in ("cold", "warm"):
            if name in results:
                lines.append(f"  {name}: {results[name]}")
    return "\n".join(lines)


# --- A part, in its own process: records results as it goes --------------------------------


class Recorder:
    """The part's results, rewritten to its file after every change (a kill keeps them)."""

    def __init__(self, path: str):
        self.path, self.results = path, {}

    def __setitem__(self, key, value):
        self.results[key] = value
        self.flush()

    def flush(self):
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.results, f, default=str)
        os.replace(self.path + ".tmp", self.path)


def run_part(args) -> int:
    _kill_own_group_on_sigterm()  # sent when the parent dies: the part's processes go too
    # `python -m jaxtrain` puts its working directory first on sys.path: not the checkout,
    # whose bare tree lacks jaxtrain.configs (the GPU machine runs the installed wheel).
    os.chdir(_scratch())
    recorder = Recorder(args.result)
    try:
        if args.fail == args.run_part:  # for tests/test_accelerator_bench.py
            raise RuntimeError(f"injected failure (--fail={args.fail})")
        PARTS[args.run_part](args, recorder, _sizes(args.smoke, args.batch))
    except Exception as e:
        recorder["_error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"
        return 1
    return 0


def _scratch() -> str:
    """The call's scratch directory (the parent's, removed at its end), or the system's."""
    return os.environ.get(SCRATCH) or tempfile.gettempdir()


def _left(args) -> float:
    """Seconds left of the part's budget (its process group is killed at the end)."""
    return max(args.deadline - time.time(), 1.0)


def _run(command, env) -> str:
    """Runs a `jaxtrain train` command to its end; its stdout, or an error naming why."""
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"exit {done.returncode} of {command[3:5]}: {_tail(done.stderr)}")
    return done.stdout


def measure_child(spec: dict, timeout: float) -> dict:
    """`measure(spec)` in a fresh process: its result, or {"error": ...}."""
    argv = [sys.executable, os.path.abspath(__file__), f"--measure={json.dumps(spec)}"]
    # jax's persistent cache, shared by the measurements of this call alone: part 1's
    # variants are different programs (each compiles cold); part 3 loads part 1's first.
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.path.join(_scratch(), "xla_cache")}
    status, output = run_child(argv, timeout, env)
    result = _child_result(output)
    if result is not None:
        return result
    if status is None:
        return {"error": f"stopped after {timeout:.0f} s"}
    return {"error": f"exit status {status}: {_tail(output)}"}


def part_1b(args, rec, sizes):
    # cuDNN's fused attention first (the GPU's fast path); on a CPU only XLA's exists.
    attentions = ["cudnn", "xla"] if args.platform == "gpu" else ["xla"]
    remats = sizes["remats"]
    rec["attentions"], rec["remats_tried"], rec["variants"] = attentions, remats, []
    plan = [(attentions[0], remat) for remat in remats[:2]]
    plan += [(other, None) for other in attentions[1:]] + [(attentions[0], r) for r in remats[2:]]
    best = None  # the fastest variant so far: XLA's attention runs at its remat policy
    for index, (attention, remat) in enumerate(plan):
        remat = remat or (best or {"remat": remats[0]})["remat"]
        spec = dict(
            config=sizes["one_b"],
            settings=[*sizes["one_b_set"], f"model.attention_impl={attention}"]
            + [f"model.remat={remat}"],
            warmup=sizes["warmup"],
            steps=sizes["steps"],
            trace=os.path.join(args.out, "trace_part1.tgz") if args.trace and not index else "",
            fit=True,
        )
        result = {"attention": attention, "remat": remat}
        result.update(measure_child(spec, _left(args)))
        rec.results["variants"].append(result)
        if "step_s" in result and (best is None or result["step_s"] < best["step_s"]):
            best = result
            keys = ("attention", "remat", "global_batch_size", "step_s")
            rec.results["best"] = {k: best[k] for k in keys}
        rec.flush()
    if best is None:
        raise RuntimeError("no variant ran: " + result.get("error", result.get("skipped", "?")))


def part_main_job(args, rec, sizes):
    spec = dict(config=sizes["main"], settings=[], warmup=5, steps=sizes["main_steps"])
    result = measure_child(spec, _left(args))
    rec["measurement"] = result
    if "step_s" not in result:
        raise RuntimeError(result.get("error") or result["skipped"])
    rec["tokens_per_s"] = result["tokens_per_s"]
    low, high = CPU_MAIN_JOB_TOKENS_PER_S
    rec["cpu_tokens_per_s"] = {"low": low, "high": high, "source": "BENCHMARKS.md CPU Training"}
    rec["vs_cpu"] = f"{result['tokens_per_s'] / high:.1f}x-{result['tokens_per_s'] / low:.1f}x"


def part_checkpoint(args, rec, sizes):
    remat = "save_dots"
    spec = dict(
        config=sizes["one_b"],
        # One checkpoint kept on disk (13 GB at 1B, parameters and Adam moments in float32).
        settings=[*sizes["one_b_set"], f"model.remat={remat}", "checkpoint.keep_latest=1"]
        + (["model.attention_impl=cudnn"] if args.platform == "gpu" else []),
        warmup=sizes["warmup"],
        steps=1,
        checkpoint=dict(window=sizes["window"], repeats=sizes["repeats"]),
        fit=True,
    )
    result = measure_child(spec, _left(args))
    rec["measurement"] = result
    if "step_s" not in result:
        raise RuntimeError(result.get("error") or result["skipped"])
    for key in ("save_cost_s", "amortised_percent", "checkpoint_every_steps", "checkpoint_mib"):
        rec[key] = result[key]


def _train_command(workdir, config, steps, every, settings):
    return [
        sys.executable,
        "-m",
        "jaxtrain",
        "train",
        f"--config={config}",
        f"--workdir={workdir}",
        f"--config.num_train_steps={steps}",
        f"--config.checkpoint_every_steps={every}",
        "--config.log_every_steps=1",
        # Every launch compiles (and autotunes) afresh: the harder case for equality.
        "--config.compilation_cache.dir=",
        "--config.model.dropout_rate=0.1",  # the dropout RNG must resume exactly too
        *(f"--config.{s}" for s in [*COMMON, *settings]),
    ]


def _resume_pair(tmp, config, env, tag):
    """An uninterrupted run and one killed after checkpoint 20 and rerun: their workdirs."""
    steps, every, kill_after = 100, 10, 20
    reference, resumed = os.path.join(tmp, f"{tag}_a"), os.path.join(tmp, f"{tag}_b")
    _run(_train_command(reference, config, steps, every, []), env)
    command = _train_command(resumed, config, steps, every, [])
    # Its output to a file, not a pipe: one that nobody reads could fill and stall it.
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        # Orbax renames a step's directory into place when it commits.
        committed = os.path.join(resumed, "checkpoints", str(kill_after))
        while not os.path.isdir(committed) and process.poll() is None:
            time.sleep(0.005)
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"the run ended before checkpoint {kill_after}: {_tail(log.read())}")
        process.send_signal(signal.SIGKILL)
        process.wait()
    return reference, resumed, steps, "resumed at" in _run(command, env)


def part_resume(args, rec, sizes):
    env = {**os.environ}
    config = sizes["main"]
    with tempfile.TemporaryDirectory() as tmp:
        a, b, steps, resumed = _resume_pair(tmp, config, env, "default")
        rec["killed_after_checkpoint"], rec["rerun_said_resumed"] = 20, resumed
        verdict = compare_child(a, b, steps)
        rec["bitwise_equal"] = verdict["equal"]
        rec["comparison"] = verdict
        if not verdict["equal"] and args.platform == "gpu":
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {DETERMINISTIC_FLAG}".strip()
            rec["deterministic_flag"] = DETERMINISTIC_FLAG
            a2, b2, steps, _ = _resume_pair(tmp, config, env, "deterministic")
            verdict2 = compare_child(a2, b2, steps)
            rec["bitwise_equal_deterministic"] = verdict2["equal"]
            rec["comparison_deterministic"] = verdict2
            default_s, flagged_s = verdict["step_time_s"], verdict2["step_time_s"]
            rec["deterministic_cost"] = (
                f"{flagged_s / default_s:.3f}x the step time ({flagged_s:.5f} s against "
                f"{default_s:.5f} s, median over the uninterrupted runs' logged steps)"
            )


def compare_child(a: str, b: str, steps: int) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), f"--compare={a},{b},{steps}"]
    status, output = run_child(argv, 300)
    result = _child_result(output)
    if result is None:
        raise RuntimeError(f"the comparison failed ({status}): {_tail(output)}")
    return result


def part_compilation_cache(args, rec, sizes):
    sys.path.insert(0, HERE)
    from startup import time_to_step_1

    settings = [*sizes["one_b_set"], *COMMON, "checkpoint_every_steps=100000"]
    settings.append("num_train_steps=100000")
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "cache")  # empty: the first launch compiles and stores
        for name in ("cold", "warm"):
            started, logged, compile_s = time_to_step_1(
                sizes["one_b"], os.path.join(tmp, name), cache, settings
            )
            rec[name] = {
                "step_1_starts_s": started,
                "step_1_logged_s": logged,
                "compile_s": compile_s,
            }
    cold, warm = rec.results["cold"]["step_1_starts_s"], rec.results["warm"]["step_1_starts_s"]
    rec["warm_over_cold"] = warm / cold


PARTS = {
    1: part_1b,
    2: part_main_job,
    3: part_checkpoint,
    4: part_resume,
    5: part_compilation_cache,
}


# --- Children that use the device ----------------------------------------------------------


def probe() -> dict:
    import importlib.metadata

    import jax

    device = jax.devices()[0]
    stats = {}
    with contextlib.suppress(Exception):
        stats = device.memory_stats() or {}
    versions = {}
    for package in (
        "jax",
        "jaxlib",
        "jax-cuda13-plugin",
        "jax-cuda12-plugin",
        "flax",
        "optax",
        "orbax-checkpoint",
        "tensorstore",
        "numpy",
        "grain",
        "tensorflow-datasets",
        "ml-collections",
        "tensorboardX",
        "jaxtrain",
    ):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    from jaxtrain import hardware

    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "memory_limit_bytes": stats.get("bytes_limit"),
        "peak_flops_16bit": hardware.peak_flops(device),
        "jax": jax.__version__,
        "versions": versions,
    }


def _build(config):
    """The compiled train step and what it needs, by benchmarks/overhead.py's `build`
    (the functions `train_and_evaluate` uses), with tracing and compiling timed."""
    import jax

    sys.path.insert(0, HERE)
    from overhead import build, train_iterator

    from jaxtrain import sharding, steps

    task, mesh, rules, layout, loss_scale, shardings, abstract = build(config)
    with jax.set_mesh(mesh), sharding.use_rules(rules):
        start = time.perf_counter()
        train_step = steps.make_train_step(
            task.loss,
            layout,
            microbatches=config.microbatches,
            loss_scale=loss_scale,
        )
        lowered = steps.trace_train_step(train_step, layout, abstract).lower()
        traced_s = time.perf_counter() - start
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start
    iterator = train_iterator(config, task)
    return task, mesh, layout, compiled, shardings, iterator, traced_s, compile_s


def measure(spec: dict) -> dict:
    import jax
    import numpy as np

    sys.path.insert(0, HERE)
    from overhead import load

    from jaxtrain import data, hardware, hlo, metrics, precision, state, steps

    config = load(spec["config"], [*COMMON, *spec["settings"]])
    device = jax.devices()[0]
    limit = None
    with contextlib.suppress(Exception):  # GPU and TPU say how much memory jax may use
        limit = (device.memory_stats() or {}).get("bytes_limit")
    # A smaller device, pretended (tests/test_accelerator_bench.py: CPUs report no limit).
    limit = float(os.environ.get(MEMORY_LIMIT, 0)) or limit
    halved_from = None
    while True:
        task, mesh, layout, step, shardings, iterator, traced_s, compile_s = _build(config)
        stats = hlo.compiled_stats(step)
        predicted = sum(stats.get(f"{k}_size_in_bytes", 0) for k in ("argument", "output"))
        predicted += stats.get("temp_size_in_bytes", 0) - stats.get("alias_size_in_bytes", 0)
        # Too big for the device: once, at half the sequences per step (a figure at a
        # smaller batch beats none; `halved_from` says so).
        if not (limit and predicted > limit and halved_from is None and spec.get("fit")):
            break
        halved_from = config.global_batch_size
        config.global_batch_size //= 2
    tokens = config.global_batch_size * config.data.seq_len
    m = config.model
    result = {
        "config": spec["config"],
        "settings": spec["settings"],
        "compute_dtype": str(precision.dtypes(config.precision, device=device)[0]),
        "global_batch_size": config.global_batch_size,
        "seq_len": config.data.seq_len,
        "tokens_per_step": tokens,
        "trace_lower_s": traced_s,
        "compile_s": compile_s,
        "memory_analysis": {k: v for k, v in stats.items() if k.endswith("_in_bytes")},
        # What the step holds at once: arguments, outputs and temporaries, less the
        # donated state that the outputs reuse.
        "predicted_bytes": predicted,
        "memory_limit_bytes": limit,
        "halved_from": halved_from,
    }
    if limit and predicted > limit:
        result["skipped"] = f"does not fit: {predicted / 2**30:.3g} GiB > {limit / 2**30:.3g} GiB"
        return result
    flops, source = steps.flops_per_device_step(
        task.flops_per_example, layout, config.global_batch_size, stats
    )
    # The attention term of gpt.train_flops_per_sequence, per device: halved for causal.
    attention = 12 * m.num_layers * m.num_heads * m.head_dim * config.data.seq_len**2
    attention *= config.global_batch_size / mesh.devices.size
    peak = hardware.peak_flops(device)
    result.update(flops_per_device=flops, flops_source=source, peak_flops=peak)
    result["attention_flops_share"] = attention / flops if flops else None

    needed = spec["warmup"] + spec["steps"]
    batches = [data.to_global(next(iterator), shardings) for _ in range(needed)]
    with jax.set_mesh(mesh):
        train_state = state.create_state(layout, config.seed)
        for batch in batches[: spec["warmup"]]:
            train_state, out = step(train_state, batch)
        jax.block_until_ready((train_state, out))
        start = time.perf_counter()
        for batch in batches[spec["warmup"] :]:
            train_state, out = step(train_state, batch)
        jax.block_until_ready((train_state, out))  # every step's work done, metrics too
        seconds = (time.perf_counter() - start) / spec["steps"]
        loss = float(np.asarray(jax.device_get(out["loss"])))
        result.update(step_s=seconds, tokens_per_s=tokens / seconds, loss=loss)
        if flops and peak:
            result["mfu"] = flops / peak / seconds
            result["mfu_causal"] = (flops - attention / 2) / peak / seconds
        result["peak_memory_bytes"] = metrics.peak_memory_bytes(jax.local_devices())
        if spec.get("trace"):
            result["trace"] = _trace_one_step(step, train_state, batches[-1], spec["trace"])
            train_state = None
        if spec.get("checkpoint"):
            del train_state
            result.update(_checkpoint_cost(config, layout, step, shardings, iterator, spec))
    return result


def _trace_one_step(step, train_state, batch, path: str) -> str:
    import jax

    with tempfile.TemporaryDirectory() as directory:
        jax.profiler.start_trace(directory)
        try:
            out = step(train_state, batch)
            jax.block_until_ready(out)
        finally:
            jax.profiler.stop_trace()
        # One file: what comes back from the GPU machine is at most 2 folders deep.
        with tarfile.open(path, "w:gz") as tar:
            tar.add(directory, arcname="trace")
    return path


def _checkpoint_cost(config, layout, step, shardings, iterator, spec) -> dict:
    """benchmarks/checkpoint_cost.py's measurement: windows with and without a save."""
    import jax

    from jaxtrain import checkpoint, data, state

    window, repeats = spec["checkpoint"]["window"], spec["checkpoint"]["repeats"]
    save_after = min(3, window - 1)
    batches = [data.to_global(next(iterator), shardings) for _ in range(window)]
    config_dict = json.loads(config.to_json_best_effort())
    plain, saved, blocked, waited = [], [], [], []
    with tempfile.TemporaryDirectory(dir=_scratch()) as workdir:
        ckpt = checkpoint.Checkpointer(workdir, config.checkpoint)

        def run(with_save: bool, number: int) -> None:
            train_state = state.create_state(layout, config.seed)  # the step donates it
            jax.block_until_ready(train_state)
            start = time.perf_counter()
            for i, batch in enumerate(batches, 1):
                train_state, out = step(train_state, batch)
                if with_save and i == save_after:
                    jax.device_get(out)  # as the loop settles a checkpoint step
                    call = time.perf_counter()
                    ckpt.save(number, train_state, iterator.get_state(), config_dict)
                    blocked.append(time.perf_counter() - call)
            jax.block_until_ready((train_state, out))
            end = time.perf_counter()
            (saved if with_save else plain).append(end - start)
            if with_save:
                ckpt.wait_until_finished()
                waited.append(time.perf_counter() - end)

        run(True, 1)  # warm-up: Orbax's first save sets up its threads
        plain.clear(), saved.clear(), blocked.clear(), waited.clear()
        for repeat in range(repeats):
            for with_save in (False, True) if repeat % 2 == 0 else (True, False):
                run(with_save, 100 * (repeat + 2))
        ckpt.close()
        size = sum(
            os.path.getsize(os.path.join(base, f))
            for base, _, files in os.walk(os.path.join(workdir, "checkpoints"))
            for f in files
        )
    step_s = statistics.median(plain) / window
    cost = statistics.median(b - a for a, b in zip(plain, saved, strict=True))
    every = config.checkpoint_every_steps
    return {
        "window_steps": window,
        "plain_window_s": plain,
        "save_window_s": saved,
        "save_call_blocked_s": blocked,
        "write_after_window_s": waited,
        "save_cost_s": cost,
        "save_cost_steps": cost / step_s,
        "checkpoint_every_steps": every,
        "amortised_percent": 100 * cost / (every * step_s),
        "checkpoint_mib": size / 2**20,
    }


def compare(a: str, b: str, steps: int) -> dict:
    """Final parameters of two runs, bitwise; their logged losses; their step times."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from jaxtrain import metrics_jsonl

    def params(workdir):
        options = ocp.CheckpointManagerOptions(read_only=True)
        with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), options=options) as m:
            if m.latest_step() != steps:
                raise RuntimeError(f"{workdir}: latest step {m.latest_step()}, not {steps}")
            restored = m.restore(steps, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        return jax.tree.map(np.asarray, restored["state"]["params"])

    def records(workdir):
        path = os.path.join(workdir, "metrics.jsonl")
        return [r for r in metrics_jsonl.read_records(path) if r.get("split") == "train"]

    left, right = jax.tree.leaves(params(a)), jax.tree.leaves(params(b))
    differing = [
        i for i, (x, y) in enumerate(zip(left, right, strict=True)) if x.tobytes() != y.tobytes()
    ]
    max_diff = max(
        (float(np.max(np.abs(left[i].astype(np.float64) - right[i]))) for i in differing),
        default=0.0,
    )
    losses_a = {r["step"]: r["loss"] for r in records(a)}
    losses_b = {r["step"]: r["loss"] for r in records(b)}
    first = min((s for s in losses_a if losses_b.get(s) != losses_a[s]), default=None)
    return {
        "equal": not differing and len(left) == len(right),
        "leaves": len(left),
        "differing_leaves": len(differing),
        "max_abs_difference": max_diff,
        "losses_equal": losses_a == losses_b,
        "first_step_losses_differ": first,
        "step_time_s": statistics.median(
            r["step_time_s"] for r in records(a) if "step_time_s" in r and r["step"] > 5
        ),
    }


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="", help="directory for accelerator.json (required)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, on CPU")
    parser.add_argument("--parts", default="1,2,3,4,5", help="which parts, e.g. 1,3")
    parser.add_argument("--trace", action="store_true", help="trace one step of part 1")
    parser.add_argument("--batch", type=int, default=16, help="sequences per 1B step")
    parser.add_argument("--budgets", default="", help="seconds per part: 1=200,3=60")
    parser.add_argument("--fail", type=int, default=0, help="make this part raise (tests)")
    # Internal: the child processes.
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-part", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--result", default="", help=argparse.SUPPRESS)
    parser.add_argument("--platform", default="", help=argparse.SUPPRESS)
    parser.add_argument("--measure", default="", help=argparse.SUPPRESS)
    parser.add_argument("--compare", default="", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.parts = [int(p) for p in args.parts.split(",") if p]
    unknown = sorted(set(args.parts) - set(PART_NAMES))
    if unknown:
        parser.error(f"--parts: no part {unknown[0]} (parts are 1-5)")
    internal = args.probe or args.run_part or args.measure or args.compare
    if not args.out and not internal:
        parser.error("--out DIR is required")
    return args


if __name__ == "__main__":
    args = parse()
    if args.probe:
        print(MARK + json.dumps(probe()))
    elif args.measure:
        print(MARK + json.dumps(measure(json.loads(args.measure))))
    elif args.compare:
        a, b, steps = args.compare.split(",")
        print(MARK + json.dumps(compare(a, b, int(steps))))
    elif args.run_part:
        sys.exit(run_part(args))
    else:
        sys.exit(main(args))
