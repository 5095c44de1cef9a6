"""The train state's structure and layout, built from config without touching devices.

`make_setup(config, mesh)` gives everything needed to create, restore, compile and plan
a run: the model's graph definition, the optimizer, the abstract (shape + sharding) train
state, and the input batch's abstract shape. Nothing here allocates device memory, so the
same code sizes a run for hardware that is not attached (`jaxtrain plan`).
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtrain import models, optim, precision, sharding, steps


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a run is made of, before any array exists."""

    task: str  # "classification" or "lm"
    microbatches: int  # gradient accumulation: sequential parts per global batch
    inject_nonfinite_at: tuple  # steps whose gradients are made NaN (testing the policy)
    model_flops_per_step: float | None  # MFU's numerator, all devices; None: no formula
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    init: Callable  # rng -> TrainState, pure: jit it with out_shardings=state_shardings
    state_shardings: steps.TrainState  # NamedSharding leaves
    abstract_state: steps.TrainState  # ShapeDtypeStruct leaves carrying their shardings
    batch_sharding: NamedSharding
    abstract_batch: dict  # ShapeDtypeStruct per batch key, global shapes


def make_setup(config, mesh: Mesh) -> Setup:
    """Builds the abstract run for `config` on `mesh`.

    Raises:
      ConfigError: unknown model, bad model fields, a logical axis without a rule.
    """
    rules = tuple(tuple(rule) for rule in config.rules)
    task = models.model_class(config.model.name).task
    compute_dtype, param_dtype = precision.dtypes(config.precision, mesh.devices.flat[0].platform)

    def create_model(rng):
        # Shardings come from our rules table through jit's out_shardings, not from Flax.
        with nnx.use_eager_sharding(False):
            return models.make_model(
                config.model,
                dtype=compute_dtype,
                param_dtype=param_dtype,
                rngs=nnx.Rngs(params=rng),
            )

    abstract_model = nnx.eval_shape(lambda: create_model(jax.random.key(0)))
    graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
    param_shardings = sharding.named_shardings(
        nnx.to_pure_dict(nnx.get_partition_spec(abstract_params)), mesh, rules
    )
    schedule = optim.make_schedule(config.optim, config.num_train_steps)
    tx = optim.make_optimizer(config.optim, schedule)

    def init(rng) -> steps.TrainState:
        params_rng, dropout_rng = jax.random.split(rng)
        params = nnx.to_pure_dict(nnx.state(create_model(params_rng), nnx.Param))
        return steps.TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=jax.random.key_data(dropout_rng),
            skipped=jnp.zeros((), jnp.int32),
        )

    replicated = NamedSharding(mesh, PartitionSpec())
    shapes = jax.eval_shape(init, jax.random.key(0))
    # Optimizer moments take their parameter's sharding; counters are replicated.
    opt_shardings = optax.tree_map_params(
        tx,
        lambda _, s: s,
        shapes.opt_state,
        param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    state_shardings = steps.TrainState(
        step=replicated,
        params=param_shardings,
        opt_state=opt_shardings,
        rng=replicated,
        skipped=replicated,
    )
    batch_sharding = sharding.batch_sharding(mesh, rules)
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, state_shardings
    )
    # A weight its mesh axes do not divide: one line naming it, not jit's IndivisibleError.
    sharding.check_divisible(abstract_state.params)
    per_example = models.train_flops_per_example(config, shapes.params)
    return Setup(
        task=task,
        microbatches=config.microbatches,
        inject_nonfinite_at=tuple(config.nonfinite.inject_at_steps),
        model_flops_per_step=(
            None if per_example is None else per_example * config.global_batch_size
        ),
        graphdef=graphdef,
        tx=tx,
        schedule=schedule,
        init=init,
        state_shardings=state_shardings,
        abstract_state=abstract_state,
        batch_sharding=batch_sharding,
        abstract_batch={
            k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
            for k, (shape, dtype) in batch_shapes(config, task).items()
        },
    )


def batch_shapes(config, task: str) -> dict[str, tuple[tuple[int, ...], jnp.dtype]]:
    """Global shape and dtype of each training batch array, as the input pipeline makes them."""
    batch = config.global_batch_size
    if task == "lm":
        tokens = ((batch, config.data.seq_len), jnp.dtype(jnp.int32))
        return {"inputs": tokens, "targets": tokens}
    return {
        "inputs": ((batch, *config.model.image_shape), jnp.dtype(jnp.uint8)),
        "targets": ((batch,), jnp.dtype(jnp.int32)),
    }


def create_state(setup: Setup, seed: int) -> steps.TrainState:
    """A freshly initialised state, created directly in its sharded layout on the mesh."""
    return jax.jit(setup.init, out_shardings=setup.state_shardings)(jax.random.key(seed))


def compile_train_step(setup: Setup):
    """The train step, compiled ahead of time for the setup's shardings (state donated)."""
    replicated = NamedSharding(setup.batch_sharding.mesh, PartitionSpec())
    return (
        jax.jit(
            steps.make_train_step(
                setup.graphdef,
                setup.tx,
                setup.schedule,
                setup.microbatches,
                setup.inject_nonfinite_at,
            ),
            in_shardings=(setup.state_shardings, setup.batch_sharding),
            out_shardings=(setup.state_shardings, replicated),
            donate_argnums=(0,),
        )
        .lower(setup.abstract_state, setup.abstract_batch)
        .compile()
    )


def jit_eval_step(setup: Setup):
    """The eval step, jitted for the setup's shardings; its running totals are donated."""
    replicated = NamedSharding(setup.batch_sharding.mesh, PartitionSpec())
    return jax.jit(
        steps.make_eval_step(setup.graphdef),
        in_shardings=(setup.state_shardings.params, setup.batch_sharding, replicated),
        out_shardings=replicated,
        donate_argnums=(2,),
    )


def flops_per_device_step(setup: Setup, num_devices: int, compiled_stats: dict):
    """(FLOPs per device per step, where the number comes from) for MFU and step-time bounds.

    Model FLOPs when the model has a formula; otherwise XLA's count of the compiled step,
    which includes remat recompute and counts a loop body (scan over layers) only once.
    """
    if setup.model_flops_per_step is not None:
        return setup.model_flops_per_step / num_devices, "model"
    if "flops" in compiled_stats:
        return compiled_stats["flops"], "XLA"
    return None, None
