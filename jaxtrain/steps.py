"""The train and eval steps: pure functions of (state, batch), jitted once by the caller.

`TrainState` holds only arrays (parameters as a plain nested dict), so it is a pytree
that Orbax saves and restores directly and that another program can read back.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Any  # nested dict of arrays (nnx.to_pure_dict of the model's Params)
    opt_state: Any  # optax state, mirroring params
    rng: jax.Array  # uint32 raw key data; dropout keys are folded in from the step


def _loss_and_metrics(logits, targets, mask=None):
    """Mean cross-entropy and accuracy (float32), plus their sums for exact averaging."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    weights = (
        jnp.ones_like(losses)
        if mask is None
        else jnp.broadcast_to(
            mask.reshape(mask.shape + (1,) * (losses.ndim - mask.ndim)), losses.shape
        )
    )
    count = jnp.sum(weights)
    loss_sum = jnp.sum(losses * weights)
    return loss_sum / jnp.maximum(count, 1.0), {
        "loss_sum": loss_sum,
        "correct_sum": jnp.sum(correct * weights),
        "count": count,
    }


def make_train_step(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule
):
    """Returns `train_step(state, batch) -> (state, metrics)`.

    Args:
      graphdef: the model's static structure (from `nnx.split`).
      tx: the optimizer.
      schedule: the learning-rate schedule, for the `lr` metric.
    """

    def train_step(state: TrainState, batch):
        dropout_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def loss_fn(params):
            model = nnx.merge(graphdef, params)
            logits = model(batch["inputs"], train=True, rngs=nnx.Rngs(dropout=dropout_rng))
            return _loss_and_metrics(logits, batch["targets"])

        (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "accuracy": sums["correct_sum"] / sums["count"],
            "grad_norm": optax.global_norm(grads),
            "lr": schedule(state.step),
        }
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef):
    """Returns `eval_step(params, batch, totals) -> totals`, summing on device.

    Sums (not means) accumulate across batches so padding rows (mask 0) never count and
    the result is exact for any number of batches; the host fetches the totals once.
    """

    def eval_step(params, batch, totals):
        model = nnx.merge(graphdef, params)
        logits = model(batch["inputs"], train=False)
        _, sums = _loss_and_metrics(logits, batch["targets"], batch["mask"])
        return jax.tree.map(jnp.add, totals, sums)

    return eval_step


def zero_eval_totals():
    """Initial value for `eval_step`'s running totals."""
    return {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "correct_sum", "count")}
