"""The learning-rate range test (Smith, arXiv 1506.01186; fastai's `lr_find`).

    result = lr_find.range_test(config, "runs/lr_find", min_lr=1e-6, max_lr=1.0, steps=200)
    result["suggested_lr"]

A short run of the config's task and optimizer whose learning rate rises exponentially
from `min_lr` to `max_lr`, one step each, every step's loss logged. The loss against the
learning rate falls, flattens and blows up; the suggestion is a tenth of the learning
rate at the smoothed loss's minimum (Smith's and fastai's rule), and the point where it
falls fastest (steepest descent against log lr) is reported beside it. On the main job
(BENCHMARKS.md) the steepest point came out 4-13x below the rates a search found best
(3e-3 to 9e-3) and the tenth-of-minimum 2-6x below: a range test's loss keeps falling
from training as much as from the rate, so both lean low; treat the suggestion as the
centre of a search. The run is an ordinary jaxtrain run in its own workdir (config.json,
metrics.jsonl, one checkpoint at the end; a rerun with the same workdir reads the
finished run back) and the curve goes to `lr_find.csv` and `lr_find.png` there.

It is a transform of the task, not a branch in the loop: the task's optimizer (its own,
or the config's by name) is built with the range test's schedule in place of the
config's, and the config is changed only in fields that say how long to run and what to
log. A step whose loss blows up to inf or NaN is skipped (`nonfinite.policy="skip"`), not
fatal: divergence is the range test's expected end.
"""

import copy
import csv
import dataclasses
import math
import os

import numpy as np
import optax

from jaxtrain import metrics_jsonl
from jaxtrain.checks import is_int, is_number
from jaxtrain.errors import ConfigError

# The raw per-step loss is smoothed (an exponential moving average, bias-corrected) over
# about 1/30 of the range's points: fastai's fixed 0.98 (50 points) would lag by a whole
# decade of learning rate on a short test and shift the suggestion up.
POINTS_PER_WINDOW = 30
# The curve is cut where the smoothed loss passes this multiple of its minimum: diverged.
DIVERGED = 4.0


def check_range(min_lr, max_lr, steps) -> None:
    """Raises ConfigError for a range the test cannot run (one line naming the flag)."""
    for name, value in (("min_lr", min_lr), ("max_lr", max_lr)):
        if not (is_number(value) and value > 0):
            raise ConfigError(f"--{name} must be a positive number, got {value!r}")
    if not min_lr < max_lr:
        raise ConfigError(f"--min_lr ({min_lr!r}) must be below --max_lr ({max_lr!r})")
    if not (is_int(steps) and steps >= 10):
        raise ConfigError(f"--steps must be an integer >= 10 (one lr per step), got {steps!r}")


def exponential_schedule(min_lr: float, max_lr: float, steps: int) -> optax.Schedule:
    """`min_lr` at step 0 to `max_lr` at step `steps - 1`, a constant factor per step."""
    return optax.exponential_decay(
        init_value=min_lr, transition_steps=steps - 1, decay_rate=max_lr / min_lr
    )


def range_test_config(config, steps: int):
    """The config of the range test's run: `steps` steps, each logged, one evaluation and
    one checkpoint at the end, non-finite steps skipped."""
    config = copy.deepcopy(config)
    config.num_train_steps = steps
    config.log_every_steps = 1
    config.eval_every_steps = steps
    config.eval_steps = 1
    config.checkpoint_every_steps = steps
    config.nonfinite.policy = "skip"
    config.nonfinite.max_consecutive_skips = steps  # never abort: divergence ends the test
    return config


def range_test_task(task, config, schedule: optax.Schedule):
    """`task` with its optimizer built on `schedule` (the config's optimizer by name when
    the task has none of its own)."""
    from jaxtrain import optim

    optimizer, _ = optim.optimizer_and_schedule(
        config, task.optimizer, model=task.model, trainable=task.trainable, schedule=schedule
    )
    return dataclasses.replace(task, optimizer=lambda _config_schedule: optimizer)


def smoothed(losses, points: int | None = None) -> np.ndarray:
    """Bias-corrected exponential moving average of a loss sequence, over a window of
    `points / POINTS_PER_WINDOW` points (at least 2; `points`: len(losses) by default)."""
    window = max(2, (points or len(losses)) // POINTS_PER_WINDOW)
    beta = 1 - 1 / window
    out, average = [], 0.0
    for i, loss in enumerate(losses):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta ** (i + 1)))
    return np.asarray(out)


