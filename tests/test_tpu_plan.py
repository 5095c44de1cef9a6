"""`jaxtrain plan` compiled by the TPU compiler itself, on libtpu's compile-only devices.

libtpu (`jax[tpu]`, in the test extras on x86-64 Linux) compiles for a TPU slice on this
CPU host; where it is not installed these tests are skipped.
"""

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import CONFIGS, REPO, load_config

from jaxtrain import plan, topology

pytest.importorskip("libtpu")

GPT = os.path.join(CONFIGS, "gpt_pysource.py")
MESH = dict(data=1, fsdp=2, sequence=1, tensor=2)
MESH_8 = dict(data=2, fsdp=2, sequence=1, tensor=2)


def _gpt(scan_layers: bool):
    # The smoke GPT, 4 layers deep: each layer a loop trip when scanned.
    return load_config(
        "gpt_pysource", "smoke", mesh=MESH, model__num_layers=4, model__scan_layers=scan_layers
    )


@pytest.fixture(scope="module")
def scanned():
    return plan.make_plan(_gpt(scan_layers=True), "v5p-8")


@pytest.fixture(scope="module")
def unrolled():
    return plan.make_plan(_gpt(scan_layers=False), "v5p-8")


def test_compiled_by_the_tpu_compiler_with_the_targets_layout(scanned):
    assert scanned["source"] == "tpu-aot" and scanned["num_devices"] == 4
    assert scanned["compute_dtype"] == "bfloat16"
    # The same shardings on 4 CPU devices (whose bytes tests/test_plan.py checks against
    # real arrays) hold the same bytes per device.
    on_cpu = plan.make_plan(_gpt(scan_layers=True), "cpu-4")
    for key in ("parameters", "optimizer_state", "batch"):
        assert scanned["memory"][key] == on_cpu["memory"][key] > 0
    memory = scanned["memory"]
    # XLA's arguments are those arrays laid out in TPU tiles: never fewer bytes.
    assert memory["arguments"] >= memory["parameters"] + memory["optimizer_state"]
    assert memory["capacity"] == 95 * 2**30 and memory["fits"] is True
    assert scanned["collectives"]["all-gather"]["count"] > 0  # FSDP gathers weights


def test_trip_counts_make_a_scanned_model_count_as_its_unrolled_twin(scanned, unrolled):
    assert scanned["loops"] >= 2 and unrolled["loops"] == 0  # forward and backward scans
    assert scanned["model_flops_per_device"] == unrolled["model_flops_per_device"]
    # XLA's own count has each layer loop's body once: about a quarter of 4 layers' work.
    assert scanned["xla_flops_per_device_loops_once"] < 0.5 * unrolled["xla_flops_per_device"]
    # With every trip counted the two programs agree (they differ a little: the unrolled
    # one skips the first layer's input gradient, the scanned one indexes stacked arrays).
    assert scanned["xla_flops_per_device"] == pytest.approx(
        unrolled["xla_flops_per_device"], rel=0.03
    )
    assert (
        unrolled["xla_flops_per_device"]
        == unrolled["xla_flops_per_device_loops_once"]
        > unrolled["model_flops_per_device"]  # norms, softmax, the optimizer, ...
    )
    # Per-layer collectives inside the loops count once per layer too.
    gathers = scanned["collectives"]["all-gather"]["count"]
    assert gathers >= 4 * scanned["loops"]


def test_compiler_estimate_adds_the_loop_trips_and_gives_mfu(scanned, unrolled):
    estimate = scanned["compiler_estimate"]
    assert estimate["step_time_s"] > 2 * estimate["step_time_s_loops_once"] > 0
    ratio = scanned["xla_flops_per_device"] / scanned["xla_flops_per_device_loops_once"]
    assert estimate["step_time_s"] == pytest.approx(estimate["step_time_s_loops_once"] * ratio)
    assert estimate["pallas_kernel_flops"] == 0  # 32 tokens: "auto" attention is XLA's
    twin = unrolled["compiler_estimate"]
    assert twin["step_time_s"] == twin["step_time_s_loops_once"] > 0  # nothing to add
    assert estimate["mfu"] == pytest.approx(
        scanned["model_flops_per_device"] / (estimate["step_time_s"] * 459e12)
    )
    text = plan.format_plan(scanned)
    assert "compiled for libtpu's compile-only TPU devices" in text.splitlines()[0]
    assert f"{estimate['mfu']:.1%} MFU (model FLOPs)" in text
    assert "train step FLOPs per device: " in text and " model | " in text


