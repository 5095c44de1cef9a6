"""Named topologies (v5p-64, v6e-8, h100x8x4, cpu-8) and the devices to compile for them.

Topology names (case-insensitive): a chip of `jaxtrain.hardware.CHIPS` and a count, the
TPU ones as Cloud TPU names slices:

    v4-8 v5p-64     TPU v4, v5p: the number counts TensorCores, two per chip and one JAX
                    device per chip (v5p-64 = 32 chips, 32 devices)
    tpu7x-8         TPU7x (Ironwood): the number counts TensorCores, two per chip, and each
                    TensorCore is a JAX device (tpu7x-8 = 4 chips, 8 devices)
    v5e-16 v6e-256  TPU v5e, v6e: the number counts chips, one TensorCore and device each
    h100x8          8 GPUs on one host; h100x8x4 is 8 GPUs per host on 4 hosts (32 GPUs).
                    GPUs: b200, gb200, h100, h100_pcie, h200, a100 (80 GB), a100_40gb, l4,
                    a10g, t4, v100
    cpu-8           8 CPU devices

Where a step is compiled, first that applies (`target_devices`):
  1. attached devices of the target's kind, when there are enough (exact);
  2. TPU targets, when libtpu is installed (`pip install "jax[tpu]"`, which runs on any
     x86 Linux host): its compile-only devices for the slice's physical shape, compiled
     by the real TPU compiler (exact);
  3. otherwise N simulated CPU devices (XLA:CPU): shardings, parameter and optimizer
     bytes and collectives are the target's; temporaries and FLOPs approximate it.
The CPU device count can only be set before jax starts its backend. `jaxtrain plan` runs
in a fresh process, so it always can; from Python, plan before anything else uses jax,
or for a topology no larger than the CPU devices the process already has (a larger one
is a ConfigError saying so).
"""

import dataclasses
import difflib
import importlib.util
import math
import os
import re

import jax
import numpy as np
from jax.experimental import mesh_utils

from jaxtrain import sharding
from jaxtrain.errors import ConfigError
from jaxtrain.hardware import CHIPS, Chip, chip_for_device_kind

_TOPOLOGY = re.compile(
    r"(?P<chip>[a-z][a-z0-9_]*?)(?:-(?P<count>\d+)|x(?P<gpus>\d+)(?:x(?P<hosts>\d+))?)"
)
_SYNTAX = "TPU as v5e-16 (chip-N), GPU as h100x8 or h100x8x4 (GPUs per host x hosts), CPU as cpu-8"


@dataclasses.dataclass(frozen=True)
class Topology:
    """A parsed topology name: which chip, how many devices."""

    name: str
    chip_name: str
    chip: Chip
    num_devices: int
    num_hosts: int | None  # known for GPU names only


def parse_topology(name: str, chips: dict[str, Chip] | None = None) -> Topology:
    """Parses a topology name (see the module docstring).

    Args:
      name: e.g. "v5p-64", "h100x8x4", "cpu-8".
      chips: the chip table; CHIPS by default.

    Returns:
      The Topology.

    Raises:
      ConfigError: the name does not parse, names an unknown chip, or a count that does
        not fit the chip.
    """
    chips = CHIPS if chips is None else chips
    match = _TOPOLOGY.fullmatch(name.strip().lower())
    if not match:
        raise ConfigError(f"bad topology {name!r}: write {_SYNTAX}")
    chip_name = match["chip"]
    if chip_name not in chips:
        close = difflib.get_close_matches(chip_name, sorted(chips), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"unknown chip {chip_name!r} in topology {name!r}{hint}; chips are {sorted(chips)}"
        )
    chip = chips[chip_name]
    if chip.platform == "gpu":
        if match["gpus"] is None:
            raise ConfigError(f"GPU topology {name!r} is written {chip_name}xGPUS[xHOSTS]")
        hosts = int(match["hosts"] or 1)
        num_devices = int(match["gpus"]) * hosts
    else:
        if match["count"] is None:
            raise ConfigError(f"topology {name!r} is written {chip_name}-N")
        hosts, count = None, int(match["count"])
        cores_per_chip = chip.cores_per_device * chip.devices_per_chip
        if count % cores_per_chip:
            raise ConfigError(
                f"topology {name!r}: {chip_name}-N counts TensorCores, "
                f"{cores_per_chip} per chip, so N must be a multiple of {cores_per_chip}"
            )
        num_devices = count // chip.cores_per_device
    if num_devices < 1:
        raise ConfigError(f"topology {name!r} has no devices")
    return Topology(name, chip_name, chip, num_devices, hosts)


