"""Device mesh and logical-axis sharding.

Parameters and activations name their dimensions with *logical* axes ("embed", "mlp",
"activation_batch", ...). A `Rules` table maps each logical axis to zero or more *mesh*
axes, so changing the parallelism strategy is a config edit:

    rules = Rules((("embed", "fsdp"), ("mlp", "tensor"), ("activation_batch", ("data", "fsdp"))))
    rules.spec(("embed", "mlp"))  # PartitionSpec('fsdp', 'tensor')

A model whose weights carry no logical names (any Flax layer as written) gets them from
the config by path instead (`config.param_axes`, as big_vision and MaxText shard by name
patterns): `Rules(..., param_axes=((r".*linear.*/kernel", ("embed", "mlp")),))`.
"""

import contextlib
import math
import threading
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxtrain.errors import ConfigError
from jaxtrain.paths import PathRules, path_str  # path_str: also read from here

# Canonical order, outermost first: `tensor` is innermost so that its collectives run
# between neighbouring devices (the fastest links on TPU ICI and within an NVLink domain).
MESH_AXES = ("data", "fsdp", "sequence", "tensor")

# The logical axis of the leading (example) dimension of every input batch array.
BATCH_AXIS = "activation_batch"


class Rules:
    """A logical-axis rules table, checked once: logical axis name -> tuple of mesh axes.

    Also the logical axes of variables by path pattern (`param_axes`), for weights that
    name none of their own: a `PathRules` of `(regex over the variable's path, logical
    axes)`, first match wins; axes None leaves a match replicated whatever its rank.

    Args:
      rules: pairs `(logical_name, mesh_axes)`, mesh_axes a mesh axis name, a tuple of
        them, or None (replicated); or another Rules.
      param_axes: pairs `(pattern, logical_axes)` (see `jaxtrain.paths`); None: those
        of `rules` when it is a Rules, else none.

    Raises:
      ConfigError: a rule names a mesh axis that is not one of MESH_AXES; a param_axes
        pair that is malformed or names a logical axis without a rule.
    """

    def __init__(self, rules, param_axes=None):
        if isinstance(rules, Rules):
            self.table = dict(rules.table)
            self.param_axes = rules.param_axes if param_axes is None else self._patterns(param_axes)
            return
        self.table: dict[str, tuple[str, ...]] = {}
        for name, axes in rules:
            axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            unknown = [a for a in axes if a not in MESH_AXES]
            if unknown:
                raise ConfigError(
                    f"config.rules maps {name!r} to unknown mesh axis {unknown[0]!r}; "
                    f"axes are {MESH_AXES}"
                )
            self.table[name] = axes
        self.param_axes = self._patterns(param_axes or ())

    def _patterns(self, param_axes) -> PathRules:
        def logical_axes(axes, name):
            if axes is None:
                return None
            ok = not isinstance(axes, str) and isinstance(axes, Sequence)
            if not ok or not all(a is None or isinstance(a, str) for a in axes):
                raise ConfigError(
                    f"{name} must give a tuple of logical axis names (or None) per "
                    f"dimension, or None (replicated), got {axes!r}"
                )
            missing = [a for a in axes if a is not None and a not in self.table]
            if missing:
                raise ConfigError(
                    f"{name} names logical axis {missing[0]!r}, which has no entry in "
                    f"config.rules; known: {sorted(self.table)}"
                )
            return tuple(axes)

        return PathRules(param_axes, "config.param_axes", logical_axes)

    def spec(self, logical_axes: Sequence[str | None], where: str = "") -> PartitionSpec:
        """Maps one logical name (or None: replicated) per dimension to a PartitionSpec.

        A mesh axis is used at most once per spec: if two dimensions map to the same mesh
        axis, the first one keeps it and the later one drops it (as Flax and MaxText do).

        Args:
          logical_axes: the logical names, one per dimension.
          where: what the spec belongs to, for the error message.

        Raises:
          ConfigError: a logical name has no rule.
        """
        used: set[str] = set()
        spec = []
        for name in logical_axes:
            if name is None:
                spec.append(None)
                continue
            if name not in self.table:
                place = f" (used by {where})" if where else ""
                raise ConfigError(
                    f"logical axis {name!r}{place} has no entry in config.rules; "
                    f"known: {sorted(self.table)}"
                )
            axes = tuple(a for a in self.table[name] if a not in used)
            used.update(axes)
            spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return PartitionSpec(*spec)

    def __repr__(self) -> str:
        patterns = f", param_axes={self.param_axes!r}" if self.param_axes else ""
        return f"Rules({tuple(self.table.items())}{patterns})"


def mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
    """Resolves a `{axis: size}` config (one size may be -1) against a device count.

    Args:
      mesh_config: mapping from axis name (a subset of MESH_AXES) to size; -1 means
        "all remaining devices". Axes left out have size 1.
      num_devices: how many devices the mesh must cover exactly.

    Returns:
      An ordered `{axis: size}` dict over all of MESH_AXES.

    Raises:
      ConfigError: unknown axis, bad size, or a product that does not match the devices.
    """
    sizes = dict(mesh_config)
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ConfigError(f"config.mesh has unknown axis {unknown[0]!r}; axes are {MESH_AXES}")
    shape = {name: int(sizes.get(name, 1)) for name in MESH_AXES}
    fill = [name for name, size in shape.items() if size == -1]
    bad = [name for name, size in shape.items() if size == 0 or size < -1]
    if bad or len(fill) > 1:
        raise ConfigError(
            f"config.mesh sizes must be positive with at most one -1, got {_fmt(shape)}"
        )
    fixed = math.prod(size for size in shape.values() if size != -1)
    if fill:
        if num_devices % fixed:
            raise ConfigError(
                f"config.mesh {_fmt(shape)} cannot fill {num_devices} devices: "
                f"{num_devices} is not divisible by {fixed}"
            )
        shape[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(
            f"config.mesh {_fmt(shape)} needs {fixed} devices but {num_devices} are available"
        )
    return shape


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the device mesh from config, with every axis in `Auto` (GSPMD) mode.

    Args:
      mesh_config: see `mesh_shape`, e.g. `{"data": -1, "tensor": 2}`.
      devices: the devices to use; all global devices by default.

    Returns:
      A `jax.sharding.Mesh` with axes MESH_AXES.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    axis_types = (AxisType.Auto,) * len(shape)
    if devices == jax.devices():
        # All of them: make_mesh picks a topology-aware device order on TPU/GPU. (Others,
        # such as libtpu's compile-only devices for `jaxtrain plan`, are taken as ordered.)
        return jax.make_mesh(
            tuple(shape.values()), tuple(shape), axis_types=axis_types, devices=devices
        )
    device_array = np.asarray(devices).reshape(tuple(shape.values()))
    return Mesh(device_array, tuple(shape), axis_types=axis_types)


def mesh_and_rules(config, devices: Sequence[jax.Device] | None = None) -> tuple[Mesh, Rules]:
    """The mesh and rules of a run config, after checking its global batch splits over both.

    The one start-up that `train_and_evaluate` and `jaxtrain plan` share.

    Raises:
      ConfigError: a bad mesh or rule, or a batch the mesh, the microbatches or the
        processes do not divide.
    """
    mesh = make_mesh(config.mesh, devices)
    rules = Rules(config.rules, param_axes=config.param_axes)
    check_batch_split(config.global_batch_size, config.microbatches, mesh, rules)
    return mesh, rules


def _fmt(shape) -> str:
    return "(" + ", ".join(f"{k}={v}" for k, v in shape.items()) + ")"


def named_shardings(logical_specs, mesh: Mesh, rules: Rules):
    """Maps a pytree of logical PartitionSpecs to NamedShardings (errors name the path)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(
        logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )
    shardings = [
        NamedSharding(mesh, rules.spec(spec, where=path_str(path))) for path, spec in leaves
    ]
    return jax.tree_util.tree_unflatten(treedef, shardings)


# Activation constraints. Models call `constrain(x, names)` at block boundaries; it is a
# no-op unless a mesh is set (`jax.set_mesh`) and rules are active (`use_rules`), so the
# models also run unsharded in a notebook or someone else's code.
class _Active(threading.local):
    rules: Rules | None = None


_ACTIVE = _Active()


@contextlib.contextmanager
def use_rules(rules: Rules | None):
    """Activates a rules table for `constrain` while tracing (None: constraints off)."""
    previous = _ACTIVE.rules
    _ACTIVE.rules = None if rules is None else Rules(rules)
    try:
        yield
    finally:
        _ACTIVE.rules = previous


def active_spec(logical_axes: Sequence[str | None]) -> PartitionSpec | None:
    """The PartitionSpec of logical axis names under the active rules and mesh, or None.

    None when tracing without a mesh (`jax.set_mesh`) or rules (`use_rules`): the caller
    then runs unsharded. For models that place an array themselves (`constrain`) or
    split work over the mesh by hand (`jax.shard_map`, as the splash attention kernel).
    """
    rules = _ACTIVE.rules
    if rules is None or not rules.table or jax.sharding.get_abstract_mesh().empty:
        return None
    return rules.spec(logical_axes)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Constrains an activation's sharding by logical axis names (no-op without a mesh)."""
    spec = active_spec(logical_axes)
    return x if spec is None else jax.lax.with_sharding_constraint(x, spec)


def batch_axes(ndim: int) -> tuple[str | None, ...]:
    """Default logical axes of a batch array: examples split, the other dimensions whole."""
    return (BATCH_AXIS,) + (None,) * (ndim - 1)


def data_parallel_size(mesh: Mesh, rules: Rules) -> int:
    """How many ways the global batch is split (product of the batch axis's mesh axes)."""
    axes = rules.spec((BATCH_AXIS,))[0] or ()
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def check_divisible(abstract_tree, what: str = "parameter") -> None:
    """Checks that every array's sharded dimensions divide evenly over their mesh axes.

    jit refuses such arrays too, but its message names neither the array nor the config
    field to change; this one names the array, its shape and the mesh axis. It reads only
    shapes and shardings (no compilation), so it costs microseconds per array.

    Args:
      abstract_tree: a pytree of `jax.ShapeDtypeStruct` (or arrays) carrying a
        NamedSharding; leaves without one are skipped.
      what: what the leaves are, for the message ("parameter", "batch array", ...).

    Raises:
      ConfigError: the first array with a dimension its mesh axes do not divide.
    """
    leaves = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
    for path, leaf in leaves:
        leaf_sharding = getattr(leaf, "sharding", None)
        if isinstance(leaf_sharding, NamedSharding):
            problem = indivisible(leaf.shape, leaf_sharding)
            if problem:
                raise ConfigError(f"{what} {path_str(path)} of shape {problem}")


def indivisible(shape, named_sharding: NamedSharding) -> str | None:
    """Why an array of `shape` does not split evenly as `named_sharding` says, or None.

    The message goes on from "PARAMETER of shape ": the shape, the mesh axis, the dimension.
    """
    for dim, axes in enumerate(named_sharding.spec):
        if axes is None:
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        ways = math.prod(named_sharding.mesh.shape[a] for a in axes)
        if shape[dim] % ways:
            over = f"mesh axis {axes[0]!r}" if len(axes) == 1 else f"mesh axes {axes}"
            return (
                f"{tuple(shape)} cannot be split over {over} (size {ways}) along dimension "
                f"{dim} ({shape[dim]} is not divisible by {ways})"
            )
    return None


def check_batch_split(global_batch_size: int, microbatches: int, mesh: Mesh, rules: Rules) -> None:
    """Checks that a global batch splits over the data-parallel devices, its microbatches
    and the processes.

    Raises:
      ConfigError: naming the batch, the split and the batch's mesh axes.
    """
    split = data_parallel_size(mesh, rules)
    if global_batch_size % split:
        raise ConfigError(
            f"config.global_batch_size={global_batch_size} is not divisible by the "
            f"{split} ways the mesh splits a batch (over {rules.spec((BATCH_AXIS,))[0]})"
        )
    if global_batch_size % (split * microbatches):
        raise ConfigError(
            f"config.global_batch_size={global_batch_size} does not split into "
            f"config.microbatches={microbatches} parts of a multiple of {split} "
            "(the data-parallel size)"
        )
    if global_batch_size % jax.process_count():
        raise ConfigError(
            f"config.global_batch_size={global_batch_size} is not divisible "
            f"by the {jax.process_count()} processes"
        )
