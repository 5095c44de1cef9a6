"""Optimizer and learning-rate schedule from config, each picked by name.

    tx, schedule = optimizer_and_schedule(config, task.optimizer, model=task.model)

`config.optim.name` picks the optimizer (`OPTIMIZERS`), `config.optim.schedule` the
schedule (`SCHEDULES`). Shared fields (lr, warmup, weight decay, clipping) are flat in
`config.optim`; each optimizer's own fields live in the sub-dict named after it
(`config.optim.lion.b1`), checked only when it is the one chosen. Every built-in optimizer
carries its learning rate in its state (`optax.inject_hyperparams`), which is what the
train step logs as `lr` (`learning_rate`).
"""

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxtrain import weights
from jaxtrain.checks import MAX_STEPS, is_int, is_number, require
from jaxtrain.errors import ConfigError
from jaxtrain.paths import path_str

OPTIMIZERS = (
    "adamw",
    "lamb",
    "lion",
    "adafactor",
    "sgd",
    "muon",
    "schedule_free_adamw",
    "ademamix",
)
SCHEDULES = ("warmup_cosine", "linear", "constant", "rsqrt", "wsd")
LR_SCALINGS = ("none", "linear", "sqrt")
WSD_DECAY_SHAPES = ("linear", "cosine", "sqrt")
# Fields of config.optim before optimizers were chosen by name, and where they went.
_MOVED = {"b1": "adamw.b1", "b2": "adamw.b2", "eps": "adamw.eps"}


def _beta(value) -> bool:
    return is_number(value) and 0 <= value < 1


def _positive(value) -> bool:
    return is_number(value) and value > 0


# Each optimizer's own fields: (field, check, what a good value is).
_FIELD_CHECKS = {
    "adamw": (("b1", _beta, "in [0, 1)"), ("b2", _beta, "in [0, 1)"), ("eps", _positive, "> 0")),
    "lamb": (("b1", _beta, "in [0, 1)"), ("b2", _beta, "in [0, 1)"), ("eps", _positive, "> 0")),
    "lion": (("b1", _beta, "in [0, 1)"), ("b2", _beta, "in [0, 1)")),
    "adafactor": (
        ("decay_rate", lambda v: is_number(v) and 0 < v <= 1, "in (0, 1]"),
        ("min_dim_size_to_factor", lambda v: is_int(v) and v >= 1, "a positive integer"),
        ("clipping_threshold", lambda v: is_number(v) and v >= 0, "a number >= 0 (0: off)"),
        ("multiply_by_parameter_scale", lambda v: isinstance(v, bool), "True or False"),
        ("eps", _positive, "> 0"),
    ),
    "sgd": (
        ("momentum", _beta, "in [0, 1) (0: plain SGD)"),
        ("nesterov", lambda v: isinstance(v, bool), "True or False"),
    ),
    "muon": (
        ("beta", _beta, "in [0, 1)"),
        ("ns_steps", lambda v: is_int(v) and 1 <= v <= 100, "an integer in [1, 100]"),
        ("nesterov", lambda v: isinstance(v, bool), "True or False"),
        ("adam_b1", _beta, "in [0, 1)"),
        ("adam_b2", _beta, "in [0, 1)"),
        ("eps", _positive, "> 0"),
    ),
    "schedule_free_adamw": (
        ("b1", _beta, "in [0, 1)"),
        ("b2", _beta, "in [0, 1)"),
        ("eps", _positive, "> 0"),
        ("weight_lr_power", lambda v: is_number(v) and v >= 0, "a number >= 0"),
    ),
    "ademamix": (
        ("b1", _beta, "in [0, 1)"),
        ("b2", _beta, "in [0, 1)"),
        ("b3", _beta, "in [0, 1)"),
        ("alpha", lambda v: is_number(v) and v >= 0, "a number >= 0"),
        ("eps", _positive, "> 0"),
    ),
}


