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
        data.pipeline.get_builder(config.data.name, config.data.data_dir)  # a bad name fails
        train_data = lambda: labelled_images(config.data, config.data.train_split)  # noqa: E731
        eval_data = lambda: labelled_images(config.data, config.data.eval_split)  # noqa: E731
    compute_dtype, param_dtype = precision.dtypes(config.precision)
    model = models.make_model(config.model, dtype=compute_dtype, param_dtype=param_dtype)
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
