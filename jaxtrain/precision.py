"""Dtype policy: what the model computes in and what it stores parameters in.

Parameters, optimizer state and the loss stay float32; activations and matmuls use the
compute dtype. bfloat16 has float32's exponent range, so it needs no loss scaling.
"""

import jax
import jax.numpy as jnp

from jaxtrain.errors import ConfigError

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_dtype(name: str, platform: str | None = None):
    """Maps a config dtype name to a jnp dtype.

    "auto" is bfloat16 on TPU and GPU (their matrix units are made for it) and float32
    on CPU, where bfloat16 is emulated and slower.
    """
    if name == "auto":
        platform = platform or jax.devices()[0].platform
        return jnp.float32 if platform == "cpu" else jnp.bfloat16
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose one of {['auto', *_DTYPES]}")
    return _DTYPES[name]


def dtypes(precision_config, platform: str | None = None):
    """(compute_dtype, param_dtype) for `config.precision`."""
    return (
        resolve_dtype(precision_config.compute_dtype, platform),
        resolve_dtype(precision_config.param_dtype, platform),
    )