def check_config(o) -> None:
    """Checks `config.optim`: the shared fields, and the chosen optimizer's own.

    Fields of optimizers other than `o.name` are not checked here:
    `jaxtrain.checks.check_unused_optimizer_fields` refuses those a config file or an
    override changed.

    Raises:
      ConfigError: the first bad field, named.
    """
    from jaxtrain.configs import base  # configs/base.py imports nothing of jaxtrain's

    for old, new in _MOVED.items():
        if old in o:
            raise ConfigError(
                f"config.optim.{old} is now config.optim.{new} (each optimizer's fields "
                "live under its name)"
            )
    if o.name not in OPTIMIZERS:
        raise ConfigError(
            f"config.optim.name must be one of {', '.join(OPTIMIZERS)}, got {o.name!r}"
        )
    if o.schedule not in SCHEDULES:
        raise ConfigError(
            f"config.optim.schedule must be one of {', '.join(SCHEDULES)}, got {o.schedule!r}"
        )
    for key, ok, what in (
        ("lr", is_number(o.lr) and o.lr >= 0, "a finite number >= 0"),
        ("min_lr_ratio", is_number(o.min_lr_ratio) and 0 <= o.min_lr_ratio <= 1, "in [0, 1]"),
        (
            "warmup_steps",
            is_int(o.warmup_steps) and 0 <= o.warmup_steps <= MAX_STEPS,
            f"an integer >= 0 and at most {MAX_STEPS} (steps are int32)",
        ),
        (
            "wsd_decay_fraction",
            is_number(o.wsd_decay_fraction) and 0 < o.wsd_decay_fraction <= 1,
            "in (0, 1]",
        ),
        ("wsd_decay_shape", o.wsd_decay_shape in WSD_DECAY_SHAPES, " or ".join(WSD_DECAY_SHAPES)),
        ("lr_scaling", o.lr_scaling in LR_SCALINGS, " or ".join(LR_SCALINGS)),
        (
            "reference_batch_size",
            is_int(o.reference_batch_size) and o.reference_batch_size > 0,
            "a positive integer",
        ),
        ("weight_decay", is_number(o.weight_decay) and o.weight_decay >= 0, "a number >= 0"),
        ("grad_clip_norm", is_number(o.grad_clip_norm) and o.grad_clip_norm > 0, "positive"),
    ):
        require(ok, f"optim.{key}", o[key], what)
    if o.name == "schedule_free_adamw" and o.schedule != "constant":
        # Schedule-free averaging replaces the decay: a decaying schedule on top would
        # not be the method (warmup is still the config's, optim.warmup_steps).
        raise ConfigError(
            "config.optim.schedule must be 'constant' with optim.name='schedule_free_adamw' "
            f"(it replaces the schedule's decay; warmup stays), got {o.schedule!r}"
        )
    defaults = base.get_config().optim
    for name in OPTIMIZERS:
        for key in o.get(name) or ():  # config.json records only the chosen optimizer's
            if key not in defaults[name]:
                raise ConfigError(
                    f"config.optim.{name}.{key} is not a field of {name} "
                    f"(its fields: {', '.join(defaults[name])})"
                )
    if o.get(o.name) is None:
        raise ConfigError(f"the config has no field 'optim.{o.name}': start from base")
    for key, ok, what in _FIELD_CHECKS[o.name]:
        require(ok(o[o.name][key]), f"optim.{o.name}.{key}", o[o.name][key], what)
    weights.check_config(o)


def peak_lr(optim_config, global_batch_size: int | None = None) -> float:
    """`optim.lr` scaled by `optim.lr_scaling` for `global_batch_size` (None: unscaled)."""
    scaling = optim_config.get("lr_scaling", "none")
    if scaling == "none" or global_batch_size is None:
        return optim_config.lr
    ratio = global_batch_size / optim_config.reference_batch_size
    return optim_config.lr * (ratio if scaling == "linear" else math.sqrt(ratio))


