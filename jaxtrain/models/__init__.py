"""Models by config name: `config.model.name` -> a function `rngs -> nnx.Module`.

`name` is a bundled model ("gpt", "cnn"), built from its typed hyperparameters (the other
`config.model` fields) and the compute and parameter dtypes of `config.precision`; or an
import path `"package.module:Factory"` to the user's own NNX module class (or function),
called with the other fields as keyword arguments and `rngs=`.
"""

import dataclasses
from collections.abc import Callable

from flax import nnx

from jaxtrain import imports
from jaxtrain.errors import ConfigError, did_you_mean
from jaxtrain.models.cnn import CNN, CNNConfig
from jaxtrain.models.gpt import GPT, GPTConfig

# name -> (module class, its typed hyperparameters)
BUNDLED = {"gpt": (GPT, GPTConfig), "cnn": (CNN, CNNConfig)}


def hyperparameters(model_config):
    """The bundled model's typed hyperparameters from `config.model`.

    Raises:
      ConfigError: unknown model name, missing, unknown or invalid fields.
    """
    fields = dict(model_config)
    name = fields.pop("name")
    if name not in BUNDLED:
        raise ConfigError(
            f"unknown model {name!r}{did_you_mean(name, BUNDLED)}; bundled models: "
            f"{sorted(BUNDLED)}, or an import path 'package.module:Class'"
        )
    config_class = BUNDLED[name][1]
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown, missing = sorted(set(fields) - known), sorted(known - set(fields))
    if unknown or missing:
        problem = f"unknown field {unknown[0]!r}" if unknown else f"missing field {missing[0]!r}"
        raise ConfigError(f"config.model ({name}): {problem}; fields are {sorted(known)}")
    try:
        return config_class(**{k: _plain(v) for k, v in fields.items()})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model ({name}): {e}") from e


def _plain(value):
    # ConfigDict fields come back as lists where the config wrote tuples; dataclasses
    # must stay hashable (they are static parts of the model).
    return tuple(value) if isinstance(value, list) else value


def make_model(model_config, *, dtype, param_dtype) -> Callable[[nnx.Rngs], nnx.Module]:
    """A function `rngs -> model` for `config.model` (see the module docstring).

    Raises:
      ConfigError: a bad name, import path or field; checked now, before any model is built.
    """
    name = model_config.name
    if ":" in name:
        factory = imports.resolve(name, "config.model.name")
        fields = {k: v for k, v in dict(model_config).items() if k != "name"}
        return lambda rngs: factory(**fields, rngs=rngs)
    model_class = BUNDLED.get(name, (None,))[0]
    cfg = hyperparameters(model_config)
    return lambda rngs: model_class(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
