"""The chip table: which entry a device kind names, its peak's dtype, topology names."""

import importlib.util
import types

import jax
import jax.numpy as jnp
import pytest

from jaxtrain import hardware, precision, topology
from jaxtrain.errors import ConfigError
from jaxtrain.hardware import CHIPS


@pytest.mark.parametrize(
    "kind, chip",
    [
        # As jax (CUDA's device name) and libtpu report them.
        ("NVIDIA B200", "b200"),
        ("NVIDIA GB200", "gb200"),
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H100 NVL", "h100"),  # no entry of its own
        ("NVIDIA H100 PCIe", "h100_pcie"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA A100 80GB PCIe", "a100"),
        ("NVIDIA A100-SXM4-40GB", "a100_40gb"),
        ("NVIDIA A100-PCIE-40GB", "a100_40gb"),
        ("NVIDIA A10G", "a10g"),
        ("NVIDIA L4", "l4"),
        ("Tesla T4", "t4"),
        ("Tesla V100-SXM2-16GB", "v100"),
        ("Tesla V100-SXM2-32GB", "v100"),
        ("Tesla V100-PCIE-16GB", "v100"),
        ("TPU v4", "v4"),
        ("TPU v5 lite", "v5e"),
        ("TPU v5", "v5p"),
        ("TPU v5p", "v5p"),
        ("TPU v6 lite", "v6e"),
        ("TPU7x", "tpu7x"),
    ],
)
def test_device_kinds_name_their_chip(kind, chip):
    assert hardware.chip_for_device_kind(kind) is CHIPS[chip]


@pytest.mark.parametrize(
    "kind",
    [
        "NVIDIA A10",  # the A10 itself: neither an A100 nor an A10G
        "NVIDIA L40S",  # "NVIDIA L4" is not its leading word
        "NVIDIA L40",
        "Tesla V100S-PCIE-32GB",  # a V100S (130 TFLOPS), not a V100
        "NVIDIA GH200 480GB",  # neither a GB200 nor an H200
        "NVIDIA GeForce RTX 4090",
        "AMD Instinct MI300X",
        "TPU v6",
        "cpu",
        "",
    ],
)
def test_unknown_kinds_have_no_chip_and_no_peak(kind):
    assert hardware.chip_for_device_kind(kind) is None
    device = types.SimpleNamespace(device_kind=kind)
    assert hardware.peak_flops(device) is None and hardware.tdp_watts(device) is None


def test_longest_prefix_wins_and_a_tie_goes_to_the_first_entry():
    short = hardware.Chip("gpu", 1, 1.0, ("X A",))
    longer = hardware.Chip("gpu", 2, 2.0, ("X A-1",))
    twin = hardware.Chip("gpu", 3, 3.0, ("X A",))
    chips = {"short": short, "longer": longer, "twin": twin}
    assert hardware.chip_for_device_kind("X A-1 rev2", chips) is longer
    assert hardware.chip_for_device_kind("X A-2", chips) is short
    assert hardware.chip_for_device_kind("X AB", chips) is None


def test_t4_and_v100_mfu_divides_by_their_float16_peak():
    # No bfloat16 units: "auto" computes in float16 there, so the peak is float16's.
    t4 = types.SimpleNamespace(platform="gpu", device_kind="Tesla T4", compute_capability="7.5")
    v100 = types.SimpleNamespace(
        platform="gpu", device_kind="Tesla V100-SXM2-16GB", compute_capability="7.0"
    )
    assert precision.resolve_dtype("auto", device=t4) == jnp.float16
    assert precision.resolve_dtype("auto", device=v100) == jnp.float16
    assert hardware.peak_flops(t4) == 65e12
    assert hardware.peak_flops(v100) == 125e12


@pytest.mark.parametrize("name", sorted(CHIPS))
def test_every_peak_is_of_the_dtype_auto_computes_in(name):
    # The table's float16 chips are exactly those the precision rule gives float16.
    chip = CHIPS[name]
    expected = jnp.float16 if name in ("t4", "v100") else jnp.bfloat16
    for kind in chip.device_kinds:
        assert precision.auto_compute_dtype(chip.platform, kind) == expected
    if chip.platform != "cpu":
        assert chip.device_kinds, name
        assert chip.peak_flops_16bit is None or 1e13 < chip.peak_flops_16bit < 1e16


def test_tpu7x_device_is_half_a_chip():
    chip = CHIPS["tpu7x"]
    # Per chip: 2307 TFLOPS bf16 and 192 GiB (Google's table), two devices.
    assert chip.devices_per_chip == 2 and chip.cores_per_device == 1
    assert chip.peak_flops_16bit * 2 == 2307e12
    assert chip.memory_bytes * 2 == 192 * hardware.GiB


@pytest.mark.parametrize(
    "name, chip, devices, hosts",
    [
        ("b200x8", "b200", 8, 1),
        ("gb200x4x18", "gb200", 72, 18),
        ("h100_pciex2", "h100_pcie", 2, 1),
        ("l4x8", "l4", 8, 1),
        ("a10gx4", "a10g", 4, 1),
        ("t4x1", "t4", 1, 1),
        ("v100x8x2", "v100", 16, 2),
        ("tpu7x-8", "tpu7x", 8, None),  # TensorCores, each a device: 4 chips
        ("TPU7X-2", "tpu7x", 2, None),
    ],
)
def test_new_topology_names_parse(name, chip, devices, hosts):
    parsed = topology.parse_topology(name)
    assert (parsed.chip_name, parsed.num_devices, parsed.num_hosts) == (chip, devices, hosts)


def test_tpu7x_counts_tensorcores_two_per_chip():
    with pytest.raises(ConfigError, match="tpu7x-N counts TensorCores, 2 per chip"):
        topology.parse_topology("tpu7x-3")
    with pytest.raises(ConfigError, match="did you mean 'tpu7x'"):
        topology.parse_topology("v7x-8")


@pytest.mark.parametrize(
    "name, dims",
    [
        ("tpu7x-2", [1, 1, 1]),
        ("tpu7x-8", [2, 2, 1]),  # one host's 2x2x1 chips
        ("tpu7x-16", [2, 2, 2]),
        ("tpu7x-64", [2, 4, 4]),
        ("v5p-64", [2, 4, 4]),  # the same slice in v5p's count (megacore)
        ("v6e-8", [2, 4]),
    ],
)
def test_slice_shape_is_in_chips(name, dims):
    assert topology.tpu_slice_shape(topology.parse_topology(name))[0] == dims


def test_attached_devices_are_the_targets_chip_by_the_same_lookup(monkeypatch):
    # "TPU v5" (v5p's) is a leading word of "TPU v5 lite", but the lookup names v5e for
    # those devices: a v5p target must not take them as its own.
    v5e = [types.SimpleNamespace(platform="tpu", device_kind="TPU v5 lite") for _ in range(4)]
    cpu = jax.devices("cpu")
    monkeypatch.setattr(jax, "devices", lambda backend=None: cpu if backend == "cpu" else v5e)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "libtpu" else real_find_spec(name, *args),
    )
    assert topology.target_devices(topology.parse_topology("v5e-4"))[:2] == (v5e, "attached")
    devices, source, _ = topology.target_devices(topology.parse_topology("v5p-8"))
    assert source == "cpu-simulated" and devices[0].platform == "cpu"