def make_schedule(
    optim_config, num_train_steps: int, global_batch_size: int | None = None
) -> optax.Schedule:
    """The learning rate per step `optim.schedule` names: linear warmup from 0, then its shape.

    Args:
      optim_config: `config.optim`.
      num_train_steps: the step the run ends at (the decay's end).
      global_batch_size: for `optim.lr_scaling`; None: the peak is `optim.lr` as given.

    Returns:
      The schedule, a function of the step.
    """
    peak = peak_lr(optim_config, global_batch_size)
    warmup = optim_config.warmup_steps
    end = peak * optim_config.min_lr_ratio
    name = optim_config.get("schedule", "warmup_cosine")
    if name == "warmup_cosine":  # today's schedule, built as before (bitwise)
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=peak,
            warmup_steps=warmup,
            decay_steps=max(num_train_steps, warmup + 1),
            end_value=end,
        )
    after = max(num_train_steps - warmup, 1)  # steps after warmup
    if name == "linear":
        rest = optax.linear_schedule(peak, end, after)
    elif name == "constant":
        rest = optax.constant_schedule(peak)
    elif name == "rsqrt":
        # optax has no inverse square root schedule: peak * sqrt(w / step) from the end of
        # warmup (w = warmup_steps, at least 1), so it is continuous there.
        w = max(warmup, 1)
        rest = lambda step: peak * jax.lax.rsqrt((step + w) / w)  # noqa: E731
    else:  # wsd: optax has none, so it is joined from optax pieces, stable then decay
        decay = max(1, min(after, round(optim_config.wsd_decay_fraction * num_train_steps)))
        shape = optim_config.wsd_decay_shape
        if shape == "linear":
            tail = optax.linear_schedule(peak, end, decay)
        elif shape == "cosine":
            tail = optax.cosine_decay_schedule(peak, decay, alpha=optim_config.min_lr_ratio)
        else:  # sqrt: the "1 - sqrt" cooldown of Hägele et al. 2024; optax has none
            tail = lambda step: (
                peak
                - (peak - end)
                * jnp.sqrt(  # noqa: E731
                    jnp.clip(step / decay, 0.0, 1.0)
                )
            )
        rest = optax.join_schedules([optax.constant_schedule(peak), tail], [after - decay])
    if warmup == 0:
        return rest
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), rest], [warmup])


def _decay_mask(params):
    # Weight decay on matrices and kernels only, not on norm scales or biases.
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def logical_axes(model, trainable=nnx.Param) -> dict[str, tuple]:
    """{variable path: its logical axis names (None per unnamed dim)} of a model, abstractly.

    Args:
      model: `rngs -> nnx.Module` (a Task's `model`).
      trainable: the variables to name.
    """
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: model(nnx.Rngs(0)))
    return {
        path_str(keys): tuple(nnx.spmd.get_var_pspec(v) or ())
        for keys, v in nnx.to_flat_state(nnx.state(abstract, trainable))
    }


def muon_dimensions(ndim: int, names: tuple = ()):
    """How Muon treats a weight of `ndim` dimensions with these logical axis names.

    A "layers" axis (scanned layers' stacked weights) is a batch axis: each layer's
    matrix is orthogonalised alone. Weights with a "vocab" axis (embedding, output head)
    and vectors take Muon's Adam fallback, as its authors advise. Of the other axes,
    the "embed" axis is the model dimension: first, it is the input (attention's query,
    key, value: embed -> heads x head_dim); last, the output (attention's out: heads x
    head_dim -> embed). Otherwise, and for unnamed weights, Flax's kernel layout: inputs
    first, the last axis the output (Linear, Conv).

    Returns:
      `optax.contrib.MuonDimensionNumbers`, or None for the Adam fallback.
    """
    names = tuple(names) if len(names) == ndim else (None,) * ndim
    rest = [i for i, n in enumerate(names) if n != "layers"]
    if len(rest) < 2 or "vocab" in names:
        return None
    if names[rest[0]] == "embed":
        reduction, output = rest[:1], rest[1:]
    else:
        reduction, output = rest[:-1], rest[-1:]
    return optax.contrib.MuonDimensionNumbers(tuple(reduction), tuple(output))


