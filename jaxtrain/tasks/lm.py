"""The bundled language-modelling task: next-token cross-entropy over byte-level text.

`config.task = "lm"`: the model named by `config.model` (the bundled GPT, or an import
path to any module mapping tokens [batch, length] to logits [batch, length, vocab]),
trained on consecutive windows of a TFDS text data set's bytes (`config.data`).

Its pieces (`__all__`) are public, for wrapping rather than forking: build the task of a
config, then replace what you change (a `jaxtrain.Task` is a frozen dataclass):

    import dataclasses
    import optax
    from jaxtrain import optim
    from jaxtrain.tasks import lm

    def smoothed(model, batch, rngs):  # lm.loss with label smoothing
        logits = model(batch["inputs"], rngs=rngs)
        labels = optax.smooth_labels(jax.nn.one_hot(batch["targets"], logits.shape[-1]), 0.1)
        return jnp.mean(optax.softmax_cross_entropy(logits, labels)), {}

    task = dataclasses.replace(
        lm.make_task(config),
        loss=smoothed,
        # The config's optimizer (optim.make_optimizer), after a transformation of yours.
        optimizer=lambda schedule: optax.chain(
            optax.add_noise(0.01, 0.55, seed=0), optim.make_optimizer(config.optim, schedule)
        ),
    )
    jaxtrain.train_and_evaluate(config, workdir, task=task)

Evaluation keeps `eval_metrics` (per-token cross-entropy and accuracy), so a wrapped and
a plain run report the same quantity. From the command line, a function of yours that
returns such a task is `config.task = "my_tasks:make_task"`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtrain import data, models, precision
from jaxtrain.checks import is_int, require
from jaxtrain.data import synthetic
from jaxtrain.errors import ConfigError
from jaxtrain.models import gpt
from jaxtrain.tasks import Task

__all__ = [
    "DOCUMENT_SEPARATOR",
    "TokenWindows",
    "eval_metrics",
    "load_tokens",
    "loss",
    "make_task",
    "summarize_eval",
    "text_windows",
    "token_losses",
]

# Separates documents in the byte stream of a text data set; source files contain no NULs.
DOCUMENT_SEPARATOR = 0


def token_losses(logits, targets):
    """Per-token cross-entropy and correctness (float32), each [batch, length]."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return losses, correct


def loss(model, batch, rngs):
    """Mean next-token cross-entropy of a batch, and its token accuracy (the train loss).

    Args:
      model: maps `batch["inputs"]` (int32 [batch, length]) to logits, called with
        `rngs=` (dropout).
      batch: `{"inputs", "targets"}`, targets the inputs shifted by one.
      rngs: this step's `nnx.Rngs`.

    Returns:
      (loss, {"accuracy": ...}), both means over every token of the batch.
    """
    losses, correct = token_losses(model(batch["inputs"], rngs=rngs), batch["targets"])
    return jnp.mean(losses), {"accuracy": jnp.mean(correct)}


def eval_metrics(model, batch, rngs):
    """Per-token loss and accuracy: evaluation averages them over every real token."""
    losses, correct = token_losses(model(batch["inputs"]), batch["targets"])
    return {"loss": losses, "accuracy": correct}


def summarize_eval(metrics: dict) -> dict:
    """Adds the perplexity, exp(mean loss per token)."""
    return {**metrics, "perplexity": float(np.exp(min(metrics["loss"], 50.0)))}


