"""What XLA compiled: its memory and cost analyses, and what one step runs, read from the
partitioned HLO text: the collectives, and the FLOPs with every loop trip counted.

XLA's cost analysis (`compiled.cost_analysis()`: `flops`, and on TPU the compiler's
step-time estimate `optimal_seconds`) counts a while loop's body once, however many times
it runs: a model whose layers are a `lax.scan` reports about 1/num_layers of its work.
`step_counts` walks the compiled program's calls from its entry instead, multiplying each
loop body by its trip count, and `compiled_stats` corrects XLA's figures with it.
"""

import dataclasses
import re

from jaxtrain.hlo_flops import instruction_flops, shape_bytes

_WHILE = re.compile(r"\swhile\(")  # a while instruction in HLO text

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_MEMORY_STATS = (
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "temp_size_in_bytes",
    "generated_code_size_in_bytes",
    "alias_size_in_bytes",
)


def compiled_stats(compiled, counts: "StepCounts | None" = None) -> dict[str, float]:
    """Per-device FLOPs, memory and (TPU) estimated seconds of a compiled step.

    Args:
      compiled: a compiled jax function (`jax.jit(f).lower(...).compile()`).
      counts: its `step_counts`, if already made (they are made otherwise).

    Returns:
      What the backend reports of `flops` (XLA's count, each loop body once),
      `optimal_seconds` (the TPU compiler's step-time estimate, each loop body once; when
      it is not positive, `optimal_seconds_invalid` holds it instead) and
      the `*_size_in_bytes` fields of `memory_analysis()`. With `flops`, also
      `flops_per_step`: XLA's count plus the FLOPs of the loop trips it leaves out (see
      `step_counts`); with `optimal_seconds`, `optimal_seconds_per_step` (see below).
    """
    stats = {}
    cost = compiled.cost_analysis()
    if cost and cost.get("flops", -1) >= 0:
        stats["flops"] = float(cost["flops"])
    if cost and "optimal_seconds" in cost:
        # The TPU compiler reports a negative estimate for some programs (a 1.1B GPT whose
        # step overflows v6e's HBM: -24.9): no estimate, which plan says.
        key = "optimal_seconds" if cost["optimal_seconds"] > 0 else "optimal_seconds_invalid"
        stats[key] = float(cost["optimal_seconds"])
    memory = compiled.memory_analysis()
    if memory is not None:
        for name in _MEMORY_STATS:
            if hasattr(memory, name):
                stats[name] = float(getattr(memory, name))
    if "flops" in stats:
        if counts is None:
            text = compiled.as_text()
            # Without a loop XLA's count is the step's: skip the walk (0.2-0.4 s of a warm
            # start on the main job's 1.8 MB of HLO).
            counts = step_counts(text) if _WHILE.search(text) else None
        loop_trips = counts.flops - counts.flops_once if counts else 0.0
        stats["flops_per_step"] = stats["flops"] + loop_trips
        if "optimal_seconds" in stats and stats["flops"] > 0:
            # The compiler gives one estimate for the whole program and none per loop, so
            # the trips it leaves out are priced at the program's own seconds per FLOP. That
            # is exact only when a loop body runs at the program's average rate. Against the
            # compiler's estimate for the same GPT built without a loop (scan_layers=False;
            # BENCHMARKS.md, 2026-11-30, v5p-8) it came out 12-17% short for the 1.1B of
            # configs/gpt_1b.py (outside the loop, mostly its LM head, the program runs at
            # 1.9x its layers' rate) and 58% long for a 4-layer d=512 GPT. Rejected:
            # compiling a loop-free copy (only for models that can unroll themselves;
            # 1.2-3.6x the 1.1B's compile time; the 7.2B's does not fit where the scanned
            # one does) and pricing a body by a second compile with every scan unrolled
            # twice (within 1% for the 1.1B, 2.2x long for the d=512 GPT: the unrolled
            # scan's stacking gets priced too).
            scale = stats["flops_per_step"] / stats["flops"]
            stats["optimal_seconds_per_step"] = stats["optimal_seconds"] * scale
    return stats


@dataclasses.dataclass(frozen=True)
class StepCounts:
    """What one execution of a compiled program runs, per device.

    Attributes:
      collectives: {op: {"count": executions, "bytes": their result bytes summed}}.
      flops: FLOPs as XLA counts them (see `jaxtrain.hlo_flops`), each loop body counted
        once per trip.
      flops_once: the same with each loop body counted once, as XLA's cost analysis does.
      loops: while loops in the program (a loop nested in another counts once).
      unknown_trip_counts: those whose trip count could not be read: counted once.
      uncounted_kernels: {custom-call target: calls} of library or hand-written kernels
        whose math no count here sees (cuDNN attention, Pallas kernels, ...).
    """

    collectives: dict[str, dict[str, int]]
    flops: float
    flops_once: float
    loops: int
    unknown_trip_counts: int
    uncounted_kernels: dict[str, int]


