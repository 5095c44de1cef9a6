"""Model registry: `config.model.name` -> an NNX module class.

Each class has a `task` attribute ("classification" or "lm") that picks the loss and the
input pipeline, and takes the remaining `config.model` fields as keyword arguments.
"""

import difflib

from flax import nnx

from jaxtrain.errors import ConfigError
from jaxtrain.models.cnn import CNN
from jaxtrain.models.gpt import GPT

MODELS = {"cnn": CNN, "gpt": GPT}


def model_class(name: str):
    """Looks up a model class by config name, with a one-line error naming the choices."""
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown model {name!r}{hint}; known models: {sorted(MODELS)}")
    return MODELS[name]


def make_model(model_config, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Module:
    """Builds the model named by `model_config.name` from the other fields."""
    fields = dict(model_config)
    cls = model_class(fields.pop("name"))
    try:
        return cls(**fields, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model ({model_config.name}): {e}") from e


def train_flops_per_example(config, params) -> float | None:
    """Model FLOPs to train on one example, or None for a model with no formula.

    Args:
      config: the run's config (model and data fields).
      params: the model's parameters (arrays or ShapeDtypeStructs).
    """
    formula = getattr(model_class(config.model.name), "train_flops_per_example", None)
    return formula(config, params) if formula else None
