"""Damaged data sets: real byte edits of real ArrayRecord shards and metadata files.

A bundled data set found damaged at first use is set aside (`*.damaged`) and rebuilt; a
data set jaxtrain cannot rebuild, or damage found mid-run, is one line and exit 65.
Each test damages its own copy of the session's data sets, never the shared data_dir.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import CONFIGS, TIMINGS, read_metrics

from jaxtrain import integrity
from jaxtrain.data import pipeline
from jaxtrain.errors import EXIT_DATA, DataError, StorageError

DIGITS = os.path.join(CONFIGS, "digits_cnn.py")
JAXTRAIN = os.path.join(os.path.dirname(sys.executable), "jaxtrain")


def _copy_digits(data_dir, tmp_path):
    """A private copy of the bundled digits data set; returns (data dir, version dir)."""
    pipeline.from_tfds("digits", "train", data_dir=data_dir)  # built once per session
    root = tmp_path / "tfds"
    shutil.copytree(os.path.join(data_dir, "digits"), root / "digits")
    return root, root / "digits" / "1.0.0"


def _shard(version_dir, split):
    [name] = [p for p in os.listdir(version_dir) if f"-{split}.array_record" in p]
    return version_dir / name


def _flip(path, start=0.25, length=16):
    """Inverts `length` bytes from `start` (a fraction of the file): inside its records."""
    with open(path, "r+b") as f:
        f.seek(int(os.path.getsize(path) * start))
        offset = f.tell()
        data = f.read(length)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def _damage(version_dir, split, kind):
    shard = _shard(version_dir, split)
    if kind == "flipped bytes":
        _flip(shard)
    elif kind == "truncated shard":
        os.truncate(shard, os.path.getsize(shard) // 2)
    elif kind == "empty shard":
        os.truncate(shard, 0)
    elif kind == "deleted shard":
        os.remove(shard)
    elif kind == "garbled dataset_info.json":
        (version_dir / "dataset_info.json").write_text('{"name": "digits", garbage')
    elif kind == "deleted dataset_info.json":
        os.remove(version_dir / "dataset_info.json")
    elif kind == "garbled features.json":
        (version_dir / "features.json").write_text('{"featuresDict')
    return shard


def _labels(records):
    return [int(records[i]["label"]) for i in range(len(records))]


# --- In this process: detection, the message, the rebuild ---------------------------------


def test_a_flipped_byte_in_a_bundled_shard_is_set_aside_and_rebuilt(data_dir, tmp_path, capsys):
    root, version_dir = _copy_digits(data_dir, tmp_path)
    shard = _damage(version_dir, "test", "flipped bytes")
    damaged_bytes = shard.read_bytes()
    capsys.readouterr()
    records = pipeline.from_tfds("digits", "test", data_dir=str(root))
    # One line of ours (TFDS adds its own "Downloading and preparing" lines).
    [line] = [line for line in capsys.readouterr().out.splitlines() if "damaged" in line]
    assert re.fullmatch(
        re.escape(f"preparing data set 'digits' in {version_dir} (again: {shard} is damaged: ")
        + "Corrupted Riegeli/records file: chunk (data|header) hash mismatch"
        + re.escape(f"; set aside as {version_dir}.damaged)"),
        line,
    ), line
    # The damaged version is kept as it was; the rebuilt one holds the same examples.
    assert (version_dir.parent / "1.0.0.damaged" / shard.name).read_bytes() == damaged_bytes
    assert _labels(records) == _labels(pipeline.from_tfds("digits", "test", data_dir=data_dir))
    capsys.readouterr()
    pipeline.from_tfds("digits", "test", data_dir=str(root))  # checked again: nothing to do
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    "kind", ["flipped bytes", "truncated shard", "empty shard", "deleted shard"]
)
def test_a_damaged_shard_of_a_set_jaxtrain_cannot_rebuild_is_one_data_error(
    kind, data_dir, tmp_path
):
    _, version_dir = _copy_digits(data_dir, tmp_path)
    own = tfds.builder_from_directory(str(version_dir))  # a user's own prepared data set
    shard = _damage(version_dir, "train", kind)
    records = pipeline.from_tfds(own, "train")
    with pytest.raises(DataError) as caught:
        for i in range(len(records)):
            records[i]
    message = str(caught.value)
    assert isinstance(caught.value, StorageError)  # caught by callers who catch those
    assert "\n" not in message
    assert message.startswith(f"data set 'digits' is damaged: {shard}: ")
    assert f"mv {version_dir} {version_dir}.damaged" in message
    assert os.path.isdir(version_dir)  # not ours to move


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind",
    [
        "truncated shard",
        "empty shard",
        "deleted shard",
        "garbled dataset_info.json",
        "deleted dataset_info.json",
        "garbled features.json",
    ],
)
def test_every_kind_of_damage_to_a_bundled_set_is_rebuilt(kind, data_dir, tmp_path, capsys):
    root, version_dir = _copy_digits(data_dir, tmp_path)
    _damage(version_dir, "train", kind)
    capsys.readouterr()
    records = pipeline.from_tfds("digits", "train", data_dir=str(root))
    out = capsys.readouterr().out
    assert "set aside as" in out and "is damaged" in out, out
    assert sorted(os.listdir(version_dir.parent)) == ["1.0.0", "1.0.0.damaged"]
    assert _labels(records) == _labels(pipeline.from_tfds("digits", "train", data_dir=data_dir))


# --- Real `jaxtrain` processes ----------------------------------------------------------


def _train_command(workdir, root, *flags):
    return [
        JAXTRAIN,
        "train",
        f"--config={DIGITS}:smoke",
        f"--workdir={workdir}",
        f"--config.data.data_dir={root}",
        "--config.log_every_steps=1",
        *flags,
    ]


def _run(command, **kwargs):
    return subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)


def _losses(workdir):
    return {
        step: {k: v for k, v in r.items() if k not in TIMINGS}
        for step, r in read_metrics(workdir).items()
    }


def _one_error_line(stderr):
    lines = [line for line in stderr.splitlines() if line.startswith("jaxtrain: error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


@pytest.mark.slow
def test_train_and_eval_rebuild_a_damaged_bundled_set_and_get_the_same_numbers(data_dir, tmp_path):
    clean_root, _ = _copy_digits(data_dir, tmp_path / "clean")
    root, version_dir = _copy_digits(data_dir, tmp_path / "damaged")
    _damage(version_dir, "train", "flipped bytes")
    runs = {}
    for name, data in (("clean", clean_root), ("damaged", root)):
        result = _run(_train_command(tmp_path / name / "run", data))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = result
    assert "set aside as" not in runs["clean"].stdout
    assert f"set aside as {version_dir}.damaged" in runs["damaged"].stdout
    assert _losses(tmp_path / "damaged" / "run") == _losses(tmp_path / "clean" / "run")

    # `jaxtrain eval` reads the eval split: damaged, it is rebuilt too, with the same result.
    _damage(version_dir, "test", "truncated shard")
    evals = {}
    for name in ("clean", "damaged"):
        workdir = tmp_path / name / "run"
        result = _run([JAXTRAIN, "eval", f"--workdir={workdir}"])
        assert result.returncode == 0, result.stderr[-3000:]
        evals[name] = result.stdout
    assert f"set aside as {version_dir}.damaged-2" in evals["damaged"]
    assert evals["damaged"].strip().splitlines()[-1] == evals["clean"].strip().splitlines()[-1]


@pytest.mark.slow
def test_damage_found_mid_run_stops_cleanly_and_the_rerun_rebuilds_and_resumes(data_dir, tmp_path):
    root, version_dir = _copy_digits(data_dir, tmp_path)
    workdir = tmp_path / "run"
    # Batches read by the prefetcher, two steps ahead (no grain threads reading hundreds
    # ahead), so damage done at step N is met a few steps later.
    flags = [
        "--config.data.read_threads=0",
        "--config.checkpoint_every_steps=10",
        "--config.eval_every_steps=100000",
    ]
    proc = subprocess.Popen(
        _train_command(workdir, root, "--config.num_train_steps=100000", *flags),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if max(read_metrics(workdir), default=0) >= 25:
                    break
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.01)
        proc.send_signal(signal.SIGSTOP)  # the shard changes between two reads
        shard = _shard(version_dir, "train")
        _flip(shard, start=0.05, length=int(os.path.getsize(shard) * 0.6))
        proc.send_signal(signal.SIGCONT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_DATA, stderr[-3000:]
    line = _one_error_line(stderr)
    assert f"data set 'digits' is damaged: {shard}: Corrupted Riegeli/records file" in line
    assert "rebuilt when a run starts" in line
    before = _losses(workdir)
    last = max(before)
    saved = max(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    assert saved == last // 10 * 10 and (workdir / "checkpoints" / str(saved)).is_dir()
    assert (workdir / "checkpoints" / str(saved) / integrity.COMMIT_MARKER).exists()

    # The rerun sets the damaged set aside, rebuilds it, resumes from the checkpoint and
    # trains the steps after it exactly as the first run had.
    rerun = _run(_train_command(workdir, root, f"--config.num_train_steps={last}", *flags))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"set aside as {version_dir}.damaged" in rerun.stdout
    assert f"resumed at {saved}" in rerun.stdout
    after = _losses(workdir)
    assert after == before
    np.testing.assert_equal(sorted(after), list(range(1, last + 1)))


# A task of the user's own, reading a prepared TFDS data set of theirs (not bundled).
USER_TASK = """
import dataclasses, os
import numpy as np
import tensorflow_datasets as tfds
from jaxtrain import data
from jaxtrain.tasks import classification


