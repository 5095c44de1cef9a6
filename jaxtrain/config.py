"""Config files: found by path or by a bundled name, loaded, and checked in one pass.

config = load_config("gpt_pysource.py:smoke")       # bundled with jaxtrain, any install
config = load_config("path/to/my_config.py:arg")    # or a file
"""

import importlib.resources
import importlib.util
import os

import ml_collections

# The shared checks live below every module (jaxtrain.checks); importing them here also
# keeps `jaxtrain.config.require` and friends working for tasks written before.
from jaxtrain.checks import MAX_STEPS, check_eval_steps, is_int, is_number, require  # noqa: F401
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
      ConfigError: the file does not exist, does not load (its error, in a line), has no
        `get_config`, or returns something that is not a run config (see `check_fields`).
    """
    path = config_path(spec)
    name, colon, arg = spec.partition(":")
    try:
        module_spec = importlib.util.spec_from_file_location("_jaxtrain_config", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        get_config = getattr(module, "get_config", None)
        if not callable(get_config):
            raise ConfigError(
                f"config file {name!r} has no get_config() function "
                "(def get_config(arg=None): returning an ml_collections.ConfigDict)"
            )
        # As config_flags calls it: `FILE.py:` passes "".
        config = get_config(arg) if colon else get_config()
    except ConfigError:
        raise
    except Exception as e:  # the user's code: its error, in a line, with the file's name
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:400]
        raise ConfigError(f"config file {name!r} failed to load: {reason}") from e
    check_fields(config, name)
    from jaxtrain.checks import check_unused_optimizer_fields
    from jaxtrain.configs import base

    # A field of an optimizer the file does not choose would look as if it applied.
    check_unused_optimizer_fields(config.optim, base.get_config().optim, f"config file {name!r}")
    return config


def check_fields(config, source: str | None = None) -> None:
    """Checks that `config` is a ConfigDict with every field of configs/base.py.

    A config that does not start from `base.get_config()` (a plain dict, None, a
    ConfigDict built from nothing) would otherwise fail later with a KeyError on the first
    field read. The mesh's axes are the exception: an axis left out has size 1.

    Args:
      config: what a config file's `get_config` returned, or a config built in code.
      source: the config file's name, for the message; None: built in code.

    Raises:
      ConfigError: naming the file and what is wrong.
    """
    from jaxtrain.configs import base

    if not isinstance(config, ml_collections.ConfigDict):
        got = type(config).__name__
        what = f"config file {source!r}: get_config() returned" if source else "the config is a"
        raise ConfigError(
            f"{what} {got}, not an ml_collections.ConfigDict: start from "
            "jaxtrain.configs.base (c = base.get_config())"
        )
    # Each missing field once, at its shallowest level: "data", not each field of it.
    missing = list(
        dict.fromkeys(
            _missing_part(config, "mesh" if key.startswith("mesh.") else key)
            for key in _dotted_fields(base.get_config())
        )
    )
    missing = [key for key in missing if key]
    if missing:
        listed = ", ".join(repr(key) for key in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ConfigError(
            f"{f'config file {source!r}: ' if source else ''}the config has no field "
            f"{listed}{more}: start from "
            "jaxtrain.configs.base (c = base.get_config()), which has every field a run reads"
        )


def _dotted_fields(config, prefix=""):
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict) and len(value):
            yield from _dotted_fields(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def _missing_part(config, dotted: str) -> str | None:
    """The shortest prefix of the dotted field `dotted` that `config` lacks, or None."""
    node, parts = config, dotted.split(".")
    for i, key in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or key not in node:
            return ".".join(parts[: i + 1])
        node = node[key]
    return None


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
        optim,
        precision,
        profiling,
        sharding,
        tracking,
    )

    check_fields(config)
    for key in _POSITIVE:
        require(is_int(config[key]) and config[key] > 0, key, config[key], "a positive integer")
    require(
        config.num_train_steps <= MAX_STEPS,
        "num_train_steps",
        config.num_train_steps,
        f"at most {MAX_STEPS} (the step counter is an int32)",
    )
    check_eval_steps(config.eval_steps)
    # jax's keys take a 64-bit seed; grain's and numpy's shuffles a non-negative one.
    require(
        is_int(config.seed) and -(2**63) <= config.seed < 2**63,
        "seed",
        config.seed,
        "a 64-bit integer",
    )
    require(
        is_int(config.data.seed) and 0 <= config.data.seed < 2**63,
        "data.seed",
        config.data.seed,
        "an integer from 0 to 2**63 - 1",
    )
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
    optim.check_config(config.optim)
    sharding.Rules(config.rules, param_axes=config.param_axes)  # rules and param_axes
    precision.check_config(config.precision)
    checkpoint.check_config(config.checkpoint)
    nonfinite.check_config(config.nonfinite)
    tracking.check_config(config.logging)
    compilation_cache.check_config(config.compilation_cache)
    profiling.check_config(config.profile)
    energy.check_config(config.energy)
