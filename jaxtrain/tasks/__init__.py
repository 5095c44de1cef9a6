"""What to train: a `Task` is a model, its loss and metrics, and its data.

The loop (`train_and_evaluate`), the compiled steps and the planner see nothing else, so a
user's own task trains exactly as the bundled ones (`lm`, `classification`), which are
written the same way in this package:

    task = Task(model=lambda rngs: MyNet(rngs=rngs), loss=my_loss, data=arrays)

`config.task` names a bundled task or a function `"package.module:make_task"` that takes
the config and returns a Task; `from_config` resolves it. The bundled tasks' pieces
(`jaxtrain.tasks.lm.make_task`, `.loss`, `.eval_metrics`, ...; the same in
`jaxtrain.tasks.classification`) are public, to wrap: `dataclasses.replace(
lm.make_task(config), loss=my_loss)` (see `jaxtrain.tasks.lm`).
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax
from flax import nnx

from jaxtrain import imports, sharding
from jaxtrain.errors import ConfigError, did_you_mean

# loss(model, batch, rngs) -> (scalar loss, {name: scalar metric})
LossFn = Callable[[nnx.Module, dict, nnx.Rngs], tuple[jax.Array, dict]]
# eval_metrics(model, batch, rngs) -> {name: per-example values, leading dimension = batch}
EvalFn = Callable[[nnx.Module, dict, nnx.Rngs], dict]


@dataclasses.dataclass(frozen=True)
class Task:
    """A model, its loss and metrics, and its data: everything the loop needs to train.

    Only `model`, `loss` and `data` are required.

    Attributes:
      model: `rngs -> nnx.Module`, building the model. Weights name their logical axes
        (`nnx.with_partitioning`, or `kernel_metadata={"out_sharding": (...)}`) for the
        config's rules to shard them; a parameter with none takes them from the first
        `config.param_axes` pattern matching its path, or else is replicated, with a warning.
      loss: `loss(model, batch, rngs) -> (loss, metrics)`: the scalar loss to minimise
        and a dict of scalar metrics, both means over the batch. `model` is in train mode
        (`nnx.view(model, deterministic=False, use_running_average=False)`); `rngs` is an
        `nnx.Rngs` whose streams (`rngs.dropout()`, `rngs.noise()`, ...) differ every step.
        State the model changes (BatchNorm statistics, its own RNG streams, any
        `nnx.Variable`) is kept in the train state; `nnx.Intermediate` values it sows are
        the loss's to read (`nnx.pop(model, nnx.Intermediate)`) and are not kept.
      data: the training examples: a `grain.MapDataset`, a dict of equally long arrays,
        any random-access source (`len()` and `[i]`, such as
        `jaxtrain.data.from_tfds(builder, "train")`), or a function returning one (read
        only when training starts, so `jaxtrain plan` never loads it). Each example is a
        dict of arrays; a batch stacks them.
      eval_data: the evaluation examples, as `data`; None: no evaluation.
      eval_metrics: `eval_metrics(model, batch, rngs) -> {name: values}` with one value
        per example (or per position: `[batch, ...]`), the model in eval mode. Evaluation
        reports each name's mean over the real entries of the whole split (a last, padded
        batch's padding excluded). By default: `loss` and its metrics for each example on
        its own (`per_example(loss)`), exact for any loss that is a mean over examples;
        give your own for a loss that couples examples (contrastive, in-batch negatives).
      summarize_eval: `metrics -> metrics`, run on the host after evaluation, e.g. to add
        a perplexity.
      example: one example's structure, `{key: jax.ShapeDtypeStruct}`; None: read from
        `data[0]`. Give it when `data` is expensive to load, so planning does not load it.
      batch_axes: logical axes of each batch array, `{key: ("activation_batch", ...)}`;
        by default the leading (example) dimension is split over the data-parallel mesh
        axes and the others are whole.
      flops_per_example: model FLOPs to train on one example (forward and backward), or
        a function of the parameters (a tree of ShapeDtypeStruct) returning it; for MFU.
        None: XLA's count of the compiled step is used.
      tokens_per_example: adds `tokens_per_s` to the metrics.
      optimizer: `schedule -> optax.GradientTransformation`, given the config's learning
        rate schedule; None: the config's optimizer (`config.optim`).
      trainable: an NNX filter of the variables the optimizer updates (default
        `nnx.Param`); other parameters are kept, frozen, in the train state.
      name: what the console calls the model.
    """

    model: Callable[[nnx.Rngs], nnx.Module]
    loss: LossFn
    data: Any
    eval_data: Any = None
    eval_metrics: EvalFn | None = None
    summarize_eval: Callable[[dict], dict] | None = None
    example: Mapping[str, jax.ShapeDtypeStruct] | None = None
    batch_axes: Mapping[str, tuple] | None = None
    flops_per_example: float | Callable[[Any], float] | None = None
    tokens_per_example: int | None = None
    optimizer: Callable[[optax.Schedule], optax.GradientTransformation] | None = None
    trainable: Any = nnx.Param
    name: str = "model"

    def evaluation(self) -> EvalFn:
        """`eval_metrics`, or the default built from `loss`."""
        return self.eval_metrics or per_example(self.loss)


def per_example(loss: LossFn) -> EvalFn:
    """Eval metrics from a loss: `loss` and its metrics for each example of a batch alone.

    Runs the loss under `jax.vmap` on batches of one, so padding rows never mix with
    real ones. Each example draws its own randomness: the loss's `rngs` and every RNG
    stream the model holds (an `nnx.Rngs` in its state, as a VAE's reparameterisation
    noise) are split over the batch (`nnx.split_rngs`), so example `i` of the global
    batch gets the `i`-th key of its batch's keys (the eval step folds the batch's index
    into them) whatever the mesh, and every evaluation the same keys.
    Activation sharding constraints are off inside (a batch of one does not split),
    which costs nothing in eval mode.
    """

    def eval_metrics(model, batch, rngs):
        size = jax.tree.leaves(batch)[0].shape[0]
        # Without the split every example would draw the model's one key: the same noise.
        model = nnx.split_rngs(model, splits=size, graph_updates=False)
        graphdef, streams, rest = nnx.split(model, nnx.RngState, ...)
        # Arrays: each example's model is its own copy; only the RNG streams differ.
        streams, rest = nnx.to_pure_dict(streams), nnx.to_pure_dict(rest)

        def one(example, key, model_streams):
            single = jax.tree.map(lambda x: x[None], example)
            value, metrics = loss(nnx.merge(graphdef, model_streams, rest), single, nnx.Rngs(key))
            return {"loss": value, **metrics}

        with sharding.use_rules(None):
            return jax.vmap(one)(batch, jax.random.split(rngs(), size), streams)

    return eval_metrics


def from_config(config) -> Task:
    """The task `config.task` names: "lm", "classification", or "package.module:make_task".

    Raises:
      ConfigError: an unknown name or a bad import path, or a factory that does not
        return a Task.
    """
    from jaxtrain.tasks import classification, lm

    bundled = {"lm": lm.make_task, "classification": classification.make_task}
    name = config.task
    if ":" in name:
        task = imports.resolve(name, "config.task")(config)
        if not isinstance(task, Task):
            raise ConfigError(
                f"config.task={name!r} returned {type(task).__name__}, not a jaxtrain.Task"
            )
        return task
    if name not in bundled:
        raise ConfigError(
            f"unknown task {name!r}{did_you_mean(name, bundled)}; bundled tasks: "
            f"{sorted(bundled)}, or an import path 'package.module:make_task'"
        )
    return bundled[name](config)