def count_collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """Collectives one step runs, from compiled (partitioned) HLO text, and their bytes.

    A collective in a loop counts once per trip (see `step_counts`); one in a
    conditional branch counts once. An async pair counts once, by its `-done` half,
    whose result is the collective's output (the `-start` half's tuple also holds the
    inputs).

    Returns:
      {op: {"count": executions, "bytes": their result sizes per device, summed}} for each
      op in COLLECTIVES that occurs.
    """
    return step_counts(hlo_text).collectives


@dataclasses.dataclass
class _Instruction:
    name: str
    shape: str
    opcode: str
    operands: list[str]  # operand names (a constant: its literal)
    attributes: str  # everything after the operand list
    root: bool


# Computations an instruction runs. `to_apply` is a `call`'s callee, but elsewhere a
# reducer or comparator, which the instruction's own count prices (see hlo_flops).
_CALLEE = re.compile(
    r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_KERNELS = re.compile(r"cudnn|cublas|tpu_custom_call|mosaic|triton|onednn", re.I)


def step_counts(hlo_text: str) -> StepCounts:
    """Counts what one execution of a compiled (partitioned) HLO module runs.

    Walks the calls from the entry computation (fusions, loops, conditionals, calls).
    A loop's trip count is XLA's `known_trip_count` annotation (XLA:CPU writes one) or,
    where the compiler leaves none (the TPU compiler), read from the loop itself: a
    counter that starts at a constant, steps by a constant and is compared with a
    constant, as `lax.scan` and `fori_loop` compile. A loop with neither counts once.
    """
    computations, entry = _parse(hlo_text)
    memo: dict[str, dict] = {}
    kernels: dict[str, int] = {}
    loops = {"all": 0, "unknown": 0}

    def total(name: str) -> dict:
        if name in memo:
            return memo[name]
        memo[name] = acc = {"flops": 0.0, "flops_once": 0.0}  # also a recursion guard
        body = computations.get(name, {})
        for inst in body.values():
            flops = instruction_flops(inst, body, computations)
            _add(acc, {"flops": flops, "flops_once": flops})
            op = inst.opcode.removesuffix("-done")
            if op in COLLECTIVES:
                _add(acc, {f"{op}:count": 1, f"{op}:bytes": shape_bytes(inst.shape)})
            if inst.opcode == "custom-call" and not flops:
                target = re.search(r'custom_call_target="([^"]*)"', inst.attributes)
                if target and _KERNELS.search(target[1]):
                    kernels[target[1]] = kernels.get(target[1], 0) + 1
            if inst.opcode in ("async-update", "async-done"):
                continue  # the same wrapped computation as its async-start: walked there
            trips = 1
            if inst.opcode == "while":
                loops["all"] += 1
                trips = _trip_count(inst, body, computations)
                loops["unknown"] += trips is None
                trips = 1 if trips is None else trips
            for key, callee in _CALLEE.findall(inst.attributes):
                if key != "to_apply" or inst.opcode == "call":
                    _add(acc, total(callee), trips if key == "body" else 1)
            for branches in _BRANCHES.findall(inst.attributes):
                for callee in re.findall(r"[\w.\-]+", branches):
                    _add(acc, total(callee))
        return acc

    found = {"flops": 0.0, "flops_once": 0.0}
    for root in [entry] if entry else list(computations):  # no ENTRY: each line once
        _add(found, total(root))
    return StepCounts(
        collectives={
            op: {"count": int(found[f"{op}:count"]), "bytes": int(found[f"{op}:bytes"])}
            for op in COLLECTIVES
            if f"{op}:count" in found
        },
        flops=found["flops"],
        flops_once=found["flops_once"],
        loops=loops["all"],
        unknown_trip_counts=loops["unknown"],
        uncounted_kernels=kernels,
    )


def _add(acc: dict, other: dict, times: int = 1) -> None:
    for key, value in other.items():
        # A loop's once-count keeps its body once: the count XLA's cost analysis makes.
        acc[key] = acc.get(key, 0) + value * (1 if key == "flops_once" else times)


def _parse(hlo_text: str) -> tuple[dict[str, dict[str, _Instruction]], str | None]:
    """{computation: {instruction name: instruction}} in order, and the entry's name."""
    computations: dict[str, dict[str, _Instruction]] = {}
    entry, body = None, computations.setdefault("", {})
    for line in hlo_text.splitlines():
        if line.rstrip().endswith("{") and " = " not in line:  # a computation's header
            name = line.split("(", 1)[0].split()[-1].lstrip("%")
            body = computations.setdefault(name, {})
            entry = name if line.lstrip().startswith("ENTRY") else entry
        elif inst := _instruction(line):
            body[inst.name] = inst
    return computations, entry


def _instruction(line: str) -> _Instruction | None:
    """Parses an instruction line `[ROOT] %name = SHAPE opcode(operands), attributes`."""
    lhs, assign, rest = line.partition(" = ")
    if not assign:
        return None
    lhs, rest = lhs.split(), rest.lstrip()
    if rest.startswith("("):  # a tuple shape; layouts inside may hold parentheses too
        end = _closing(rest, 0)
        shape, rest = rest[:end], rest[end:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    opcode, paren, rest = rest.partition("(")
    if not paren or not lhs:
        return None
    end = _closing(rest, 0, depth=1)
    operand_text = re.sub(r"/\*.*?\*/", "", rest[: end - 1])
    operands = [part.split()[-1].lstrip("%") for part in _split_top(operand_text) if part.split()]
    return _Instruction(
        lhs[-1].lstrip("%"), shape, opcode.strip(), operands, rest[end:], lhs[0] == "ROOT"
    )


def _closing(text: str, start: int, depth: int = 0) -> int:
    """Index just past the parenthesis that closes at `depth` 0 (or the text's end)."""
    for i in range(start, len(text)):
        depth += (text[i] == "(") - (text[i] == ")")
        if depth == 0:
            return i + 1
    return len(text)


def _split_top(text: str) -> list[str]:
    """Splits at commas outside brackets (shapes and layouts hold commas)."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char in "([{") - (char in ")]}")
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def _trip_count(loop: _Instruction, caller: dict, computations: dict) -> int | None:
    """A while loop's trip count: annotated, or read from its counter (None if neither)."""
    if known := _TRIP_COUNT.search(loop.attributes):
        return int(known[1])
    callees = dict(_CALLEE.findall(loop.attributes))
    condition = computations.get(callees.get("condition"), {})
    body = computations.get(callees.get("body"), {})
    compare = next((i for i in condition.values() if i.root), None)
    if compare is None or compare.opcode != "compare" or len(compare.operands) != 2:
        return None
    direction = re.search(r"direction=(\w+)", compare.attributes)
    direction = direction[1] if direction else ""
    left, right = (_follow(name, condition) for name in compare.operands)
    if _constant(right) is None:  # `limit > counter` reads as `counter < limit`
        left, right = right, left
        direction = {"GT": "LT", "GE": "LE", "LT": "GT", "LE": "GE"}.get(direction, direction)
    limit, index = _constant(right), _tuple_index(left)
    if limit is None or index is None or direction not in ("LT", "LE"):
        return None
    init = _tuple_operand(caller, loop.operands[0] if loop.operands else "", index)
    start = _constant(_follow(init, caller)) if init else None
    step_value = None
    root = next((i for i in body.values() if i.root), None)
    step = _tuple_operand(body, root.name, index) if root else None
    increment = _follow(step, body) if step else None
    if increment is not None and increment.opcode == "add" and len(increment.operands) == 2:
        a, b = (_follow(name, body) for name in increment.operands)
        if _tuple_index(a) == index:
            step_value = _constant(b)
        elif _tuple_index(b) == index:
            step_value = _constant(a)
    if start is None or not step_value or step_value < 0:
        return None
    span = limit - start + (direction == "LE")
    return max(0, -(-span // step_value))


def _follow(name: str, computation: dict) -> _Instruction | None:
    """The instruction a name refers to, looking through copies, bitcasts and converts."""
    inst = computation.get(name)
    while inst is not None and inst.opcode in ("copy", "bitcast", "convert") and inst.operands:
        inst = computation.get(inst.operands[0])
    return inst


def _constant(inst: _Instruction | None) -> int | None:
    if inst is None or inst.opcode != "constant" or not inst.operands:
        return None
    try:
        return int(inst.operands[0])
    except ValueError:
        return None


def _tuple_index(inst: _Instruction | None) -> int | None:
    """k when `inst` is get-tuple-element(parameter, index=k)."""
    if inst is None or inst.opcode != "get-tuple-element":
        return None
    index = re.search(r"index=(\d+)", inst.attributes)
    return int(index[1]) if index else None


def _tuple_operand(computation: dict, name: str, index: int) -> str | None:
    """The name of element `index` of the tuple instruction `name`."""
    inst = computation.get(name)
    if inst is None or inst.opcode != "tuple" or index >= len(inst.operands):
        return None
    return inst.operands[index]
