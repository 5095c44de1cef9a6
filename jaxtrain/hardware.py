"""The accelerators jaxtrain knows: memory, dense 16-bit peak and power per device, one lookup.

MFU (model FLOPs utilisation) divides by a chip's peak: the dense peak of the 16-bit type
that `compute_dtype="auto"` computes in on it (bfloat16; float16 on T4 and V100, which
have no bfloat16 units). `jaxtrain plan` checks fit against its memory; the energy
estimate (`jaxtrain.energy`) multiplies its power by time where nothing measures it. All
read this one table, through one lookup (`chip_for_device_kind`). A device that matches
no entry (CPUs included) has no peak and no power: MFU is then left out, not guessed.
"""

import dataclasses

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator, per JAX device: a GPU, a TPU chip, or half a TPU7x chip."""

    platform: str  # "tpu", "gpu" or "cpu"
    memory_bytes: int | None  # per device; None: no limit worth checking (CPU)
    # Dense (no sparsity) peak FLOP/s per device of the 16-bit type compute_dtype="auto"
    # computes in here (`jaxtrain.precision.auto_compute_dtype`): bfloat16, or float16 on
    # GPUs without bfloat16 units (T4, V100). None: unknown, and MFU is left out.
    peak_flops_16bit: float | None
    # Leading words of jax's `device.device_kind` that name this chip ("NVIDIA A100"
    # names "NVIDIA A100-SXM4-80GB"; "NVIDIA L4" does not name "NVIDIA L40S").
    device_kinds: tuple[str, ...] = ()
    cores_per_device: int = 1  # TensorCores per JAX device: 2 where megacore joins them
    devices_per_chip: int = 1  # JAX devices per TPU chip: 2 on TPU7x, one per chiplet
    tpu_name: str = ""  # libtpu's name for the generation ("v5e" in "v5e:4x4")
    slice_dims: int = 2  # a TPU slice's chip grid: 2D (v5e, v6e) or 3D (v4, v5p, TPU7x)
    # Power per device for energy estimates: the vendor's TDP (board power) for GPUs.
    # Google publishes no TDP for TPUs: theirs are rough public figures, good to about
    # +-30%. Override with config.energy.device_watts.
    tdp_watts: float | None = None


# Memory: TPU HBM in GiB, GPU memory in (decimal) GB, as the vendors print them. Peaks are
# dense: NVIDIA's tables print sparse ("with sparsity") figures, twice these. Sources:
#   v4       cloud.google.com/tpu/docs/v4: 275 TFLOPs bf16, 32 GiB per chip (megacore)
#   v5e      cloud.google.com/tpu/docs/v5e: 197 TFLOPs bf16, 16 GB
#   v5p, v6e, tpu7x  docs.cloud.google.com/tpu/docs/tpu7x (table of all three): per chip
#            459 / 918 / 2307 TFLOPs bf16, 95 / 32 / 192 GiB. A TPU7x chip is two JAX
#            devices (device_kind "TPU7x"; libtpu's compile-only devices show 2 per chip
#            and refuse a program over 94.75 GiB on one): half of each per device.
#   h100     NVIDIA H100 SXM: 1,979 TFLOPS bf16 sparse, 80 GB, 700 W (NVIDIA's table as
#            archive-lib.hpctech.co.jp/gpuproduct/nvidia-h100.html reprints it)
#   h100_pcie  same table: 1,513 sparse, 80 GB, 300-350 W (350: the H100 PCIe product
#            brief PB-11133-001, manuals.plus mirror)
#   h200     H100's compute (glennklockwood.com/garden/processors/h100), 141 GB, 700 W
#   a100     NVIDIA A100: 624 TFLOPS bf16 sparse, SXM 400 W (yobitel.com/knowledge-base/
#            nvidia-a100); 80 GB and 40 GB models
#   b200     docs.nvidia.com/nim/bionemo/boltz2/1.8.0/support-matrix.html: 180 GB; HGX
#            B200 at 1,000 W: 2,250 TFLOPS bf16 dense (glennklockwood.com/garden/
#            processors/B200, from NVIDIA's Blackwell brief); 1,000 W TGP (MLCommons
#            inference v6.0 results, Nebius B200 system)
#   gb200    same support matrix: 186 GB; the GB200 variant at 1,200 W: 2,500 TFLOPS
#            bf16 dense (glennklockwood.com/garden/processors/B200)
#   l4       NVIDIA L4: 242 TFLOPS fp16/bf16 sparse, 24 GB, 72 W (NVIDIA's figures as
#            grokipedia.com/page/NVIDIA_L4_vs_L40S cites them)
#   a10g     AWS's A10 variant, 24 GB (docs.aws.amazon.com/batch/latest/userguide/
#            gpu-jobs.html). Neither NVIDIA nor AWS publishes its tensor peak (below the
#            A10's 125 TFLOPS) or its power: both left unknown, not guessed.
#   t4       NVIDIA T4: 65 TFLOPS fp16 (mixed precision), 16 GB, 70 W
#            (huggingface.co/hardware/t4; sysrqmts.com/en/gpus/nvidia/tesla/t4)
#   v100     V100 SXM2: 125 Tensor TFLOPS fp16 (developer.nvidia.com/
#            programming-tensor-cores-cuda-9-0), 16 GB, 300 W; the PCIe card's 112 TFLOPS
#            and 250 W (io-tech.fi) read as SXM2's
CHIPS = {
    "v4": Chip(
        "tpu",
        32 * GiB,
        275e12,
        ("TPU v4",),
        cores_per_device=2,
        tpu_name="v4",
        slice_dims=3,
        tdp_watts=200,
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
        slice_dims=3,
        tdp_watts=400,
    ),
    "v6e": Chip("tpu", 32 * GiB, 918e12, ("TPU v6 lite", "TPU v6e"), tpu_name="v6e", tdp_watts=300),
    # Ironwood. Google publishes no power figure for it.
    "tpu7x": Chip(
        "tpu",
        96 * GiB,
        2307e12 / 2,
        ("TPU7x",),
        devices_per_chip=2,
        tpu_name="tpu7x",
        slice_dims=3,
    ),
    # SXM boards, except h100_pcie.
    "b200": Chip("gpu", 180 * 10**9, 2250e12, ("NVIDIA B200",), tdp_watts=1000),
    "gb200": Chip("gpu", 186 * 10**9, 2500e12, ("NVIDIA GB200",), tdp_watts=1200),
    "h100": Chip("gpu", 80 * 10**9, 989e12, ("NVIDIA H100",), tdp_watts=700),
    # "NVIDIA H100 NVL" (835 TFLOPS) has no entry of its own: it reads as h100.
    "h100_pcie": Chip("gpu", 80 * 10**9, 756e12, ("NVIDIA H100 PCIe",), tdp_watts=350),
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
    "l4": Chip("gpu", 24 * 10**9, 121e12, ("NVIDIA L4",), tdp_watts=72),
    "a10g": Chip("gpu", 24 * 10**9, None, ("NVIDIA A10G",)),
    # float16 peaks: no bfloat16 on these (see above).
    "t4": Chip("gpu", 16 * 10**9, 65e12, ("Tesla T4",), tdp_watts=70),
    # One entry for every V100 (SXM2 or PCIe, 16 or 32 GB): the 16 GB SXM2's figures.
    "v100": Chip("gpu", 16 * 10**9, 125e12, ("Tesla V100",), tdp_watts=300),
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
    """Dense 16-bit peak FLOP/s of one jax device (`Chip.peak_flops_16bit`), or None."""
    chip = chip_for_device_kind(device.device_kind)
    return chip.peak_flops_16bit if chip else None


def tdp_watts(device) -> float | None:
    """Power per device from the table (see `Chip.tdp_watts`), or None when unknown."""
    chip = chip_for_device_kind(device.device_kind)
    return chip.tdp_watts if chip else None
