"""The chip table: which entry a device kind names."""

import importlib.util
import types

import jax
import pytest

from jaxtrain import hardware, topology
from jaxtrain.hardware import CHIPS


@pytest.mark.parametrize(
    "kind, chip",
    [
        # As jax (CUDA's device name) and libtpu report them.
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H100 PCIe", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA A100 80GB PCIe", "a100"),
        ("NVIDIA A100-SXM4-40GB", "a100_40gb"),
        ("NVIDIA A100-PCIE-40GB", "a100_40gb"),
        ("TPU v4", "v4"),
        ("TPU v5 lite", "v5e"),
        ("TPU v5", "v5p"),
        ("TPU v5p", "v5p"),
        ("TPU v6 lite", "v6e"),
    ],
)
def test_device_kinds_name_their_chip(kind, chip):
    assert hardware.chip_for_device_kind(kind) is CHIPS[chip]


@pytest.mark.parametrize(
    "kind",
    [
        "NVIDIA A10",  # the A10: not an A100
        "NVIDIA A100X",
        "NVIDIA GH200 480GB",  # not an H200
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
