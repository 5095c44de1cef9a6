"""Kill -9 a real run after a checkpoint, rerun the same command, lose nothing."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import CONFIGS, read_metrics

GPT = os.path.join(CONFIGS, "gpt_pysource.py")


def _command(workdir, data_dir):
    return [
        os.path.join(os.path.dirname(sys.executable), "jaxtrain"),
        "train",
        f"--config={GPT}:smoke",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        "--config.num_train_steps=300",
        "--config.checkpoint_every_steps=10",
        "--config.log_every_steps=1",
        "--config.eval_every_steps=1000",
    ]


@pytest.mark.slow
def test_killed_run_reruns_to_the_same_result(tmp_path, data_dir):
    reference = tmp_path / "reference"
    subprocess.run(_command(reference, data_dir), check=True, timeout=300, capture_output=True)

    workdir = tmp_path / "killed"
    proc = subprocess.Popen(
        _command(workdir, data_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    committed = workdir / "checkpoints" / "20"  # Orbax renames a step dir into place on commit
    deadline = time.monotonic() + 240
    while not committed.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = max(read_metrics(workdir))
    assert killed_at < 300

    rerun = subprocess.run(
        _command(workdir, data_dir), check=True, timeout=300, capture_output=True, text=True
    )
    assert "resumed at" in rerun.stdout

    want, got = read_metrics(reference), read_metrics(workdir)
    assert sorted(got) == list(range(1, 301))  # each step logged exactly once
    np.testing.assert_array_equal([got[s]["loss"] for s in got], [want[s]["loss"] for s in got])
    final_want = read_metrics(reference, "eval")[300]["loss"]
    assert read_metrics(workdir, "eval")[300]["loss"] == final_want
