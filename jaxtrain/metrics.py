"""Metric writers: the console, `metrics.jsonl`, TensorBoard and W&B; step timing and memory.

Only process 0 writes; every other process gets a writer that does nothing. Losing where
metrics go never stops training: a console that went away (`| head`) is dropped
silently, a metrics file that cannot be written (disk full) gets one warning, and the
run goes on (its checkpoints then fail loudly if the disk is really full).
"""

import json
import math
import os
import sys
import time

import jax
from absl import logging
from tqdm import tqdm

from jaxtrain import files, tracking
from jaxtrain.errors import StorageError

_console_lost = False


def console(message: str) -> None:
    """Prints a line on process 0 without breaking the progress bar."""
    global _console_lost
    if jax.process_index() != 0 or _console_lost:
        return
    try:
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()
    except OSError:  # BrokenPipeError: whoever read stdout is gone (`| head -n 6`)
        _console_lost = True
        # Python would fail flushing stdout again at exit: point it at /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def human(n: float) -> str:
    """1234567 -> '1.23M' (for FLOPs and bytes on the console)."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.3g}"


# Known metrics first, in this order; the rest after them, alphabetically.
_ORDER = (
    "loss",
    "perplexity",
    "accuracy",
    "grad_norm",
    "lr",
    "step_time_s",
    "examples_per_s",
    "tokens_per_s",
    "mfu",
    "input_wait",
    "peak_memory_gib",
    "loss_scale",
)


class MetricWriter:
    """Writes scalars to the console, `workdir/metrics.jsonl`, TensorBoard and W&B.

    Args:
      workdir: the run directory.
      total_steps: for the progress bar.
      start_step: the step the run starts from (the restored step, 0 for a new run).
        Lines a killed run logged after it are dropped first, so that `metrics.jsonl`
        holds each step once.
      config: the run's resolved config as a nested dict: recorded as TensorBoard
        hyperparameters, and, with `config["logging"]["wandb"]`, every record also goes
        to a W&B run (see `jaxtrain.tracking`). None: neither.
    """

    def __init__(
        self, workdir: str, *, total_steps: int, start_step: int, config: dict | None = None
    ):
        self.enabled = jax.process_index() == 0
        self._jsonl = self._tensorboard = self._wandb = None
        self._path = os.path.join(workdir, "metrics.jsonl")
        # A bar only on a terminal; logs and CI get plain lines.
        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            unit="step",
            dynamic_ncols=True,
            disable=not (self.enabled and sys.stderr.isatty()),
        )
        if self.enabled:
            from tensorboardX import SummaryWriter

            _truncate_jsonl(self._path, start_step)
            self._jsonl = open(self._path, "a", encoding="utf-8")
            self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))
            if config is not None:
                tracking.write_hparams(self._tensorboard, config)
                if config.get("logging", {}).get("wandb"):
                    self._wandb = tracking.WandbRun(workdir, config)

    def advance(self, steps: int = 1) -> None:
        """Moves the progress bar."""
        self._bar.update(steps)

    def write(self, step: int, split: str, scalars: dict[str, float]) -> None:
        """Writes one record: `{"step": step, "split": split, **scalars}`."""
        if not self.enabled:
            return
        order = {k: i for i, k in enumerate(_ORDER)}
        keys = sorted(scalars, key=lambda k: (order.get(k, len(order)), k))
        scalars = {k: float(scalars[k]) for k in keys}
        if self._jsonl is not None:
            try:
                self._jsonl.write(json.dumps({"step": step, "split": split, **scalars}) + "\n")
                self._jsonl.flush()
                for key, value in scalars.items():
                    self._tensorboard.add_scalar(f"{split}/{key}", value, step)
                self._tensorboard.flush()
            except OSError as e:
                logging.warning(
                    "cannot write metrics to %s (%s); training goes on, but metrics from "
                    "step %d on are not recorded there",
                    self._path,
                    e.strerror or e,
                    step,
                )
                self._close_files()
        if self._wandb is not None:
            self._wandb.log(step, split, scalars)
        shown = " | ".join(f"{k} {_fmt(v)}" for k, v in scalars.items())
        console(f"step {step:>6} {split:>5} | {shown}")

    def close(self) -> None:
        self._bar.close()
        self._close_files()
        wandb_run, self._wandb = self._wandb, None
        if wandb_run is not None:
            wandb_run.close()

    def _close_files(self) -> None:
        files, self._jsonl, self._tensorboard = (self._jsonl, self._tensorboard), None, None
        for f in files:
            if f is not None:
                try:
                    f.close()
                except OSError:  # what it could not flush was reported when it failed
                    pass


def append(workdir: str, step: int, split: str, scalars: dict[str, float]) -> dict:
    """Appends one record to `workdir/metrics.jsonl` from outside a training run.

    For commands that add to a run's log (`jaxtrain eval`): no progress bar, no
    TensorBoard, no truncation. Each record is one write of one line in append mode, so
    a run training at the same time keeps its own lines whole. Process 0 only.

    Returns:
      The record, `{"step": step, "split": split, **scalars}`, as written.
    """
    order = {k: i for i, k in enumerate(_ORDER)}
    keys = sorted(scalars, key=lambda k: (order.get(k, len(order)), k))
    record = {"step": step, "split": split, **{k: float(scalars[k]) for k in keys}}
    if jax.process_index() == 0:
        path = os.path.join(workdir, "metrics.jsonl")
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise StorageError(f"cannot append to {path!r}: {e.strerror or e}") from e
    return record


def format_record(record: dict) -> str:
    """A record as the console shows it: `step N split | loss 1.652 | ...`."""
    shown = " | ".join(f"{k} {_fmt(v)}" for k, v in record.items() if k not in ("step", "split"))
    return f"step {record['step']:>6} {record['split']:>5} | {shown}"


def _fmt(value: float) -> str:
    if value != value or math.isinf(value):
        return str(value)
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"


def _truncate_jsonl(path: str, last_step: int) -> None:
    """Drops lines logged after `last_step`, through a temporary file and an atomic rename."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (ValueError, KeyError):
            continue  # a line cut short by a kill
    if len(kept) != len(lines):
        files.write_atomically(path, "".join(kept))


