"""What a red team broke, each fixed at its mechanism and tried again here.

Signals, locks, pipes and disks are tried on real `jaxtrain train` processes; checksum
and read-failure cases in this process, with faults injected where the bytes are read.
"""

import errno
import gc
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import CONFIGS, gpt_smoke_config, read_metrics
from orbax.checkpoint._src.serialization import serialization as orbax_serialization

import jaxtrain
from jaxtrain import cli, integrity, tasks
from jaxtrain.errors import EXIT_INTERRUPTED, EXIT_IO, EXIT_PREEMPTED, StorageError
from jaxtrain.nonfinite import NonFiniteError

GPT = os.path.join(CONFIGS, "gpt_pysource.py")
JAXTRAIN = os.path.join(os.path.dirname(sys.executable), "jaxtrain")


def _command(workdir, data_dir, steps=5000, *flags):
    return [
        JAXTRAIN,
        "train",
        f"--config={GPT}:smoke",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        f"--config.num_train_steps={steps}",
        "--config.log_every_steps=1",
        "--config.eval_every_steps=100000",
        "--config.checkpoint_every_steps=100000",
        *flags,
    ]


def _cli(workdir, data_dir, *flags):
    """`jaxtrain train` of the GPT smoke config, in this process."""
    return cli.main(
        [
            "jaxtrain",
            "train",
            f"--config={GPT}:smoke",
            f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}",
            *flags,
        ]
    )


def _start(command, **kwargs):
    return subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kwargs
    )


def _wait_for_step(proc, workdir, step, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if max(read_metrics(workdir), default=0) >= step:
                return
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.01)
    raise AssertionError(f"no step {step} logged; {proc.poll()=}")


def _committed(workdir, step):
    return (workdir / "checkpoints" / str(step) / integrity.COMMIT_MARKER).exists()


# --- Preemption always ends in a committed checkpoint and exit 75 --------------------------


@pytest.mark.slow
@pytest.mark.parametrize("second", ["one second later", "a flood every 20 ms"])
def test_more_sigterms_never_cut_the_save_short(second, data_dir, tmp_path):
    proc = _start(_command(tmp_path, data_dir))
    try:
        _wait_for_step(proc, tmp_path, 3)
        proc.send_signal(signal.SIGTERM)
        if second == "one second later":
            time.sleep(1)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        else:
            while proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                time.sleep(0.02)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, stderr[-2000:]
    step = max(read_metrics(tmp_path))
    assert f"preempted at step {step} (SIGTERM): checkpoint saved" in stderr
    assert _committed(tmp_path, step)
    assert not [p for p in os.listdir(tmp_path / "checkpoints") if "tmp" in p]
    assert "Traceback" not in stderr


@pytest.mark.slow
def test_sigterm_before_the_first_step_exits_75_at_once(data_dir, tmp_path):
    proc = _start(_command(tmp_path, data_dir))
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "config.json").exists() and time.monotonic() < deadline:
            time.sleep(0.005)  # written just before the state is made and the step compiled
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, stderr[-2000:]
    assert "stopped by SIGTERM before the first step" in stderr or "preempted at step" in stderr
    assert "Traceback" not in stderr


# The bundled LM task, whose example reads hang once a marker file exists: a run stuck
# waiting for its input, which only a second Ctrl-C can end.
STALLING_TASK = """
import dataclasses, os, time
from jaxtrain import data
from jaxtrain.tasks import lm


def make_task(config):
    task = lm.make_task(config)

    def read(example):
        while os.path.exists(os.environ["STALL_MARKER"]):
            time.sleep(0.05)
        return example

    return dataclasses.replace(task, data=lambda: data.as_dataset(task.data).map(read))
"""


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_130_and_a_second_stops_at_once(data_dir, tmp_path):
    proc = _start(_command(tmp_path / "once", data_dir))
    try:
        _wait_for_step(proc, tmp_path / "once", 3)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED, stderr[-2000:]
    step = max(read_metrics(tmp_path / "once"))
    assert f"preempted at step {step} (SIGINT)" in stderr and _committed(tmp_path / "once", step)
    assert "Traceback" not in stderr

    (tmp_path / "stalling_task.py").write_text(STALLING_TASK)
    marker = tmp_path / "stall"
    workdir = tmp_path / "twice"
    proc = _start(
        _command(workdir, data_dir, 5000, "--config.task=stalling_task:make_task"),
        cwd=tmp_path,
        env={**os.environ, "STALL_MARKER": str(marker)},
    )
    try:
        _wait_for_step(proc, workdir, 3)
        marker.touch()  # from now on the input never delivers another example
        last, still = max(read_metrics(workdir)), 0
        while still < 20:  # until no step has been logged for 2 s: the run waits for input
            time.sleep(0.1)
            now = max(read_metrics(workdir))
            last, still = now, (still + 1 if now == last else 0)
        proc.send_signal(signal.SIGINT)  # asks for a save at the next step: never comes
        time.sleep(1)
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED, stderr[-2000:]
    assert "SIGINT: saving a checkpoint at the next step boundary" in stderr
    assert "second Ctrl-C: exiting now" in stderr


