"""The accelerators jaxtrain knows: memory, dense bf16 peak and power per device, one lookup.

MFU (model FLOPs utilisation) divides by a chip's peak; `jaxtrain plan` checks fit against
its memory; the energy estimate (`jaxtrain.energy`) multiplies its power by time where
nothing measures it. All read this one table, through one lookup (`chip_for_device_kind`).
A device that matches no entry (CPUs included) has no peak and no power: MFU is then left
out, not guessed.
"""

import dataclasses

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator (one JAX device)."""

    platform: str  # "tpu", "gpu" or "cpu"
    memory_bytes: int | None  # per device; None: no limit worth checking (CPU)
    peak_bf16_flops: float | None  # dense, no sparsity, per device; None: unknown
    # Leading words of jax's `device.device_kind` that name this chip ("NVIDIA A100"
    # names "NVIDIA A100-SXM4-80GB"; "NVIDIA L4" does not name "NVIDIA L40S").
    device_kinds: tuple[str, ...] = ()
    cores_per_device: int = 1  # TensorCores a TPU topology name counts per device
    tpu_name: str = ""  # libtpu's name for the generation ("v5e" in "v5e:4x4")
    # Power per device for energy estimates: the vendor's TDP (board power) for GPUs.
    # Google publishes no TDP for TPUs: theirs are rough public figures, good to about
    # +-30%. Override with config.energy.device_watts.
    tdp_watts: float | None = None


# From the vendors' spec sheets: TPU HBM in GiB, GPU memory in (decimal) GB.
CHIPS = {
    "v4": Chip(
        "tpu", 32 * GiB, 275e12, ("TPU v4",), cores_per_device=2, tpu_name="v4", tdp_watts=200
    ),
    "v5e": Chip("tpu", 16 * GiB, 197e12, ("TPU v5 lite", "TPU v5e"), tpu_name="v5e", tdp_watts=200),
    # Some runtimes report v5p as plain "TPU v5"; the longest prefix wins over v5e's.
    "v5p": Chip(
        "tpu",
        95 * GiB,
        459e12,
        ("TPU v5p", "TPU v5"),
        cores_per_device=2,
        tpu_name="v5",
        tdp_watts=400,
    ),
    "v6e": Chip("tpu", 32 * GiB, 918e12, ("TPU v6 lite", "TPU v6e"), tpu_name="v6e", tdp_watts=300),
    # SXM boards' TDPs.
    "h100": Chip("gpu", 80 * 10**9, 989e12, ("NVIDIA H100",), tdp_watts=700),
    "h200": Chip("gpu", 141 * 10**9, 989e12, ("NVIDIA H200",), tdp_watts=700),
    "a100": Chip("gpu", 80 * 10**9, 312e12, ("NVIDIA A100",), tdp_watts=400),
    # The 40 GB models are named so; every other A100 reads as a100 (80 GB).
    "a100_40gb": Chip(
        "gpu",
        40 * 10**9,
        312e12,
        ("NVIDIA A100-SXM4-40GB", "NVIDIA A100-PCIE-40GB"),
        tdp_watts=400,
    ),
    "cpu": Chip("cpu", None, None),
}


def _names(prefix: str, device_kind: str) -> bool:
    """Whether `prefix` is `device_kind`'s leading words (ends where a word ends)."""
    rest = device_kind[len(prefix) :]
    return device_kind.startswith(prefix) and not rest[:1].isalnum()


def chip_for_device_kind(device_kind: str, chips: dict[str, Chip] | None = None) -> Chip | None:
    """The chip whose longest `device_kinds` entry names jax's device_kind, or None.

    An entry names a kind when it is the kind's leading words: "TPU v5" names "TPU v5 lite"
    (and v5e's longer "TPU v5 lite" wins), "NVIDIA A100" names "NVIDIA A100 80GB PCIe",
    and neither "NVIDIA L4" names "NVIDIA L40S" nor "Tesla V100" "Tesla V100S-PCIE-32GB".
    On a tie the first entry wins.
    """
    best, best_length = None, -1
    for chip in (CHIPS if chips is None else chips).values():
        for prefix in chip.device_kinds:
            if _names(prefix, device_kind) and len(prefix) > best_length:
                best, best_length = chip, len(prefix)
    return best


def peak_flops(device) -> float | None:
    """Dense bf16 peak FLOP/s of one jax device, or None when its kind is unknown."""
    chip = chip_for_device_kind(device.device_kind)
    return chip.peak_bf16_flops if chip else None


def tdp_watts(device) -> float | None:
    """Power per device from the table (see `Chip.tdp_watts`), or None when unknown."""
    chip = chip_for_device_kind(device.device_kind)
    return chip.tdp_watts if chip else None
