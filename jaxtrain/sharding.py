"""Device mesh and logical-axis sharding.

Parameters and activations name their dimensions with *logical* axes ("embed", "mlp",
"activation_batch", ...). The config's `rules` table maps each logical axis to zero or
more *mesh* axes, so changing the parallelism strategy is a config edit:

    rules = (("embed", "fsdp"), ("mlp", "tensor"), ("activation_batch", ("data", "fsdp")))
"""

import contextlib
import math
import threading
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxtrain.errors import ConfigError

# Canonical order, outermost first: `tensor` is innermost so that its collectives run
# between neighbouring devices (the fastest links on TPU ICI and within an NVLink domain).
MESH_AXES = ("data", "fsdp", "sequence", "tensor")


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
      mesh_config: see `mesh_shape`.
      devices: the devices to use; all global devices by default.

    Returns:
      A `jax.sharding.Mesh` with axes MESH_AXES.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    axis_types = (AxisType.Auto,) * len(shape)
    if len(devices) == jax.device_count():
        # make_mesh picks a topology-aware device order on TPU/GPU.
        return jax.make_mesh(
            tuple(shape.values()), tuple(shape), axis_types=axis_types, devices=devices
        )
    device_array = np.asarray(devices).reshape(tuple(shape.values()))
    return Mesh(device_array, tuple(shape), axis_types=axis_types)


def _fmt(shape) -> str:
    return "(" + ", ".join(f"{k}={v}" for k, v in shape.items()) + ")"


def logical_to_mesh_spec(logical_axes, rules, where: str = "") -> PartitionSpec:
    """Maps a tuple of logical axis names to a PartitionSpec over mesh axes.

    A mesh axis is used at most once per spec: if two dimensions map to the same mesh
    axis, the first one keeps it and the later one drops it (as Flax/MaxText do).

    Args:
      logical_axes: one logical name (or None for "replicated") per dimension.
      rules: sequence of `(logical_name, mesh_axes)`, mesh_axes a name, a tuple of
        names, or None.
      where: what the spec belongs to, for the error message.

    Returns:
      The PartitionSpec.

    Raises:
      ConfigError: a logical name has no rule.
    """
    table = dict(_normalise_rules(rules))
    used: set[str] = set()
    spec = []
    for name in logical_axes:
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            place = f" (used by {where})" if where else ""
            raise ConfigError(
                f"logical axis {name!r}{place} has no entry in config.rules; known: {sorted(table)}"
            )
        axes = tuple(a for a in table[name] if a not in used)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def _normalise_rules(rules):
    for entry in rules:
        name, axes = entry
        if axes is None:
            axes = ()
        elif isinstance(axes, str):
            axes = (axes,)
        unknown = [a for a in axes if a not in MESH_AXES]
        if unknown:
            raise ConfigError(
                f"config.rules maps {name!r} to unknown mesh axis {unknown[0]!r}; "
                f"axes are {MESH_AXES}"
            )
        yield name, tuple(axes)


def named_shardings(logical_specs, mesh: Mesh, rules):
    """Maps a pytree of logical PartitionSpecs (with `/`-joined paths) to NamedShardings."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(
        logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )
    shardings = [
        NamedSharding(mesh, logical_to_mesh_spec(spec, rules, where=path_str(path)))
        for path, spec in leaves
    ]
    return jax.tree_util.tree_unflatten(treedef, shardings)


def path_str(path) -> str:
    """`('blocks', 0, 'attn', 'kernel')`-style key path as `blocks/0/attn/kernel`."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


# Activation constraints. Models call `constrain(x, names)` at block boundaries; it is a
# no-op unless a mesh is set (`jax.set_mesh`) and rules are active (`use_rules`), so the
# models also run unsharded in a notebook or someone else's code.
class _Rules(threading.local):
    rules: tuple = ()


_ACTIVE = _Rules()


@contextlib.contextmanager
def use_rules(rules):
    """Activates a logical-axis rules table for `constrain` while tracing."""
    previous = _ACTIVE.rules
    _ACTIVE.rules = tuple(tuple(r) for r in rules)
    try:
        yield
    finally:
        _ACTIVE.rules = previous


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Constrains an activation's sharding by logical axis names (no-op without a mesh)."""
    if not _ACTIVE.rules or jax.sharding.get_abstract_mesh().empty:
        return x
    spec = logical_to_mesh_spec(logical_axes, _ACTIVE.rules)
    return jax.lax.with_sharding_constraint(x, spec)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """Input batches: leading dimension split as the rules map "activation_batch"."""
    return NamedSharding(mesh, logical_to_mesh_spec(("activation_batch",), rules))


def data_parallel_size(mesh: Mesh, rules) -> int:
    """How many ways the global batch is split (product of the batch's mesh axes)."""
    axes = logical_to_mesh_spec(("activation_batch",), rules)[0] or ()
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def check_divisible(abstract_tree, what: str = "parameter") -> None:
    """Checks that every array's sharded dimensions divide evenly over their mesh axes.

    jit refuses such arrays too, but its message names neither the array nor the config
    field to change; this one names the array, its shape and the mesh axis. It reads only
    shapes and shardings (no compilation), so it costs microseconds per array.

    Args:
      abstract_tree: a pytree of `jax.ShapeDtypeStruct` (or arrays) carrying a
        NamedSharding, such as `Setup.abstract_state`; leaves without one are skipped.
      what: what the leaves are, for the message ("parameter", "batch array", ...).

    Raises:
      ConfigError: the first array with a dimension its mesh axes do not divide.
    """
    leaves = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
    for path, leaf in leaves:
        leaf_sharding = getattr(leaf, "sharding", None)
        if not isinstance(leaf_sharding, NamedSharding):
            continue
        for dim, axes in enumerate(leaf_sharding.spec):
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else tuple(axes)
            ways = math.prod(leaf_sharding.mesh.shape[a] for a in axes)
            if leaf.shape[dim] % ways:
                over = f"mesh axis {axes[0]!r}" if len(axes) == 1 else f"mesh axes {axes}"
                raise ConfigError(
                    f"{what} {path_str(path)} of shape {tuple(leaf.shape)} cannot be split "
                    f"over {over} (size {ways}) along dimension {dim} "
                    f"({leaf.shape[dim]} is not divisible by {ways})"
                )


def check_batch_split(global_batch_size: int, microbatches: int, mesh: Mesh, rules) -> None:
    """Checks that a global batch splits over the data-parallel devices and its microbatches.

    Raises:
      ConfigError: naming the batch, the split and the batch's mesh axes.
    """
    split = data_parallel_size(mesh, rules)
    if global_batch_size % split:
        raise ConfigError(
            f"config.global_batch_size={global_batch_size} is not divisible by the "
            f"{split} ways the mesh splits a batch "
            f"(over {logical_to_mesh_spec(('activation_batch',), rules)[0]})"
        )
    if global_batch_size % (split * microbatches):
        raise ConfigError(
            f"config.global_batch_size={global_batch_size} does not split into "
            f"config.microbatches={microbatches} parts of a multiple of {split} "
            "(the data-parallel size)"
        )
