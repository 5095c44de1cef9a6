"""Which weights a run evaluates and serves: the trained ones, and their moving average.

    tx = with_ema(tx, decay=0.999)                     # an optimizer that also averages
    sets = evaluation_weights(state.opt_state, state.params)   # {"": ..., "ema": ...}

The exponential moving average of the weights (`config.optim.ema_decay`) is an optax
transformation around the run's optimizer: its state holds the inner optimizer's state and
a params-shaped `ema` tree, so it is sharded like the parameters (`optax.tree_map_params`
finds it, as it finds Adam's moments), checkpointed, resumed and restored onto another mesh
with the rest of the optimizer state, and a step the non-finite guard drops leaves it as
it was, with no code of its own in the train loop. optax has the averaging itself
(`optax.incremental_update`) but no transformation that keeps an average of the weights
(`optax.ema` averages updates), hence `with_ema`.

Schedule-free optimizers (`optax.contrib.schedule_free*`) train one sequence of weights and
are evaluated at another (`optax.contrib.schedule_free_eval_params`): for them, the
weights a run evaluates and serves are the latter.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import contrib

from jaxtrain.checks import is_number, require
from jaxtrain.errors import ConfigError

# What `--weights` / `which` may name: the EMA, or the weights training produced.
CHOICES = ("ema", "raw")


class EmaState(NamedTuple):
    """`with_ema`'s state: the inner optimizer's, and the average of the weights."""

    inner: Any  # the wrapped optimizer's state
    ema: Any  # params-shaped: the weights' moving average (float32 at least)
    count: jax.Array  # int32 scalar: updates averaged so far (for the warmup)


def check_config(optim_config) -> None:
    """Checks `config.optim.ema_decay` and `ema_warmup`.

    Raises:
      ConfigError: the first bad field, named.
    """
    decay = optim_config.ema_decay
    require(is_number(decay) and 0 <= decay < 1, "optim.ema_decay", decay, "in [0, 1) (0: off)")
    warmup = optim_config.ema_warmup
    require(isinstance(warmup, bool), "optim.ema_warmup", warmup, "True or False")


def optimizer(tx: optax.GradientTransformation, optim_config) -> optax.GradientTransformation:
    """`tx` keeping the weight EMA `optim_config` asks for; `tx` itself when it asks none.

    Args:
      tx: the run's optimizer (built-in or a task's own).
      optim_config: `config.optim` (`ema_decay`, `ema_warmup`). A run written before
        these fields existed has none: no EMA.
    """
    decay = optim_config.get("ema_decay", 0.0)
    if not decay:  # no wrapper: the state, its shardings and checkpoints as without EMA
        return tx
    return with_ema(tx, decay, warmup=optim_config.get("ema_warmup", False))


def with_ema(
    tx: optax.GradientTransformation, decay: float, *, warmup: bool = False
) -> optax.GradientTransformationExtraArgs:
    """`tx`, also keeping an exponential moving average of the weights it produces.

    After each update, `ema = d * ema + (1 - d) * (params + updates)`, starting from the
    initial weights. The updates are `tx`'s, unchanged: training is bitwise the same.

    Args:
      tx: the optimizer.
      decay: `d`, in [0, 1); the average spans about `1 / (1 - d)` steps.
      warmup: use `d_t = min(d, (1 + t) / (10 + t))` at the t-th update (t from 0), as
        TensorFlow's `ExponentialMovingAverage(num_updates=...)` does, so that early
        averages are not dominated by the initial weights.

    Returns:
      A transformation whose state is an `EmaState`. Its `update` needs `params`.
    """
    tx = optax.with_extra_args_support(tx)

    def init(params):
        # A copy of its own (a float32 one for lower-precision weights): the params and the
        # EMA are donated to the train step side by side, so they must not share buffers.
        ema = jax.tree.map(lambda p: jnp.array(p, dtype=_ema_dtype(p), copy=True), params)
        return EmaState(inner=tx.init(params), ema=ema, count=jnp.zeros((), jnp.int32))

    def update(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("with_ema's update needs the params: tx.update(grads, state, params)")
        updates, inner = tx.update(updates, state.inner, params, **extra_args)
        new_params = optax.apply_updates(params, updates)  # what the train step applies
        d = jnp.asarray(decay, jnp.float32)
        if warmup:
            t = state.count.astype(jnp.float32)
            d = jnp.minimum(d, (1 + t) / (10 + t))
        ema = jax.tree.map(
            lambda e, p: (d * e + (1 - d) * p.astype(e.dtype)).astype(e.dtype),
            state.ema,
            new_params,
        )
        return updates, EmaState(inner=inner, ema=ema, count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init, update)


def _ema_dtype(p):
    # bfloat16 weights cannot hold an average: (1 - d) * (p - ema) falls below their step.
    return jnp.promote_types(jnp.result_type(p), jnp.float32)


def _find(opt_state, kind):
    found = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, kind))
    return [x for x in found if isinstance(x, kind)]


def evaluation_weights(opt_state, params) -> dict[str, Any]:
    """The weight sets a run evaluates, by name: "" for the trained weights, "ema" for
    their moving average when the optimizer keeps one (`with_ema`).

    The trained weights are `params`, or, when the optimizer is schedule-free (an
    `optax.contrib.ScheduleFreeState` anywhere in `opt_state`), its evaluation parameters
    (`optax.contrib.schedule_free_eval_params`): its raw iterate is not the model to use.
    Each set has the dtypes of `params`.
    """
    trained = params
    schedule_free = _find(opt_state, contrib.ScheduleFreeState)
    if schedule_free:
        # One schedule-free optimizer per run: the first found is the one.
        trained = contrib.schedule_free_eval_params(schedule_free[0], params)
    sets = {"": _like(trained, params)}
    ema = _find(opt_state, EmaState)
    if ema:
        sets["ema"] = _like(ema[0].ema, params)
    return sets


def _like(tree, params):
    return jax.tree.map(lambda x, p: x if x.dtype == p.dtype else x.astype(p.dtype), tree, params)


def choose(sets: dict[str, Any], which: str | None) -> dict[str, Any]:
    """The sets of `evaluation_weights` that `which` names: "ema", "raw" (the trained
    weights, schedule-free's evaluation parameters), or None: every set.

    Raises:
      ConfigError: an unknown name, or "ema" for a run without an EMA.
    """
    if which is None:
        return sets
    if which not in CHOICES:
        raise ConfigError(f"weights must be one of {list(CHOICES)}, got {which!r}")
    name = "" if which == "raw" else which
    if name not in sets:
        raise ConfigError(
            "weights 'ema': this run keeps no moving average of its weights "
            "(config.optim.ema_decay is 0); use the raw weights"
        )
    return {name: sets[name]}


def default(sets: dict[str, Any]) -> str:
    """The set a run serves (sample, export) unless told: "ema" when it has one, else "raw"."""
    return "ema" if "ema" in sets else "raw"


def metric_name(set_name: str, metric: str) -> str:
    """A metric's name for a weight set: the trained weights' keep theirs ("loss"), the
    EMA's are prefixed ("ema_loss"), in one eval record beside them."""
    return f"{set_name}_{metric}" if set_name else metric