@pytest.mark.parametrize(
    "name, kind, shape",
    [
        ("v5p-8", "TPU v5", (2, 2, 1)),
        ("v5p-16", "TPU v5", (2, 2, 2)),
        ("v5p-64", "TPU v5", (2, 4, 4)),
        ("v5p-128", "TPU v5", (4, 4, 4)),
        ("v4-8", "TPU v4", (2, 2, 1)),
        ("v5e-2", "TPU v5 lite", (1, 2, 1)),  # smaller than a host: one host of its shape
        ("v5e-16", "TPU v5 lite", (4, 4, 1)),
        ("v6e-8", "TPU v6 lite", (2, 4, 1)),
        ("v6e-256", "TPU v6 lite", (16, 16, 1)),
        ("tpu7x-8", "TPU7x", (2, 2, 1)),  # 8 TensorCores: 4 chips of two devices each
        ("tpu7x-128", "TPU7x", (4, 4, 4)),
    ],
)
def test_slices_have_their_physical_shape(name, kind, shape):
    parsed = topology.parse_topology(name)
    devices = topology.tpu_topology_devices(parsed)
    assert len(devices) == parsed.num_devices == math.prod(shape) * parsed.chip.devices_per_chip
    assert {d.device_kind for d in devices} == {kind}
    extent = tuple(max(d.coords[i] for d in devices) + 1 for i in range(3))
    assert extent == shape


def test_tpu7x_plan_is_per_device_half_a_chip():
    config = load_config("gpt_pysource", "smoke", mesh=MESH_8, model__num_layers=2)
    result = plan.make_plan(config, "tpu7x-8")
    assert result["source"] == "tpu-aot" and result["num_devices"] == 8
    assert result["memory"]["capacity"] == 96 * 2**30 and result["memory"]["fits"] is True
    assert result["peak_flops"] == 2307e12 / 2 and result["peak_dtype"] == "bfloat16"
    assert plan.format_plan(result).startswith("plan for tpu7x-8: 8 tpu7x devices (4 chips) |")


def test_tensor_axis_spans_neighbouring_chips():
    devices = topology.tpu_topology_devices(topology.parse_topology("v5p-64"))
    ordered = topology.physical_order(devices, dict(data=4, fsdp=4, tensor=2))
    for a, b in zip(ordered[::2], ordered[1::2], strict=True):  # each tensor pair
        assert sum(abs(x - y) for x, y in zip(a.coords, b.coords, strict=True)) == 1


def test_a_step_the_tpu_compiler_refuses_for_memory_is_reported_as_not_fitting():
    # 512 sequences of 4,096 tokens on one 16 GiB v5e chip: XLA's attention scores alone
    # would need over 100 GiB (splash attention, "auto"'s choice on TPU, never holds them).
    config = load_config(
        "gpt_pysource",
        "smoke",
        global_batch_size=512,
        data__seq_len=4096,
        model__attention_impl="xla",
    )
    result = plan.make_plan(config, "v5e-1")
    memory = result["memory"]
    assert memory["fits"] is False and "RESOURCE_EXHAUSTED" in memory["refused"]
    assert memory["parameters"] > 0 and result["model_flops_per_device"] > 0
    assert result["collectives"] is None and result["compiler_estimate"] is None
    text = plan.format_plan(result)
    assert "  does not fit: the compiler refused it: " in text and "collectives" not in text


def test_cli_lays_out_a_mesh_that_splits_a_physical_axis():
    # v5p-64 is 2x4x4 chips; a mesh of data 2 x fsdp 8 x tensor 2 splits a 4-chip axis,
    # which jax.make_mesh refuses. `jaxtrain plan` starts as many CPU devices as chips (for
    # a fallback), so the compile-only devices must not be taken for this process's own.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, "-m", "jaxtrain", "plan", f"--config={GPT}:smoke", "--topology=v5p-64"]
        + ["--config.mesh.data=2", "--config.mesh.fsdp=-1", "--config.mesh.tensor=2"]
        + ["--config.global_batch_size=64"]
        + ["--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["source"] == "tpu-aot"
    assert result["mesh"] == {"data": 2, "fsdp": 8, "sequence": 1, "tensor": 2}


def test_splash_attention_kernels_are_priced_by_their_matmuls():
    # Pallas kernels are one opaque custom call to the TPU compiler, priced by their bytes:
    # the plan adds their matmuls at peak, counted over every block (jaxtrain/pallas_flops).
    config = load_config(
        "gpt_pysource",
        "smoke",
        mesh=MESH,
        data__seq_len=256,
        model__head_dim=64,
        model__attention_impl="auto",  # splash on TPU at a multiple of 128 tokens
        model__remat="full",
    )
    result = plan.make_plan(config, "v5p-8")
    estimate = result["compiler_estimate"]
    model = config.model
    # Per device: the batch split over FSDP, the heads over tensor (MESH).
    batch, heads = config.global_batch_size // 2, model.num_heads // 2
    full_grid_matmul = 2 * batch * heads * 256 * 256 * model.head_dim
    # Per layer: forward (2 matmuls), its recomputation under full remat (2), the
    # backward's dK/dV kernel (4) and dQ kernel (3).
    want = model.num_layers * (2 + 2 + 4 + 3) * full_grid_matmul
    assert estimate["pallas_kernel_flops"] == want
    assert estimate["pallas_kernel_s"] == pytest.approx(want / 459e12)
    assert estimate["step_time_s"] == pytest.approx(
        estimate["step_time_s_compiler"] + estimate["pallas_kernel_s"]
    )
    assert estimate["mfu"] == pytest.approx(
        result["model_flops_per_device"] / (estimate["step_time_s"] * 459e12)
    )
    assert any("splash_mha_fwd" in note and "at peak" in note for note in result["notes"])
