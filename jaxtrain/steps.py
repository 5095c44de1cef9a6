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
    skipped: jax.Array  # int32 scalar: steps whose update was dropped as non-finite


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
    inject_nonfinite_at: tuple[int, ...] = (),
):
    """Returns `train_step(state, batch) -> (state, metrics)`.

    Args:
      graphdef: the model's static structure (from `nnx.split`).
      tx: the optimizer.
      schedule: the learning-rate schedule, for the `lr` metric.
      microbatches: split the batch into this many equal parts whose gradients are
        accumulated (float32) in a scan before one update: the same update as the whole
        batch at once, with the activation memory of one part.
      inject_nonfinite_at: steps (1-based) whose first gradient leaf is made NaN, to
        exercise the non-finite policy; empty in normal runs (then it costs nothing).

    A step whose loss or any gradient is not finite leaves params and optimizer state as
    they were (whatever the policy, so garbage never reaches the state) and counts itself
    in `state.skipped`; its metrics carry `finite` and `first_nonfinite_leaf` (index into
    `jax.tree.leaves(params)`, -1 when all are finite) for the host to act on.
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
        if inject_nonfinite_at:
            leaves, treedef = jax.tree.flatten(grads)
            hit = jnp.isin(state.step + 1, jnp.asarray(inject_nonfinite_at))
            leaves[0] = jnp.where(hit, jnp.nan, leaves[0])
            grads = jax.tree.unflatten(treedef, leaves)
        loss = sums["loss_sum"] / sums["count"]
        leaf_finite = jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
        finite = jnp.isfinite(loss) & jnp.all(leaf_finite)

        def update(_):
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            return optax.apply_updates(state.params, updates), opt_state

        # A conditional, not a select: the skipped branch does no work at all.
        params, opt_state = jax.lax.cond(
            finite, update, lambda _: (state.params, state.opt_state), None
        )
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            skipped=state.skipped + jnp.where(finite, 0, 1).astype(jnp.int32),
        )
        metrics = {
            "loss": loss,
            "accuracy": sums["correct_sum"] / sums["count"],
            "grad_norm": optax.global_norm(grads),
            "lr": schedule(state.step),
            "skipped_steps": new_state.skipped,
            "finite": finite,
            "first_nonfinite_leaf": jnp.where(finite, -1, jnp.argmin(leaf_finite)),
        }
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
