"""The learning-rate range test: the suggestion from a curve, bad ranges, a real run."""

import csv
import json
import os

import numpy as np
import pytest
from conftest import gpt_smoke_config

from jaxtrain import lr_find
from jaxtrain.errors import ConfigError


def valley(lrs, noise=0.0, seed=0):
    """A range test's loss shape: flat, a fall centred on lr 1e-2, a floor, a blow-up."""
    x = np.log10(lrs)
    fall = 2.0 / (1.0 + np.exp(3.0 * (x + 2.0)))  # falls fastest at 10**-2
    blow = np.exp(4.0 * (x - 0.0))  # explodes past lr 1
    rng = np.random.default_rng(seed)
    return 3.0 + fall + blow + noise * rng.standard_normal(len(lrs))


def test_the_suggestion_is_a_tenth_of_the_minimum_and_the_steepest_fall_is_found():
    lrs = np.geomspace(1e-6, 10.0, 200)
    result = lr_find.suggest(lrs, valley(lrs, noise=0.01))
    # The curve falls fastest at 1e-2; smoothing lags a little to the right.
    assert 10**-2.4 < result["steepest_lr"] < 10**-1.6, result
    assert result["steepest_lr"] < result["min_loss_lr"] < 1.0
    assert result["suggested_lr"] == pytest.approx(result["min_loss_lr"] / 10)
    assert result["diverged_lr"] is not None and result["diverged_lr"] > result["min_loss_lr"]


def test_the_curve_ends_at_the_first_non_finite_loss():
    lrs = np.geomspace(1e-6, 10.0, 100)
    losses = valley(lrs)
    losses[80:] = np.nan  # skipped steps past the blow-up
    assert lr_find.suggest(lrs, losses)["points"] <= 80
    losses[3] = np.inf
    with pytest.raises(ConfigError, match="lower --min_lr"):
        lr_find.suggest(lrs, losses)


def test_the_schedule_runs_from_min_to_max_exponentially():
    schedule = lr_find.exponential_schedule(1e-6, 1.0, 61)
    values = np.asarray([float(schedule(s)) for s in range(61)])
    np.testing.assert_allclose(values[[0, 30, 60]], [1e-6, 1e-3, 1.0], rtol=1e-5)
    ratios = values[1:] / values[:-1]
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-4)


@pytest.mark.parametrize(
    "min_lr, max_lr, steps, message",
    [
        (0.0, 1.0, 100, "--min_lr must be a positive number, got 0.0"),
        (1e-3, float("nan"), 100, "--max_lr must be a positive number"),
        (1.0, 1e-3, 100, "--min_lr (1.0) must be below --max_lr (0.001)"),
        (1e-6, 1.0, 5, "--steps must be an integer >= 10"),
    ],
)
def test_a_bad_range_is_one_line_before_anything_is_written(
    tmp_path, data_dir, min_lr, max_lr, steps, message
):
    workdir = tmp_path / "lr"
    with pytest.raises(ConfigError) as error:
        lr_find.range_test(
            gpt_smoke_config(data_dir), str(workdir), min_lr=min_lr, max_lr=max_lr, steps=steps
        )
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not workdir.exists()


def test_a_range_test_runs_the_task_and_writes_its_curve(tmp_path, data_dir):
    workdir = str(tmp_path / "lr")
    result = lr_find.range_test(
        gpt_smoke_config(data_dir), workdir, min_lr=1e-4, max_lr=1.0, steps=12
    )
    assert 1e-4 <= result["suggested_lr"] <= 1.0
    with open(result["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == pytest.approx(1e-4, rel=1e-4) and lrs[-1] == pytest.approx(1.0, rel=1e-4)
    # The run's own log has the lr its optimizer used, and it is the curve's.
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    used = [r["lr"] for r in logged if r.get("split") == "train" and "lr" in r]
    np.testing.assert_allclose(used, lrs, rtol=1e-5)
    assert os.path.getsize(result["png"]) > 10_000
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["num_train_steps"] == 12


def _lr_find_command(workdir, data_dir, *flags):
    from jaxtrain import cli

    return cli.main(
        [
            "jaxtrain",
            "lr-find",
            "--config=gpt_pysource.py:smoke",
            f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}",
            *flags,
        ]
    )


def test_the_command_refuses_a_bad_range_in_one_line(tmp_path, data_dir, capsys):
    workdir = tmp_path / "lr"
    assert _lr_find_command(workdir, data_dir, "--min_lr=1", "--max_lr=0.1") == 2
    assert capsys.readouterr().err.strip() == (
        "jaxtrain: error: --min_lr (1.0) must be below --max_lr (0.1)"
    )
    assert not workdir.exists()


@pytest.mark.slow
def test_the_command_prints_a_suggestion_and_reruns_from_its_run(tmp_path, data_dir, capsys):
    workdir = tmp_path / "lr"
    flags = ("--steps=20", "--min_lr=1e-5", "--max_lr=10", "--config.optim.name=lion")
    assert _lr_find_command(workdir, data_dir, *flags) == 0
    out = capsys.readouterr().out
    [line] = [ln for ln in out.splitlines() if ln.startswith("suggested lr: ")]
    with open(workdir / "config.json") as f:
        assert json.load(f)["optim"]["name"] == "lion"
    # A rerun reads the finished run back (no step trained again) and suggests the same.
    before = (workdir / "metrics.jsonl").read_text()
    assert _lr_find_command(workdir, data_dir, *flags) == 0
    assert line in capsys.readouterr().out
    assert (workdir / "metrics.jsonl").read_text().count('"split": "train"') == before.count(
        '"split": "train"'
    )
