"""`jaxtrain plan`: the train step compiled ahead of time for a topology that is not attached.

    jaxtrain plan --config=configs/gpt_pysource.py --topology=v5p-64 [--json]

A plan is the run's per-device memory (parameters, optimizer state, XLA's arguments,
outputs and temporaries), whether that fits the chip, FLOPs per step and the collectives
the step runs, all known before anyone books the hardware. A parameter that its mesh axes
do not divide (KV heads over `tensor`, ...) is reported by name, shape and axis.

Topology names (case-insensitive), one JAX device per chip or GPU:

    v4-8 v5p-64     TPU v4, v5p: the number counts TensorCores, two per chip (v5p-64 = 32 chips)
    v5e-16 v6e-256  TPU v5e, v6e: the number counts chips
    h100x8          8 GPUs on one host; h100x8x4 is 8 GPUs per host on 4 hosts (32 GPUs).
                    Chips: h100, h200, a100 (80 GB), a100_40gb
    cpu-8           8 CPU devices

Where the step is compiled, first that applies:
  1. attached devices of the target's kind, when there are enough (exact);
  2. TPU targets, when libtpu is installed: its compile-only topology devices (exact);
  3. otherwise N simulated CPU devices (XLA:CPU). Shardings, parameter and optimizer bytes
     and collectives are the target's; XLA's temporaries and FLOPs approximate the target
     compiler's (fusion, layout and async collectives differ). Compute dtype "auto" is
     resolved for the target's platform, not for the CPU.
The CPU device count can only be set before jax starts its backend. `jaxtrain plan` runs
in a fresh process, so it always can; from Python, call `make_plan` before anything else
uses jax, or with a topology no larger than the CPU devices the process already has
(a larger one is a ConfigError saying so).
"""

import copy
import dataclasses
import difflib
import importlib.util
import json
import math
import re

import jax
import jax.numpy as jnp

from jaxtrain import config as config_lib
from jaxtrain import data, hlo, metrics, optim, precision, sharding, steps
from jaxtrain import state as state_lib
from jaxtrain import tasks as tasks_lib
from jaxtrain.errors import ConfigError
from jaxtrain.hardware import CHIPS, Chip, GiB

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
        if count % chip.cores_per_device:
            raise ConfigError(
                f"topology {name!r}: {chip_name}-N counts TensorCores, "
                f"{chip.cores_per_device} per chip, so N must be a multiple of "
                f"{chip.cores_per_device}"
            )
        num_devices = count // chip.cores_per_device
    if num_devices < 1:
        raise ConfigError(f"topology {name!r} has no devices")
    return Topology(name, chip_name, chip, num_devices, hosts)


