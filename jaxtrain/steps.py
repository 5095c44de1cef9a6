"""The train and eval steps: pure functions of (state, batch) built from a task's loss, and
their compilation with explicit shardings.

    train_step = make_train_step(task.loss, layout)            # (state, batch) -> (state, metrics)
    compiled = compile_train_step(train_step, layout, abstract_batch)

Train and eval mode reach the model the Flax way (`nnx.view(model, deterministic=...,
use_running_average=...)`), and each step's `rngs` come from the state's key and the step
number, so a resumed run draws exactly what an uninterrupted one would.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxtrain import optim
from jaxtrain.data.pipeline import example_sharding
from jaxtrain.errors import ConfigError
from jaxtrain.precision import LossScale
from jaxtrain.sharding import constrain, path_str
from jaxtrain.state import StateLayout, TrainState

# Keys every evaluation's `rngs` start from: evaluations of different steps compare.
EVAL_SEED = 0

# Train-step metrics for the host's non-finite guard, not for the log.
GUARD_METRICS = ("finite", "overflow", "nonfinite_in_update", "first_nonfinite_leaf")


def set_mode(model: nnx.Module, *, train: bool) -> nnx.Module:
    """The model in train or eval mode (Dropout `deterministic`, BatchNorm
    `use_running_average`, and any module's own `set_view`)."""
    flags = dict(deterministic=not train, use_running_average=not train)
    return nnx.view(model, raise_if_not_found=False, **flags)


def split_microbatches(x: jax.Array, num: int) -> jax.Array:
    """[batch, ...] -> [num, batch // num, ...], microbatch m holding rows m, m+num, ...

    Strided rows keep every microbatch spread over all the devices the batch is sharded
    on (contiguous blocks would each land on a few devices only).
    """
    micro = x.reshape(x.shape[0] // num, num, *x.shape[1:]).swapaxes(0, 1)
    return constrain(micro, (None, "activation_batch") + (None,) * (x.ndim - 1))


def _check_loss_output(output):
    if not (isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], dict)):
        raise TypeError(
            f"a task's loss must return (loss, metrics dict), got {type(output).__name__}"
        )
    loss, metrics = output
    shapes = {k: jnp.shape(v) for k, v in {"loss": loss, **metrics}.items() if jnp.shape(v)}
    if shapes:
        raise TypeError(f"a task's loss and metrics must be scalars (means), got shapes {shapes}")
    return jnp.asarray(loss, jnp.float32), {
        k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()
    }


def check_variables_kept(model: nnx.Module, params, model_state) -> None:
    """Raises ConfigError unless the loss left the model with the train state's variables.

    The train state holds the variables the model makes when it is built; one the model
    makes in `__call__` (a custom `nnx.Variable` assigned, or sown, at call time) has
    no place in it, and would otherwise surface as jax's error about `cond` branch
    structures. Sown `nnx.Intermediate` values are the loss's and never kept: allowed.

    Args:
      model: the model after the loss ran on it.
      params: the trainable variables it was merged from (nested dicts).
      model_state: its other variables, as merged (nested dicts).
    """
    kept = {**_flat(params), **_flat(model_state)}
    after = {
        tuple(path): variable
        for path, variable in nnx.state(model, nnx.Not(nnx.Intermediate)).flat_state()
    }
    for path, variable in after.items():
        kind = type(variable).__name__
        if path not in kept:
            raise ConfigError(
                f"the model made variable {path_str(path)!r} ({kind}) in __call__, and the "
                "train state has no place for it: create it in __init__ to keep it, or pop "
                f"it in the loss to drop it (nnx.pop(model, {kind}))"
            )
        was, now = jax.typeof(kept[path]), jax.typeof(variable.get_value())
        if (was.shape, was.dtype) != (now.shape, now.dtype):
            raise ConfigError(
                f"the loss changed variable {path_str(path)!r} ({kind}) from "
                f"{was.str_short()} to {now.str_short()}: a variable keeps the shape and "
                "dtype the model made it with in __init__"
            )
    lost = sorted(path_str(path) for path in kept.keys() - after.keys())
    if lost:
        raise ConfigError(
            f"the loss removed variable {lost[0]!r} from the model: the train state keeps "
            "every variable the model makes in __init__; pop only what __call__ made"
        )


