"""The train state, its abstract shape and sharded layout, and sharded initialisation.

    layout = make_state_layout(model_fn, tx, mesh, rules)   # no device memory yet
    state = create_state(layout, seed)                      # created already sharded

`TrainState` holds only arrays in nested dicts (no NNX objects), so Orbax saves and
restores it directly and another program can read it back; `layout.merge` turns its
variables back into the NNX model.
"""

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtrain.errors import ConfigError
from jaxtrain.precision import LossScale
from jaxtrain.sharding import Rules, check_divisible, indivisible, path_str


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
    param_axes=None,
) -> StateLayout:
    """Traces the model and optimizer abstractly and lays their state out over `mesh`.

    Every variable's sharding comes from its logical axis names through `rules`: its own
    names (`nnx.with_partitioning`, `kernel_metadata={"out_sharding": ...}`), else those
    the first `param_axes` pattern matching its path gives (so an unmodified Flax model
    shards too), else none: replicated. A parameter of two or more dimensions left
    without names gets one warning naming all such (an unsharded matrix defeats FSDP and
    tensor parallelism); vectors and scalars (biases, norm scales) are small and
    replicated silently. Optimizer moments take their parameter's sharding (factored
    ones its sharding less the factored dimension, see `_moment_sharding`); counters
    are replicated.

    Args:
      model: `rngs -> nnx.Module`. Its `rngs` serves any stream name.
      tx: the optimizer.
      mesh: the device mesh.
      rules: logical-axis rules (a Rules or pairs), with their `param_axes` if a Rules.
      trainable: an NNX filter of the variables the optimizer updates.
      loss_scale: the run's loss scaling, for the scale a new state starts from; None:
        `LossScale()`'s (the scale is then carried but not used).
      param_axes: `(regex over variable paths, logical axes)` pairs, first match wins,
        as `config.param_axes` (e.g. `((r".*/kernel", ("embed", "mlp")),)`); they
        replace the ones `rules` carries. None: those of `rules`.

    Raises:
      ConfigError: a logical axis without a rule, a weight its mesh axes do not divide,
        or a param_axes pattern that matches no variable or the wrong number of
        dimensions.
    """
    rules = Rules(rules, param_axes=param_axes)

    def build(rng) -> nnx.Module:
        params_rng, dropout_rng, other_rng = jax.random.split(rng, 3)
        # Shardings come from our rules table through jit's out_shardings, not from Flax.
        with nnx.use_eager_sharding(False):
            return model(nnx.Rngs(other_rng, params=params_rng, dropout=dropout_rng))

    abstract_model = nnx.eval_shape(lambda: build(jax.random.key(0)))
    graphdef, abstract_params, abstract_rest = nnx.split(
        abstract_model, trainable, _not_kept(trainable)
    )
    param_shardings, rest_shardings = _variable_shardings(
        (abstract_params, abstract_rest), mesh, rules
    )

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
        _moment_sharding,
        shapes.opt_state,
        param_shardings,
        shapes.params,
        transform_non_params=lambda _: replicated,
        # A MaskedNode holds the place of a parameter another part of the optimizer
        # updates (Muon's Adam fallback): it has no array, so nothing to lay out.
        is_leaf=lambda x: isinstance(x, NamedSharding | jax.ShapeDtypeStruct | optax.MaskedNode),
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


def _moment_sharding(moment, param_sharding: NamedSharding, param) -> NamedSharding:
    """The sharding of an optimizer state leaf that stands in its parameter's place.

    Most are the parameter's shape (Adam's moments, momentum, Muon's): its sharding.
    Factored moments (Adafactor's row and column statistics) are its shape less one
    dimension: its spec less that dimension's entry, so they stay sharded as the rows or
    columns they summarise (the first such dimension when several would fit; any is
    valid, since the kept dimensions' mesh axes divide them as they divide the
    parameter). Any other shape (Adafactor's (1,) placeholders for the statistics a
    parameter does not keep) is replicated: it is not laid out along the parameter.
    """
    if isinstance(moment, optax.MaskedNode):
        return moment
    shape, spec = tuple(moment.shape), tuple(param_sharding.spec)
    spec += (None,) * (len(param.shape) - len(spec))
    if shape == tuple(param.shape):
        return param_sharding
    if len(shape) == len(param.shape) - 1:
        for dim in range(len(param.shape)):
            if shape == tuple(param.shape[:dim] + param.shape[dim + 1 :]):
                kept = spec[:dim] + spec[dim + 1 :]
                return NamedSharding(param_sharding.mesh, PartitionSpec(*kept))
    return NamedSharding(param_sharding.mesh, PartitionSpec())


