"""The `jaxtrain` command: every kind of bad input gets one line, exit status 2, no writes."""

import hashlib
import os
import subprocess
import sys

import pytest
from conftest import CONFIGS, REPO
from jaxtrain.configs import base as base_config

import jaxtrain
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


# Config files whose get_config gives no run config: (file body, what the line says).
BAD_CONFIG_FILES = {
    "returns_dict": ("def get_config(arg=None):\n    return {'task': 'lm'}\n", "returned dict"),
    "returns_none": ("def get_config(arg=None):\n    pass\n", "returned NoneType"),
    "returns_list": ("def get_config(arg=None):\n    return [1, 2]\n", "returned list"),
    "no_get_config": ("x = 1\n", "has no get_config() function"),
    "raises": (
        "def get_config(arg=None):\n    raise RuntimeError('boom')\n",
        "failed to load: RuntimeError: boom",
    ),
    "not_from_base": (
        "import ml_collections\n\ndef get_config(arg=None):\n"
        "    return ml_collections.ConfigDict({'task': 'lm', 'seed': 0})\n",
        "the config has no field 'checkpoint', 'checkpoint_every_steps', 'compilation_cache' "
        f"and {len(set(base_config.get_config()) - {'task', 'seed'}) - 3} more: "
        "start from jaxtrain.configs.base",
    ),
    "lacks_one_field": (
        "from jaxtrain.configs import base\n\ndef get_config(arg=None):\n"
        "    c = base.get_config()\n    del c.optim.adamw['b2']\n    return c\n",
        "the config has no field 'optim.adamw.b2': start from jaxtrain.configs.base",
    ),
}


@pytest.mark.parametrize("command", ["train", "plan", "load_config"])
@pytest.mark.parametrize("name", sorted(BAD_CONFIG_FILES))
def test_a_config_file_that_gives_no_run_config_is_one_line(command, name, tmp_path, capsys):
    body, message = BAD_CONFIG_FILES[name]
    path = tmp_path / f"{name}.py"
    path.write_text(body)
    workdir = tmp_path / "run"
    if command == "load_config":
        with pytest.raises(jaxtrain.ConfigError) as error:
            jaxtrain.load_config(f"{path}:arg")
        line = f"jaxtrain: error: {error.value}"
    else:
        extra = f"--workdir={workdir}" if command == "train" else "--topology=cpu-8"
        status = cli.main(["jaxtrain", command, f"--config={path}:arg", extra])
        assert status == 2
        line = _one_error_line(capsys)
    assert f"config file '{path}'" in line and message in line, line
    assert len(line) < 400  # one line, not a traceback folded into one
    assert not workdir.exists()
    assert sorted(os.listdir(tmp_path)) == [path.name]  # nothing else written


def test_a_config_built_in_code_without_base_fields_is_refused_by_train(tmp_path):
    import ml_collections

    with pytest.raises(jaxtrain.ConfigError, match=r"^the config is a dict, not an ml_coll"):
        jaxtrain.train_and_evaluate({"task": "lm"}, str(tmp_path / "run"))
    bare = ml_collections.ConfigDict({"task": "lm"})
    with pytest.raises(jaxtrain.ConfigError, match=r"^the config has no field 'checkpoint'"):
        jaxtrain.train_and_evaluate(bare, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "config, override, message",
    [
        # A vocabulary that does not cover the byte tokens trained to a NaN loss at step 1
        # (exit 3) after the workdir was written; likewise too few classes for the labels.
        (GPT, "model.vocab_size=1", "config.model.vocab_size must be at least 256: the tokens"),
        (GPT, "model.vocab_size=255", "of data set 'pysource' are bytes, got 255"),
        (DIGITS, "model.num_classes=2", "config.model.num_classes must be at least 10: data "),
        (DIGITS, "model.image_shape=(16,16,1)", "shape of the images of data set 'digits', (8, 8"),
        (DIGITS, "data.label_key=lbl", "config.data.label_key='lbl' is not a field of data set"),
        (GPT, "data.text_key=txt", "it has ['path', 'text']"),
        (GPT, "model.rope_base=inf", "config.model (gpt): rope_base=inf must be a finite"),
        (GPT, "model.dropout_rate=nan", "dropout_rate=nan must be in [0, 1)"),
        (DIGITS, "model.features=(0,4)", "features=(0, 4) must be one or more positive"),
        # Only -1 means the whole split.
        (GPT, "eval_steps=0", "config.eval_steps must be a positive integer or -1 (all of"),
        (GPT, "eval_steps=-5", "config.eval_steps must be a positive integer or -1"),
        # Values the libraries reject with a traceback (OverflowError, ValueError).
        (GPT, "seed=100000000000000000000", "config.seed must be a 64-bit integer"),
        (GPT, "data.seed=-1", "config.data.seed must be an integer from 0 to 2**63 - 1"),
        (
            GPT,
            "optim.warmup_steps=100000000000000",
            "config.optim.warmup_steps must be an integer >= 0 and at most 2147483647",
        ),
    ],
)
def test_model_and_data_fields_that_cannot_train_are_refused_before_writing(
    config, override, message, tmp_path, capsys, data_dir
):
    workdir = tmp_path / "run"
    assert _train(workdir, f"{config}:smoke", data_dir, f"--config.{override}") == 2
    assert message in _one_error_line(capsys)
    assert not workdir.exists()
