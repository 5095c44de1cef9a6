"""Exact resume: kill a real run at various points, rerun the same command, lose nothing.

Every test compares against one uninterrupted run of the same command: every logged
metric (timings aside) and the final parameters must be bitwise identical.
"""

import glob
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
from conftest import CONFIGS, TIMINGS, read_metrics

from jaxtrain.errors import EXIT_PREEMPTED

GPT = os.path.join(CONFIGS, "gpt_pysource.py")
STEPS = 60


def _command(workdir, data_dir, checkpoint_every=10):
    return [
        os.path.join(os.path.dirname(sys.executable), "jaxtrain"),
        "train",
        f"--config={GPT}:smoke",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        f"--config.num_train_steps={STEPS}",
        f"--config.checkpoint_every_steps={checkpoint_every}",
        "--config.log_every_steps=1",
        "--config.eval_every_steps=30",
        # Dropout on, so the comparison covers the dropout RNG resuming exactly too.
        "--config.model.dropout_rate=0.1",
    ]


def _run(command):
    return subprocess.run(command, check=True, timeout=300, capture_output=True, text=True)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    _run(_command(workdir, data_dir))
    return workdir


def _start_and_kill(command, ready, sig=signal.SIGKILL):
    """Starts `command`, sends `sig` once `ready()` is true, returns the exit status."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before the kill point: {proc.stderr.read()}"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    return proc.returncode, stderr


def _logged_step(workdir, at_least):
    def ready():
        try:
            return max(read_metrics(workdir), default=0) >= at_least
        except (FileNotFoundError, ValueError):  # not yet written, or a line half-written
            return False

    return ready


def _final_params(workdir):
    with ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"), options=ocp.CheckpointManagerOptions(read_only=True)
    ) as manager:
        assert manager.latest_step() == STEPS
        restored = manager.restore(STEPS, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return restored["state"]["params"]


def _assert_identical_runs(workdir, reference):
    for split in ("train", "eval"):
        got, want = read_metrics(workdir, split), read_metrics(reference, split)
        assert sorted(got) == sorted(want)  # every step logged exactly once
        for step in want:
            strip = lambda r: {k: v for k, v in r.items() if k not in TIMINGS}  # noqa: E731
            assert strip(got[step]) == strip(want[step]), (split, step)
    jax.tree.map(np.testing.assert_array_equal, _final_params(workdir), _final_params(reference))


@pytest.mark.slow
def test_kill_between_steps_before_any_checkpoint(reference, data_dir, tmp_path):
    status, _ = _start_and_kill(_command(tmp_path, data_dir), _logged_step(tmp_path, 3))
    assert status == -signal.SIGKILL
    assert not os.path.isdir(tmp_path / "checkpoints" / "10")
    _run(_command(tmp_path, data_dir))
    _assert_identical_runs(tmp_path, reference)


@pytest.mark.slow
def test_kill_right_after_a_checkpoint_commits(reference, data_dir, tmp_path):
    committed = tmp_path / "checkpoints" / "20"  # Orbax renames a step into place on commit
    status, _ = _start_and_kill(_command(tmp_path, data_dir), committed.is_dir)
    assert status == -signal.SIGKILL and max(read_metrics(tmp_path)) < STEPS
    rerun = _run(_command(tmp_path, data_dir))
    assert "resumed at 20" in rerun.stdout or "resumed at 30" in rerun.stdout
    _assert_identical_runs(tmp_path, reference)


@pytest.mark.slow
def test_kill_during_asynchronous_saves(reference, data_dir, tmp_path):
    # Saving every step keeps an asynchronous save in flight nearly all the time.
    command = _command(tmp_path, data_dir, checkpoint_every=1)
    status, _ = _start_and_kill(command, _logged_step(tmp_path, 15))
    assert status == -signal.SIGKILL
    leftovers = glob.glob(str(tmp_path / "checkpoints" / "*tmp*"))
    _run(command)
    _assert_identical_runs(tmp_path, reference)
    # A save cut short is never taken as a checkpoint (when the kill caught one).
    for path in leftovers:
        assert not os.path.basename(path).isdigit()


@pytest.mark.slow
def test_sigterm_saves_and_exits_for_a_rerun(reference, data_dir, tmp_path):
    status, stderr = _start_and_kill(
        _command(tmp_path, data_dir), _logged_step(tmp_path, 5), sig=signal.SIGTERM
    )
    assert status == EXIT_PREEMPTED, stderr
    stopped_at = max(read_metrics(tmp_path))
    assert f"preempted at step {stopped_at}" in stderr
    # The stop step was checkpointed (it is not a multiple of checkpoint_every_steps).
    assert os.path.isdir(tmp_path / "checkpoints" / str(stopped_at))
    rerun = _run(_command(tmp_path, data_dir))
    assert f"resumed at {stopped_at}" in rerun.stdout
    _assert_identical_runs(tmp_path, reference)


@pytest.mark.slow
@pytest.mark.parametrize(
    "item, edit",
    [
        # The data position one example on: without its digest the rerun would resume
        # at another example, silently.
        ("data", lambda text: re.sub(r'"examples_seen": (\d+)', r'"examples_seen": 1\1', text)),
        # A changed seed in the stored config: damage, not a user's config change.
        ("config", lambda text: text.replace('"seed": 0', '"seed": 1', 1)),
    ],
)
def test_a_changed_item_sets_the_step_aside_and_the_rerun_is_exact(
    item, edit, reference, data_dir, tmp_path
):
    committed = tmp_path / "checkpoints" / "20"
    status, _ = _start_and_kill(_command(tmp_path, data_dir), committed.is_dir)
    assert status == -signal.SIGKILL
    newest = max(int(n) for n in os.listdir(tmp_path / "checkpoints") if n.isdigit())
    path = tmp_path / "checkpoints" / str(newest) / item / "metadata"
    text = path.read_text(encoding="utf-8")
    path.write_text(edit(text), encoding="utf-8")
    assert path.read_text(encoding="utf-8") != text
    rerun = _run(_command(tmp_path, data_dir))
    assert f"checkpoint step {newest}" in rerun.stderr and f"item '{item}'" in rerun.stderr
    assert f"resumed at {newest - 10}" in rerun.stdout
    assert f"{newest}.damaged" in os.listdir(tmp_path / "checkpoints")
    _assert_identical_runs(tmp_path, reference)
