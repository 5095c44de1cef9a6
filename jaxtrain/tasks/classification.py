"""The bundled image-classification task: softmax cross-entropy over integer labels.

`config.task = "classification"`: the model named by `config.model` (the bundled CNN, or
an import path to any module mapping uint8 images [batch, height, width, channels] to
logits [batch, classes]), trained on a TFDS image data set (`config.data`).

Its pieces (`__all__`) are public, for wrapping rather than forking, as
`jaxtrain.tasks.lm` shows: `dataclasses.replace(classification.make_task(config),
loss=my_loss, optimizer=...)`, with `example_losses` (per-example cross-entropy and
correctness) to build a loss from. Evaluation keeps `eval_metrics`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtrain import data, models, precision
from jaxtrain.checks import is_int, require
from jaxtrain.data import synthetic
from jaxtrain.errors import ConfigError
from jaxtrain.tasks import Task

__all__ = ["eval_metrics", "example_losses", "labelled_images", "loss", "make_task"]


def example_losses(logits, labels):
    """Per-example cross-entropy and correctness (float32), each [batch]."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return losses, correct


def loss(model, batch, rngs):
    """Mean cross-entropy of a batch, and its accuracy."""
    losses, correct = example_losses(model(batch["inputs"]), batch["targets"])
    return jnp.mean(losses), {"accuracy": jnp.mean(correct)}


def eval_metrics(model, batch, rngs):
    """Per-example loss and accuracy."""
    losses, correct = example_losses(model(batch["inputs"]), batch["targets"])
    return {"loss": losses, "accuracy": correct}


def labelled_images(data_config, split: str):
    """A TFDS image split as `{"inputs": uint8 image, "targets": int32 label}` examples."""
    records = data.from_tfds(data_config.name, split, data_dir=data_config.data_dir)
    image_key, label_key = data_config.image_key, data_config.label_key
    return records.map(
        lambda r: {"inputs": np.asarray(r[image_key]), "targets": np.int32(r[label_key])}
    )


def check_data_fields(config, features) -> None:
    """Checks the config against an image data set's features (`builder.info.features`).

    Labels the head has no output for would train to a NaN loss at step 1, and images of
    another shape fail in the first step, both after the workdir was written.

    Raises:
      ConfigError: no such image or label field, fewer `config.model.num_classes` than
        the data set has classes, or a `config.model.image_shape` its images do not have.
    """
    name = config.data.name
    for field in ("image_key", "label_key"):
        key = config.data[field]
        if key not in features:
            raise ConfigError(
                f"config.data.{field}={key!r} is not a field of data set {name!r}; "
                f"it has {sorted(features)}"
            )
    classes = getattr(features[config.data.label_key], "num_classes", None)
    if classes is not None and "num_classes" in config.model:
        require(
            is_int(config.model.num_classes) and config.model.num_classes >= classes,
            "model.num_classes",
            config.model.num_classes,
            f"at least {classes}: data set {name!r} has {classes} classes",
        )
    shape = getattr(features[config.data.image_key], "shape", None)
    if shape is not None and "image_shape" in config.model:
        want = tuple(config.model.image_shape)
        fits = len(want) == len(shape) and all(
            s is None or s == w for s, w in zip(shape, want, strict=True)
        )
        require(
            fits,
            "model.image_shape",
            want,
            f"the shape of the images of data set {name!r}, {tuple(shape)}",
        )


def make_task(config) -> Task:
    """The classification task of a config (configs/digits_cnn.py); loads no data.

    The task's `loss` is `loss`, its `eval_metrics` `eval_metrics`, its optimizer the
    config's (`optimizer=None`); replace any of them with `dataclasses.replace`.

    One example's image shape comes from `config.model.image_shape` when the model has
    that field (the bundled CNN), otherwise from the first training example.
    `config.data.name = "synthetic"` trains on random images of that shape with random
    labels below `config.model.num_classes`, made per example.

    Raises:
      ConfigError: an unknown data set or model, bad model fields, or synthetic data for a
        model without `image_shape` and `num_classes`.
    """
    # The model's own fields first: the checks below read them.
    compute_dtype, param_dtype = precision.dtypes(config.precision)
    model = models.make_model(config.model, dtype=compute_dtype, param_dtype=param_dtype)
    if config.data.name == synthetic.NAME:
        if not ("image_shape" in config.model and "num_classes" in config.model):
            raise ConfigError(
                "config.data.name='synthetic' makes images of config.model.image_shape "
                "with labels below config.model.num_classes: the model config has no such fields"
            )
        train_data, eval_data = (
            synthetic.SyntheticImages(
                split,
                config.data.seed,
                image_shape=config.model.image_shape,
                num_classes=config.model.num_classes,
            )
            for split in ("train", "eval")
        )
    else:
        builder = data.pipeline.get_builder(config.data.name, config.data.data_dir)
        check_data_fields(config, builder.info.features)
        train_data = lambda: labelled_images(config.data, config.data.train_split)  # noqa: E731
        eval_data = lambda: labelled_images(config.data, config.data.eval_split)  # noqa: E731
    return Task(
        model=model,
        loss=loss,
        data=train_data,
        eval_data=eval_data,
        eval_metrics=eval_metrics,
        example=(
            {
                "inputs": jax.ShapeDtypeStruct(tuple(config.model.image_shape), jnp.uint8),
                "targets": jax.ShapeDtypeStruct((), jnp.int32),
            }
            if "image_shape" in config.model
            else None
        ),
        name=config.model.name,
    )
