"""The train state, its abstract shape and sharded layout, and sharded initialisation.

    layout = make_state_layout(model_fn, tx, mesh, rules)   # no device memory yet
    state = create_state(layout, seed)                      # created already sharded

`TrainState` holds only arrays in nested dicts (no NNX objects), so Orbax saves and
restores it directly and another program can read it back; `layout.merge` turns its
variables back into the NNX model.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtrain.precision import LossScale
from jaxtrain.sharding import Rules, check_divisible, named_shardings, path_str


@struct.dataclass
class TrainState:
    """Everything a run carries from step to step, as arrays (a pytree)."""

    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Any  # the trainable variables, nested dicts (nnx.to_pure_dict)
    opt_state: Any  # optax state, mirroring params
    model_state: Any  # the model's other variables: frozen parameters, BatchNorm
    # statistics, its own RNG streams, any other nnx.Variable; nested dicts
    rng: jax.Array  # uint32 raw key data; each step's keys are folded in from the step
    skipped: jax.Array  # int32 scalar: steps whose update was dropped as non-finite
    # Dynamic loss scaling (float16 compute): {"scale", "good_steps", "overflows"}, see
    # jaxtrain.precision.LossScale. Kept whatever the precision, so a resumed run may
    # switch precision; only a run that scales its loss reads or changes it.
    loss_scale: Any


def _not_kept(trainable):
    # What a forward pass sows (nnx.Intermediate) is the loss's to read, never carried on.
    return nnx.All(nnx.Not(trainable), nnx.Not(nnx.Intermediate))


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """A run's train state before any array exists: structure, shapes, dtypes, shardings.

    Attributes:
      graphdef: the model's static structure (from `nnx.split`).
      tx: the optimizer.
      trainable: the NNX filter of the variables in `params`; the rest (less sown
        intermediates) are `model_state`.
      abstract_state: a TrainState of ShapeDtypeStruct leaves carrying their shardings.
      shardings: a TrainState of NamedSharding leaves.
      init: `rng -> TrainState`, pure: jit it with `out_shardings=shardings` (see
        `create_state`).
      num_parameters: how many values the model's parameters hold, trainable or not.
    """

    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    trainable: Any
    abstract_state: TrainState
    shardings: TrainState
    init: Callable[[jax.Array], TrainState]
    num_parameters: int

    @property
    def mesh(self) -> Mesh:
        return self.shardings.step.mesh

    def merge(self, params, model_state) -> nnx.Module:
        """The NNX model holding these variables (inside or outside jit)."""
        return nnx.merge(self.graphdef, params, model_state)

    def split(self, model: nnx.Module) -> tuple[Any, Any]:
        """(params, model_state) of a model as nested dicts: the inverse of `merge`."""
        return (
            nnx.to_pure_dict(nnx.state(model, self.trainable)),
            nnx.to_pure_dict(nnx.state(model, _not_kept(self.trainable))),
        )


def make_state_layout(
    model: Callable[[nnx.Rngs], nnx.Module],
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules,
    *,
    trainable=nnx.Param,
    loss_scale: LossScale | None = None,
) -> StateLayout:
    """Traces the model and optimizer abstractly and lays their state out over `mesh`.

    Every variable's sharding comes from its logical axis names through `rules`; one
    without names is replicated. A parameter of two or more dimensions without names gets
    one warning naming all such (an unsharded matrix defeats FSDP and tensor parallelism);
    vectors and scalars (biases, norm scales) are small and replicated silently.
    Optimizer moments take their parameter's sharding; counters are replicated.

    Args:
      model: `rngs -> nnx.Module`. Its `rngs` serves any stream name.
      tx: the optimizer.
      mesh: the device mesh.
      rules: logical-axis rules (a Rules or pairs).
      trainable: an NNX filter of the variables the optimizer updates.
      loss_scale: the run's loss scaling, for the scale a new state starts from; None:
        `LossScale()`'s (the scale is then carried but not used).

    Raises:
      ConfigError: a logical axis without a rule, or a weight its mesh axes do not divide.
    """
    rules = Rules(rules)

    def build(rng) -> nnx.Module:
        params_rng, dropout_rng, other_rng = jax.random.split(rng, 3)
        # Shardings come from our rules table through jit's out_shardings, not from Flax.
        with nnx.use_eager_sharding(False):
            return model(nnx.Rngs(other_rng, params=params_rng, dropout=dropout_rng))

    abstract_model = nnx.eval_shape(lambda: build(jax.random.key(0)))
    graphdef, abstract_params, abstract_rest = nnx.split(
        abstract_model, trainable, _not_kept(trainable)
    )
    _warn_unnamed(abstract_model)
    param_shardings = _variable_shardings(abstract_params, mesh, rules)
    rest_shardings = _variable_shardings(abstract_rest, mesh, rules)

    def assemble(params, model_state, step_rng) -> TrainState:
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            model_state=model_state,
            rng=jax.random.key_data(step_rng),
            skipped=jnp.zeros((), jnp.int32),
            loss_scale=(loss_scale or LossScale()).initial_state(),
        )

    def init(rng) -> TrainState:
        model_rng, step_rng = jax.random.split(rng)
        _, params, rest = nnx.split(build(model_rng), trainable, _not_kept(trainable))
        return assemble(nnx.to_pure_dict(params), nnx.to_pure_dict(rest), step_rng)

    replicated = NamedSharding(mesh, PartitionSpec())
    # The state's shapes from the model's, without building the model a second time.
    shapes = jax.eval_shape(
        assemble,
        nnx.to_pure_dict(abstract_params),
        nnx.to_pure_dict(abstract_rest),
        jax.random.key(0),
    )
    opt_shardings = optax.tree_map_params(
        tx,
        lambda _, s: s,
        shapes.opt_state,
        param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    shardings = TrainState(
        step=replicated,
        params=param_shardings,
        opt_state=opt_shardings,
        model_state=rest_shardings,
        rng=replicated,
        skipped=replicated,
        loss_scale=jax.tree.map(lambda _: replicated, shapes.loss_scale),
    )
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings
    )
    # A weight its mesh axes do not divide: one line naming it, not jit's IndivisibleError.
    check_divisible(abstract_state.params)
    check_divisible(abstract_state.model_state, what="model variable")
    num_parameters = sum(
        math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract_model, nnx.Param))
    )
    return StateLayout(graphdef, tx, trainable, abstract_state, shardings, init, num_parameters)


def _variable_shardings(abstract_variables: nnx.State, mesh: Mesh, rules: Rules):
    """NamedShardings from the variables' logical names (none: replicated)."""
    specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_variables))
    specs = jax.tree.map(
        lambda spec: spec if isinstance(spec, PartitionSpec) else PartitionSpec(),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
    return named_shardings(specs, mesh, rules)


def _warn_unnamed(abstract_model: nnx.Module) -> None:
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(abstract_model, nnx.Param)))
    values = nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param))
    unnamed = [
        path_str(path)
        for (path, spec), value in zip(
            jax.tree_util.tree_flatten_with_path(
                specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
            )[0],
            jax.tree.leaves(values),
            strict=True,
        )
        if value.ndim >= 2 and len(spec) != value.ndim
    ]
    if unnamed:
        shown = ", ".join(unnamed[:8]) + (
            f" and {len(unnamed) - 8} more" if len(unnamed) > 8 else ""
        )
        logging.warning(
            "%d weight matrices have no logical axis names and are replicated on every device: %s "
            "(name them with nnx.with_partitioning or kernel_metadata={'out_sharding': ...} "
            "to shard them)",
            len(unnamed),
            shown,
        )


def create_state(layout: StateLayout, seed: int) -> TrainState:
    """A freshly initialised state, created directly in its sharded layout on the mesh."""
    return jax.jit(layout.init, out_shardings=layout.shardings)(jax.random.key(seed))
