"""Config files: found by path or by a bundled name, loaded, and checked in one pass.

config = load_config("gpt_pysource.py:smoke")       # bundled with jaxtrain, any install
config = load_config("path/to/my_config.py:arg")    # or a file
"""

import importlib.resources
import importlib.util
import math
import os

import ml_collections

from jaxtrain.errors import ConfigError

# Fields that count something and must be positive.
_POSITIVE = (
    "global_batch_size",
    "num_train_steps",
    "log_every_steps",
    "eval_every_steps",
    "checkpoint_every_steps",
    "microbatches",
)


def bundled_configs() -> list[str]:
    """File names of the config files that ship with jaxtrain (`configs/` in a checkout)."""
    files = importlib.resources.files("jaxtrain.configs")
    return sorted(
        f.name
        for f in files.iterdir()
        if f.name.endswith(".py") and not f.name.startswith(("_", "base"))
    )


def config_path(spec: str) -> str:
    """The file a `FILE.py[:ARG]` spec names: a path if one exists, else a bundled config.

    Raises:
      ConfigError: neither a file nor a bundled config.
    """
    path = spec.partition(":")[0]
    if os.path.isfile(path):
        return path
    bundled = importlib.resources.files("jaxtrain.configs") / os.path.basename(path)
    if os.path.dirname(path) in ("", "configs") and bundled.is_file():
        return str(bundled)
    raise ConfigError(
        f"config file not found: {path!r} (bundled configs: {', '.join(bundled_configs())})"
    )


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads `FILE.py[:ARG]` as `jaxtrain train --config=...` does, without overrides.

    Args:
      spec: a config file path, or the name of a bundled config ("gpt_pysource.py"),
        optionally followed by `:arg` for `get_config(arg)`.

    Returns:
      The ConfigDict, unlocked: set fields as attributes (`config.optim.lr = 1e-3`).

    Raises:
      ConfigError: the file does not exist.
    """
    path = config_path(spec)
    arg = spec.partition(":")[2]
    module_spec = importlib.util.spec_from_file_location("_jaxtrain_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


# The step counter is an int32 on device.
MAX_STEPS = 2**31 - 1


# The checks below, shared by every module's `check_config`: one wording for every field.


def require(ok: bool, field: str, value, what: str) -> None:
    """Raises `ConfigError("config.FIELD must be WHAT, got VALUE")` unless `ok`."""
    if not ok:
        raise ConfigError(f"config.{field} must be {what}, got {value!r}")


def is_int(value) -> bool:
    """An int, not a bool (True is an int to Python, never a count to a config)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def validate(config) -> None:
    """Checks a run config's values before anything is built or written.

    The fields every run has (configs/base.py); a task checks its own (`config.data`,
    `config.model`) when it is built.

    Raises:
      ConfigError: the first bad field, named, with why.
    """
    from jaxtrain import (
        checkpoint,
        compilation_cache,
        energy,
        nonfinite,
        precision,
        profiling,
        sharding,
        tracking,
    )

    for key in _POSITIVE:
        require(is_int(config[key]) and config[key] > 0, key, config[key], "a positive integer")
    require(
        config.num_train_steps <= MAX_STEPS,
        "num_train_steps",
        config.num_train_steps,
        f"at most {MAX_STEPS} (the step counter is an int32)",
    )
    require(is_int(config.eval_steps), "eval_steps", config.eval_steps, "an integer (-1: all)")
    require(is_int(config.seed), "seed", config.seed, "an integer")
    require(is_int(config.data.seed), "data.seed", config.data.seed, "an integer")
    require(
        is_int(config.data.prefetch) and config.data.prefetch >= 1,
        "data.prefetch",
        config.data.prefetch,
        "a positive integer",
    )
    require(
        is_int(config.data.read_threads) and config.data.read_threads >= 0,
        "data.read_threads",
        config.data.read_threads,
        "an integer >= 0",
    )
    o = config.optim
    for key, ok, what in (
        ("lr", is_number(o.lr) and o.lr >= 0, "a finite number >= 0"),
        ("min_lr_ratio", is_number(o.min_lr_ratio) and 0 <= o.min_lr_ratio <= 1, "in [0, 1]"),
        ("warmup_steps", is_int(o.warmup_steps) and o.warmup_steps >= 0, "an integer >= 0"),
        ("b1", is_number(o.b1) and 0 <= o.b1 < 1, "in [0, 1)"),
        ("b2", is_number(o.b2) and 0 <= o.b2 < 1, "in [0, 1)"),
        ("eps", is_number(o.eps) and o.eps > 0, "a positive number"),
        ("weight_decay", is_number(o.weight_decay) and o.weight_decay >= 0, "a number >= 0"),
        ("grad_clip_norm", is_number(o.grad_clip_norm) and o.grad_clip_norm > 0, "positive"),
    ):
        require(ok, f"optim.{key}", o[key], what)
    sharding.Rules(config.rules, param_axes=config.param_axes)  # rules and param_axes
    precision.check_config(config.precision)
    checkpoint.check_config(config.checkpoint)
    nonfinite.check_config(config.nonfinite)
    tracking.check_config(config.logging)
    compilation_cache.check_config(config.compilation_cache)
    profiling.check_config(config.profile)
    energy.check_config(config.energy)
