"""metrics.jsonl as a log: damage never blocks a resume, lines never glue, strict JSON;
the run's files on a full disk (a small tmpfs, `ulimit -f`): one line, exit 74, nothing lost.

The damage is real byte edits of the file the real writer wrote; the disks are real (a
tmpfs filled up, RLIMIT_FSIZE), in this process where no signal is involved and in real
`jaxtrain train` processes killed with SIGKILL where one is.
"""

import json
import logging
import math
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest
from conftest import CONFIGS, gpt_smoke_config, read_metrics

from jaxtrain import cli, integrity, metrics, plot, workdir
from jaxtrain.errors import EXIT_BAD_INPUT, EXIT_IO, ConfigError, StorageError
from jaxtrain.train import train_and_evaluate

GPT = os.path.join(CONFIGS, "gpt_pysource.py")
JAXTRAIN = os.path.join(os.path.dirname(sys.executable), "jaxtrain")


def _strict(line: bytes) -> dict:
    """A line as a strict JSON reader parses it: NaN, Infinity and -Infinity refused."""

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(line.decode("utf-8"), parse_constant=refuse)


def _log(tmp_path, steps=6) -> str:
    """A run directory whose metrics.jsonl the real writer wrote: train steps 1..`steps`,
    an eval at step 2 with a NaN and an infinity in it."""
    run = tmp_path / "run"
    run.mkdir()
    writer = metrics.MetricWriter(str(run), total_steps=steps, start_step=0)
    for step in range(1, steps + 1):
        writer.write(step, "train", {"loss": 5.0 - 0.1 * step, "lr": 1e-3 * step})
        if step == 2:
            writer.write(step, "eval", {"loss": math.nan, "perplexity": math.inf})
    writer.close()
    return str(run)


def _lines(run) -> list[bytes]:
    with open(os.path.join(run, "metrics.jsonl"), "rb") as f:
        return f.read().splitlines(keepends=True)


def test_non_finite_values_are_strict_json_and_read_back_as_floats(tmp_path):
    run = _log(tmp_path)
    lines = _lines(run)
    records = [_strict(line) for line in lines]  # every line, strictly
    [evaluation] = [r for r in records if r["split"] == "eval"]
    assert evaluation == {"step": 2, "split": "eval", "loss": "NaN", "perplexity": "Infinity"}
    [read] = [r for r in plot.read_metrics(run) if r["split"] == "eval"]
    assert math.isnan(read["loss"]) and read["perplexity"] == math.inf
    assert math.isnan(read_metrics(run, "eval")[2]["loss"])  # the tests' reader too


def test_an_old_log_with_bare_nan_is_read_and_rewritten_strict_at_the_next_start(tmp_path):
    run = _log(tmp_path)
    path = os.path.join(run, "metrics.jsonl")
    old = b"".join(_lines(run)).replace(b'"NaN"', b"NaN").replace(b'"Infinity"', b"Infinity")
    with open(path, "wb") as f:  # as jaxtrain wrote it before: json.dumps' bare constants
        f.write(old)
    assert math.isnan([r for r in plot.read_metrics(run) if r["split"] == "eval"][0]["loss"])
    metrics.MetricWriter(run, total_steps=6, start_step=6).close()
    assert [_strict(line) for line in _lines(run)][2]["perplexity"] == "Infinity"
    assert not os.path.exists(path + ".damaged")  # old, not damaged


