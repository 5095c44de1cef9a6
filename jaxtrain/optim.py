"""Optimizer and learning-rate schedule from config."""

import jax
import optax

from jaxtrain import weights
from jaxtrain.checks import MAX_STEPS, is_int, is_number, require


def check_config(o) -> None:
    """Checks `config.optim`.

    Raises:
      ConfigError: the first bad field, named.
    """
    for key, ok, what in (
        ("lr", is_number(o.lr) and o.lr >= 0, "a finite number >= 0"),
        ("min_lr_ratio", is_number(o.min_lr_ratio) and 0 <= o.min_lr_ratio <= 1, "in [0, 1]"),
        (
            "warmup_steps",
            is_int(o.warmup_steps) and 0 <= o.warmup_steps <= MAX_STEPS,
            f"an integer >= 0 and at most {MAX_STEPS} (steps are int32)",
        ),
        ("b1", is_number(o.b1) and 0 <= o.b1 < 1, "in [0, 1)"),
        ("b2", is_number(o.b2) and 0 <= o.b2 < 1, "in [0, 1)"),
        ("eps", is_number(o.eps) and o.eps > 0, "a positive number"),
        ("weight_decay", is_number(o.weight_decay) and o.weight_decay >= 0, "a number >= 0"),
        ("grad_clip_norm", is_number(o.grad_clip_norm) and o.grad_clip_norm > 0, "positive"),
    ):
        require(ok, f"optim.{key}", o[key], what)
    weights.check_config(o)


def make_schedule(optim_config, num_train_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine decay to `lr * min_lr_ratio`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim_config.lr,
        warmup_steps=optim_config.warmup_steps,
        decay_steps=max(num_train_steps, optim_config.warmup_steps + 1),
        end_value=optim_config.lr * optim_config.min_lr_ratio,
    )


def _decay_mask(params):
    # Weight decay on matrices and kernels only, not on norm scales or biases.
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim_config, schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW with global-norm gradient clipping.

    Args:
      optim_config: `config.optim` (lr, b1, b2, eps, weight_decay, grad_clip_norm, ...).
      schedule: the learning-rate schedule.

    Returns:
      The optax transformation.
    """
    return optax.chain(
        optax.clip_by_global_norm(optim_config.grad_clip_norm),
        optax.adamw(
            learning_rate=schedule,
            b1=optim_config.b1,
            b2=optim_config.b2,
            eps=optim_config.eps,
            weight_decay=optim_config.weight_decay,
            mask=_decay_mask,
        ),
    )


def optimizer_and_schedule(config, custom=None):
    """The optimizer of a run and its learning-rate schedule.

    Args:
      config: the run config (`optim` and `num_train_steps`).
      custom: `schedule -> optax.GradientTransformation` (a task's own optimizer), or
        None for `make_optimizer(config.optim, schedule)`.

    Returns:
      (optimizer, schedule).
    """
    schedule = make_schedule(config.optim, config.num_train_steps)
    tx = custom(schedule) if custom else make_optimizer(config.optim, schedule)
    tx = weights.optimizer(tx, config.optim)  # the weight EMA, if config.optim asks for one
    return tx, schedule
