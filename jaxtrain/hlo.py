"""What XLA compiled: memory and cost analyses, and the collectives in the partitioned HLO."""

import math
import re

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_MEMORY_STATS = (
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "temp_size_in_bytes",
    "generated_code_size_in_bytes",
    "alias_size_in_bytes",
)


def compiled_stats(compiled) -> dict[str, float]:
    """Per-device FLOPs and memory of a compiled program, from XLA's own analyses.

    Returns:
      Any of `flops` and the `*_size_in_bytes` fields of `memory_analysis()` that the
      backend reports.
    """
    stats = {}
    cost = compiled.cost_analysis()
    if cost and cost.get("flops", -1) >= 0:
        stats["flops"] = float(cost["flops"])
    memory = compiled.memory_analysis()
    if memory is not None:
        for name in _MEMORY_STATS:
            if hasattr(memory, name):
                stats[name] = float(getattr(memory, name))
    return stats


_ARRAY_SHAPE = re.compile(r"\b(?P<dtype>pred|[a-z]+\d+[a-z0-9]*)\[(?P<dims>[\d,<=]*)\]")
_CALLEE = re.compile(
    r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def count_collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """Collectives one step runs, from compiled (partitioned) HLO text, and their bytes.

    Walks the calls from the entry computation, so a collective in a loop with a known
    trip count (a scan over layers) counts once per iteration; one in a loop of unknown
    trip count or in a conditional branch counts once. An async pair counts once, by its
    `-done` half, whose result is the collective's output (the `-start` half's tuple also
    holds the inputs).

    Returns:
      {op: {"count": executions, "bytes": their result sizes per device, summed}} for each
      op in COLLECTIVES that occurs.
    """
    computations: dict[str, list[tuple[str, str, str]]] = {}
    entry, body = None, computations.setdefault("", [])
    for line in hlo_text.splitlines():
        if line.rstrip().endswith("{") and " = " not in line:  # a computation's header
            name = line.split("(", 1)[0].split()[-1].lstrip("%")
            body = computations.setdefault(name, [])
            entry = name if line.lstrip().startswith("ENTRY") else entry
        elif parsed := _instruction(line):
            body.append((*parsed, line))
    found: dict[str, dict[str, int]] = {}

    def walk(name: str, times: int) -> None:
        for shape, opcode, line in computations.get(name, ()):
            op = opcode.removesuffix("-done")
            if op in COLLECTIVES:
                counts = found.setdefault(op, {"count": 0, "bytes": 0})
                counts["count"] += times
                counts["bytes"] += times * _shape_bytes(shape)
            if opcode in ("async-update", "async-done"):
                continue  # the same wrapped computation as its async-start: walked there
            trips = _TRIP_COUNT.search(line) if opcode == "while" else None
            for key, callee in _CALLEE.findall(line):
                walk(callee, times * (int(trips[1]) if trips and key == "body" else 1))
            for branches in _BRANCHES.findall(line):
                for callee in re.findall(r"[\w.\-]+", branches):
                    walk(callee, times)

    for root in [entry] if entry else list(computations):  # no ENTRY: each line once
        walk(root, 1)
    return {op: found[op] for op in COLLECTIVES if op in found}


def _instruction(line: str) -> tuple[str, str] | None:
    """(result shape, opcode) of an HLO instruction line `%name = SHAPE opcode(...)...`."""
    _, assign, rest = line.partition(" = ")
    if not assign:
        return None
    rest = rest.lstrip()
    if rest.startswith("("):  # a tuple shape; layouts inside may hold parentheses too
        depth, end = 0, 0
        while True:
            depth += (rest[end] == "(") - (rest[end] == ")")
            end += 1
            if depth == 0 or end == len(rest):
                break
        shape, rest = rest[:end], rest[end:]
    else:
        shape, _, rest = rest.partition(" ")
    return shape, rest.lstrip().split("(", 1)[0]


def _shape_bytes(shape: str) -> int:
    """Bytes of an HLO result shape such as `f32[4,32]{1,0}` or a tuple of them."""
    total = 0
    for array in _ARRAY_SHAPE.finditer(shape):
        dtype = array["dtype"]
        bits = 8 if dtype == "pred" else int(re.search(r"\d+", dtype).group())
        dims = [int(d.removeprefix("<=")) for d in array["dims"].split(",") if d]
        total += math.prod(dims) * bits // 8
    return total
