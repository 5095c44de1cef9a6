"""The train and eval steps: pure functions of (state, batch), jitted once by the caller.

`TrainState` holds only arrays (parameters as a plain nested dict), so it is a pytree
that Orbax saves and restores directly and that another program can read back.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from jaxtrain.sharding import constrain


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


def split_microbatches(x: jax.Array, num: int) -> jax.Array:
    """[batch, ...] -> [num, batch // num, ...], microbatch m holding rows m, m+num, ...

    Strided rows keep every microbatch spread over all the devices the batch is sharded
    on (contiguous blocks would each land on a few devices only).
    """
    micro = x.reshape(x.shape[0] // num, num, *x.shape[1:]).swapaxes(0, 1)
    return constrain(micro, (None, "activation_batch") + (None,) * (x.ndim - 1))


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    microbatches: int = 1,
):
    """Returns `train_step(state, batch) -> (state, metrics)`.

    Args:
      graphdef: the model's static structure (from `nnx.split`).
      tx: the optimizer.
      schedule: the learning-rate schedule, for the `lr` metric.
      microbatches: split the batch into this many equal parts whose gradients are
        accumulated (float32) in a scan before one update: the same update as the whole
        batch at once, with the activation memory of one part.
    """

    def grads_and_sums(params, batch, rng):
        def loss_fn(params):
            model = nnx.merge(graphdef, params)
            logits = model(batch["inputs"], train=True, rngs=nnx.Rngs(dropout=rng))
            return _loss_and_metrics(logits, batch["targets"])

        (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, sums

    def train_step(state: TrainState, batch):
        dropout_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        if microbatches == 1:
            grads, sums = grads_and_sums(state.params, batch, dropout_rng)
        else:

            def accumulate(totals, xs):
                micro, index = xs
                rng = jax.random.fold_in(dropout_rng, index)
                return jax.tree.map(jnp.add, totals, grads_and_sums(state.params, micro, rng)), None

            zeros = (
                jax.tree.map(jnp.zeros_like, state.params),
                {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "correct_sum", "count")},
            )
            micro = jax.tree.map(lambda x: split_microbatches(x, microbatches), batch)
            (grads, sums), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(microbatches)))
            # Each part's gradient is of its own mean loss; equal parts make their mean the
            # gradient of the whole batch's mean loss.
            grads = jax.tree.map(lambda g: g / microbatches, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": sums["loss_sum"] / sums["count"],
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
