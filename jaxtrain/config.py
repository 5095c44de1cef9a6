"""Loading config files outside the command line (notebooks, research code, tests)."""

import importlib.util

import ml_collections


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/config.py[:arg]` as `jaxtrain train --config=...` does, without overrides.

    Args:
      spec: a config file path, optionally followed by `:arg` for `get_config(arg)`.

    Returns:
      The ConfigDict, unlocked: set fields as attributes (`config.optim.lr = 1e-3`).
    """
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_jaxtrain_config", path)
    if module_spec is None:
        raise FileNotFoundError(f"config file not found: {path!r}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