# --- One run per workdir ------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_run_on_a_busy_workdir_is_refused_untouched(data_dir, tmp_path):
    first = _start(_command(tmp_path, data_dir))
    try:
        _wait_for_step(first, tmp_path, 2)
        second = subprocess.run(
            _command(tmp_path, data_dir), capture_output=True, text=True, timeout=240
        )
        assert second.returncode == 2
        [line] = second.stderr.strip().splitlines()[-1:]
        assert line.startswith("jaxtrain: error: workdir")
        assert f"in use by another run (pid {first.pid} on " in line
        assert first.poll() is None  # the first run was not disturbed
        _wait_for_step(first, tmp_path, max(read_metrics(tmp_path)) + 2)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        first.kill()
    # The OS freed the dead run's lock: a rerun is not refused.
    rerun = subprocess.run(
        _command(tmp_path, data_dir, steps=3), capture_output=True, text=True, timeout=240
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]


# --- Never load garbage -------------------------------------------------------------------


def _train(data_dir, workdir, steps, **overrides):
    config = gpt_smoke_config(data_dir, steps, checkpoint_every_steps=2, **overrides)
    return jaxtrain.train_and_evaluate(config, str(workdir))


@pytest.fixture(scope="module")
def four_steps(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("four_steps")
    _train(data_dir, workdir, 4)
    return workdir


@pytest.mark.slow
def test_a_flipped_bit_is_caught_and_the_run_falls_back(
    four_steps, data_dir, tmp_path, caplog, capsys
):
    caught = []
    for trial in range(5):
        workdir = tmp_path / str(trial)
        shutil.copytree(four_steps, workdir)
        files = sorted((workdir / "checkpoints" / "4" / "state").rglob("d/*"), key=os.path.getsize)
        with open(files[-1], "r+b") as f:  # one bit of the largest array file, same length
            data = bytearray(f.read())
            position = random.Random(trial).randrange(len(data) * 8)
            data[position // 8] ^= 1 << (position % 8)
            f.seek(0)
            f.write(data)
        caplog.clear()
        capsys.readouterr()
        with caplog.at_level(logging.WARNING):
            state, _ = _train(data_dir, workdir, 6)
        assert int(state.step) == 6
        warnings = {
            r.getMessage() for r in caplog.records if "trying the previous" in r.getMessage()
        }
        if "resumed at 4" in capsys.readouterr().out:
            # The flip hit bytes no array reads (padding, an unused index field): every
            # array matched its checksum, so step 4 was whole.
            assert not warnings
            continue
        # Otherwise the run fell back to step 2, named step 4 and why, and kept it aside.
        assert len(warnings) == 1 and "checkpoint step 4" in next(iter(warnings)), warnings
        assert "4.damaged" in os.listdir(workdir / "checkpoints")
        caught.extend(warnings)
    # Most flips decode to wrong numbers that only the checksum can tell.
    assert any("does not match its checksum" in cause for cause in caught), caught


def test_checksums_cost_one_pass_over_the_state_and_survive_another_mesh(four_steps):
    sums = integrity.saved_json(str(four_steps / "checkpoints" / "4"), integrity.CHECKSUMS_ITEM)
    # Every array of the state has its checksum: parameters, moments, the optimizer's counts.
    assert "params/blocks/0/attn/key/kernel" in sums and "opt_state/1/count" in sums
    assert "opt_state/1/inner_state/0/mu/blocks/0/attn/key/kernel" in sums
    config = gpt_smoke_config(mesh={"fsdp": 4, "tensor": 2})
    from conftest import build

    _, layout, _, _ = build(config)
    checkpointer = jaxtrain.Checkpointer(str(four_steps), config.checkpoint)
    try:
        state, _ = checkpointer.restore(4, layout.abstract_state)  # verified on restore
    finally:
        checkpointer.close()
    assert integrity.checksum_mismatch(state, sums) is None
    assert int(state.step) == 4


def test_a_transient_read_failure_stops_the_run_and_keeps_the_step(
    four_steps, data_dir, tmp_path, monkeypatch
):
    workdir = tmp_path / "run"
    shutil.copytree(four_steps, workdir)

    async def unreadable(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(orbax_serialization, "_read_array_index_and_device_put", unreadable)
    with pytest.raises(StorageError, match="cannot read checkpoint .*checkpoints/4.*Input/output"):
        _train(data_dir, workdir, 6)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]  # nothing set aside
    monkeypatch.undo()

    # Vetting too: a permission error is not damage.
    def denied(step_dir, *parts):
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(step_dir, *parts))

    monkeypatch.setattr(integrity, "_read_json", denied)
    assert _cli(workdir, data_dir) == EXIT_IO
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]


