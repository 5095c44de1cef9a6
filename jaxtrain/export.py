"""A trained model as one file that runs without jaxtrain: a serialized `jax.export`.

    run = jaxtrain.load_run("runs/gpt_pysource")
    exported = export_inference(run)            # tokens [b, t] -> logits [b, t, vocab]
    save(exported, "gpt.jaxexport")

The file holds the model's inference function (its `__call__` in eval mode on a batch of
the task's `inputs`) as StableHLO with the trained parameters inside as constants. Anyone
with jax loads and calls it, without this package, Flax or the training code:

    import jax, numpy as np
    with open("gpt.jaxexport", "rb") as f:
        forward = jax.export.deserialize(f.read())
    logits = forward.call(np.array([[0, 100, 101, 102]], np.int32))

The batch dimension is symbolic (any batch size); for the bundled GPT the sequence length
is too (any length: RoPE has no table of positions). It runs on one device, on the
platforms it was exported for (by default the one exporting it; `platforms=("cpu",
"cuda", "tpu")` for all three). StableHLO keeps its compatibility guarantees across jax
versions: a jax release up to 6 months newer loads it.
"""

import jax
import numpy as np
from jax import export

from jaxtrain import data, files, steps
from jaxtrain.errors import ConfigError


def input_spec(run, input_key: str = "inputs") -> jax.ShapeDtypeStruct:
    """The exported function's argument: a batch of the task's `input_key` arrays with a
    symbolic batch size (and, for the bundled GPT, a symbolic length).

    Raises:
      ConfigError: the task's examples have no `input_key`.
    """
    example = run.task.example or data.example_spec(data.as_dataset(run.task.data))
    if input_key not in example:
        raise ConfigError(
            f"the task's examples have no {input_key!r}; they have {sorted(example)}: "
            "choose the model's input with --input_key"
        )
    spec = example[input_key]
    if run.config.model.get("name") == "gpt":
        shape = export.symbolic_shape("b, t")
    else:
        batch = export.symbolic_shape("b")
        shape = (*batch, *spec.shape)
    return jax.ShapeDtypeStruct(tuple(shape), spec.dtype)


def export_inference(
    run, *, input_key: str = "inputs", platforms: tuple[str, ...] | None = None
) -> export.Exported:
    """The run's model, `inputs -> model(inputs)` in eval mode, exported with its weights.

    Args:
      run: a `jaxtrain.Run` (`jaxtrain.load_run`).
      input_key: which array of the task's examples the model takes.
      platforms: the platforms to export for ("cpu", "cuda", "rocm", "tpu"); None: the
        default backend's.

    Returns:
      A `jax.export.Exported` for one device; `.serialize()` gives the file's bytes.

    Raises:
      ConfigError: no such input, or a model that does not export (its error, in a line).
    """
    spec = input_spec(run, input_key)
    # Gathered to the host once: the weights become constants of the exported program,
    # which then needs neither the training mesh nor the arrays' shardings.
    params, model_state = jax.device_get((run.state.params, run.state.model_state))

    def forward(inputs):
        model = steps.set_mode(run.layout.merge(params, model_state), train=False)
        return model(inputs)

    try:
        return export.export(jax.jit(forward), platforms=platforms)(spec)
    except Exception as e:  # shape polymorphism or an unknown platform: say what failed
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:400]
        raise ConfigError(f"model {run.task.name!r} does not export: {reason}") from e


def save(exported: export.Exported, path: str) -> int:
    """Writes the serialized export to `path` (atomically); returns its size in bytes.

    Raises:
      ConfigError: `path` cannot be written.
    """
    blob = exported.serialize()
    try:
        files.write_atomically(path, blob)
    except OSError as e:
        raise ConfigError(f"cannot write {path!r}: {e.strerror or e}") from e
    return len(blob)


def describe(exported: export.Exported) -> str:
    """`int32[b,t] -> float32[b,t,256] on cpu`: what the exported function takes and gives."""

    def fmt(avals):
        return ", ".join(f"{np.dtype(a.dtype).name}[{','.join(map(str, a.shape))}]" for a in avals)

    return (
        f"{fmt(exported.in_avals)} -> {fmt(exported.out_avals)} on {', '.join(exported.platforms)}"
    )
