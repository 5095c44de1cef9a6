"""The matmul FLOPs of the Pallas kernels in a traced program, counted from its jaxpr.

XLA cannot see into a Pallas kernel: on TPU it is one opaque `tpu_custom_call`. Its
`cost_analysis()` counts none of the kernel's FLOPs, and the TPU compiler's step-time
estimate (`optimal_seconds`) prices the call by the bytes it reads and writes, not by its
math (checked on libtpu 0.0.42.1: splash attention's forward at twice the sequence
length was priced like twice the bytes, not four times the FLOPs). jax's own kernels
(splash attention among them) declare no `pl.CostEstimate` either. So `jaxtrain plan`
counts their matmuls here, from the kernel bodies in the jaxpr (or takes the FLOPs a
kernel declares in its `pl.CostEstimate`), and prices them at peak.

The count is an upper bound for block-sparse kernels: every step of a kernel's grid
counts, and of a `cond` the costliest branch, although a kernel such as causal splash
attention skips the blocks its mask leaves empty at run time (6 of 16 blocks at 2,048
tokens in blocks of 512). Loops inside a kernel count once per trip where the
trip count is static; a `while` loop counts once.
"""

import math

import jax


def pallas_flops(closed_jaxpr) -> tuple[float, dict[str, int]]:
    """(matmul FLOPs of every Pallas kernel call, {kernel name: calls}), loops applied.

    Args:
      closed_jaxpr: the program, e.g. `jax.jit(f).trace(*args).jaxpr` or
        `jax.make_jaxpr(f)(*args)`. Kernels under `jax.shard_map` count at the shapes
        one device sees.
    """
    calls: dict[str, int] = {}

    def kernel_call(eqn, times: int) -> float | None:
        if eqn.primitive.name != "pallas_call":
            return None
        kernel = eqn.params.get("name") or "pallas_call"
        calls[kernel] = calls.get(kernel, 0) + times
        declared = getattr(eqn.params.get("cost_estimate"), "flops", None)
        if declared is not None:  # the kernel's author knows best
            return times * float(declared)
        grid = math.prod(int(g) for g in eqn.params["grid_mapping"].grid)
        return times * grid * _total(_jaxpr(eqn.params["jaxpr"]), _matmul)

    return _total(_jaxpr(closed_jaxpr), kernel_call), calls


def _jaxpr(value):
    """The Jaxpr in a Jaxpr or ClosedJaxpr, else None."""
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        return value.jaxpr
    if isinstance(value, jax.extend.core.Jaxpr):
        return value
    return None


def _subjaxprs(eqn):
    for value in eqn.params.values():
        for item in value if isinstance(value, list | tuple) else (value,):
            sub = _jaxpr(item)
            if sub is not None:
                yield sub


def _total(jaxpr, count, times: int = 1) -> float:
    """What `count(eqn, times)` gives for `jaxpr`'s equations, run `times` times.

    An equation `count` gives None for is looked into: a `cond` by its costliest branch,
    a `scan` once per trip, anything else holding jaxprs (jit, remat, shard_map, a while
    loop's body) once.
    """
    total = 0.0
    for eqn in jaxpr.eqns:
        own = count(eqn, times)
        if own is not None:
            total += own
        elif eqn.primitive.name == "cond":
            total += max((_total(b, count, times) for b in _subjaxprs(eqn)), default=0.0)
        else:
            trips = int(eqn.params.get("length", 1)) if eqn.primitive.name == "scan" else 1
            total += sum(_total(sub, count, times * trips) for sub in _subjaxprs(eqn))
    return total


def _matmul(eqn, times: int) -> float | None:
    """A kernel body's dot_general: its FLOPs; None for any other equation."""
    if eqn.primitive.name != "dot_general":
        return None
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    out = eqn.outvars[0].aval.shape
    return times * 2.0 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)
