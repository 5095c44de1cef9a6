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
from jaxtrain.errors import ConfigError, did_you_mean

# The platforms jax.export lowers for (its docs: "JAX built-in platforms are 'tpu', 'cpu',
# 'cuda', 'rocm'"). jax takes any other name too and writes a file no device can run: a
# misspelt name is refused here instead.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def check_platforms(platforms) -> tuple[str, ...] | None:
    """`platforms` as `export_inference` takes them: known names, each once; None stays None.

    Raises:
      ConfigError: an unknown or repeated platform, naming the valid choices.
    """
    if platforms is None:
        return None
    if isinstance(platforms, str):  # "cpu" is one platform, not three letters
        platforms = (platforms,)
    platforms = tuple(platforms)
    for platform in platforms:
        if platform not in PLATFORMS:
            hint = (
                " (jax exports for 'cuda' (NVIDIA) or 'rocm' (AMD), not 'gpu')"
                if str(platform).lower() == "gpu"
                else did_you_mean(str(platform).lower(), PLATFORMS)
            )
            raise ConfigError(
                f"unknown export platform {platform!r}{hint}; choose from {', '.join(PLATFORMS)} "
                "(e.g. --platforms=cpu,cuda,tpu)"
            )
        if platforms.count(platform) > 1:
            raise ConfigError(f"export platform {platform!r} is listed twice in {list(platforms)}")
    if not platforms:
        raise ConfigError(f"no export platforms given; choose from {', '.join(PLATFORMS)}")
    return platforms


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
      platforms: the platforms to export for, any of `PLATFORMS` ("cpu", "cuda", "rocm",
        "tpu"), whatever this machine has; None: the default backend's.

    Returns:
      A `jax.export.Exported` for one device; `.serialize()` gives the file's bytes.

    Raises:
      ConfigError: an unknown platform, no such input, or a model that does not export
        (its error, in a line).
    """
    platforms = check_platforms(platforms)
    spec = input_spec(run, input_key)
    # Gathered to the host once: the weights become constants of the exported program,
    # which then needs neither the training mesh nor the arrays' shardings.
    params, model_state = jax.device_get((run.state.params, run.state.model_state))

    def forward(inputs):
        model = steps.set_mode(run.layout.merge(params, model_state), train=False)
        return model(inputs)

    try:
        return export.export(jax.jit(forward), platforms=platforms)(spec)
    except Exception as e:  # shape polymorphism, an op with no lowering: say what failed
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