def target_devices(topology: Topology) -> tuple[list, str, list[str]]:
    """Devices to compile for, in the order of the module docstring.

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
            if d.platform == chip.platform
            and any(d.device_kind.startswith(kind) for kind in chip.device_kinds)
        ]
        if len(attached) >= n:
            return attached[:n], "attached", notes
        if chip.platform == "tpu" and importlib.util.find_spec("libtpu") is not None:
            try:
                return _tpu_topology_devices(topology), "tpu-aot", notes
            except Exception as e:  # an unsupported shape, an older libtpu: simulate instead
                reason = " ".join(f"{type(e).__name__}: {e}".split())
                notes.append(f"TPU AOT topology unavailable ({reason}); simulated instead")
    cpu = jax.devices("cpu")
    if len(cpu) < n:
        raise ConfigError(
            f"topology {topology.name!r} needs {n} CPU devices, but jax already started "
            f"with {len(cpu)}; run `jaxtrain plan` in a new process"
        )
    return cpu[:n], "attached" if chip.platform == "cpu" else "cpu-simulated", notes


def _tpu_topology_devices(topology: Topology) -> list:
    """libtpu's compile-only devices for a power-of-two slice (as MaxText names them)."""
    from jax.experimental import topologies

    chips = topology.num_devices
    if chips & (chips - 1):
        raise ValueError(f"no physical shape known for {chips} chips")
    if topology.chip.cores_per_device == 2:  # v4, v5p: 3D torus, 2x2x1 per host
        dims = [2, 2, 1] if chips >= 4 else [chips, 1, 1]
        while math.prod(dims) < chips:
            smallest = min(dims)
            i = len(dims) - 1 - dims[::-1].index(smallest)
            dims[i] *= 2
        wrap = (chips >= 64,) * 3
        chip_config = "megacore"
    else:  # v5e, v6e: 2D, a full 16x16 pod wraps around
        side = 2 ** (int(math.log2(chips)) // 2)
        dims = [side, chips // side]
        wrap = (dims[0] == 16, dims[1] == 16, False)
        chip_config = "default"
    description = topologies.get_topology_desc(
        topology_name=f"{topology.chip.tpu_name}:{'x'.join(map(str, dims))}",
        platform="tpu",
        chip_config_name=chip_config,
        chips_per_host_bounds=(2, 2, 1) if chips >= 4 else (chips, 1, 1),
        num_slices=1,
        wrap=wrap,
    )
    return list(description.devices)


def config_for_platform(config, platform: str):
    """A copy of `config` with "auto" dtypes resolved as they would be on `platform`."""
    config = copy.deepcopy(config)
    for field in ("compute_dtype", "param_dtype"):
        dtype = precision.resolve_dtype(config.precision[field], platform)
        config.precision[field] = jnp.dtype(dtype).name
    return config


def make_plan(
    config, topology: str | Topology, *, task=None, chips: dict[str, Chip] | None = None
) -> dict:
    """Compiles the train step for `topology` and says what it needs per device.

    Args:
      config: a run config (see configs/); its mesh is resolved against the topology.
      topology: a topology name (see the module docstring) or a parsed Topology.
      task: what to train; by default the task `config.task` names (built after "auto"
        dtypes are resolved for the target). Its data is not loaded when it gives
        `example`.
      chips: the chip table for names; `jaxtrain.hardware.CHIPS` by default.

    Returns:
      A JSON-serialisable dict: the topology, where it was compiled, the mesh, per-device
      memory in bytes and whether it fits, FLOPs per step per device, ideal step times,
      and the collectives in the compiled step.

    Raises:
      ConfigError: a bad topology, a mesh that does not cover it, a parameter or batch
        dimension its mesh axes do not divide, or any other bad config field.
    """
    if isinstance(topology, str):
        topology = parse_topology(topology, chips)
    chip = topology.chip
    devices, source, notes = target_devices(topology)
    config = config_for_platform(config, chip.platform)
    config_lib.validate(config)
    task = task or tasks_lib.from_config(config)
    mesh, rules = sharding.mesh_and_rules(config, devices)
    tx, _ = optim.optimizer_and_schedule(config, task.optimizer)
    layout = state_lib.make_state_layout(task.model, tx, mesh, rules, trainable=task.trainable)
    example = task.example or data.example_spec(data.as_dataset(task.data))
    batch = data.abstract_batch(
        example,
        config.global_batch_size,
        data.batch_shardings(example, mesh, rules, task.batch_axes),
    )
    with jax.set_mesh(mesh), sharding.use_rules(rules):
        train_step = steps.make_train_step(task.loss, layout, microbatches=config.microbatches)
        compiled = steps.compile_train_step(train_step, layout, batch)
    stats = hlo.compiled_stats(compiled)

    memory = {
        "parameters": per_device_bytes(layout.abstract_state.params),
        "optimizer_state": per_device_bytes(layout.abstract_state.opt_state),
        "model_state": per_device_bytes(layout.abstract_state.model_state),
        "batch": per_device_bytes(batch),
    }
    for key, stat in (
        ("arguments", "argument_size_in_bytes"),
        ("outputs", "output_size_in_bytes"),
        ("aliased", "alias_size_in_bytes"),
        ("temporaries", "temp_size_in_bytes"),
        ("generated_code", "generated_code_size_in_bytes"),
    ):
        memory[key] = int(stats.get(stat, 0))
    # Donated inputs that outputs reuse are counted once.
    memory["total"] = (
        memory["arguments"]
        + memory["outputs"]
        - memory["aliased"]
        + memory["temporaries"]
        + memory["generated_code"]
    )
    memory["capacity"] = chip.memory_bytes
    memory["fits"] = None if chip.memory_bytes is None else memory["total"] <= chip.memory_bytes

    flops, flops_source = steps.flops_per_device_step(
        task.flops_per_example, layout, config.global_batch_size, stats
    )
    peak = chip.peak_bf16_flops
    if source == "cpu-simulated" and chip.platform != "cpu":
        notes.append(
            f"compiled by XLA:CPU on {topology.num_devices} simulated devices: temporaries "
            f"and FLOPs approximate the {chip.platform.upper()} compiler's"
        )
    if chip.platform == "gpu" and memory["total"] > 0.75 * chip.memory_bytes:
        notes.append(
            "over 75% of GPU memory: JAX preallocates 75% by default; raise "
            "XLA_PYTHON_CLIENT_MEM_FRACTION to use more"
        )
    hlo_text = compiled.as_text()
    if flops_source == "XLA" and re.search(r"\swhile\(", hlo_text):
        notes.append(
            "the step has loops (a scan over layers, ...): XLA's FLOP count includes each "
            "loop body once, so it is low"
        )
    return {
        "topology": topology.name,
        "chip": topology.chip_name,
        "platform": chip.platform,
        "num_devices": topology.num_devices,
        "num_hosts": topology.num_hosts,
        "source": source,
        "model": task.name,
        "num_parameters": layout.num_parameters,
        "mesh": dict(mesh.shape),
        "compute_dtype": config.precision.compute_dtype,
        "global_batch_size": config.global_batch_size,
        "memory": memory,
        "flops_per_device": flops,
        "flops_source": flops_source,  # "model" (MFU's numerator) or "XLA"
        "peak_flops": peak,
        "step_time_s": (
            {"mfu_100": flops / peak, "mfu_40": flops / (0.4 * peak)} if flops and peak else None
        ),
        "collectives": hlo.count_collectives(hlo_text),
        "notes": notes,
    }


def per_device_bytes(abstract_tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStruct carrying shardings."""
    return sum(
        math.prod(leaf.sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
        for leaf in jax.tree.leaves(abstract_tree)
    )


def to_json(plan: dict) -> str:
    """The plan as indented JSON."""
    return json.dumps(plan, indent=2)


def format_plan(plan: dict) -> str:
    """The plan as a few human-readable lines."""
    memory = plan["memory"]
    hosts = f" on {plan['num_hosts']} hosts" if (plan["num_hosts"] or 1) > 1 else ""
    lines = [
        f"plan for {plan['topology']}: {plan['num_devices']} {plan['chip']} "
        f"{_DEVICE_NOUNS[plan['platform']]}{hosts} | "
        f"compiled for {_SOURCES[plan['source']]}",
        f"model {plan['model']}: {plan['num_parameters']:,} parameters | mesh {plan['mesh']} | "
        f"global batch {plan['global_batch_size']} | compute {plan['compute_dtype']}",
        f"memory per device: parameters {_gib(memory['parameters'])}, optimizer state "
        f"{_gib(memory['optimizer_state'])}, batch {_gib(memory['batch'])}",
        f"  XLA: arguments {_gib(memory['arguments'])}, outputs {_gib(memory['outputs'])} "
        f"(aliased {_gib(memory['aliased'])}), temporaries (activations, workspace) "
        f"{_gib(memory['temporaries'])}, "
        f"generated code {_gib(memory['generated_code'])}",
    ]
    total = _gib(memory["total"])
    if memory["fits"] is None:
        lines.append(f"  total {total} (no memory limit checked for {plan['chip']})")
    elif memory["fits"]:
        share = memory["total"] / memory["capacity"]
        lines.append(f"  total {total} of {_gib(memory['capacity'])}: fits ({share:.1%} used)")
    else:
        lines.append(
            f"  total {total}: does not fit (needs {total}, has {_gib(memory['capacity'])})"
        )
    if plan["flops_per_device"] is not None:
        line = (
            f"train step: {metrics.human(plan['flops_per_device'])}FLOP per device "
            f"({plan['flops_source']} FLOPs)"
        )
        if plan["step_time_s"]:
            times = plan["step_time_s"]
            line += (
                f"; at {metrics.human(plan['peak_flops'])}FLOP/s bf16 peak: "
                f"{_seconds(times['mfu_100'])} at 100% MFU, {_seconds(times['mfu_40'])} at 40%"
            )
        lines.append(line)
    collectives = ", ".join(
        f"{op} x{c['count']} ({_gib(c['bytes'])})" for op, c in plan["collectives"].items()
    )
    lines.append(f"collectives per step (result bytes per device): {collectives or 'none'}")
    lines += [f"note: {note}" for note in plan["notes"]]
    return "\n".join(lines)


_DEVICE_NOUNS = {"tpu": "chips", "gpu": "GPUs", "cpu": "devices"}
_SOURCES = {
    "attached": "the attached devices",
    "tpu-aot": "libtpu's compile-only devices",
    "cpu-simulated": "simulated CPU devices",
}


def _seconds(t: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3)):
        if t >= scale:
            return f"{t / scale:.3g} {unit}"
    return f"{t / 1e-6:.3g} µs"


def _gib(n: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n}B"