def _muon_dimension_numbers(axes: dict[str, tuple]):
    def dimension_numbers(params):
        return jax.tree_util.tree_map_with_path(
            lambda keys, p: muon_dimensions(p.ndim, axes.get(path_str(keys), ())), params
        )

    return dimension_numbers


def _factory(o, axes):
    """`learning_rate -> optax.GradientTransformation`: `o.name` with `o`'s fields."""
    f, wd = o[o.name], o.weight_decay
    if o.name == "adamw":
        return lambda learning_rate: optax.adamw(
            learning_rate, b1=f.b1, b2=f.b2, eps=f.eps, weight_decay=wd, mask=_decay_mask
        )
    if o.name == "lamb":
        return lambda learning_rate: optax.lamb(
            learning_rate, b1=f.b1, b2=f.b2, eps=f.eps, weight_decay=wd, mask=_decay_mask
        )
    if o.name == "lion":
        return lambda learning_rate: optax.lion(
            learning_rate, b1=f.b1, b2=f.b2, weight_decay=wd, mask=_decay_mask
        )
    if o.name == "adafactor":
        # optax.adafactor's weight_decay_rate is added after the learning rate (0.1 would
        # shrink every weight by a tenth each step); config.optim.weight_decay is decoupled
        # decay times the learning rate, as AdamW's and every other optimizer's here.
        return lambda learning_rate: optax.chain(
            optax.adafactor(
                learning_rate,
                min_dim_size_to_factor=f.min_dim_size_to_factor,
                decay_rate=f.decay_rate,
                multiply_by_parameter_scale=f.multiply_by_parameter_scale,
                clipping_threshold=f.clipping_threshold or None,
                eps=f.eps,
            ),
            optax.add_decayed_weights(-wd * learning_rate, _decay_mask),
        )
    if o.name == "sgd":
        # optax.sgd takes no decay: L2 decay (added to the gradient, through the momentum,
        # as torch.optim.SGD does), on matrices only.
        return lambda learning_rate: optax.chain(
            optax.add_decayed_weights(wd, _decay_mask),
            optax.sgd(learning_rate, momentum=f.momentum or None, nesterov=f.nesterov),
        )
    if o.name == "muon":
        if axes is None:
            raise ConfigError(
                "optim.name='muon' needs the model's logical axes: call "
                "optim.optimizer_and_schedule(config, custom, model=task.model)"
            )
        # The Adam fallback (embedding, head, vectors) takes no decay: optax applies
        # adam_weight_decay to every fallback leaf, norm scales too, with no mask.
        return lambda learning_rate: optax.contrib.muon(
            learning_rate,
            ns_steps=f.ns_steps,
            beta=f.beta,
            eps=f.eps,
            weight_decay=wd,
            weight_decay_mask=_decay_mask,
            nesterov=f.nesterov,
            adam_b1=f.adam_b1,
            adam_b2=f.adam_b2,
            muon_weight_dimension_numbers=_muon_dimension_numbers(axes),
        )
    if o.name == "schedule_free_adamw":
        # Its own warmup is off: the config's schedule (constant after warmup) is injected.
        # It has no decay mask: schedule-free decay applies to every weight.
        return lambda learning_rate: optax.contrib.schedule_free_adamw(
            learning_rate,
            b1=f.b1,
            b2=f.b2,
            eps=f.eps,
            weight_decay=wd,
            weight_lr_power=f.weight_lr_power,
        )
    return lambda learning_rate: optax.contrib.ademamix(
        learning_rate,
        b1=f.b1,
        b2=f.b2,
        b3=f.b3,
        alpha=f.alpha,
        eps=f.eps,
        weight_decay=wd,
        mask=_decay_mask,
    )


