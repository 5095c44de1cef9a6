"""The checks every module's `check_config` shares: one wording for every field.

Below every module that checks a config (it imports only jaxtrain.errors), so config.py,
which runs those checks, sits above them all:

    from jaxtrain.checks import is_int, require

    require(is_int(n) and n > 0, "model.num_experts", n, "a positive integer")
    # ConfigError: config.model.num_experts must be a positive integer, got 0
"""

import math

from jaxtrain.errors import ConfigError

# The step counter is an int32 on device.
MAX_STEPS = 2**31 - 1


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


def check_eval_steps(value, field: str = "config.eval_steps") -> None:
    """Eval batches per evaluation: a positive integer, or -1 for the whole split.

    Raises:
      ConfigError: anything else (0 or -5 would otherwise read as "all" unnoticed).
    """
    if not (is_int(value) and (value == -1 or value >= 1)):
        raise ConfigError(
            f"{field} must be a positive integer or -1 (all of the split), got {value!r}"
        )
