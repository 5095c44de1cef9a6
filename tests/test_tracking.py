"""Tracking: the config in TensorBoard's HParams; Weights & Biases, offline, when enabled."""

import glob
import json
import os
import struct
import subprocess
import sys

import pytest
from conftest import gpt_smoke_config, read_metrics

from jaxtrain import cli, metrics, tracking
from jaxtrain.train import train_and_evaluate


def _events(directory) -> list:
    """Every Event of every event file directly in `directory` (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):  # length, its CRC, the record, its CRC
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            events.append(event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length]))
            pos += 12 + length + 4
    return events


def _hparams(events) -> dict:
    """The hyperparameters of the session-start summaries in `events`, as Python values."""
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

    found = {}
    for event in events:
        for value in event.summary.value:
            if value.tag == "_hparams_/session_start_info":
                data = HParamsPluginData.FromString(value.metadata.plugin_data.content)
                for name, v in data.session_start_info.hparams.items():
                    found[name] = getattr(v, v.WhichOneof("kind"))
    return found


def test_flatten_keeps_every_field_showable():
    flat = tracking.flatten(
        {"optim": {"lr": 3e-3}, "rules": [["embed", "fsdp"]], "model": {"features": (32, 64)}}
    )
    assert flat == {"optim.lr": 3e-3, "rules": '[["embed", "fsdp"]]', "model.features": "[32, 64]"}


def test_hparams_land_in_the_run_directory_beside_the_scalars(tmp_path):
    config = json.loads(gpt_smoke_config().to_json_best_effort())
    writer = metrics.MetricWriter(str(tmp_path), total_steps=2, start_step=0, config=config)
    writer.write(1, "train", {"loss": 2.5})
    writer.close()
    board = tmp_path / "tensorboard"
    # One run: no timestamped subdirectory, as tensorboardX's add_hparams would make.
    assert [p.name for p in board.iterdir() if p.is_dir()] == []
    events = _events(board)
    hparams = _hparams(events)
    assert hparams["optim.lr"] == pytest.approx(config["optim"]["lr"])
    assert hparams["model.name"] == "gpt" and hparams["logging.wandb"] is False
    assert hparams["mesh.data"] == -1
    assert json.loads(hparams["rules"])[0] == ["activation_batch", ["data", "fsdp"]]
    assert ("train/loss", 1) in [(v.tag, e.step) for e in events for v in e.summary.value]


def test_wandb_without_the_package_is_one_line_and_writes_nothing(
    tmp_path, data_dir, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` sees without it
    workdir = tmp_path / "run"
    status = cli.main(
        [
            "jaxtrain",
            "train",
            "--config=gpt_pysource.py:smoke",
            f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}",
            "--config.logging.wandb=True",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err == [
        "jaxtrain: error: config.logging.wandb=True needs the wandb package, which is not "
        "installed: pip install 'jaxtrain[wandb]' (or pip install wandb)"
    ]
    assert not workdir.exists()


def _wandb_records(run_dir) -> list[dict]:
    """The records of an offline W&B run, read by wandb's own log reader."""
    [log] = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    proc = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", log],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def _history(records) -> dict[int, dict]:
    return {r["history"]["step"]["num"]: r["history"]["item"] for r in records if "history" in r}


def test_wandb_offline_run_holds_the_scalars_and_a_rerun_continues_it(
    tmp_path, data_dir, monkeypatch
):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    workdir = tmp_path / "run"
    overrides = dict(logging__wandb=True, logging__wandb_project="jaxtrain-test")
    train_and_evaluate(gpt_smoke_config(data_dir, steps=4, **overrides), str(workdir))
    # Resumed from step 4 for two more steps: the same W&B run (its id), steps 5 and 6.
    config = gpt_smoke_config(data_dir, steps=6, eval_every_steps=6, **overrides)
    train_and_evaluate(config, str(workdir))

    run_dirs = sorted(glob.glob(str(workdir / "wandb" / "offline-run-*")))
    assert len(run_dirs) == 2
    run_id = (workdir / "wandb" / "run_id").read_text().strip()
    assert all(d.endswith(f"-{run_id}") for d in run_dirs)
    first, second = (_wandb_records(d) for d in run_dirs)

    [run] = [r["run"] for r in first if "run" in r]
    assert run["project"] == "jaxtrain-test" and run["display_name"] == "run"
    assert run["config"]["update"]["optim"]["lr"] == config.optim.lr
    assert run["config"]["update"]["model"]["name"] == "gpt"

    history = {**_history(first), **_history(second)}
    assert sorted(history) == [1, 2, 3, 4, 5, 6]
    for step, record in read_metrics(workdir).items():  # the same numbers as metrics.jsonl
        assert history[step]["train/loss"] == pytest.approx(record["loss"], rel=1e-6)
        assert history[step]["train/grad_norm"] == pytest.approx(record["grad_norm"], rel=1e-6)
    for step, record in read_metrics(workdir, split="eval").items():
        assert history[step]["eval/loss"] == pytest.approx(record["loss"], rel=1e-6)
    assert sorted(read_metrics(workdir, split="eval")) == [4, 6]
    assert [r["exit"]["exit_code"] for r in second if "exit" in r] == [0]
    # TensorBoard got the config too, in the run's own directory, once per start.
    assert _hparams(_events(workdir / "tensorboard"))["logging.wandb"] is True


def test_turning_tracking_on_or_off_keeps_a_resumed_run_the_same_run():
    from jaxtrain import workdir

    saved = {"logging": {"wandb": False, "wandb_project": ""}, "seed": 0}
    current = {"logging": {"wandb": True, "wandb_project": "mine"}, "seed": 0}
    changes = workdir.check_resume_config(saved, current, allow=False, step=4)
    assert changes == ["logging.wandb: false -> true", 'logging.wandb_project: "" -> "mine"']


def test_a_field_added_since_the_run_was_saved_is_no_change_at_its_default():
    # A run saved before jaxtrain had optim.ema_decay resumes: the field's default is what
    # the run did. The same field at another value, or a field the run had, still counts.
    from jaxtrain import workdir
    from jaxtrain.errors import ConfigError

    saved = {"optim": {"name": "adamw", "lr": 0.001}, "seed": 0}
    current = {"optim": {"name": "adamw", "lr": 0.001, "ema_decay": 0.0}, "seed": 0}
    assert workdir.check_resume_config(saved, current, allow=False, step=4) == []
    current["optim"]["ema_decay"] = 0.999
    with pytest.raises(ConfigError, match=r"optim.ema_decay: \(none\) -> 0.999"):
        workdir.check_resume_config(saved, current, allow=False, step=4)
    del saved["seed"]  # a field the saved run lacks, now at its default: no change either
    current["optim"]["ema_decay"] = 0.0
    assert workdir.check_resume_config(saved, current, allow=False, step=4) == []