def make_optimizer(
    optim_config, schedule: optax.Schedule, *, axes: dict[str, tuple] | None = None
) -> optax.GradientTransformation:
    """The optimizer `optim.name` names, with global-norm gradient clipping.

    Its learning rate is injected (`optax.inject_hyperparams`, the learning rate alone,
    so the other hyperparameters stay Python floats and the numbers stay those of the
    plain optimizer): the state holds the rate each update used (`learning_rate`).

    Args:
      optim_config: `config.optim`.
      schedule: the learning-rate schedule.
      axes: the model's logical axes by path (`logical_axes`), for Muon only.

    Returns:
      The optax transformation.
    """
    o = optim_config
    if "name" not in o:  # a run's config.json from before optimizers had names
        o = {**o.to_dict(), "name": "adamw", "adamw": {k: o[k] for k in _MOVED}}
        o = type(optim_config)(o)
    return optax.chain(
        optax.clip_by_global_norm(o.grad_clip_norm),
        optax.inject_hyperparams(_factory(o, axes))(learning_rate=schedule),
    )


def learning_rate(opt_state) -> jax.Array | None:
    """The learning rate an optimizer's state says its last update used, or None.

    The first `hyperparams["learning_rate"]` of an `optax.inject_hyperparams` state found
    anywhere in `opt_state`: every built-in optimizer's, and a task's own optimizer that
    injects one. None when there is none (the rate is not in the state).
    """
    kinds = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
    for node in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, kinds)):
        if isinstance(node, kinds) and "learning_rate" in node.hyperparams:
            return node.hyperparams["learning_rate"]
    return None


def recorded_config(optim_dict: dict, *, task_optimizer: bool = False) -> dict:
    """`config.optim` as a run records it (config.json): only the fields that apply.

    The sub-dicts of optimizers other than `name` are dropped. With a task's own
    optimizer (`Task.optimizer`), `task_optimizer: true` says that `name` and its fields
    applied only if that optimizer calls `make_optimizer`.
    """
    recorded = {
        k: v for k, v in optim_dict.items() if k not in OPTIMIZERS or k == optim_dict["name"]
    }
    if task_optimizer:
        recorded["task_optimizer"] = True
    return recorded


def state_bytes_per_parameter(layout) -> float:
    """Bytes of optimizer state per model parameter, from a StateLayout's abstract state."""
    leaves = jax.tree.leaves(layout.abstract_state.opt_state)
    total = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves)
    return total / layout.num_parameters


def optimizer_and_schedule(
    config, custom=None, *, model=None, trainable=nnx.Param, schedule: optax.Schedule | None = None
):
    """The optimizer of a run and its learning-rate schedule.

    Args:
      config: the run config (`optim`, `num_train_steps`, `global_batch_size`).
      custom: `schedule -> optax.GradientTransformation` (a task's own optimizer), or
        None for `make_optimizer(config.optim, schedule)`.
      model: the task's `rngs -> nnx.Module`, whose logical axes tell Muon which weights
        are matrices and how (`muon_dimensions`); needed for `optim.name='muon'` only.
      trainable: the variables the optimizer updates (the task's `trainable`).
      schedule: a schedule to use instead of the config's (`jaxtrain.lr_find`'s range).

    Returns:
      (optimizer, schedule).
    """
    if schedule is None:
        schedule = make_schedule(config.optim, config.num_train_steps, config.global_batch_size)
    if custom:
        tx = custom(schedule)
    else:
        axes = None
        if config.optim.get("name") == "muon" and model is not None:
            axes = logical_axes(model, trainable)
        tx = make_optimizer(config.optim, schedule, axes=axes)
    tx = weights.optimizer(tx, config.optim)  # the weight EMA, if config.optim asks for one
    return tx, schedule