def suggest(lrs, losses) -> dict:
    """The suggested learning rate from a range test's (lr, loss) points.

    Returns:
      {"suggested_lr": min_loss_lr / 10; "steepest_lr": steepest descent of the smoothed
      loss against log lr, before the minimum; "min_loss_lr": the lr at the smoothed
      minimum; "diverged_lr": the first lr
      where the smoothed loss passed DIVERGED x its minimum (None if it never did);
      "points": how many points the curve kept}.

    Raises:
      ConfigError: too few finite points to read a curve from (a range that starts
        already diverged: lower --min_lr).
    """
    lrs, losses = np.asarray(lrs, float), np.asarray(losses, float)
    finite = np.isfinite(losses)
    # Past the first non-finite loss the run only skips: the curve ends there.
    end = int(np.argmin(finite)) if not finite.all() else len(losses)
    points = len(losses)
    lrs, losses = lrs[:end], losses[:end]
    if len(losses) < 5:
        raise ConfigError(
            f"the range test kept {len(losses)} finite losses (of {len(finite)}): the loss "
            "was not finite from the first steps; lower --min_lr"
        )
    smooth = smoothed(losses, points)
    running_min = np.minimum.accumulate(smooth)
    over = np.nonzero(smooth > DIVERGED * running_min)[0]
    diverged_lr = float(lrs[over[0]]) if len(over) else None
    if len(over):
        lrs, smooth = lrs[: over[0]], smooth[: over[0]]
    lowest = int(np.argmin(smooth))
    slopes = np.gradient(smooth[: lowest + 1], np.log(lrs[: lowest + 1])) if lowest >= 2 else None
    steepest = int(np.argmin(slopes)) if slopes is not None else lowest
    return {
        "suggested_lr": float(lrs[lowest]) / 10,
        "steepest_lr": float(lrs[steepest]),
        "min_loss_lr": float(lrs[lowest]),
        "diverged_lr": diverged_lr,
        "points": len(smooth),
    }


def read_curve(workdir: str, schedule: optax.Schedule) -> tuple[list[float], list[float]]:
    """(lrs, losses) of the range test's run: each logged step's training loss and the lr
    its update used (the schedule at the step before the one logged)."""
    points = {}
    for record in metrics_jsonl.read_records(os.path.join(workdir, "metrics.jsonl")):
        if record.get("split") == "train" and "loss" in record:
            points[record["step"]] = float(record["loss"])
    steps = sorted(points)
    return [float(schedule(s - 1)) for s in steps], [points[s] for s in steps]


def range_test(
    config, workdir: str, *, min_lr=1e-6, max_lr=1.0, steps=200, task=None, devices=None
) -> dict:
    """Runs the range test in `workdir` and writes lr_find.csv and lr_find.png there.

    Args:
      config: the run config whose task and optimizer are tested (`optim.lr` and the
        schedule fields are not used: the range test's schedule replaces them).
      workdir: the range test's own run directory.
      min_lr, max_lr: the learning rates of the first and the last step.
      steps: how many steps (points of the curve).
      task: what to train; by default the task `config.task` names.
      devices: devices for the mesh; all devices by default.

    Returns:
      `suggest`'s dict, with "csv" and "png" paths added.

    Raises:
      ConfigError: a bad range or config (nothing written), or too few finite points.
    """
    from jaxtrain import config as config_lib
    from jaxtrain import tasks as tasks_lib
    from jaxtrain.train import train_and_evaluate

    check_range(min_lr, max_lr, steps)
    run_config = range_test_config(config, steps)
    config_lib.validate(run_config)
    schedule = exponential_schedule(min_lr, max_lr, steps)
    task = range_test_task(task or tasks_lib.from_config(run_config), run_config, schedule)
    train_and_evaluate(run_config, workdir, task=task, devices=devices)
    lrs, losses = read_curve(workdir, schedule)
    result = suggest(lrs, losses)
    result["csv"] = _write_csv(workdir, lrs, losses)
    result["png"] = _plot(workdir, lrs, losses, result)
    return result


def _write_csv(workdir, lrs, losses) -> str:
    path = os.path.join(workdir, "lr_find.csv")
    smooth = smoothed(np.nan_to_num(losses, nan=np.inf), len(losses))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "lr", "loss", "smoothed_loss"])
        for step, (lr, loss, s) in enumerate(zip(lrs, losses, smooth, strict=True), start=1):
            writer.writerow([step, f"{lr:.6g}", f"{loss:.6g}", f"{s:.6g}"])
    return path


def _plot(workdir, lrs, losses, result) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from jaxtrain.plot import DPI, FIGSIZE

    figure = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    finite = [(lr, loss) for lr, loss in zip(lrs, losses, strict=True) if math.isfinite(loss)]
    axes.plot(*zip(*finite, strict=True), linewidth=0.8, alpha=0.5, label="loss")
    kept = result["points"]
    axes.plot(lrs[:kept], smoothed(losses[:kept], len(losses)), linewidth=1.5, label="smoothed")
    axes.axvline(result["suggested_lr"], color="C2", linestyle="--", label="suggested (min / 10)")
    axes.axvline(result["steepest_lr"], color="C3", linestyle=":", label="steepest fall")
    axes.set_xscale("log")
    axes.set_xlabel("learning rate")
    axes.set_ylabel("training loss")
    low = min(loss for _, loss in finite)
    axes.set_ylim(top=max(low * DIVERGED, low + 1e-3))
    axes.set_title(f"learning-rate range test: suggested {result['suggested_lr']:.3g}")
    axes.legend()
    path = os.path.join(workdir, "lr_find.png")
    figure.savefig(path)
    return path