def _flat(tree) -> dict:
    """{key path as a tuple of keys: leaf} of nested dicts (nnx.to_pure_dict's)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(k.key for k in path): leaf for path, leaf in leaves}


def make_train_step(
    loss_fn: Callable,
    layout: StateLayout,
    *,
    microbatches: int = 1,
    loss_scale: LossScale | None = None,
):
    """Returns `train_step(state, batch) -> (state, metrics)`, pure and jittable.

    Args:
      loss_fn: `loss(model, batch, rngs) -> (loss, metrics)` (see `jaxtrain.Task.loss`).
      layout: the state's layout (model structure and optimizer).
      microbatches: split the batch into this many equal parts whose gradients are
        accumulated (float32) in a scan before one update: the same update as the whole
        batch at once, with the activation memory of one part.
      loss_scale: dynamic loss scaling (float16 compute; `jaxtrain.precision.loss_scale`):
        the loss is scaled by `state.loss_scale["scale"]` before the backward pass and
        the gradients unscaled after it. A step whose scaled gradients overflow is
        skipped, with `overflow` set, and the scale halves. None: no scaling.

    Metrics are the loss's (averaged over microbatches), `grad_norm`, `lr` (the learning
    rate the optimizer's state says its last applied update used, `optim.learning_rate`;
    none for an optimizer that keeps no `inject_hyperparams` learning rate),
    `skipped_steps`, with loss scaling `loss_scale` (after the step) and
    `loss_scale_overflows`, and for the host: `finite`, `overflow`, `nonfinite_in_update`
    and `first_nonfinite_leaf` (index into `jax.tree.leaves(params)`: of the gradients,
    or of the updated parameters; -1 when all is finite). A step whose loss or any
    gradient is not finite, or whose update would make the state non-finite, leaves
    params, optimizer and model state as they were (garbage never reaches the state) and
    counts itself in `state.skipped`, unless it is a loss scale overflow (`overflow`: an
    expected event, counted in `state.loss_scale["overflows"]` instead).
    """
    tx = layout.tx

    def grads_and_metrics(params, model_state, batch, rng, scale):
        """Gradients of the loss times `scale` (None: unscaled), metrics, model state."""

        def objective(params):
            model = set_mode(layout.merge(params, model_state), train=True)
            loss, metrics = _check_loss_output(loss_fn(model, batch, nnx.Rngs(rng)))
            check_variables_kept(model, params, model_state)
            objective = loss if scale is None else loss * scale
            return objective, ({**metrics, "loss": loss}, layout.split(model)[1])

        (_, (metrics, model_state)), grads = jax.value_and_grad(objective, has_aux=True)(params)
        return grads, metrics, model_state

    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        scale = None if loss_scale is None else state.loss_scale["scale"]
        if microbatches == 1:
            grads, metrics, model_state = grads_and_metrics(
                state.params, state.model_state, batch, rng, scale
            )
        else:
            micro = jax.tree.map(lambda x: split_microbatches(x, microbatches), batch)

            def accumulate(carry, xs):
                grads_sum, metrics_sum, model_state = carry
                part, index = xs
                grads, metrics, model_state = grads_and_metrics(
                    state.params, model_state, part, jax.random.fold_in(rng, index), scale
                )
                return (_add(grads_sum, grads), _add(metrics_sum, metrics), model_state), None

            first = jax.tree.map(lambda x: x[0], micro)
            metric_shapes = jax.eval_shape(
                lambda: grads_and_metrics(state.params, state.model_state, first, rng, scale)[1]
            )
            zeros = (
                jax.tree.map(jnp.zeros_like, state.params),
                jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metric_shapes),
                state.model_state,
            )
            (grads, metrics, model_state), _ = jax.lax.scan(
                accumulate, zeros, (micro, jnp.arange(microbatches))
            )
            # Each part's gradient is of its own mean loss; equal parts make their mean the
            # gradient of the whole batch's mean loss.
            grads, metrics = jax.tree.map(lambda g: g / microbatches, (grads, metrics))
        if scale is not None:  # back to the loss's own gradients (inf stays inf)
            grads = jax.tree.map(lambda g: g / scale.astype(g.dtype), grads)
        leaf_finite = _leaves_finite(grads)
        loss_finite, grads_finite = jnp.isfinite(metrics["loss"]), jnp.all(leaf_finite)
        finite = loss_finite & grads_finite
        overflow = jnp.bool_(False)
        new_loss_scale = state.loss_scale
        if loss_scale is not None:
            overflow = loss_scale.is_overflow(state.loss_scale, loss_finite, grads_finite)
            new_loss_scale = loss_scale.update(state.loss_scale, grads_finite, overflow)

        def update(_):
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            # Finite gradients can still make a non-finite state (a NaN learning rate, an
            # overflowing moment): such an update is dropped too, and says where.
            new_finite = _leaves_finite(params)
            state_finite = jnp.all(new_finite) & _all_finite(opt_state) & _all_finite(model_state)
            new = (params, opt_state, model_state)
            chosen = jax.lax.cond(state_finite, lambda: new, kept_state)
            return *chosen, state_finite, jnp.argmin(new_finite)

        def kept_state():
            return state.params, state.opt_state, state.model_state

        def keep(_):
            bad = jnp.where(jnp.all(leaf_finite), -1, jnp.argmin(leaf_finite))  # -1: the loss
            return (*kept_state(), jnp.bool_(True), bad)

        # A conditional, not a select: a skipped step does no update work at all.
        params, opt_state, new_model_state, state_finite, bad_leaf = jax.lax.cond(
            finite, update, keep, None
        )
        applied = finite & state_finite
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            model_state=new_model_state,
            # An overflow is the loss scale's calibration, counted in loss_scale.
            skipped=state.skipped + jnp.where(applied | overflow, 0, 1).astype(jnp.int32),
            loss_scale=new_loss_scale,
        )
        metrics = {
            **metrics,
            "grad_norm": optax.global_norm(grads),
            "skipped_steps": new_state.skipped,
            "finite": applied,
            "overflow": overflow,
            # Where: 0 the loss or a gradient, 1 the state after the update.
            "nonfinite_in_update": ~state_finite,
            "first_nonfinite_leaf": jnp.where(applied, -1, bad_leaf),
        }
        lr = optim.learning_rate(new_state.opt_state)  # what ran, not what a schedule says
        if lr is not None:
            metrics["lr"] = lr
        if loss_scale is not None:
            metrics["loss_scale"] = new_loss_scale["scale"]
            metrics["loss_scale_overflows"] = new_loss_scale["overflows"]
        return new_state, metrics

    return train_step


def _add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _leaves_finite(tree) -> jax.Array:
    """Whether each leaf of a tree of float arrays is all finite, in leaf order."""
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)])


def _all_finite(tree) -> jax.Array:
    """Whether every floating-point leaf of a tree (counters and keys aside) is finite."""
    checks = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.floating)
    ]
    return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


def compile_train_step(train_step, layout: StateLayout, abstract_batch):
    """`train_step` compiled ahead of time for the layout's shardings, the state donated.

    Args:
      train_step: from `make_train_step`.
      layout: the state's layout.
      abstract_batch: the global batch's ShapeDtypeStructs carrying their shardings
        (`jaxtrain.data.abstract_batch`).

    Returns:
      A compiled function `(state, batch) -> (state, metrics)`; its `memory_analysis()`
      and `cost_analysis()` describe the step before it runs.
    """
    return trace_train_step(train_step, layout, abstract_batch).lower().compile()


def trace_train_step(train_step, layout: StateLayout, abstract_batch):
    """`train_step` traced as `compile_train_step` compiles it, not yet lowered.

    For a caller that reads the program as well as compiling it (`jaxtrain plan` reads
    the Pallas kernels in its jaxpr): one trace serves both.

    Returns:
      jax's `Traced`: `.jaxpr` is the step's program; `.lower().compile()` is what
      `compile_train_step` returns.
    """
    replicated = NamedSharding(layout.mesh, PartitionSpec())
    return jax.jit(
        train_step,
        in_shardings=(layout.shardings, _shardings(abstract_batch)),
        out_shardings=(layout.shardings, replicated),
        donate_argnums=(0,),
    ).trace(layout.abstract_state, abstract_batch)


def _shardings(abstract_tree):
    return jax.tree.map(lambda x: x.sharding, abstract_tree)


def make_eval_step(eval_fn: Callable, layout: StateLayout):
    """Returns `eval_step(params, model_state, batch, mask, batch_index) -> sums`.

    Args:
      eval_fn: `eval_metrics(model, batch, rngs) -> {name: per-example values}` (see
        `jaxtrain.Task.eval_metrics`), run with the model in eval mode.
      layout: the state's layout.

    `batch_index` is the batch's place in the evaluation (0, 1, ...: `enumerate` over
    `jaxtrain.data.eval_batches`), the same on every process. It is folded into the keys
    the eval function draws from, the loss's `rngs` and every RNG stream the model holds,
    so each batch draws its own noise (row i of every batch would otherwise draw the same)
    and every evaluation of the same batches draws the same.

    Sums are `{name: {"sum": ..., "count": ...}}` over the entries whose example has mask
    1 (padding never counts). Added up over an evaluation's batches on device (`add`)
    and fetched once, `eval_means` turns them into exact means.
    """

    def eval_step(params, model_state, batch, mask, batch_index):
        model = set_mode(layout.merge(params, model_state), train=False)
        key = jax.random.fold_in(jax.random.key(EVAL_SEED), batch_index)
        # The model's own streams (a VAE's noise) are part of the state, the same for
        # every batch: each batch folds its index into them too.
        streams = nnx.state(model, nnx.RngKey)
        nnx.update(model, jax.tree.map(lambda k: jax.random.fold_in(k, batch_index), streams))
        values = eval_fn(model, batch, nnx.Rngs(key))
        sums = {}
        for name, value in values.items():
            value = jnp.asarray(value, jnp.float32)
            if value.ndim == 0 or value.shape[0] != mask.shape[0]:
                raise TypeError(
                    f"eval metric {name!r} has shape {value.shape}; eval metrics are per "
                    f"example, their first dimension the batch ({mask.shape[0]})"
                )
            weight = jnp.broadcast_to(
                mask.reshape(mask.shape + (1,) * (value.ndim - 1)), value.shape
            )
            sums[name] = {
                "sum": jnp.sum(jnp.where(weight > 0, value, 0.0) * weight),
                "count": jnp.sum(weight),
            }
        return sums

    return eval_step


def jit_eval_step(eval_step, layout: StateLayout, abstract_batch):
    """`eval_step` jitted for the layout's and the batch's shardings (sums replicated)."""
    batch_shardings = _shardings(abstract_batch)
    mask_sharding = example_sharding(batch_shardings)
    state = layout.shardings
    replicated = NamedSharding(layout.mesh, PartitionSpec())
    return jax.jit(
        eval_step,
        in_shardings=(
            state.params,
            state.model_state,
            batch_shardings,
            mask_sharding,
            replicated,
        ),
        out_shardings=replicated,
    )


def add(totals, sums):
    """Adds one batch's eval sums to the running totals (None before the first batch)."""
    return sums if totals is None else _add(totals, sums)


def eval_means(totals) -> dict[str, float]:
    """{name: mean} from an evaluation's fetched totals."""
    return {name: float(t["sum"]) / max(float(t["count"]), 1.0) for name, t in totals.items()}


def flops_per_device_step(flops_per_example, layout: StateLayout, global_batch_size, stats):
    """(FLOPs per device per step, "model" or "XLA"): the numerator of MFU.

    Model FLOPs when the task gives them (a number, or a function of all the model's
    parameters as ShapeDtypeStructs); otherwise XLA's count of the compiled step (`stats`
    from `jaxtrain.hlo.compiled_stats`) with every loop trip counted (a scanned layer once
    per layer), which includes remat recompute.
    """
    num_devices = layout.mesh.devices.size
    if callable(flops_per_example):
        abstract = layout.merge(layout.abstract_state.params, layout.abstract_state.model_state)
        flops_per_example = flops_per_example(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    if flops_per_example is not None:
        return flops_per_example * global_batch_size / num_devices, "model"
    if "flops_per_step" in stats:
        return stats["flops_per_step"], "XLA"
    return None, None
