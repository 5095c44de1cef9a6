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


def check_unused_optimizer_fields(o, reference, source: str) -> None:
    """Refuses a field of an optimizer other than `o.name` that differs from `reference`.

    Such a field would look as if it applied. A config file is checked against
    configs/base.py's defaults; a command line's overrides against the config file (whose
    own optimizer's fields, such as the GPT configs' adamw.b2, stay as they are when an
    override picks another optimizer).

    Args:
      o: `config.optim`.
      reference: the `config.optim` whose values count as unchanged.
      source: who changed it, for the message ("config file 'x.py'", "--config overrides").

    Raises:
      ConfigError: the first such field.
    """
    # Every sub-dict of config.optim is an optimizer's fields (jaxtrain.optim.OPTIMIZERS);
    # here, below jax, so that the command line checks its overrides before importing it.
    for name in [k for k, v in o.items() if hasattr(v, "items")]:
        if name == o.get("name") or name not in reference:
            continue
        for key in o[name]:
            if key in reference[name] and o[name][key] != reference[name][key]:
                raise ConfigError(
                    f"{source}: config.optim.{name}.{key} does not apply: optim.name is "
                    f"{o.get('name')!r} (set optim.name={name!r}, or leave it at "
                    f"{reference[name][key]!r})"
                )
