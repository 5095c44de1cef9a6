"""User code named in a config by import path: `"package.module:attribute"`."""

import importlib
import os
import sys

from jaxtrain.errors import ConfigError


def resolve(path: str, field: str):
    """Imports `package.module` and returns its `attribute`.

    The current directory is importable, as with `python -m`, so a config can name a
    module beside it (`jaxtrain train` runs as a console script, whose sys.path lacks it).

    Args:
      path: `"package.module:attribute"` (`attribute` may be dotted).
      field: the config field that holds it, for the message.

    Raises:
      ConfigError: one line naming the field, the path and what failed.
    """
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"{field}={path!r} must be an import path 'package.module:name'")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        target = importlib.import_module(module_name)
    except Exception as e:  # not found, or the module itself failed: say which and why
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise ConfigError(f"{field}={path!r}: cannot import {module_name!r} ({reason})") from e
    where = module_name
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{field}={path!r}: {where!r} has no attribute {part!r}")
        target, where = getattr(target, part), f"{where}.{part}"
    if not callable(target):
        raise ConfigError(f"{field}={path!r} is not callable")
    return target