class StepTimer:
    """Time per step, and the share of it spent waiting for input, between two marks
    where the device was known to be idle.

    Args:
      step: the step of the first mark.
      input_wait_s: returns the seconds the loop has spent blocked waiting for its next
        batch, in all (`jaxtrain.data.DevicePrefetcher.wait_seconds`).
    """

    def __init__(self, step: int, input_wait_s=lambda: 0.0):
        self._input_wait_s = input_wait_s
        self.reset(step)

    def reset(self, step: int) -> None:
        """Marks `step` (after an evaluation, whose time is not a step's)."""
        self._step, self._time, self._waited = step, time.perf_counter(), self._input_wait_s()

    def measure(self, step: int) -> dict[str, float]:
        """`step_time_s` (seconds per step) and `input_wait` (the fraction of the
        interval spent waiting for input) since the last mark; marks `step`."""
        now, waited = time.perf_counter(), self._input_wait_s()
        steps, seconds = step - self._step, now - self._time
        result = {}
        if steps > 0 and seconds > 0:
            result = {
                "step_time_s": seconds / steps,
                "input_wait": min(1.0, (waited - self._waited) / seconds),
            }
        self._step, self._time, self._waited = step, now, waited
        return result


def peak_memory_bytes(devices) -> float | None:
    """The largest peak of device memory in use among `devices`, as their runtime reports
    it (`device.memory_stats()["peak_bytes_in_use"]`: GPU and TPU); None where none does
    (CPU): not guessed."""
    peaks = []
    for device in devices:
        try:
            stats = device.memory_stats()
        except Exception:  # a runtime without the call
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"])
    return float(max(peaks)) if peaks else None
