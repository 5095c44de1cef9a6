"""`jaxtrain plan`: the train step compiled ahead of time for a topology that is not attached.

    jaxtrain plan --config=configs/gpt_1b.py --topology=v5p-8 [--json]

A plan is the run's per-device memory (parameters, optimizer state, XLA's arguments,
outputs and temporaries), whether that fits the chip, FLOPs per step, the collectives the
step runs and, compiled by the TPU compiler, its own estimate of the step's time and the
MFU that implies: all known before anyone books the hardware. A parameter that its mesh
axes do not divide (KV heads over `tensor`, ...) is reported by name, shape and axis.

Topology names and where the step is compiled (libtpu's compile-only TPU devices when
libtpu is installed, else simulated CPU devices): see `jaxtrain.topology`. Compute dtype
"auto" is resolved for the target's platform, not for the host's.

FLOPs per device per step come two ways, both printed: the task's model FLOPs (for the
bundled LM, PaLM's 6N per token plus attention: the MFU numerator, remat recompute not
counted) and XLA's count of the compiled program with every loop trip counted
(`jaxtrain.hlo`; remat recompute included). MFU uses the model FLOPs when the task gives
them, XLA's count otherwise.
"""

import copy
import json
import math

import jax
import jax.numpy as jnp

from jaxtrain import config as config_lib
from jaxtrain import data, hlo, metrics, optim, precision, sharding, steps
from jaxtrain import state as state_lib
from jaxtrain import tasks as tasks_lib
from jaxtrain.hardware import Chip, GiB
from jaxtrain.pallas_flops import pallas_flops
from jaxtrain.topology import Topology, parse_topology, physical_order, target_devices

__all__ = ["Topology", "config_for_platform", "format_plan", "make_plan", "parse_topology"]


def config_for_platform(config, platform: str, device_kind: str = ""):
    """A copy of `config` with "auto" dtypes resolved as they would be on `platform`
    (for a GPU, on one of `device_kind`: float16 on a T4 or V100)."""
    config = copy.deepcopy(config)
    for field in ("compute_dtype", "param_dtype"):
        dtype = precision.resolve_dtype(config.precision[field], platform, device_kind=device_kind)
        config.precision[field] = jnp.dtype(dtype).name
    return config


