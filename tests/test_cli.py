"""The `jaxtrain` command: every kind of bad input gets one line, exit status 2, no writes."""

import hashlib
import os
import subprocess
import sys

import pytest
from conftest import CONFIGS, REPO

from jaxtrain import cli

GPT = os.path.join(CONFIGS, "gpt_pysource.py")
DIGITS = os.path.join(CONFIGS, "digits_cnn.py")


def _train(workdir, config, data_dir, *overrides):
    return cli.main(
        [
            "jaxtrain",
            "train",
            f"--config={config}",
            f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}",
            *overrides,
        ]
    )


def _snapshot(directory):
    """Every file under `directory` with a hash of its bytes (empty if it does not exist)."""
    result = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                result[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return result


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("jaxtrain: error: ")
    return err[0]


@pytest.mark.parametrize(
    "args, message",
    [
        ([f"--config={CONFIGS}/nope.py"], "config file not found: '"),
        (
            [f"--config={GPT}:smoke", "--config.optim.lrr=1"],
            "unknown config key 'optim.lrr' in '--config.optim.lrr=1'; did you mean 'optim.lr'?",
        ),
        ([f"--config={GPT}:smoke", "--config.optim.lr=fast"], "--config.optim.lr=fast"),
        ([f"--config={GPT}:smoke", "--config.num_train_steps=1.5"], "--config.num_train_steps=1.5"),
        (
            [f"--config={GPT}:smoke", "--config.mesh.data=3"],
            "config.mesh (data=3, fsdp=1, sequence=1, tensor=1) needs 3 devices but 8 are "
            "available",
        ),
        (
            [f"--config={GPT}:smoke", "--config.global_batch_size=12"],
            "config.global_batch_size=12 is not divisible by the 8 ways",
        ),
        (
            [f"--config={GPT}:smoke", "--config.model.name=gtp"],
            "unknown model 'gtp' (did you mean 'gpt'?)",
        ),
        (
            [f"--config={DIGITS}:smoke", "--config.data.name=digitz"],
            "unknown data set 'digitz' (did you mean 'digits'?)",
        ),
        ([f"--config={GPT}:smoke", "--config.precision.compute_dtype=fp8"], "unknown dtype 'fp8'"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args, message, tmp_path, capsys, data_dir):
    workdir = tmp_path / "run"
    status = cli.main(
        ["jaxtrain", "train", f"--workdir={workdir}", *args, f"--config.data.data_dir={data_dir}"]
    )
    assert status == 2
    assert message in _one_error_line(capsys)
    assert not workdir.exists()


def test_checkpoint_of_another_model_shape_is_refused_untouched(tmp_path, capsys, data_dir):
    workdir = tmp_path / "run"
    assert _train(workdir, f"{GPT}:smoke", data_dir) == 0
    capsys.readouterr()
    before = _snapshot(workdir)
    assert any(name.startswith("checkpoints/4/") for name in before)
    status = _train(
        workdir, f"{GPT}:smoke", data_dir, "--config.model.mlp_dim=96", "--config.num_train_steps=8"
    )
    assert status == 2
    line = _one_error_line(capsys)
    assert "holds a checkpoint (step 4) of a different model" in line
    assert (
        "params/blocks/0/mlp/down/kernel has shape (128, 64) in the checkpoint but (96, 64)" in line
    )
    assert _snapshot(workdir) == before  # config.json, metrics and checkpoints untouched


def test_console_script_exit_status(tmp_path):
    # The installed `jaxtrain` script, in a real process: status 2 and one line on stderr.
    script = os.path.join(os.path.dirname(sys.executable), "jaxtrain")
    proc = subprocess.run(
        [
            script,
            "train",
            f"--config={GPT}:smoke",
            f"--workdir={tmp_path / 'run'}",
            "--config.mesh.sequence=0",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("jaxtrain: error: config.mesh sizes")
    assert not (tmp_path / "run").exists()


def test_missing_command_or_workdir(capsys):
    assert cli.main(["jaxtrain"]) == 2
    capsys.readouterr()
    assert cli.main(["jaxtrain", "fit", f"--config={GPT}"]) == 2
    assert "unknown command 'fit'" in _one_error_line(capsys)
    assert cli.main(["jaxtrain", "train", f"--config={GPT}"]) == 2
    assert "--workdir=DIR is required" in _one_error_line(capsys)