def target_devices(
    topology: Topology, chips: dict[str, Chip] | None = None
) -> tuple[list, str, list[str]]:
    """Devices to compile for, in the order of the module docstring.

    Args:
      topology: the target.
      chips: the table `topology` was parsed with; CHIPS by default. An attached device
        is the target's when the table's lookup names the target's chip for it.

    Returns:
      (devices, source, notes): `topology.num_devices` devices; source is "attached",
      "tpu-aot" or "cpu-simulated"; notes say why a better source was not used.

    Raises:
      ConfigError: the process's CPU backend already started with too few devices.
    """
    n, chip, notes = topology.num_devices, topology.chip, []
    try:
        # Only possible before the backend starts; costs nothing if the target is attached.
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        pass  # already started: use what it has, checked below
    if chip.platform != "cpu":
        attached = [
            d
            for d in jax.devices()
            if d.platform == chip.platform and chip_for_device_kind(d.device_kind, chips) is chip
        ]
        if len(attached) >= n:
            return attached[:n], "attached", notes
        if chip.platform == "tpu":
            if importlib.util.find_spec("libtpu") is None:
                notes.append('libtpu is not installed (pip install "jax[tpu]"): simulated')
            else:
                try:
                    return tpu_topology_devices(topology), "tpu-aot", notes
                except Exception as e:  # a shape libtpu refuses, an older libtpu: simulate
                    reason = " ".join(f"{type(e).__name__}: {e}".split())
                    notes.append(f"TPU compile-only topology unavailable ({reason}): simulated")
    cpu = jax.devices("cpu")
    if len(cpu) < n:
        raise ConfigError(
            f"topology {topology.name!r} needs {n} CPU devices, but jax already started "
            f"with {len(cpu)}; run `jaxtrain plan` in a new process"
        )
    return cpu[:n], "attached" if chip.platform == "cpu" else "cpu-simulated", notes


def tpu_slice_shape(topology: Topology) -> tuple[list[int], tuple[bool, ...]]:
    """A TPU slice's physical chip grid and which of its axes wrap around (a torus).

    The shapes Cloud TPU provisions for power-of-two slices, as MaxText's table lists
    them: v4, v5p and TPU7x are 3D, 2x2x1 chips per host, doubling the shortest axis
    (the last of equals) up to v5p-64 = 2x4x4; a cube of 4x4x4 and up wraps around. v5e
    and v6e are 2D: 2x4 for 8 chips, 4x4 for 16, ..., 16x16 for a full pod, whose 16-chip
    axes wrap.

    Raises:
      ValueError: a chip count that is not a power of two (v5p-384 is 4x4x12: no rule).
    """
    chips = topology.num_devices // topology.chip.devices_per_chip
    if chips & (chips - 1):
        raise ValueError(f"no physical shape known for {chips} chips")
    if topology.chip.slice_dims == 3:
        dims = [2, 2, 1] if chips >= 4 else [chips, 1, 1]
        while math.prod(dims) < chips:
            i = len(dims) - 1 - dims[::-1].index(min(dims))
            dims[i] *= 2
        return dims, (chips >= 64,) * 3
    side = 2 ** (int(math.log2(chips)) // 2)
    dims = [side, chips // side]
    return dims, (dims[0] == 16, dims[1] == 16, False)


def tpu_topology_devices(topology: Topology) -> list:
    """libtpu's compile-only devices for a TPU slice (see `tpu_slice_shape`)."""
    from jax.experimental import topologies

    dims, wrap = tpu_slice_shape(topology)
    # libtpu lets one process at a time load it (a lock file guards the chips). Compiling
    # for devices that are not attached touches no chip, so several plans, or a plan and
    # the tests, may load it at once. (An attached TPU was looked for, and not used, first.)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # A host holds up to 2x2x1 chips; a smaller slice is one host of its own shape.
    host = tuple(min(d, limit) for d, limit in zip([*dims, 1][:3], (2, 2, 1), strict=True))
    description = topologies.get_topology_desc(
        topology_name=f"{topology.chip.tpu_name}:{'x'.join(map(str, dims))}",
        platform="tpu",
        chip_config_name="megacore" if topology.chip.cores_per_device == 2 else "default",
        chips_per_host_bounds=host,
        num_slices=1,
        wrap=wrap,
    )
    return list(description.devices)


def physical_order(devices: list, mesh_config) -> list:
    """A whole slice's TPU devices in the order a mesh of `mesh_config` should take them.

    By physical coordinates, as `jax.make_mesh` orders the attached devices of a whole
    slice, so that the innermost mesh axis (`tensor`) spans neighbouring chips. For
    compile-only devices, which `jaxtrain.make_mesh` would otherwise take as listed.
    """
    shape = tuple(sharding.mesh_shape(mesh_config, len(devices)).values())
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return list(np.asarray(grid).flat)