def test_when_every_checkpoint_is_damaged_the_run_refuses_to_start_over(
    four_steps, data_dir, tmp_path, capsys
):
    workdir = tmp_path / "run"
    shutil.copytree(four_steps, workdir)
    for step in ("2", "4"):
        os.remove(workdir / "checkpoints" / step / integrity.COMMIT_MARKER)
    before = sorted(os.listdir(workdir / "checkpoints"))
    assert _cli(workdir, data_dir) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "every checkpoint in" in line and "restart_if_all_damaged=True" in line
    assert sorted(os.listdir(workdir / "checkpoints")) == before
    # Asked for, it starts over (the damaged steps kept aside).
    assert _cli(workdir, data_dir, "--config.checkpoint.restart_if_all_damaged=True") == 0
    assert "resumed" not in capsys.readouterr().out
    assert {"2.damaged", "4.damaged", "4"} <= set(os.listdir(workdir / "checkpoints"))


# --- A resumed run is the same run ----------------------------------------------------------


def test_a_changed_config_is_refused_on_resume_unless_allowed(
    four_steps, data_dir, tmp_path, capsys
):
    workdir = tmp_path / "run"
    shutil.copytree(four_steps, workdir)
    every_2 = "--config.checkpoint_every_steps=2"
    with open(workdir / "config.json", "rb") as f:
        config_json = f.read()
    changed = ("--config.global_batch_size=32", "--config.optim.lr=0.01")
    assert _cli(workdir, data_dir, every_2, *changed) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "global_batch_size: 16 -> 32" in line and "optim.lr: 0.003 -> 0.01" in line
    assert "allow_config_changes=True" in line
    with open(workdir / "config.json", "rb") as f:
        assert f.read() == config_json  # not overwritten

    # Changes people make on purpose: more steps, other intervals.
    on_purpose = ("--config.num_train_steps=6", "--config.log_every_steps=1")
    assert _cli(workdir, data_dir, every_2, *on_purpose) == 0
    # Asked for: a new batch size continues with the next example, not the next batch.
    allowed = "--config.checkpoint.allow_config_changes=True"
    bigger = ("--config.num_train_steps=8", "--config.global_batch_size=32", allowed)
    assert _cli(workdir, data_dir, every_2, *bigger) == 0
    with ocp.CheckpointManager(workdir / "checkpoints") as manager:
        data_state = manager.restore(8, args=ocp.args.Composite(data=ocp.args.JsonRestore()))[
            "data"
        ]
    assert data_state == {"examples_seen": 6 * 16 + 2 * 32}


# --- Non-finite state, not only non-finite gradients ----------------------------------------


def test_a_nan_learning_rate_never_reaches_the_state(data_dir, tmp_path):
    config = gpt_smoke_config(data_dir, 4, checkpoint_every_steps=2)
    task = tasks.from_config(config)
    nan_lr = task.__class__(
        **{**task.__dict__, "optimizer": lambda schedule: optax.sgd(float("nan"))}
    )
    with pytest.raises(NonFiniteError, match="step 1: the update would make the state non-finite"):
        jaxtrain.train_and_evaluate(config, str(tmp_path), task=nan_lr)
    # The abort came before any save: no checkpoint of a non-finite state exists.
    assert not os.listdir(tmp_path / "checkpoints")


def test_an_abort_at_a_checkpoint_step_happens_again_on_rerun(data_dir, tmp_path):
    from test_nonfinite import _poisoned

    config = gpt_smoke_config(data_dir, 6, checkpoint_every_steps=2)
    for _ in range(2):
        with pytest.raises(NonFiniteError, match="step 4: non-finite"):
            jaxtrain.train_and_evaluate(config, str(tmp_path), task=_poisoned(config, (4,)))
        assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def test_a_non_finite_evaluation_is_reported(data_dir, tmp_path, capsys):
    config = gpt_smoke_config(data_dir, 2)
    task = tasks.from_config(config)
    examples = jaxtrain.data.as_dataset(task.eval_data)
    bad_eval = examples.map(lambda e: {**e, "inputs": np.full_like(e["inputs"], 256)})
    task = task.__class__(**{**task.__dict__, "eval_data": bad_eval})
    _, result = jaxtrain.train_and_evaluate(config, str(tmp_path), task=task)
    assert not np.isfinite(result["loss"])
    assert "step 2: evaluation is not finite (loss=nan" in capsys.readouterr().out


