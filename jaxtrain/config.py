"""Config files: found by path or by a bundled name, loaded, and checked in one pass.

config = load_config("gpt_pysource.py:smoke")       # bundled with jaxtrain, any install
config = load_config("path/to/my_config.py:arg")    # or a file
"""

import importlib.resources
import importlib.util
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


def validate(config) -> None:
    """Checks a run config's values before anything is built or written.

    Raises:
      ConfigError: the first bad field, named, with why.
    """
    from jaxtrain import checkpoint, nonfinite, precision

    for key in _POSITIVE:
        if config[key] <= 0:
            raise ConfigError(f"config.{key} must be positive, got {config[key]}")
    for key in ("compute_dtype", "param_dtype"):
        precision.resolve_dtype(config.precision[key], "cpu")
    checkpoint.check_config(config.checkpoint)
    nonfinite.check_config(config.nonfinite)
