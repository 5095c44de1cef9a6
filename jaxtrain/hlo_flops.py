"""FLOPs of one compiled HLO instruction, counted the way XLA's HloCostAnalysis counts them.

2 per multiply-add of a dot, a convolution or a library gemm; 1 per element of an
elementwise arithmetic op; for a reduce, its reducer's ops once per combined element.
Transcendentals (exp, log, tanh, ...) are XLA's separate `transcendentals` count, not
FLOPs, and are left out here too. `jaxtrain.hlo` adds these up over a whole program with
each loop body counted once per trip; summed over a loop-free program they come within
0.3% of `compiled.cost_analysis()["flops"]` on XLA:CPU and the TPU compiler (tested).

Instructions are `jaxtrain.hlo` parses of text lines: objects with `opcode`, `shape`
(text), `operands` (names) and `attributes` (text); `computation` maps the names of the
instructions it holds to them.
"""

import math
import re

# 1 FLOP per output element (XLA: HandleElementwiseOp, except the transcendentals).
ELEMENTWISE = frozenset(
    """abs add and atan2 ceil clamp compare convert divide floor maximum minimum multiply
    negate not or remainder round-nearest-afz round-nearest-even select sign subtract xor
    """.split()
)

_ARRAY_SHAPE = re.compile(r"\b(?P<dtype>pred|[a-z]+\d+[a-z0-9]*)\[(?P<dims>[\d,<=]*)\]")
# The window fields that decide which positions are valid, in `_valid_positions`' order.
_WINDOW_FIELDS = ("stride", "pad", "lhs_dilate", "rhs_dilate")


def instruction_flops(inst, computation: dict, computations: dict) -> float:
    """FLOPs of one instruction (its called computations, fused or looped, not included).

    Args:
      inst: the instruction.
      computation: the computation holding it, {name: instruction}.
      computations: every computation, {name: computation} (a reduce's reducer).
    """
    if inst.opcode in ELEMENTWISE:
        return float(_elements(inst.shape))
    if inst.opcode == "reduce":
        reducer = re.search(r"to_apply=%?([\w.\-]+)", inst.attributes)
        ops = computations.get(reducer[1], {}).values() if reducer else ()
        per_combine = sum(op.opcode in ELEMENTWISE for op in ops)
        # Variadic reduces take (inputs..., inits...): the first input's elements.
        combined = _elements(operand_shape(inst, 0, computation)) - _elements(
            first_array(inst.shape)
        )
        return float(max(0, combined) * per_combine)
    if inst.opcode == "convolution":
        return _convolution_flops(inst, computation)
    if inst.opcode == "dot":
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst.attributes)
    elif inst.opcode == "custom-call" and "dot_dimension_numbers" in inst.attributes:
        # GPU library gemms (cuBLAS) carry the dot's dimension numbers in their config.
        contracting = re.search(
            r'lhs_contracting_dimensions\\?"\s*:\s*\[([^\]]*)\]', inst.attributes
        )
    else:
        return 0.0
    lhs, out = dims(operand_shape(inst, 0, computation)), dims(inst.shape)
    if contracting is None or lhs is None or out is None:
        return 0.0
    axes = [int(a) for a in re.findall(r"\d+", contracting[1])]
    return 2.0 * math.prod(out) * math.prod(lhs[a] for a in axes if a < len(lhs))


def _convolution_flops(inst, computation: dict) -> float:
    """Only the window positions that land on the input (not on padding or dilation
    holes) multiply. The TPU compiler writes batched matmuls as convolutions over a
    padded "spatial" batch dimension, so this matters beyond CNNs."""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", inst.attributes)
    lhs = dims(operand_shape(inst, 0, computation))
    rhs = dims(operand_shape(inst, 1, computation))
    out = dims(inst.shape)
    if labels is None or lhs is None or rhs is None or out is None:
        return 0.0
    lhs_labels, rhs_labels, out_labels = labels.groups()
    window = _window(inst.attributes)
    valid = 1
    for d in range(sum(c.isdigit() for c in lhs_labels)):
        valid *= _valid_positions(
            lhs[lhs_labels.index(str(d))],
            rhs[rhs_labels.index(str(d))],
            out[out_labels.index(str(d))],
            *(window[key][d] if d < len(window[key]) else 0 for key in _WINDOW_FIELDS),
        )
    feature_groups = re.search(r"feature_group_count=(\d+)", inst.attributes)
    batch_groups = re.search(r"batch_group_count=(\d+)", inst.attributes)
    features_in = lhs[lhs_labels.index("f")] // (int(feature_groups[1]) if feature_groups else 1)
    batch = lhs[lhs_labels.index("b")] // (int(batch_groups[1]) if batch_groups else 1)
    return 2.0 * features_in * out[out_labels.index("f")] * batch * valid


def _window(attributes: str) -> dict[str, list[int]]:
    """`window={size=3x3 stride=2x2 pad=1_1x0_1 ...}` -> {field: a value per dimension}."""
    window = re.search(r"window=\{([^}]*)\}", attributes)
    fields = dict(f.split("=", 1) for f in window[1].split() if "=" in f) if window else {}
    # pad is low_high per dimension; only the low side moves which positions are valid.
    return {
        key: [int(v.split("_")[0]) for v in fields[key].split("x")] if key in fields else []
        for key in _WINDOW_FIELDS
    }


def _valid_positions(size_in, kernel, size_out, stride, pad_low, base, dilation) -> int:
    """(kernel, output) position pairs of one spatial dimension that read an input element."""
    stride, base, dilation = stride or 1, base or 1, dilation or 1
    count = 0
    for k in range(kernel):
        offset = k * dilation - pad_low  # the (dilated) input index output 0 reads
        if base == 1:  # o * stride + offset in [0, size_in): a range of o, counted at once
            first = max(0, -(offset // stride))
            last = min(size_out - 1, (size_in - 1 - offset) // stride)
            count += max(0, last - first + 1)
        else:  # a dilated input (transposed convolution): only every base-th index is real
            for o in range(size_out):
                index = o * stride + offset
                count += index >= 0 and index % base == 0 and index // base < size_in
    return count


def operand_shape(inst, i: int, computation: dict) -> str:
    """The shape text of an instruction's i-th operand ("" when it is not found)."""
    operand = computation.get(inst.operands[i]) if i < len(inst.operands) else None
    return operand.shape if operand else ""


def first_array(shape: str) -> str:
    """A shape's first array (a tuple result, such as a gemm's, leads with its output)."""
    array = _ARRAY_SHAPE.search(shape)
    return array[0] if array else ""


def dims(shape: str) -> list[int] | None:
    """The dimensions of a shape's first array, None when it has none."""
    array = _ARRAY_SHAPE.search(shape)
    if array is None:
        return None
    return [int(d.removeprefix("<=")) for d in array["dims"].split(",") if d]


def _elements(shape: str) -> int:
    """Elements of a single-array shape; 0 for a tuple (a multi-output op is not math)."""
    if shape.startswith("("):
        return 0
    found = dims(shape)
    return math.prod(found) if found is not None else 0


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape such as `f32[4,32]{1,0}` or a tuple of them."""
    total = 0
    for array in _ARRAY_SHAPE.finditer(shape):
        dtype = array["dtype"]
        bits = 8 if dtype == "pred" else int(re.search(r"\d+", dtype).group())
        sizes = [int(d.removeprefix("<=")) for d in array["dims"].split(",") if d]
        total += math.prod(sizes) * bits // 8
    return total
