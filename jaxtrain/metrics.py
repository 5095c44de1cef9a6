"""Metric writers (console, `metrics.jsonl`, TensorBoard), throughput and MFU helpers.

Only process 0 writes; every other process gets a writer that does nothing.
"""

import json
import math
import os
import sys
import time

import jax
from tqdm import tqdm

# Dense bf16 peak FLOP/s per device (no sparsity), from the vendors' spec sheets. MFU is
# reported only for these; on anything else (CPU included) it is left out, not guessed.
PEAK_BF16_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # some runtimes report v5p as plain "TPU v5"; after "TPU v5 lite"
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def peak_flops(device: jax.Device) -> float | None:
    """Peak bf16 FLOP/s of one device, or None when its kind is not in the table.

    Kinds match by prefix, first entry first, so more specific names come earlier.
    """
    kind = device.device_kind
    for prefix, flops in PEAK_BF16_FLOPS.items():
        if kind.startswith(prefix):
            return flops
    return None


def console(message: str) -> None:
    """Prints a line on process 0 without breaking the progress bar."""
    if jax.process_index() == 0:
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()


def human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.3g}"


class MetricWriter:
    """Writes scalars to the console, `workdir/metrics.jsonl` and TensorBoard."""

    def __init__(self, workdir: str, *, total_steps: int, initial_step: int):
        self.enabled = jax.process_index() == 0
        self._jsonl = self._tensorboard = None
        # A bar only on a terminal; logs and CI get plain lines.
        self._bar = tqdm(
            total=total_steps,
            initial=initial_step,
            unit="step",
            dynamic_ncols=True,
            disable=not (self.enabled and sys.stderr.isatty()),
        )
        if self.enabled:
            from tensorboardX import SummaryWriter

            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
            self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def advance(self, steps: int = 1) -> None:
        self._bar.update(steps)

    def write(self, step: int, prefix: str, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        order = {k: i for i, k in enumerate(_ORDER)}
        scalars = {k: float(scalars[k]) for k in sorted(scalars, key=lambda k: order.get(k, 99))}
        self._jsonl.write(json.dumps({"step": step, "split": prefix, **scalars}) + "\n")
        self._jsonl.flush()
        for key, value in scalars.items():
            self._tensorboard.add_scalar(f"{prefix}/{key}", value, step)
        self._tensorboard.flush()
        shown = " | ".join(f"{k} {_fmt(v)}" for k, v in scalars.items())
        console(f"step {step:>6} {prefix:>5} | {shown}")

    def close(self) -> None:
        self._bar.close()
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()


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
)


def _fmt(value: float) -> str:
    if value != value or math.isinf(value):
        return str(value)
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"


def truncate_metrics(workdir: str, last_step: int) -> None:
    """Drops metric lines logged after `last_step` (by a run that died after its last save).

    The rewrite goes through a temporary file and an atomic rename, so a crash here
    never leaves a half-written log.
    """
    path = os.path.join(workdir, "metrics.jsonl")
    if jax.process_index() != 0 or not os.path.exists(path):
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
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, path)


class Throughput:
    """Steps per second between two points where the device was known to be idle."""

    def __init__(self, step: int):
        self.reset(step)

    def reset(self, step: int) -> None:
        self._step, self._time = step, time.perf_counter()

    def measure(self, step: int) -> float | None:
        """Seconds per step since the last mark, and marks `step`."""
        now = time.perf_counter()
        steps = step - self._step
        seconds = (now - self._time) / steps if steps > 0 else None
        self._step, self._time = step, now
        return seconds


def compiled_stats(compiled) -> dict[str, float]:
    """Per-device FLOPs and memory of a compiled step, from XLA's own analyses."""
    stats = {}
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per device program
        cost = cost[0] if cost else None
    if cost and cost.get("flops", -1) >= 0:
        stats["flops"] = float(cost["flops"])
    memory = compiled.memory_analysis()
    if memory is not None:
        for name in (
            "argument_size_in_bytes",
            "output_size_in_bytes",
            "temp_size_in_bytes",
            "generated_code_size_in_bytes",
            "alias_size_in_bytes",
        ):
            if hasattr(memory, name):
                stats[name] = float(getattr(memory, name))
    return stats