# Each kind of damage: (what it does to the whole lines, whether a line is set aside).
DAMAGE = {
    "a line that is not UTF-8": lambda lines: lines[:2] + [b"\xff\xfe{\x00\x81\n"] + lines[2:],
    "a line that is JSON but not an object": lambda lines: lines[:2] + [b"[1, 2]\n"] + lines[2:],
    "a record whose step is a string": lambda lines: (
        lines[:2] + [re.sub(rb'"step": (\d+)', rb'"step": "\1"', lines[2], count=1)] + lines[3:]
    ),
    "garbage bytes in the middle of a line": lambda lines: (
        lines[:3] + [lines[3][:20] + b"\x00\x00garbage" + lines[3][30:]] + lines[4:]
    ),
    "a last line cut short by a kill": lambda lines: lines + [lines[-1][:25]],
    "a last line missing its newline": lambda lines: lines[:-1] + [lines[-1].rstrip(b"\n")],
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damage_is_set_aside_whole_records_are_kept_and_lines_never_glue(kind, tmp_path, caplog):
    run = _log(tmp_path)
    path = os.path.join(run, "metrics.jsonl")
    whole = _lines(run)
    damaged = DAMAGE[kind](list(whole))
    with open(path, "wb") as f:
        f.write(b"".join(damaged))
    bad = [
        line for line in damaged if line not in whole and line.rstrip(b"\n") + b"\n" not in whole
    ]

    with caplog.at_level(logging.WARNING):  # a start, resuming at step 4
        writer = metrics.MetricWriter(run, total_steps=8, start_step=4)
    writer.write(5, "train", {"loss": 1.0})
    writer.close()

    after = _lines(run)
    # Every whole record up to the checkpoint, byte for byte, and the new one after them.
    readable = [line.rstrip(b"\n") + b"\n" for line in damaged if line not in bad]
    assert after[:-1] == [line for line in readable if _strict(line)["step"] <= 4]
    assert _strict(after[-1]) == {"step": 5, "split": "train", "loss": 1.0}
    warnings = [r.getMessage() for r in caplog.records if "metrics.jsonl" in r.getMessage()]
    if bad:  # the unreadable lines, byte for byte, in .damaged; one warning says so
        with open(path + ".damaged", "rb") as f:
            assert f.read() == b"".join(line.rstrip(b"\n") + b"\n" for line in bad)
        [warning] = warnings
        assert "1 line(s)" in warning and path + ".damaged" in warning
    else:
        assert not os.path.exists(path + ".damaged") and not warnings
    # The next start finds nothing to set aside, so says nothing.
    caplog.clear()
    metrics.MetricWriter(run, total_steps=8, start_step=5).close()
    assert not [r for r in caplog.records if "metrics.jsonl" in r.getMessage()]


def test_eval_appends_onto_a_last_line_without_newline_on_a_line_of_its_own(tmp_path):
    run = _log(tmp_path)
    path = os.path.join(run, "metrics.jsonl")
    with open(path, "rb+") as f:
        f.truncate(os.path.getsize(path) - 1)  # the last record, whole, without its newline
    metrics.append(run, 6, "eval:test", {"loss": math.nan})
    *_, last, appended = _lines(run)
    assert _strict(last)["step"] == 6 and _strict(appended) == {
        "step": 6,
        "split": "eval:test",
        "loss": "NaN",
    }


@pytest.fixture
def file_size_limit():
    """Sets RLIMIT_FSIZE (what `ulimit -f` sets) in this process; put back afterwards.
    Python ignores SIGXFSZ, so a write past it fails with EFBIG."""
    assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN
    saved = resource.getrlimit(resource.RLIMIT_FSIZE)
    yield lambda size: resource.setrlimit(resource.RLIMIT_FSIZE, (size, saved[1]))
    resource.setrlimit(resource.RLIMIT_FSIZE, saved)


def test_a_metrics_write_past_the_file_size_limit_stops_the_run_and_is_cut_back(
    tmp_path, file_size_limit
):
    run = _log(tmp_path)
    path = os.path.join(run, "metrics.jsonl")
    writer = metrics.MetricWriter(run, total_steps=100, start_step=6)
    before = b"".join(_lines(run))
    file_size_limit(len(before) + 10)  # room for part of a line, not all of it
    try:
        with pytest.raises(StorageError) as raised:
            writer.write(7, "train", {"loss": 1.0, "grad_norm": 2.0})
    finally:
        file_size_limit(resource.RLIM_INFINITY)
        writer.close()
    assert str(raised.value) == (f"cannot write step 7's metrics to {path!r}: File too large")
    assert b"".join(_lines(run)) == before  # the part that was written, cut back off
    with pytest.raises(StorageError, match="cannot append to .*metrics.jsonl.*File too large"):
        file_size_limit(len(before) + 10)
        metrics.append(run, 6, "eval:test", {"loss": 1.0})
    file_size_limit(resource.RLIM_INFINITY)
    assert b"".join(_lines(run)) == before


def test_a_rewrite_of_the_log_that_fails_names_it_and_keeps_it(tmp_path, file_size_limit):
    run = _log(tmp_path)
    path = os.path.join(run, "metrics.jsonl")
    before = b"".join(_lines(run))
    file_size_limit(len(before) // 2)  # the rewrite (steps <= 4) needs more than this
    try:
        with pytest.raises(StorageError) as raised:
            metrics.MetricWriter(run, total_steps=8, start_step=4)
    finally:
        file_size_limit(resource.RLIM_INFINITY)
    assert str(raised.value) == f"cannot rewrite {path!r}: File too large"
    assert b"".join(_lines(run)) == before
    assert sorted(os.listdir(run)) == ["metrics.jsonl", "tensorboard"]  # no temporary


def test_tensorboard_events_past_the_file_size_limit_are_one_error_naming_the_file(
    tmp_path, file_size_limit
):
    board = tmp_path / "tensorboard"
    event_file = metrics.EventFile(str(board))
    size = os.path.getsize(event_file.path)
    file_size_limit(size + 10)
    try:
        with pytest.raises(StorageError, match="cannot write TensorBoard events to .*too large"):
            event_file.scalars(1, {f"train/metric{i}": 1.0 for i in range(20)})
    finally:
        file_size_limit(resource.RLIM_INFINITY)
        event_file.close()
    assert os.path.getsize(event_file.path) == size  # no half event for TensorBoard to trip on


@pytest.mark.parametrize("kind", ["a file", "under a file", "a dangling symlink"])
def test_a_workdir_that_is_not_a_directory_is_bad_input(kind, tmp_path):
    (tmp_path / "a_file").write_text("mine\n")
    os.symlink(tmp_path / "gone", tmp_path / "link")
    path = {
        "a file": tmp_path / "a_file",
        "under a file": tmp_path / "a_file" / "run",
        "a dangling symlink": tmp_path / "link",
    }[kind]
    with pytest.raises(ConfigError, match="is not a directory") as raised:
        with workdir.WorkdirLock(str(path)):
            pass
    assert repr(str(path)) in str(raised.value)
    assert (tmp_path / "a_file").read_text() == "mine\n" and not (tmp_path / "gone").exists()
    assert sorted(os.listdir(tmp_path)) == ["a_file", "link"]


def test_train_on_a_workdir_that_is_a_file_is_one_line_exit_2(data_dir, tmp_path, capsys):
    (tmp_path / "run").write_text("mine\n")
    argv = ["jaxtrain", "train", f"--config={GPT}:smoke", f"--workdir={tmp_path / 'run'}"]
    assert cli.main([*argv, f"--config.data.data_dir={data_dir}"]) == EXIT_BAD_INPUT
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == (
        f"jaxtrain: error: workdir {str(tmp_path / 'run')!r} is not a directory: it is a "
        "file; give a directory (made if missing)"
    )
    assert (tmp_path / "run").read_text() == "mine\n" and os.listdir(tmp_path) == ["run"]


def test_a_claim_that_cannot_be_written_is_exit_74_naming_the_lock(tmp_path, file_size_limit):
    with workdir.WorkdirLock(str(tmp_path)) as lock:
        file_size_limit(10)  # fewer bytes than the record
        try:
            with pytest.raises(StorageError, match="cannot write .*jaxtrain.lock.*too large"):
                lock.claim()
        finally:
            file_size_limit(resource.RLIM_INFINITY)


def test_a_damaged_energy_file_is_kept_aside_and_an_unwritable_one_is_exit_74(
    tmp_path, file_size_limit
):
    from jaxtrain import energy

    path = tmp_path / energy.ENERGY_FILE
    path.write_bytes(b'{"runs": [{"seconds": 1.0, "energy_k')  # cut short
    contents = energy.write(str(tmp_path), {"seconds": 2.0, "energy_kwh": 1e-3})
    assert [r["seconds"] for r in contents["runs"]] == [2.0]
    assert (tmp_path / "energy.json.damaged").read_bytes().endswith(b'"energy_k')
    before = path.read_bytes()
    file_size_limit(len(before) // 2)
    try:
        with pytest.raises(StorageError, match="cannot write .*energy.json.*too large"):
            energy.write(str(tmp_path), {"seconds": 3.0, "energy_kwh": 1e-3})
    finally:
        file_size_limit(resource.RLIM_INFINITY)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["energy.json", "energy.json.damaged"]


# --- Real runs ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_run_resumes_over_a_damaged_log(kind, data_dir, tmp_path, caplog):
    run = str(tmp_path / "run")
    train_and_evaluate(gpt_smoke_config(data_dir, steps=4, checkpoint_every_steps=2), run)
    path = os.path.join(run, "metrics.jsonl")
    whole = _lines(run)
    damaged = DAMAGE[kind](list(whole))
    with open(path, "wb") as f:
        f.write(b"".join(damaged))
    # The records the damage left whole (a last line missing its newline is one of them).
    kept = [line for line in whole if line in damaged or line.rstrip(b"\n") in damaged]
    with caplog.at_level(logging.WARNING):
        train_and_evaluate(gpt_smoke_config(data_dir, steps=6, checkpoint_every_steps=2), run)
    after = _lines(run)
    assert after[: len(kept)] == kept  # the checkpoint is step 4: every whole record kept
    assert [(_strict(x)["step"], _strict(x)["split"]) for x in after[len(kept) :]] == [
        (5, "train"),
        (6, "train"),
        (6, "eval"),
    ]
    kept_train = [_strict(x)["step"] for x in kept if _strict(x)["split"] == "train"]
    assert sorted(read_metrics(run)) == [*kept_train, 5, 6]
    warned = [r for r in caplog.records if "not metric records" in r.getMessage()]
    assert len(warned) == (kind != "a last line missing its newline")


def _train(workdir, data_dir, steps, *flags, ulimit_kib=None):
    command = [
        JAXTRAIN,
        "train",
        f"--config={GPT}:smoke",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        f"--config.num_train_steps={steps}",
        "--config.log_every_steps=1",
        "--config.eval_every_steps=100000",
        *flags,
    ]
    if ulimit_kib is not None:  # bash's ulimit -f counts KiB
        command = ["bash", "-c", f'ulimit -f {ulimit_kib}; exec "$@"', "bash", *command]
    return command


def _snapshot(root) -> dict[str, bytes]:
    found = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = f.read()
    return found


EVERY_5 = "--config.checkpoint_every_steps=5"


def _killed_after_a_checkpoint(workdir, data_dir) -> int:
    """A real run killed with SIGKILL 10 steps or more after a checkpoint of step 50 or later (one
    every 5 steps); returns the newest whole checkpoint's step."""
    proc = subprocess.Popen(
        _train(workdir, data_dir, 5000, EVERY_5),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = str(workdir / "checkpoints")
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if os.path.isdir(checkpoints):
                step = integrity.newest_whole_step(checkpoints)
                if step is not None and step >= 50 and max(read_metrics(workdir)) >= step + 10:
                    break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    step = integrity.newest_whole_step(checkpoints)
    assert step is not None and max(read_metrics(workdir)) > step, "the run did not get far enough"
    # A save the kill cut short: the rerun's start removes it (freeing room); done here, so
    # what is compared before and after is only what the rerun must keep.
    for name in os.listdir(checkpoints):
        if "tmp" in name:
            shutil.rmtree(os.path.join(checkpoints, name))
    return step


def _fill(disk, leave_pages):
    """Fills the tmpfs to its last byte, then frees `leave_pages` pages of 4 KiB."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    stat = os.statvfs(disk)
    assert stat.f_bavail == 0
    os.truncate(disk / "filler", os.path.getsize(disk / "filler") - leave_pages * 4096)


@pytest.mark.slow
@pytest.mark.parametrize(
    "room, named",
    [
        ("none", "config.json"),  # the first write that needs a new page
        ("enough for config.json", "metrics.jsonl"),  # the log's rewrite, past the checkpoint
    ],
)
def test_a_full_disk_at_resume_is_one_line_exit_74_and_changes_nothing(
    room, named, data_dir, small_disk
):
    run = small_disk / "run"
    resumed = _killed_after_a_checkpoint(run, data_dir)
    before = _snapshot(run)
    pages = 0 if room == "none" else -(-len(before["config.json"]) // 4096) + 1
    kept = [x for x in _lines(run) if _strict(x)["step"] <= resumed]
    assert len(b"".join(kept)) > (pages + 1) * 4096  # the log's rewrite cannot fit
    _fill(small_disk, pages)
    proc = subprocess.run(
        _train(run, data_dir, 5000, EVERY_5), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == EXIT_IO, proc.stderr[-3000:]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("jaxtrain: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert str(run / named) in errors[0] and "No space left on device" in errors[0]
    after = _snapshot(run)
    # Every file as it was (the lock records its holder), no temporary left; an energy
    # record of the failed part where it fitted.
    assert set(after) - set(before) <= {"energy.json"}, set(after) - set(before)
    for name, contents in before.items():
        assert name == workdir.LOCK_FILE or after[name] == contents, name
    # Room again: the same command resumes and logs each step once.
    os.remove(small_disk / "filler")
    last = resumed + 3
    proc = subprocess.run(
        _train(run, data_dir, last, EVERY_5), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(read_metrics(run)) == list(range(1, last + 1))


@pytest.mark.slow
def test_ulimit_f_at_resume_and_mid_run_is_one_line_exit_74_and_loses_nothing(data_dir, tmp_path):
    run = tmp_path / "run"
    resumed = _killed_after_a_checkpoint(run, data_dir)
    before = _snapshot(run)
    kept = b"".join(x for x in _lines(run) if _strict(x)["step"] <= resumed)
    limit = len(kept) // 1024 - 1  # KiB: config.json fits, the log's rewrite does not
    assert limit * 1024 > len(before["config.json"])
    proc = subprocess.run(
        _train(run, data_dir, 5000, EVERY_5, ulimit_kib=limit),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == EXIT_IO, proc.stderr[-3000:]  # not killed by SIGXFSZ
    [error] = [x for x in proc.stderr.splitlines() if x.startswith("jaxtrain: error:")]
    assert (
        error == f"jaxtrain: error: cannot rewrite {str(run / 'metrics.jsonl')!r}: File too large"
    )
    after = _snapshot(run)
    assert all(after[k] == v for k, v in before.items() if k != workdir.LOCK_FILE)

    # Mid-run: the log grows past the limit while training (before any checkpoint, whose
    # files would pass it first); the run stops at that line.
    shutil.rmtree(run)
    proc = subprocess.run(
        _train(run, data_dir, 5000, "--config.checkpoint_every_steps=100000", ulimit_kib=8),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == EXIT_IO, proc.stderr[-3000:]
    [error] = [x for x in proc.stderr.splitlines() if x.startswith("jaxtrain: error:")]
    # Whichever passes the limit first: the log or the event file (hparams are one big event).
    assert error.endswith(": File too large") and (
        f"metrics to {str(run / 'metrics.jsonl')!r}" in error
        or f"TensorBoard events to {str(run / 'tensorboard')!r}"[:-1] in error
    ), error
    [events] = os.listdir(run / "tensorboard")
    data, pos = (run / "tensorboard" / events).read_bytes(), 0
    while pos < len(data):  # whole frames to the last byte: no half event
        pos += 12 + struct.unpack("<Q", data[pos : pos + 8])[0] + 4
    assert pos == len(data)
    assert "Traceback" not in proc.stderr
    logged = _lines(run)
    assert all(line.endswith(b"\n") and _strict(line) for line in logged)  # no half line
    # Without the limit the same command starts again (no checkpoint yet); each step once.
    last = len(logged) + 5
    proc = subprocess.run(
        _train(run, data_dir, last, "--config.checkpoint_every_steps=100000"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(read_metrics(run)) == list(range(1, last + 1))
