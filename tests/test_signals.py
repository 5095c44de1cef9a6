"""Signals at the moments a preemptible VM sends them: during start-up, and during a
whole-split evaluation. Real `jaxtrain` processes and real signals.

A signal at an exact moment of start-up comes from the process itself: a sitecustomize
on PYTHONPATH (`SIGNAL_AT_IMPORT=jax`) sends it when that module is first imported, so
the handler runs in the middle of the import, as a notice in the first seconds would.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import CONFIGS, read_metrics

from jaxtrain import integrity
from jaxtrain.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED

GPT = os.path.join(CONFIGS, "gpt_pysource.py")
BIN = os.path.dirname(sys.executable)
STOPPED = "jaxtrain: stopped by {} before the first step: nothing new to save; rerun the same "
STOPPED += "command to continue\n"

SITECUSTOMIZE = """
import os, signal, sys

class _SignalAtImport:
    def find_spec(self, name, path=None, target=None):
        if name == os.environ["SIGNAL_AT_IMPORT"]:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), getattr(signal, os.environ.get("SIGNAL_NAME", "SIGTERM")))
        return None  # the import goes on: the handler interrupts it

if os.environ.get("SIGNAL_AT_IMPORT"):
    sys.meta_path.insert(0, _SignalAtImport())
"""


def _train_args(workdir, data_dir, *flags):
    return [
        "train",
        f"--config={GPT}:smoke",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        *flags,
    ]


def _signalled_at_import(tmp_path, module, command, signal_name="SIGTERM"):
    """Runs `command` with `signal_name` sent as `module` is first imported."""
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": str(hook), "SIGNAL_AT_IMPORT": module}
    env["SIGNAL_NAME"] = signal_name
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "signal_name, status, entry",
    [
        ("SIGTERM", EXIT_PREEMPTED, "jaxtrain"),
        ("SIGINT", EXIT_INTERRUPTED, "jaxtrain"),
        ("SIGTERM", EXIT_PREEMPTED, "python -m jaxtrain"),
    ],
)
def test_a_signal_while_jax_imports_stops_train_with_one_line(
    signal_name, status, entry, data_dir, tmp_path
):
    program = [os.path.join(BIN, "jaxtrain")] if entry == "jaxtrain" else [sys.executable, "-m"]
    program += [] if entry == "jaxtrain" else ["jaxtrain"]
    workdir = tmp_path / "run"
    done = _signalled_at_import(
        tmp_path, "jax", [*program, *_train_args(workdir, data_dir)], signal_name
    )
    assert done.returncode == status, done.stderr[-2000:]
    assert done.stderr == STOPPED.format(signal_name)  # that one line, nothing else
    assert not workdir.exists()


def test_a_signal_while_a_read_only_command_starts_is_one_line_and_75(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    jaxtrain = os.path.join(BIN, "jaxtrain")
    done = _signalled_at_import(tmp_path, "jax", [jaxtrain, "eval", f"--workdir={workdir}"])
    assert done.returncode == EXIT_PREEMPTED, done.stderr[-2000:]
    assert done.stderr == "jaxtrain: stopped by SIGTERM before jaxtrain eval finished; rerun it\n"
    assert os.listdir(workdir) == []


def test_the_command_module_imports_nothing_heavy_before_its_handler(tmp_path):
    # What the console script runs before `run()` installs the handler: this import.
    code = "import sys, jaxtrain.cli; print(sorted(m for m in ('jax', 'flax', 'orbax', " + (
        "'numpy', 'ml_collections', 'absl') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("module", ["ml_collections", "orbax.checkpoint", "flax.nnx", "grain"])
def test_a_sigterm_while_any_library_imports_is_one_line_and_75(module, data_dir, tmp_path):
    workdir = tmp_path / "run"
    command = [os.path.join(BIN, "jaxtrain"), *_train_args(workdir, data_dir)]
    done = _signalled_at_import(tmp_path, module, command)
    assert done.returncode == EXIT_PREEMPTED, done.stderr[-2000:]
    assert done.stderr == STOPPED.format("SIGTERM")
    assert not workdir.exists()


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.1, 0.3, 0.6, 1.0, 2.0, 4.0])
def test_a_sigterm_in_the_first_seconds_exits_75_with_one_line(delay, data_dir, tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        [os.path.join(BIN, "jaxtrain"), *_train_args(workdir, data_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(delay)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, stderr[-2000:]
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-2000:]
    trained = re.search(r"jaxtrain: preempted at step (\d+) \(SIGTERM\): checkpoint saved", stderr)
    if trained:  # an idle machine reaches the loop within the later delays: its own stop
        assert (workdir / "checkpoints" / trained.group(1)).is_dir(), stderr[-2000:]
        return
    # Later than the imports, libraries may log a line of their own first: ours is last.
    assert stderr.endswith(STOPPED.format("SIGTERM")) and stderr.count("jaxtrain:") == 1
    # Before the first step: nothing in a workdir, if it got as far as making one.
    assert not (workdir / "checkpoints").exists() or not os.listdir(workdir / "checkpoints")


# --- A signal during a whole-split evaluation ------------------------------------------


def _params(workdir, step):
    with ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"), options=ocp.CheckpointManagerOptions(read_only=True)
    ) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return restored["state"]["params"]


def _records(workdir):
    with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_a_sigterm_during_a_whole_split_evaluation_abandons_it_saves_and_exits_75(
    data_dir, tmp_path
):
    # Steps 1-4, a whole-split evaluation (~2,900 batches, tens of seconds) at steps 2 and 4.
    flags = [
        "--config.num_train_steps=4",
        "--config.eval_every_steps=2",
        "--config.checkpoint_every_steps=1000",
        "--config.log_every_steps=1",
    ]
    workdir = tmp_path / "run"
    command = [os.path.join(BIN, "jaxtrain"), *_train_args(workdir, data_dir, *flags)]
    proc = subprocess.Popen(
        [*command, "--config.eval_steps=-1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:  # step 2's train record is written just before its evaluation starts
                if 2 in read_metrics(workdir):
                    break
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.02)
        time.sleep(1.0)  # well into the evaluation
        assert proc.poll() is None, proc.communicate()
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
        took = time.monotonic() - signalled
    finally:
        proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, stderr[-2000:]
    # Not timed (a loaded machine would fail it): the record below says it stopped early.
    print(f"{took:.1f} s from SIGTERM to exit")
    assert "jaxtrain: preempted at step 2 (SIGTERM): checkpoint saved" in stderr
    assert "Traceback" not in stderr
    assert (workdir / "checkpoints" / "2" / integrity.COMMIT_MARKER).exists()
    [line] = [ln for ln in stdout.splitlines() if "abandoned after" in ln]
    assert line.startswith("evaluation at step 2 abandoned after ") and "(SIGTERM)" in line
    # Recorded as abandoned, never as a result: no eval record, no best rank.
    [abandoned] = [r for r in _records(workdir) if r["split"] == "eval_abandoned"]
    assert abandoned["step"] == 2 and 0 < abandoned["batches_done"] < abandoned["batches"]
    assert not [r for r in _records(workdir) if r["split"] == "eval"]
    with ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"), options=ocp.CheckpointManagerOptions(read_only=True)
    ) as manager:
        assert not manager.metadata(2).metrics  # saved as "not evaluated"

    # The rerun evaluates step 2 first, then trains on exactly as an uninterrupted run.
    rerun = subprocess.run(
        [*command, "--config.eval_steps=-1"], capture_output=True, text=True, timeout=600
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "step 2: evaluating it again" in rerun.stdout
    assert sorted(read_metrics(workdir, "eval")) == [2, 4]
    reference = tmp_path / "reference"
    # Evaluation reads the state only: the reference evaluates 1 batch, and trains the same.
    straight = subprocess.run(
        [os.path.join(BIN, "jaxtrain"), *_train_args(reference, data_dir, *flags)]
        + ["--config.eval_steps=1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert straight.returncode == 0, straight.stderr[-2000:]
    resumed, want = read_metrics(workdir), read_metrics(reference)
    assert [resumed[s]["loss"] for s in (1, 2, 3, 4)] == [want[s]["loss"] for s in (1, 2, 3, 4)]
    jax.tree.map(np.testing.assert_array_equal, _params(workdir, 4), _params(reference, 4))


@pytest.mark.slow
def test_two_processes_abandon_an_evaluation_at_the_same_batch(data_dir, tmp_path):
    """Only process 1 is signalled mid-evaluation; jax's preemption sync point makes both
    abandon at one batch (each batch is a collective: a difference would hang)."""
    import portpicker
    from test_multihost import _child_env

    address = f"localhost:{portpicker.pick_unused_port()}"
    workdir = tmp_path / "run"
    workers = []
    for process_id in range(2):
        command = [os.path.join(BIN, "jaxtrain")]
        command += _train_args(workdir, data_dir, "--config.num_train_steps=4")
        command += ["--config.eval_every_steps=2", "--config.eval_steps=-1"]
        command += ["--config.checkpoint_every_steps=1000", "--config.log_every_steps=1"]
        command += ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
        command += [f"--coordinator_address={address}", "--num_processes=2"]
        command += [f"--process_id={process_id}"]
        out = open(tmp_path / f"worker{process_id}.out", "w")  # noqa: SIM115
        workers.append(
            subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=_child_env())
        )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and all(p.poll() is None for p in workers):
            try:
                if 2 in read_metrics(workdir):
                    break
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.02)
        time.sleep(1.0)
        assert all(p.poll() is None for p in workers), "a worker ended before the signal"
        signalled = time.monotonic()
        workers[1].send_signal(signal.SIGTERM)
        for proc in workers:
            proc.wait(timeout=120)
        took = time.monotonic() - signalled
    finally:
        for proc in workers:
            proc.kill()
    logs = [(tmp_path / f"worker{i}.out").read_text() for i in range(2)]
    assert [p.returncode for p in workers] == [75, 75], [log[-2000:] for log in logs]
    assert took < 20, f"{took:.1f} s from SIGTERM to exit"
    assert all("preempted at step 2 (SIGTERM)" in log for log in logs)
    assert (workdir / "checkpoints" / "2" / integrity.COMMIT_MARKER).exists()
    [abandoned] = [r for r in _records(workdir) if r["split"] == "eval_abandoned"]
    assert 0 < abandoned["batches_done"] < abandoned["batches"]