def make_plan(
    config, topology: str | Topology, *, task=None, chips: dict[str, Chip] | None = None
) -> dict:
    """Compiles the train step for `topology` and says what it needs per device.

    Args:
      config: a run config (see configs/); its mesh is resolved against the topology.
      topology: a topology name (see `jaxtrain.topology`) or a parsed Topology.
      task: what to train; by default the task `config.task` names (built after "auto"
        dtypes are resolved for the target). Its data is not loaded when it gives
        `example`.
      chips: the chip table for names; `jaxtrain.hardware.CHIPS` by default.

    Returns:
      A JSON-serialisable dict: the topology, where it was compiled, the mesh, per-device
      memory in bytes and whether it fits, FLOPs per step per device (model and XLA),
      ideal step times, the TPU compiler's step-time estimate and MFU (when the TPU
      compiler compiled it), and the collectives in the compiled step.

    Raises:
      ConfigError: a bad topology, a mesh that does not cover it, a parameter or batch
        dimension its mesh axes do not divide, or any other bad config field.
    """
    if isinstance(topology, str):
        topology = parse_topology(topology, chips)
    chip = topology.chip
    devices, source, notes = target_devices(topology, chips)
    kind = chip.device_kinds[0] if chip.device_kinds else ""
    config = config_for_platform(config, chip.platform, kind)
    config_lib.validate(config)
    task = task or tasks_lib.from_config(config)
    if source == "tpu-aot":
        devices = physical_order(devices, config.mesh)
    mesh, rules = sharding.mesh_and_rules(config, devices)
    tx, _ = optim.optimizer_and_schedule(
        config, task.optimizer, model=task.model, trainable=task.trainable
    )
    layout = state_lib.make_state_layout(task.model, tx, mesh, rules, trainable=task.trainable)
    example = task.example or data.example_spec(data.as_dataset(task.data))
    batch = data.abstract_batch(
        example,
        config.global_batch_size,
        data.batch_shardings(example, mesh, rules, task.batch_axes),
    )
    refused = None
    with jax.set_mesh(mesh), sharding.use_rules(rules):
        train_step = steps.make_train_step(task.loss, layout, microbatches=config.microbatches)
        traced = steps.trace_train_step(train_step, layout, batch)
        try:
            compiled = traced.lower().compile()
        except jax.errors.JaxRuntimeError as e:
            # The TPU compiler refuses a program whose temporaries exceed the chip's HBM:
            # that is this plan's answer, not a failure.
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            compiled, refused = None, " ".join(str(e).split())
    counts = hlo.step_counts(compiled.as_text()) if compiled else None
    kernel_flops, kernels = 0.0, {}
    if counts and "tpu_custom_call" in counts.uncounted_kernels:
        # Pallas kernels: the compiler prices them by bytes only (jaxtrain/pallas_flops.py)
        kernel_flops, kernels = pallas_flops(traced.jaxpr)
    stats = hlo.compiled_stats(compiled, counts) if compiled else {}

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
    memory["refused"] = refused  # the compiler's out-of-memory message, when it gave one
    if refused:
        memory.update(fits=False, total=None)

    flops, flops_source = steps.flops_per_device_step(
        task.flops_per_example, layout, config.global_batch_size, stats
    )
    model_flops = flops if flops_source == "model" else None
    peak = chip.peak_flops_16bit
    estimate = None
    if chip.platform == "tpu" and source != "cpu-simulated" and "optimal_seconds" in stats:
        seconds = stats["optimal_seconds_per_step"]
        kernel_seconds = kernel_flops / peak if kernel_flops and peak else 0.0
        estimate = {
            "step_time_s": seconds + kernel_seconds,
            "step_time_s_loops_once": stats["optimal_seconds"],  # as the compiler reports
            "step_time_s_compiler": seconds,  # loops added, Pallas kernels' math left out
            "pallas_kernel_flops": kernel_flops,
            "pallas_kernel_s": kernel_seconds,
            "mfu": flops / ((seconds + kernel_seconds) * peak) if flops and peak else None,
        }
        if kernel_seconds:
            names = ", ".join(f"{k} x{n}" for k, n in sorted(kernels.items()))
            notes.append(
                f"the TPU cost model prices Pallas kernels ({names}) by their memory "
                f"traffic only: their matmuls, {_flop(kernel_flops)} per step counted over "
                "every block of their grids (more than a causal mask computes), are added "
                f"at peak: {_seconds(kernel_seconds)} of the {_seconds(seconds + kernel_seconds)}"
            )
    if "optimal_seconds_invalid" in stats:
        notes.append(
            "the TPU compiler gave no usable step-time estimate (optimal_seconds = "
            f"{stats['optimal_seconds_invalid']:.3g})"
        )
    if source == "cpu-simulated" and chip.platform != "cpu":
        notes.append(
            f"compiled by XLA:CPU on {topology.num_devices} simulated devices: temporaries "
            f"and FLOPs approximate the {chip.platform.upper()} compiler's, and there is "
            "no compiler step-time estimate"
        )
    if chip.platform == "gpu" and memory["total"] > 0.75 * chip.memory_bytes:
        notes.append(
            "over 75% of GPU memory: JAX preallocates 75% by default; raise "
            "XLA_PYTHON_CLIENT_MEM_FRACTION to use more"
        )
    if counts and counts.unknown_trip_counts:
        notes.append(
            f"{counts.unknown_trip_counts} of {counts.loops} loops have a trip count this "
            "reading of the HLO cannot find: their bodies count once in XLA FLOPs, the "
            "collectives and the step-time estimate, which are low"
        )
    if counts and counts.uncounted_kernels:
        kernels = ", ".join(f"{k} x{n}" for k, n in sorted(counts.uncounted_kernels.items()))
        notes.append(f"XLA FLOPs leave out the math of library or custom kernels: {kernels}")
    return {
        "topology": topology.name,
        "chip": topology.chip_name,
        "platform": chip.platform,
        "num_devices": topology.num_devices,
        "devices_per_chip": chip.devices_per_chip,  # 2 on TPU7x: a device per TensorCore
        "num_hosts": topology.num_hosts,
        "source": source,
        "model": task.name,
        "num_parameters": layout.num_parameters,
        "mesh": dict(mesh.shape),
        "compute_dtype": config.precision.compute_dtype,
        "global_batch_size": config.global_batch_size,
        "memory": memory,
        "flops_per_device": flops,  # MFU's numerator
        "flops_source": flops_source,  # "model" or "XLA"
        "model_flops_per_device": model_flops,
        "xla_flops_per_device": stats.get("flops_per_step"),  # every loop trip counted
        "xla_flops_per_device_loops_once": stats.get("flops"),  # as cost_analysis() reports
        "loops": counts.loops if counts else None,
        "peak_flops": peak,  # dense, of the 16-bit type "auto" computes in on the chip
        "peak_dtype": jnp.dtype(precision.auto_compute_dtype(chip.platform, kind)).name,
        "step_time_s": (
            {"mfu_100": flops / peak, "mfu_40": flops / (0.4 * peak)} if flops and peak else None
        ),
        "compiler_estimate": estimate,
        "collectives": counts.collectives if counts else None,
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
    noun = _DEVICE_NOUNS[plan["platform"]]
    if plan["devices_per_chip"] > 1:
        noun = f"devices ({plan['num_devices'] // plan['devices_per_chip']} chips)"
    lines = [
        f"plan for {plan['topology']}: {plan['num_devices']} {plan['chip']} {noun}{hosts} | "
        f"compiled for {_SOURCES[plan['source']]}",
        f"model {plan['model']}: {plan['num_parameters']:,} parameters | mesh {plan['mesh']} | "
        f"global batch {plan['global_batch_size']} | compute {plan['compute_dtype']}",
        f"memory per device: parameters {_gib(memory['parameters'])}, optimizer state "
        f"{_gib(memory['optimizer_state'])}, batch {_gib(memory['batch'])}",
    ]
    lines += _memory_lines(memory, plan["chip"])
    counted = []
    if plan["model_flops_per_device"] is not None:
        counted.append(f"{_flop(plan['model_flops_per_device'])} model")
    if plan["xla_flops_per_device"] is not None:
        loops = " with every loop trip counted" if plan["loops"] else ""
        counted.append(f"{_flop(plan['xla_flops_per_device'])} XLA (compiled{loops})")
    if counted:
        lines.append(f"train step FLOPs per device: {' | '.join(counted)}")
    if plan["step_time_s"]:
        times = plan["step_time_s"]
        lines.append(
            f"  at {_flop(plan['peak_flops'])}/s {plan['peak_dtype']} peak: "
            f"{_seconds(times['mfu_100'])} at 100% MFU, {_seconds(times['mfu_40'])} at 40% "
            f"({plan['flops_source']} FLOPs)"
        )
    estimate = plan["compiler_estimate"]
    if estimate:
        line = f"compiler's estimate: {_seconds(estimate['step_time_s'])} per step"
        if estimate["mfu"] is not None:
            line += f", {estimate['mfu']:.1%} MFU ({plan['flops_source']} FLOPs)"
        source = "TPU cost model"
        if estimate["pallas_kernel_s"]:
            source += (
                f", {_seconds(estimate['step_time_s_compiler'])}, plus "
                f"{_seconds(estimate['pallas_kernel_s'])} of Pallas kernels' matmuls at peak"
            )
        if plan["loops"]:
            source += (
                f"; it priced each loop body once, "
                f"{_seconds(estimate['step_time_s_loops_once'])}: the other trips are added "
                "at the program's average seconds per FLOP, an approximation"
            )
        lines.append(f"{line} ({source})")
    if plan["collectives"] is not None:
        collectives = ", ".join(
            f"{op} x{c['count']} ({_gib(c['bytes'])})" for op, c in plan["collectives"].items()
        )
        lines.append(f"collectives per step (result bytes per device): {collectives or 'none'}")
    lines += [f"note: {note}" for note in plan["notes"]]
    return "\n".join(lines)


def _memory_lines(memory: dict, chip: str) -> list[str]:
    """XLA's memory figures and the verdict on fit."""
    if memory["refused"]:
        return [f"  does not fit: the compiler refused it: {memory['refused']}"]
    lines = [
        f"  XLA: arguments {_gib(memory['arguments'])}, outputs {_gib(memory['outputs'])} "
        f"(aliased {_gib(memory['aliased'])}), temporaries (activations, workspace) "
        f"{_gib(memory['temporaries'])}, generated code {_gib(memory['generated_code'])}"
    ]
    total, capacity = _gib(memory["total"]), memory["capacity"]
    if memory["fits"] is None:
        lines.append(f"  total {total} (no memory limit checked for {chip})")
    elif memory["fits"]:
        share = memory["total"] / capacity
        lines.append(f"  total {total} of {_gib(capacity)}: fits ({share:.1%} used)")
    else:
        lines.append(f"  total {total}: does not fit (needs {total}, has {_gib(capacity)})")
    return lines


_DEVICE_NOUNS = {"tpu": "chips", "gpu": "GPUs", "cpu": "devices"}
_SOURCES = {
    "attached": "the attached devices",
    "tpu-aot": "libtpu's compile-only TPU devices",
    "cpu-simulated": "simulated CPU devices",
}


def _flop(n: float) -> str:
    return f"{metrics.human(n)}FLOP"


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