def _variable_shardings(parts: tuple[nnx.State, ...], mesh: Mesh, rules: Rules) -> tuple:
    """NamedShardings of each of `parts` (nested dicts), from their logical axis names.

    A variable's logical axes are its own, else the first `rules.param_axes` pattern's
    that matches its path, else none (replicated). Its own names come first: config.rules
    already remaps them, so a pattern is never needed to override a model's names, and a
    broad pattern (".*/kernel") cannot undo a layout the model's author chose. Patterns
    fill in what the model left unnamed, which is every weight of a Flax layer as written.
    The parts are matched together (params, then the other variables: frozen weights,
    statistics), so a pattern must match something in one of them.
    """
    found = [
        (path_str(keys), variable)
        for variables in parts
        for keys, variable in nnx.to_flat_state(variables)
    ]
    own = {}  # path -> the variable's own logical axes
    for path, variable in found:
        spec = nnx.spmd.get_var_pspec(variable)
        if spec is not None and len(spec):
            own[path] = tuple(spec)
    patterns = rules.param_axes
    chosen = patterns.assign(path for path, _ in found)
    for i in sorted(set(chosen.values())):
        taken = [path for path, j in chosen.items() if j == i]
        if all(path in own for path in taken):
            raise ConfigError(
                f"config.param_axes pattern {patterns.patterns[i]!r} selects only variables "
                f"that name their own logical axes, which come first (e.g. {taken[0]}: "
                f"{own[taken[0]]}); remap those through config.rules"
            )
    replicated = NamedSharding(mesh, PartitionSpec())
    by_path, unnamed = {}, []
    for path, variable in found:
        shape = tuple(getattr(variable, "shape", ()))
        what = "parameter" if isinstance(variable, nnx.Param) else "model variable"
        if path in own:
            by_path[path] = NamedSharding(mesh, rules.spec(own[path], where=path))
        elif path in chosen and patterns.values[chosen[path]] is not None:
            pattern, axes = patterns.patterns[chosen[path]], patterns.values[chosen[path]]
            source = f"config.param_axes pattern {pattern!r} -> {axes}"
            if len(axes) != len(shape):
                raise ConfigError(
                    f"{source} gives {len(axes)} logical axes to {what} {path} of shape "
                    f"{shape}, which has {len(shape)} dimensions"
                )
            by_path[path] = NamedSharding(mesh, rules.spec(axes, where=f"{path}, by {source}"))
            problem = indivisible(shape, by_path[path])
            if problem:
                raise ConfigError(f"{what} {path} of shape {problem}, by {source}")
        else:
            by_path[path] = replicated
            if what == "parameter" and len(shape) >= 2 and path not in chosen:
                unnamed.append((path, shape))
    _warn_unnamed(unnamed)
    return tuple(
        jax.tree_util.tree_map_with_path(
            lambda keys, _: by_path.get(path_str(keys), replicated), nnx.to_pure_dict(part)
        )
        for part in parts
    )


def _warn_unnamed(unnamed: list[tuple[str, tuple[int, ...]]]) -> None:
    """One warning naming the weight matrices that no logical names shard, and the ways to."""
    if not unnamed:
        return
    paths = [path for path, _ in unnamed]
    shown = ", ".join(paths[:8]) + (f" and {len(paths) - 8} more" if len(paths) > 8 else "")
    path, shape = unnamed[0]
    axes = (None,) * (len(shape) - 2) + ("embed", "mlp")  # a conv kernel: its last two
    example = f"config.param_axes = ((r'{re.escape(path)}', {axes!r}),)"
    logging.warning(
        "%d weight matrices have no logical axis names and are replicated on every device: "
        "%s. Shard them without editing the model by path pattern, e.g. %s with "
        "config.rules mapping those names to mesh axes (('embed', 'fsdp'), ('mlp', "
        "'tensor')); or name them in the model (nnx.with_partitioning, or "
        "kernel_metadata={'out_sharding': ...}); or replicate them on purpose with "
        "(pattern, None)",
        len(paths),
        shown,
        example,
    )


def create_state(layout: StateLayout, seed: int) -> TrainState:
    """A freshly initialised state, created directly in its sharded layout on the mesh."""
    return jax.jit(layout.init, out_shardings=layout.shardings)(jax.random.key(seed))