# --- One clear line for every failure -------------------------------------------------------


@pytest.mark.slow
def test_losing_the_console_never_stops_the_run(data_dir, tmp_path):
    command = " ".join(_command(tmp_path, data_dir, steps=30)) + " | head -n 3"
    proc = subprocess.run(
        ["bash", "-c", f"{command}; exit ${{PIPESTATUS[0]}}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout.splitlines()) == 3
    assert sorted(read_metrics(tmp_path)) == list(range(1, 31))
    assert "BrokenPipeError" not in proc.stderr


@pytest.mark.slow
def test_a_full_disk_mid_run_is_one_line_and_exit_74(data_dir, small_disk):
    workdir = small_disk / "run"
    proc = subprocess.run(
        _command(
            workdir,
            data_dir,
            400,
            "--config.checkpoint_every_steps=1",
            "--config.checkpoint.keep_latest=1000",
            "--config.model.mlp_dim=1024",
        ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == EXIT_IO, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("jaxtrain: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "No space left on device" in errors[0] and str(workdir) in errors[0]
    assert "is intact" in errors[0]
    assert "Event loop is closed" not in proc.stderr  # tensorstore's late callbacks, dropped
    good = integrity.newest_whole_step(str(workdir / "checkpoints"))
    assert good is not None and good >= 1


def test_a_failed_compile_is_the_runs_error_and_leaves_no_thread(data_dir, tmp_path, monkeypatch):
    # XLA compiles the train step in a background thread while the state is created.
    failed_in = []

    def fail(self):
        failed_in.append(threading.current_thread().name)
        raise RuntimeError("RESOURCE_EXHAUSTED: simulated compile failure")

    monkeypatch.setattr(jax.stages.Lowered, "compile", fail)
    with pytest.raises(RuntimeError, match="simulated compile failure"):
        jaxtrain.train_and_evaluate(gpt_smoke_config(data_dir), str(tmp_path / "run"))
    assert len(failed_in) == 1 and failed_in[0].startswith("jaxtrain-compile"), failed_in
    assert not [t for t in threading.enumerate() if t.name.startswith("jaxtrain-compile")]
    assert not (tmp_path / "run" / "checkpoints").exists() or not os.listdir(
        tmp_path / "run" / "checkpoints"
    )


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.data.seq_len=0", "config.data.seq_len must be a positive integer, got 0"),
        ("--config.data.seq_len=-8", "config.data.seq_len must be a positive integer, got -8"),
        ("--config.data.name=", "config.data.name is empty"),
        ("--config.model.num_heads=0", "num_heads=0 must be a positive integer"),
        ("--config.model.dropout_rate=2.0", "dropout_rate=2.0 must be in [0, 1)"),
        ("--config.optim.warmup_steps=-5", "config.optim.warmup_steps must be an integer >= 0"),
        ("--config.data.read_threads=-1", "config.data.read_threads must be an integer >= 0"),
        (
            "--config.num_train_steps=100000000000000000000",
            "config.num_train_steps must be at most",
        ),
        ("--config.optim.lr=nan", "config.optim.lr must be a finite number >= 0"),
    ],
)
def test_out_of_range_values_are_one_line_exit_2(flag, message, data_dir, tmp_path, capsys):
    workdir = tmp_path / "run"
    assert _cli(workdir, data_dir, flag) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("jaxtrain: error: ") and message in line, line
    assert not workdir.exists()


def test_a_data_dir_that_cannot_hold_data_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    frozen = gc.get_freeze_count()
    status = cli.main(
        [
            "jaxtrain",
            "train",
            f"--config={GPT}:smoke",
            f"--workdir={tmp_path / 'run'}",
            f"--config.data.data_dir={tmp_path / 'a_file' / 'tfds'}",
        ]
    )
    assert status == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "cannot prepare data set 'pysource'" in line and "Not a directory" in line
    assert not (tmp_path / "run").exists()
    # Only the command's own process freezes its imports (cli._freeze_imports), not a
    # Python caller's.
    assert gc.get_freeze_count() == frozen


@pytest.mark.slow
def test_two_first_use_builds_of_one_data_dir_take_turns(tmp_path):
    fresh = tmp_path / "tfds"
    runs = [
        subprocess.Popen(
            [
                JAXTRAIN,
                "train",
                f"--config={GPT}:smoke",
                f"--workdir={tmp_path / str(i)}",
                f"--config.data.data_dir={fresh}",
                "--config.num_train_steps=1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for run in runs:
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr[-2000:]
