"""A run directory read back: its config, its task, the state's layout and a checkpoint.

    run = jaxtrain.load_run("runs/gpt")              # the latest checkpoint, the run's mesh
    model = run.model()                              # the trained NNX model, eval mode
    metrics = evaluate_run(run, split="validation")  # what `jaxtrain eval` prints

Loading only reads: nothing is created, renamed or appended in the run directory, so a
run that is still training can be inspected while it goes on. The commands `sample`,
`eval` and `export` start here.
"""

import copy
import json
import os
import time
from typing import Any, NamedTuple

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from jaxtrain import checkpoint, checks, data, integrity, optim, sharding, steps, weights
from jaxtrain import state as state_lib
from jaxtrain import tasks as tasks_lib
from jaxtrain.errors import ConfigError, StorageError
from jaxtrain.tasks import Task
from jaxtrain.train import evaluate


class Run(NamedTuple):
    """A run's config, task, state layout and restored state (`jaxtrain.load_run`).

    Unpacks as `config, task, layout, state = jaxtrain.load_run(workdir)`.

    Attributes:
      config: the run's resolved config (`config.json`), as a ConfigDict.
      task: its `jaxtrain.Task`.
      layout: the state's `StateLayout` on the mesh it was loaded onto.
      state: the restored `TrainState` (parameters, optimizer and model state, sharded).
    """

    config: ml_collections.ConfigDict
    task: Task
    layout: state_lib.StateLayout
    state: state_lib.TrainState

    @property
    def step(self) -> int:
        """The checkpoint's step."""
        return int(self.state.step)

    @property
    def rules(self) -> sharding.Rules:
        """The run's logical-axis rules."""
        return sharding.Rules(self.config.rules)

    def model(self) -> nnx.Module:
        """The trained NNX model in eval mode (dropout off, BatchNorm statistics used)."""
        model = self.layout.merge(self.state.params, self.state.model_state)
        return steps.set_mode(model, train=False)

    def with_weights(self, which: str | None = None) -> "Run":
        """This run with `state.params` replaced by one of its weight sets, for what reads
        them (`model()`, `jaxtrain.sample`, `jaxtrain.export`; `jaxtrain.evaluate`
        evaluates every set of a state itself).

        Args:
          which: "ema": the weights' moving average (`config.optim.ema_decay`); "raw":
            the weights training produced (a schedule-free optimizer's evaluation
            parameters, `jaxtrain.weights.evaluation_weights`); None: "ema" when the run
            keeps one, else "raw" (what `jaxtrain sample` and `export` use).

        Raises:
          ConfigError: an unknown name, or "ema" for a run that keeps no EMA.
        """
        sets = weights.evaluation_weights(self.state.opt_state, self.state.params)
        [params] = weights.choose(sets, which or weights.default(sets)).values()
        return self._replace(state=self.state.replace(params=params))


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run wrote to `workdir/config.json`.

    Raises:
      ConfigError: `workdir` is not a directory, or holds no readable config.json.
    """
    if not os.path.isdir(workdir):
        raise ConfigError(f"workdir {workdir!r} does not exist or is not a directory")
    path = os.path.join(workdir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            return ml_collections.ConfigDict(json.load(f))
    except FileNotFoundError:
        raise ConfigError(
            f"workdir {workdir!r} has no config.json: not a jaxtrain run directory"
        ) from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path!r}: {e}") from e


def load_run(
    workdir: str,
    step: int | None = None,
    *,
    task: Task | None = None,
    mesh: dict[str, int] | None = None,
    devices=None,
) -> Run:
    """Loads a finished or running run: config, task, layout and a checkpoint restored.

    The state is laid out as in training, on the mesh the run's config names (or
    `mesh`), and each device reads only its own slices. Reads only; writes nothing.

    Args:
      workdir: the run directory (`jaxtrain train --workdir`).
      step: the checkpoint step to restore; None: the newest whole one.
      task: the run's task, for a run trained with a Task given in code; None: the
        task `config.task` names.
      mesh: mesh axis sizes replacing the config's (`{"data": -1}`), e.g. to load a
        run trained on a pod onto one host.
      devices: the devices for the mesh; all by default.

    Returns:
      A `Run`: (config, task, layout, state).

    Raises:
      ConfigError: no such run directory, task or checkpoint step; a mesh that does not
        fit the devices; a checkpoint of another model shape or one that does not read.
    """
    config = read_config(workdir)
    if mesh is not None:
        config.mesh = dict(mesh)
    if task is None and not config.get("task"):
        raise ConfigError(
            f"run {workdir!r} was trained with a Task given in code (its config.task is "
            "empty): pass the same task, load_run(workdir, task=...)"
        )
    if task is None:
        task = tasks_lib.from_config(config)
    try:
        device_mesh = sharding.make_mesh(config.mesh, devices)
    except ConfigError as e:
        raise ConfigError(f"{e}; load it onto another mesh (--mesh=data=-1)") from e
    tx, _ = optim.optimizer_and_schedule(
        config, task.optimizer, model=task.model, trainable=task.trainable
    )
    # config.param_axes: a run written before the field existed has none.
    rules = sharding.Rules(config.rules, param_axes=config.get("param_axes", ()))
    layout = state_lib.make_state_layout(
        task.model, tx, device_mesh, rules, trainable=task.trainable
    )
    directory = checkpoint.checkpoint_dir(workdir)
    if step is not None:
        problem = damage_of(directory, step)
        if problem:
            raise ConfigError(problem)
    # A run that is still training may delete the step being read (retention keeps the
    # newest few): that step was not damaged, and the newest one is read instead.
    for _ in range(_READ_TRIES):
        chosen = step if step is not None else _newest_step(workdir, layout.abstract_state)
        if chosen is None:
            if integrity.newest_whole_step(directory) is not None:
                continue  # listed before a newer step committed, read after the old went
            raise ConfigError(f"workdir {workdir!r} has no whole checkpoint in {directory!r}")
        try:
            return Run(
                config, task, layout, restore_state(directory, chosen, layout.abstract_state)
            )
        except ConfigError:
            if not _deleted_while_read(directory, chosen, newer_counts=step is None):
                raise
        if step is not None:
            raise ConfigError(
                f"checkpoint step {step} in {directory!r} was deleted while it was read (the "
                "run's retention, config.checkpoint, keeps only some steps): name a step it "
                "keeps with --step, or leave --step out for the newest"
            )
    raise ConfigError(
        f"the newest checkpoint in {directory!r} was deleted while it was read, "
        f"{_READ_TRIES} times in a row (a run saving very often with keep_latest=1?): try again"
    )


# Retention deletes a step only after a newer one has committed, so a second try nearly
# always reads a step that stays long enough.
_READ_TRIES = 5


def _newest_step(workdir: str, abstract_state) -> int | None:
    """`checkpoint.latest_compatible_step`, or None when the step it chose vanished as its
    metadata was read (retention, as above)."""
    try:
        return checkpoint.latest_compatible_step(workdir, abstract_state)
    except (OSError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        if integrity.newest_whole_step(checkpoint.checkpoint_dir(workdir)) is None:
            raise ConfigError(
                f"cannot read the checkpoints of {workdir!r}: {integrity.reason(e)}"
            ) from e
        return None


def _deleted_while_read(
    directory: str, step: int, *, newer_counts: bool, wait_s: float = 2.0
) -> bool:
    """Whether the step a read failed on is gone or going, rather than damaged.

    Orbax removes a step's files one by one, after a newer step has committed: a read that
    failed halfway may still see the step listed for a moment. When the newest step was
    asked for (`newer_counts`), a newer step than the one read means it was replaced.
    """
    deadline = time.monotonic() + wait_s
    while True:
        listed = integrity.steps(directory)
        if step not in listed or (newer_counts and listed[0] > step):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def damage_of(directory: str, step: int) -> str | None:
    """Why checkpoint `step` in `directory` cannot be restored, or None."""
    available = integrity.steps(directory)
    if step not in available:
        return f"no checkpoint step {step} in {directory!r}; steps: {sorted(available)}"
    problem = integrity.damage(os.path.join(directory, str(step)))
    return f"checkpoint step {step} in {directory!r} is damaged: {problem}" if problem else None


def restore_state(directory: str, step: int, abstract_state) -> Any:
    """Reads checkpoint `step`'s train state onto the shardings in `abstract_state`.

    A plain Orbax checkpointer on the step's `state` item: unlike a CheckpointManager
    (or `jaxtrain.Checkpointer`), it creates no directory and sets nothing aside. Every
    array is checked against the checksum saved with the step.

    Raises:
      ConfigError: the step does not read or match its checksums (damage), or holds
        another model's shapes.
      StorageError: the read failed for the environment's sake (permission, I/O).
    """
    step_dir = os.path.join(directory, str(step))
    reader = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    try:
        state = reader.restore(
            os.path.join(step_dir, "state"), args=ocp.args.StandardRestore(abstract_state)
        )
        problem = integrity.checksum_mismatch(
            state, integrity.saved_json(step_dir, integrity.CHECKSUMS_ITEM)
        )
    except Exception as e:  # Orbax and TensorStore raise many kinds; say which step and why
        if integrity.environmental(e):
            raise StorageError(f"cannot read checkpoint {step_dir!r}: {integrity.reason(e)}") from e
        problem = integrity.reason(e)
    finally:
        reader.close()
    if problem:
        raise ConfigError(f"checkpoint step {step} in {directory!r} does not restore: {problem}")
    return state


def eval_split_name(run: Run, split: str | None = None) -> str:
    """The data split an evaluation of `run` reads: `split`, or the config's eval split.

    A task of the user's own (an import path, or one given in code) is "eval_data": its
    own eval data, whatever split that holds.

    Raises:
      ConfigError: `split` given for a task of the user's own.
    """
    bundled = ":" not in run.config.task and run.config.task != ""
    if split is not None and not bundled:
        raise ConfigError(
            f"--split works for the bundled tasks; task {run.config.task or run.task.name!r} "
            "brings its own eval data: evaluate it without --split"
        )
    if not bundled:
        return "eval_data"  # the task's own; which split it holds is the task's business
    return split or run.config.data.eval_split


def evaluate_run(
    run: Run, split: str | None = None, eval_steps: int | None = None, weights: str | None = None
) -> dict:
    """The task's eval metrics for the run's checkpoint, as training's evaluation gives them.

    Args:
      run: from `load_run`.
      split: a data split of a bundled task's data set (`config.data.eval_split` is set
        to it); None: the task's eval data.
      eval_steps: how many global batches to evaluate, spread over the split (-1: all of
        it); None: `config.eval_steps`, as during training.
      weights: "raw" or "ema": that weight set only (`Run.with_weights`); None: each set
        the run has, named as in training ("loss", and "ema_loss" for the EMA's).

    Returns:
      {metric: value}, means over the evaluated examples.

    Raises:
      ConfigError: no eval data, an unknown split, a batch the mesh does not split,
        `eval_steps` neither positive nor -1, `weights` a set the run does not have.
    """
    if weights is not None:  # before any data is read
        run.with_weights(weights)
    config = copy.deepcopy(run.config)
    task = run.task
    if split is not None:
        eval_split_name(run, split)  # checks `split` applies
        config.data.eval_split = split
        task = tasks_lib.from_config(config)  # its eval data reads the new split
    if eval_steps is not None:
        checks.check_eval_steps(eval_steps, "eval_steps")
        config.eval_steps = eval_steps
    if task.eval_data is None:
        raise ConfigError(f"task {task.name!r} has no eval data")
    mesh, rules = run.layout.mesh, run.rules
    sharding.check_batch_split(config.global_batch_size, 1, mesh, rules)
    examples = data.as_dataset(task.eval_data)
    example = task.example or data.example_spec(examples)
    batch_shardings = data.batch_shardings(example, mesh, rules, task.batch_axes)
    abstract_batch = data.abstract_batch(example, config.global_batch_size, batch_shardings)
    with jax.set_mesh(mesh), sharding.use_rules(rules):
        eval_step = steps.jit_eval_step(
            steps.make_eval_step(task.evaluation(), run.layout), run.layout, abstract_batch
        )
        return evaluate(
            eval_step, run.state, examples, batch_shardings, task, config, weights=weights
        )