class TokenWindows:
    """Random-access language-model examples: consecutive windows of a byte stream."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self._tokens = tokens
        self._seq_len = seq_len

    def __len__(self):
        return max(0, (len(self._tokens) - 1) // self._seq_len)

    def __getitem__(self, index):
        start = index * self._seq_len
        window = self._tokens[start : start + self._seq_len + 1].astype(np.int32)
        return {"inputs": window[:-1], "targets": window[1:]}


def load_tokens(records, text_key: str) -> np.ndarray:
    """Concatenates a text split's records into one uint8 byte stream (byte-level tokens).

    Holds the whole split in host memory: right for the bundled corpus (tens of MB);
    a catalog corpus of many GB wants a pre-tokenised data set instead.
    """
    parts = []
    for index in range(len(records)):
        text = records[index][text_key]
        parts.append(np.frombuffer(text if isinstance(text, bytes) else text.encode(), np.uint8))
        parts.append(np.array([DOCUMENT_SEPARATOR], np.uint8))
    return np.concatenate(parts) if parts else np.zeros((0,), np.uint8)


def text_windows(data_config, split: str) -> TokenWindows:
    """`seq_len`-byte windows (inputs, and targets shifted by one) of a TFDS text split.

    Raises:
      ConfigError: an unknown data set or split, or a split shorter than one window.
    """
    records = data.from_tfds(data_config.name, split, data_dir=data_config.data_dir)
    windows = TokenWindows(load_tokens(records, data_config.text_key), data_config.seq_len)
    if not len(windows):
        raise ConfigError(
            f"split {split!r} of {data_config.name!r} is shorter than one "
            f"sequence of config.data.seq_len={data_config.seq_len}"
        )
    return windows


def check_data_fields(config, features) -> None:
    """Checks the config against a text data set's features (`builder.info.features`).

    Its tokens are bytes, 0 to 255: a model's `vocab_size`, where it has one, must cover
    them (fewer would train to a NaN loss at step 1, after the workdir was written).

    Raises:
      ConfigError: no such text field, or a vocabulary smaller than 256.
    """
    text_key = config.data.text_key
    if text_key not in features:
        raise ConfigError(
            f"config.data.text_key={text_key!r} is not a field of data set "
            f"{config.data.name!r}; it has {sorted(features)}"
        )
    if "vocab_size" in config.model:
        vocab_size = config.model.vocab_size
        require(
            is_int(vocab_size) and vocab_size >= 256,
            "model.vocab_size",
            vocab_size,
            f"at least 256: the tokens of data set {config.data.name!r} are bytes",
        )


def make_task(config) -> Task:
    """The LM task of a config (configs/gpt_pysource.py); checks names, loads no data.

    The task's `loss` is `loss`, its `eval_metrics` `eval_metrics`, its optimizer the
    config's (`optimizer=None`); replace any of them with `dataclasses.replace`.

    `config.data.name = "synthetic"` trains on random tokens below
    `config.model.vocab_size` (256 for a model without that field), made per example.

    Raises:
      ConfigError: an unknown data set or model, bad model fields, or a data set field
        or vocabulary that does not fit them (check_data_fields).
    """
    seq_len = config.data.seq_len
    require(is_int(seq_len) and seq_len >= 1, "data.seq_len", seq_len, "a positive integer")
    # The model's own fields first: the checks below read them.
    compute_dtype, param_dtype = precision.dtypes(config.precision)
    model = models.make_model(config.model, dtype=compute_dtype, param_dtype=param_dtype)
    if config.data.name == synthetic.NAME:
        vocab_size = config.model.vocab_size if "vocab_size" in config.model else 256
        train_data, eval_data = (
            synthetic.SyntheticTokens(
                split, config.data.seed, seq_len=seq_len, vocab_size=vocab_size
            )
            for split in ("train", "eval")
        )
    else:
        builder = data.pipeline.get_builder(config.data.name, config.data.data_dir)
        check_data_fields(config, builder.info.features)
        train_data = lambda: text_windows(config.data, config.data.train_split)  # noqa: E731
        eval_data = lambda: text_windows(config.data, config.data.eval_split)  # noqa: E731
    tokens = jax.ShapeDtypeStruct((seq_len,), jnp.int32)
    flops = None
    if config.model.name == "gpt":
        cfg = models.hyperparameters(config.model)
        flops = lambda params: gpt.train_flops_per_sequence(cfg, params, seq_len)  # noqa: E731
    return Task(
        model=model,
        loss=loss,
        data=train_data,
        eval_data=eval_data,
        eval_metrics=eval_metrics,
        summarize_eval=summarize_eval,
        example={"inputs": tokens, "targets": tokens},
        flops_per_example=flops,
        tokens_per_example=seq_len,
        name=config.model.name,
    )
