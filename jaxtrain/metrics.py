"""Metric writers: the console, `metrics.jsonl`, TensorBoard and W&B; step timing and memory.

Only process 0 writes; every other process gets a writer that does nothing. A console
that went away (`| head`) is dropped silently, and W&B (a copy, over a network) gets one
warning. The run's own files are its record: a `metrics.jsonl` or TensorBoard file that
cannot be written (disk full, `ulimit -f`, read-only, permission) stops the run with a
StorageError (one line naming the file, exit 74). Nothing is lost by it: the line that
failed is cut back off, the last checkpoint is intact, and the rerun logs again, bitwise,
the steps after that checkpoint.

The file's format, and how a start repairs it: `jaxtrain.metrics_jsonl`.
"""

import math
import os
import socket
import struct
import sys
import time

import jax
from tqdm import tqdm

from jaxtrain import files, tracking
from jaxtrain.errors import StorageError
from jaxtrain.metrics_jsonl import encode_record, resume_log

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
            try:
                self._open(workdir, start_step, config)
            except BaseException:
                self.close()
                raise

    def _open(self, workdir: str, start_step: int, config: dict | None) -> None:
        resume_log(self._path, start_step)
        try:
            self._jsonl = files.open_for_appending(self._path)
        except OSError as e:
            raise files.storage_error("open", self._path, e) from e
        self._tensorboard = EventFile(os.path.join(workdir, "tensorboard"))
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
            line = encode_record({"step": step, "split": split, **scalars}).encode() + b"\n"
            try:
                files.append_line(self._jsonl, line)
            except OSError as e:
                self._close_files()
                raise files.storage_error(f"write step {step}'s metrics to", self._path, e) from e
            self._tensorboard.scalars(step, {f"{split}/{k}": v for k, v in scalars.items()})
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
        jsonl, tensorboard = self._jsonl, self._tensorboard
        self._jsonl = self._tensorboard = None
        if jsonl is not None:
            os.close(jsonl)  # each line was written whole: nothing is buffered
        if tensorboard is not None:
            tensorboard.close()


class EventFile:
    """A TensorBoard event file in `directory`: each event written whole, or not at all.

    tensorboardX's writers buffer: SummaryWriter in a background thread, which on a full
    disk dies (a traceback on stderr) and whose bounded queue then blocks the training loop
    for ever; its EventsWriter in a buffered file, which half-writes a record and fails
    again at close. This writes each event's TFRecord frame (length, CRC, event, CRC:
    tensorboardX's framing) in one unbuffered append, cut back off if it fails.

    Raises (on any call but close):
      StorageError: the directory or its event file cannot be written, naming it.
    """

    def __init__(self, directory: str):
        from tensorboardX.proto import event_pb2

        # tensorboardX's name, and the pid: a rerun within the same second gets its own file.
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(directory, name)
        self._fd = None
        try:
            os.makedirs(directory, exist_ok=True)
            self._fd = files.open_for_appending(self.path)
        except OSError as e:
            raise files.storage_error("write TensorBoard events in", directory, e) from e
        try:
            self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        except StorageError:
            self.close()
            os.remove(self.path)  # empty: nothing of this run's is lost
            raise

    def add_summary(self, summary, step: int | None = None) -> None:
        """Writes one `Summary` proto (`tensorboardX.summary`) as an event at `step`."""
        from tensorboardX.proto import event_pb2

        event = event_pb2.Event(wall_time=time.time(), summary=summary)
        if step is not None:
            event.step = step
        self._write(event)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Writes `{tag: value}` at `step` as one event."""
        from tensorboardX.proto import summary_pb2

        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()]
        )
        self.add_summary(summary, step)

    def _write(self, event) -> None:
        from tensorboardX.record_writer import masked_crc32c

        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        frame = b"".join(
            (header, struct.pack("<I", masked_crc32c(header)), data)
            + (struct.pack("<I", masked_crc32c(data)),)
        )
        try:
            files.append_frame(self._fd, frame)
        except OSError as e:
            raise files.storage_error("write TensorBoard events to", self.path, e) from e

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


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
            fd = files.open_for_appending(path)
            try:
                files.append_line(fd, encode_record(record).encode() + b"\n")
            finally:
                os.close(fd)
        except OSError as e:
            raise files.storage_error("append to", path, e) from e
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