def make_task(config):
    task = classification.make_task(config)
    own = tfds.builder_from_directory(os.environ["USER_DATA"])

    def split(name):
        return data.from_tfds(own, name).map(
            lambda r: {"inputs": np.asarray(r["image"]), "targets": np.int32(r["label"])}
        )

    return dataclasses.replace(task, data=lambda: split("train"), eval_data=lambda: split("test"))
"""


@pytest.mark.slow
def test_a_damaged_set_of_the_users_own_is_one_line_exit_65_in_train_and_eval(data_dir, tmp_path):
    root, version_dir = _copy_digits(data_dir, tmp_path)
    (tmp_path / "user_task.py").write_text(USER_TASK)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "USER_DATA": str(version_dir)}
    workdir = tmp_path / "run"
    command = _train_command(workdir, root, "--config.task=user_task:make_task")
    trained = _run(command, env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    metrics_before = (workdir / "metrics.jsonl").read_bytes()

    test_shard = _damage(version_dir, "test", "flipped bytes")
    evaluated = _run([JAXTRAIN, "eval", f"--workdir={workdir}"], env=env)
    assert evaluated.returncode == EXIT_DATA, evaluated.stderr[-3000:]
    line = _one_error_line(evaluated.stderr)
    assert f"data set 'digits' is damaged: {test_shard}: " in line
    assert f"mv {version_dir} {version_dir}.damaged" in line
    assert (workdir / "metrics.jsonl").read_bytes() == metrics_before  # nothing appended

    # Read lazily during training: the run stops at the first damaged record, exit 65,
    # its newest checkpoint committed (retention has dropped the older ones as usual).
    train_shard = _damage(version_dir, "train", "flipped bytes")
    longer = ["--config.num_train_steps=200", "--config.eval_every_steps=1000"]
    more = _run([*command, *longer], env=env)
    assert more.returncode == EXIT_DATA, more.stderr[-3000:]
    assert f"data set 'digits' is damaged: {train_shard}: " in _one_error_line(more.stderr)
    last = max(read_metrics(workdir))
    newest = max(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    assert 4 < newest <= last < 200
    assert (workdir / "checkpoints" / str(newest) / integrity.COMMIT_MARKER).exists()
    assert os.path.isdir(version_dir)  # the user's files, left where they are


READ_DIGITS = """
import sys
from jaxtrain.data import pipeline
records = pipeline.from_tfds("digits", "train", data_dir=sys.argv[1])
print("labels", sum(int(records[i]["label"]) for i in range(len(records))))
"""


@pytest.mark.slow
def test_runs_sharing_a_damaged_data_dir_rebuild_it_once(data_dir, tmp_path):
    root, version_dir = _copy_digits(data_dir, tmp_path)
    _damage(version_dir, "train", "flipped bytes")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    readers = [
        subprocess.Popen(
            [sys.executable, "-c", READ_DIGITS, str(root)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(3)
    ]
    outs = []
    for reader in readers:
        out, err = reader.communicate(timeout=300)
        assert reader.returncode == 0, err[-3000:]
        outs.append(out)
    # One run set the damage aside and rebuilt; the others waited and read its rebuild.
    assert sum("set aside as" in out for out in outs) == 1, outs
    assert sorted(os.listdir(version_dir.parent)) == ["1.0.0", "1.0.0.damaged"]
    expected = sum(_labels(pipeline.from_tfds("digits", "train", data_dir=data_dir)))
    assert all(f"labels {expected}" in out for out in outs), outs
