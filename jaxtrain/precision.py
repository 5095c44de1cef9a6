"""Dtype policy and dynamic loss scaling.

Parameters, optimizer state, logits and the loss stay float32; activations and matmuls
use the compute dtype, chosen by one rule (`auto_compute_dtype`): bfloat16 where the
hardware has it (TPU, NVIDIA compute capability 8.0+), float16 on older GPUs (T4, V100:
Colab's free GPU is a T4), float32 on CPU.

bfloat16 has float32's exponent range and needs no loss scaling. float16 tops out at
65504 and flushes below ~6e-8, so its small gradients vanish unless the loss is scaled up
before the backward pass and the gradients scaled back down after it. Optax has no loss
scaling and jmp (DeepMind's mixed-precision library) is no longer maintained, so it is
written here, small: `LossScale` holds the rule, the train state holds the scale.
"""

import dataclasses

import jax
import jax.numpy as jnp

from jaxtrain.checks import is_int, is_number, require
from jaxtrain.errors import ConfigError

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
LOSS_SCALING = ("auto", "dynamic", "none")

# NVIDIA GPUs by their name, for a runtime that does not report a compute capability:
# those before Ampere (sm80) have no bfloat16 matrix units.
_NO_BFLOAT16_GPUS = ("Tesla T4", "Tesla V100", "Tesla P100", "Tesla P4", "Quadro", "TITAN V")


def auto_compute_dtype(platform: str, device_kind: str = "", compute_capability=None):
    """The compute dtype "auto" means on a device: the one rule.

    Args:
      platform: jax's platform name ("cpu", "gpu", "tpu", "cuda", "rocm").
      device_kind: jax's `device.device_kind` ("Tesla T4", "NVIDIA H100 80GB HBM3").
      compute_capability: an NVIDIA GPU's ("7.5", "8.0"; jax's
        `device.compute_capability`), or None when unknown.

    Returns:
      float32 on CPU (bfloat16 is emulated there, and slower); float16 on NVIDIA GPUs
      older than compute capability 8.0 (T4 is 7.5, V100 7.0); bfloat16 otherwise (TPU,
      A100, H100, ..., AMD GPUs).
    """
    if platform == "cpu":
        return jnp.float32
    if platform in ("gpu", "cuda"):
        if compute_capability is not None:
            major = int(str(compute_capability).split(".")[0])
            return jnp.bfloat16 if major >= 8 else jnp.float16
        if device_kind.startswith(_NO_BFLOAT16_GPUS):
            return jnp.float16
    return jnp.bfloat16


def resolve_dtype(name: str, platform: str | None = None, device=None, device_kind: str = ""):
    """Maps a config dtype name to a jnp dtype.

    Args:
      name: "auto", "float32", "bfloat16" or "float16".
      platform: for "auto" without a device (planning for a target): its platform.
      device: for "auto": the device to compute on; default `jax.devices()[0]`.
      device_kind: with `platform`, the target's device kind: a GPU is taken to have
        bfloat16 unless its name says otherwise ("Tesla T4").

    Raises:
      ConfigError: an unknown name.
    """
    if name == "auto":
        if platform is not None and device is None:
            return auto_compute_dtype(platform, device_kind)
        device = device or jax.devices()[0]
        return auto_compute_dtype(
            device.platform, device.device_kind, getattr(device, "compute_capability", None)
        )
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose one of {['auto', *_DTYPES]}")
    return _DTYPES[name]


def dtypes(precision_config, platform: str | None = None, device=None):
    """(compute_dtype, param_dtype) for `config.precision` (see `resolve_dtype`)."""
    return (
        resolve_dtype(precision_config.compute_dtype, platform, device),
        resolve_dtype(precision_config.param_dtype, platform, device),
    )


def check_config(precision_config) -> None:
    """Rejects a bad `config.precision` before anything is built.

    Raises:
      ConfigError: naming the field and why.
    """
    p = precision_config
    for key in ("compute_dtype", "param_dtype"):
        resolve_dtype(p[key], "cpu")
    if p.param_dtype == "float16":
        raise ConfigError(
            "config.precision.param_dtype='float16': float16 parameters lose small "
            "updates; keep 'float32' (compute_dtype='float16' computes in float16)"
        )
    if p.loss_scaling not in LOSS_SCALING:
        raise ConfigError(
            f"config.precision.loss_scaling={p.loss_scaling!r}; choose one of {LOSS_SCALING}"
        )
    init, growth = p.loss_scale_init, p.loss_scale_growth_steps
    require(
        is_number(init) and 1 <= init < 2**64, "precision.loss_scale_init", init, "in [1, 2**64)"
    )
    require(
        is_int(growth) and growth >= 1,
        "precision.loss_scale_growth_steps",
        growth,
        "a positive integer",
    )


@dataclasses.dataclass(frozen=True)
class LossScale:
    """Dynamic loss scaling: the rule. The train state holds its state (`initial_state`).

    The loss is multiplied by `scale` before the backward pass and the gradients divided
    by it after. A step whose scaled gradients overflow (the loss finite, a gradient not)
    is skipped and the scale halves; after `growth_steps` finite steps in a row it
    doubles. At a scale of 1 nothing is scaled up any more, so an overflow there is a
    real non-finite gradient, for `config.nonfinite` to handle.

    Attributes:
      init: the first scale (a power of two keeps the scaling exact).
      growth_steps: finite steps in a row after which the scale doubles.
    """

    init: float = 2.0**15
    growth_steps: int = 2000

    # The scale never rises past this: float32 holds it and the scaled loss exactly.
    MAX = 2.0**64

    def initial_state(self) -> dict:
        """The state the train state starts with: `{"scale", "good_steps", "overflows"}`."""
        return {
            "scale": jnp.asarray(self.init, jnp.float32),
            "good_steps": jnp.zeros((), jnp.int32),  # finite steps since the last change
            "overflows": jnp.zeros((), jnp.int32),  # steps skipped for an overflow, in all
        }

    def is_overflow(self, state: dict, loss_finite, grads_finite):
        """Whether a step's non-finite gradients are the scale's doing (the loss finite)."""
        return loss_finite & ~grads_finite & (state["scale"] > 1.0)

    def update(self, state: dict, grads_finite, overflow) -> dict:
        """The state after a step: halved on an overflow, doubled after `growth_steps`."""
        scale, good = state["scale"], state["good_steps"] + 1
        grow = grads_finite & (good >= self.growth_steps)
        scale = jnp.where(grow, jnp.minimum(scale * 2, self.MAX), scale)
        scale = jnp.where(overflow, jnp.maximum(scale / 2, 1.0), scale)
        return {
            "scale": scale,
            "good_steps": jnp.where(grow | ~grads_finite, 0, good).astype(jnp.int32),
            "overflows": state["overflows"] + overflow.astype(jnp.int32),
        }


def loss_scale(precision_config, device=None) -> LossScale | None:
    """The run's loss scaling (`config.precision`), or None when the loss is not scaled.

    "auto" scales exactly when the compute dtype is float16.
    """
    p = precision_config
    compute = resolve_dtype(p.compute_dtype, device=device)
    if p.loss_scaling == "none" or (p.loss_scaling == "auto" and compute != jnp.float16):
        return None
    return LossScale(init=float(p.loss_scale_init), growth_steps=p.loss_scale_growth_steps)
