"""Thin Orbax wrapper: save, restore onto the current shardings, retention.

A checkpoint step holds four items: `state` (the TrainState: step, params, optimizer
state, model state, RNG), `data` (the input iterator's position, JSON), `config` (JSON)
and `checksums` (every state array's checksum and every other item's digest, JSON), so a
rerun of the same command continues with the next step and the next example.

Never load garbage: each step is vetted before it is used and its arrays checked against
their checksums after restore (`jaxtrain.integrity`). A damaged step is skipped with a
warning and, once the run may write, moved aside to `<step>.damaged` for inspection, out
of the way of Orbax's retention and of the next save of that step. A step that cannot be
read because the environment failed (permission, I/O) stops the run and is left alone.
"""

import math
import os
import tempfile
import types

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from jaxtrain.checks import is_int, require
from jaxtrain.errors import ConfigError, StorageError
from jaxtrain.integrity import (
    CHECKSUMS_ITEM,
    checksum_mismatch,
    checksums,
    damage,
    environmental,
    item_digests,
    item_mismatch,
    newest_whole_step,
    reason,
    saved_json,
    steps,
)
from jaxtrain.sharding import path_str

CHECKPOINT_SUBDIR = "checkpoints"


class CheckpointWriteError(StorageError):
    """Checkpoints cannot be written (unwritable directory, disk full); older ones are intact."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)


def check_config(checkpoint_config) -> None:
    """Rejects a bad `config.checkpoint` before anything is written.

    Raises:
      ConfigError: naming the field and why.
    """
    c = checkpoint_config
    # The newest step must survive every rule: it is where a rerun resumes.
    require(
        is_int(c.keep_latest) and c.keep_latest >= 1,
        "checkpoint.keep_latest",
        c.keep_latest,
        "an integer >= 1",
    )
    for key in ("keep_best", "keep_every_steps"):
        require(
            is_int(c[key]) and c[key] >= 0, f"checkpoint.{key}", c[key], "an integer >= 0 (0 = off)"
        )
    require(c.best_mode in ("min", "max"), "checkpoint.best_mode", c.best_mode, "'min' or 'max'")
    if not c.best_metric:
        raise ConfigError("config.checkpoint.best_metric must name an eval metric, e.g. 'loss'")
    for key in ("restart_if_all_damaged", "allow_config_changes"):
        require(isinstance(c[key], bool), f"checkpoint.{key}", c[key], "True or False")


def latest_compatible_step(
    workdir: str, abstract_state, *, restart_if_all_damaged: bool = False
) -> int | None:
    """The newest whole checkpoint step in `workdir`, after checking it fits `abstract_state`.

    Damaged or incomplete steps are skipped with a warning naming each. Reads metadata
    only and writes nothing, so it can run before a run touches its workdir.

    Args:
      workdir: the run directory.
      abstract_state: the run's TrainState of ShapeDtypeStructs.
      restart_if_all_damaged: when every step is damaged, start over (None) instead of
        refusing (`config.checkpoint.restart_if_all_damaged`).

    Returns:
      The step, or None when there is none to resume from.

    Raises:
      ConfigError: `workdir/checkpoints` is not a directory (a file, a dangling link),
        the checkpoint's model variables (params, model_state) differ in
        structure or shape, or every step is damaged (throwing away the run's progress
        must be asked for).
      StorageError: a step could not be read for the environment's sake.
    """
    directory = checkpoint_dir(workdir)
    _check_directory(directory)
    step = newest_whole_step(directory, warn=True)
    if step is None:
        found = steps(directory)
        if found and not restart_if_all_damaged:
            raise ConfigError(
                f"every checkpoint in {directory!r} is damaged (steps "
                f"{', '.join(map(str, found))}; see the warnings above), so this run would "
                "start again from step 0; set --config.checkpoint.restart_if_all_damaged=True "
                "to do that (the damaged steps are kept, as <step>.damaged)"
            )
        return None
    saved = ocp.StandardCheckpointHandler().metadata(epath.Path(directory) / str(step) / "state")
    saved = getattr(saved, "tree", saved)
    parts = ("params", "model_state")
    want = _shapes({k: getattr(abstract_state, k) for k in parts})
    have = _shapes({k: saved.get(k, {}) for k in parts})
    problem = None
    for path in sorted(set(want) | set(have)):
        if path not in have:
            problem = f"{path} is in this config's model but not in the checkpoint"
        elif path not in want:
            problem = f"{path} is in the checkpoint but not in this config's model"
        elif have[path] != want[path]:
            problem = (
                f"{path} has shape {have[path]} in the checkpoint but {want[path]} in this config"
            )
        if problem:
            raise ConfigError(
                f"workdir {workdir!r} holds a checkpoint (step {step}) of a different model: "
                f"{problem}; use another --workdir or the config it was trained with"
            )
    return step


def _check_directory(directory: str) -> None:
    """Refuses, before the run writes anything, a checkpoints path that cannot be one."""
    if os.path.islink(directory) and not os.path.exists(directory):
        raise ConfigError(
            f"{directory!r} is a symbolic link to {os.readlink(directory)!r}, which does not "
            "exist: create that directory, or remove the link"
        )
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ConfigError(
            f"{directory!r} exists and is not a directory: move it away, or use another --workdir"
        )


def saved_config(workdir: str, step: int) -> dict:
    """The config a checkpoint step was saved with."""
    return saved_json(os.path.join(checkpoint_dir(workdir), str(step)), "config")


def _shapes(tree) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {path_str(path): _stored_shape(leaf) for path, leaf in leaves}


def _stored_shape(leaf) -> tuple:
    # A typed PRNG key (an RNG stream a model keeps) is stored as its raw key data.
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return tuple(jax.eval_shape(jax.random.key_data, leaf).shape)
    return tuple(leaf.shape)


def _item_handlers():
    # Named up front so that a manager that did not write the checkpoint can read it.
    return {
        "state": ocp.StandardCheckpointHandler(),
        "data": ocp.JsonCheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
        CHECKSUMS_ITEM: ocp.JsonCheckpointHandler(),
    }


class _BestEvaluated:
    """Orbax's BestN over the steps that have `metric`; the other rules handle the rest.

    Steps saved without an eval carry `{}` as metrics: BestN must neither rank them nor,
    with keep_checkpoints_without_metrics, keep them all forever.
    """

    def __init__(self, metric: str, mode: str, k: int):
        self._metric = metric
        self._best = ocp.checkpoint_managers.BestN(
            get_metric_fn=lambda metrics: metrics[metric],
            reverse=mode == "min",  # BestN keeps the end of the sorted list
            n=k,
            keep_checkpoints_without_metrics=False,
        )

    def should_preserve(self, checkpoints, *, context):
        rated = [
            info
            if info.metrics and self._metric in info.metrics
            else types.SimpleNamespace(step=info.step, time=info.time, metrics=None)
            for info in checkpoints
        ]
        return self._best.should_preserve(rated, context=context)


def _preservation_policy(c):
    policies = [ocp.checkpoint_managers.LatestN(n=c.keep_latest)]
    if c.keep_best:
        policies.append(_BestEvaluated(c.best_metric, c.best_mode, c.keep_best))
    if c.keep_every_steps:
        policies.append(ocp.checkpoint_managers.EveryNSteps(interval_steps=c.keep_every_steps))
    return ocp.checkpoint_managers.AnyPreservationPolicy(policies)


class Checkpointer:
    """Saves and restores train state, data position and config under `workdir/checkpoints`.

    Keeps the latest `keep_latest` steps, the `keep_best` best by the eval metric
    `best_metric`, and every step that is a multiple of `keep_every_steps`.
    """

    def __init__(self, workdir: str, checkpoint_config):
        """Checks the directory is writable and sets damaged steps aside.

        Raises:
          CheckpointWriteError: the checkpoint directory cannot be created or written.
        """
        check_config(checkpoint_config)
        c = checkpoint_config
        self.directory = checkpoint_dir(workdir)
        self._restart_if_all_damaged = c.restart_if_all_damaged
        self._best_metric = c.best_metric if c.keep_best else None
        self._pending_step = None  # the step whose save may still run in the background
        self._failed = False  # a save error was raised already; close() stays quiet
        try:
            if os.path.exists(self.directory) and not os.path.isdir(self.directory):
                raise NotADirectoryError(20, "exists and is not a directory")
            os.makedirs(self.directory, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.directory):
                pass
        except OSError as e:
            raise CheckpointWriteError(
                f"cannot write checkpoints to {self.directory!r}: {e.strerror or e}"
            ) from e
        if jax.process_index() == 0:
            for step in steps(self.directory):
                problem = damage(os.path.join(self.directory, str(step)))
                if problem:
                    self._set_aside(step, problem)
        _sync("jaxtrain_checkpoint_set_aside")
        metric, worst = c.best_metric, (math.inf if c.best_mode == "min" else -math.inf)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=_preservation_policy(c),
            # Setting best_fn makes Orbax store each step's eval metrics, so the best-K
            # ranking survives restarts; `best_step()` then works too.
            best_fn=lambda metrics: metrics.get(metric, worst),
            best_mode=c.best_mode,
            enable_async_checkpointing=c.async_save,
            cleanup_tmp_directories=True,  # half-written steps of a crashed run; never listed
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=_item_handlers()
        )

    def _set_aside(self, step: int, problem: str) -> None:
        """Renames a damaged step to `<step>.damaged[-N]`, which Orbax does not list."""
        path = os.path.join(self.directory, str(step))
        target, n = f"{path}.damaged", 1
        while os.path.exists(target):
            target, n = f"{path}.damaged-{n}", n + 1
        os.rename(path, target)
        logging.warning("set aside damaged checkpoint step %d as %s: %s", step, target, problem)

    def save(
        self, step: int, state, data_state: dict, config_dict: dict, eval_metrics=None
    ) -> None:
        """Starts saving (asynchronously by default); the device arrays may be reused at once.

        Args:
          step: the step number (the checkpoint's name).
          state: the TrainState.
          data_state: the input iterator's position after the last consumed batch.
          config_dict: the resolved config.
          eval_metrics: this step's evaluation metrics, if it has any.

        Raises:
          CheckpointWriteError: this save or the previous background one failed (disk
            full, directory gone read-only); the newest whole step is named and intact.
          ConfigError: `best_metric` is not among the eval metrics.
        """
        # A non-finite metric must not rank a step as best (NaN sorts anywhere).
        metrics = {k: float(v) for k, v in (eval_metrics or {}).items() if math.isfinite(v)}
        if eval_metrics and self._best_metric and self._best_metric not in eval_metrics:
            raise ConfigError(
                f"config.checkpoint.best_metric={self._best_metric!r} is not an eval metric; "
                f"the evaluation gives {sorted(metrics)}"
            )
        self.wait_until_finished()
        sums = checksums(state)  # on device, before the arrays may be donated to a step
        # Every JSON item gets a digest, so that none can change unnoticed: add a new item
        # here and it is verified like the others (integrity.damage).
        json_items = {"data": data_state, "config": config_dict}
        sums.update(item_digests({**json_items, **({"metrics": metrics} if metrics else {})}))
        try:
            saved = self.manager.save(
                step,
                metrics=metrics,  # {} = not evaluated (None would make Orbax warn each time)
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    **{name: ocp.args.JsonSave(value) for name, value in json_items.items()},
                    **{CHECKSUMS_ITEM: ocp.args.JsonSave(sums)},
                ),
            )
        except Exception as e:
            raise self._write_error(step, e) from e
        if not saved:  # Orbax skips, silently, a step not newer than its latest
            raise CheckpointWriteError(
                f"checkpoint step {step} not saved: {self.directory!r} already holds step "
                f"{self.manager.latest_step()}"
            )
        self._pending_step = step

    def restore(self, step: int, abstract_state):
        """Restores straight onto the shardings in `abstract_state` (no gather to one device).

        Each process reads only the slices its devices hold, and every array is checked
        against its saved checksum. If `step` fails to read or to match (bytes damaged in
        place), the next older step is tried with a warning naming the step and the cause;
        `state.step` says which step came back. Steps that failed are set aside once an
        older one restores.

        Returns:
          (state, data_state), or None when every step failed and
          `restart_if_all_damaged` allows starting over (they are then all set aside).

        Raises:
          StorageError: a read failed for the environment's sake (permission, I/O): the
            run stops and the step is left as it is.
          ConfigError: every step failed, and starting over was not asked for.
        """
        older = [s for s in reversed(self.manager.all_steps()) if s < step]
        failed = []
        for candidate in [step, *older]:
            path = os.path.join(self.directory, str(candidate))
            try:
                restored = self.manager.restore(
                    candidate,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=ocp.args.JsonRestore(),
                        **{CHECKSUMS_ITEM: ocp.args.JsonRestore()},
                    ),
                )
                saved_sums = restored[CHECKSUMS_ITEM]
                # The data position was vetted with the step; it is checked again as read.
                problem = checksum_mismatch(restored["state"], saved_sums) or item_mismatch(
                    {"data": restored["data"]}, saved_sums
                )
            except Exception as e:
                if environmental(e):
                    raise StorageError(f"cannot read checkpoint {path!r}: {reason(e)}") from e
                problem = reason(e)
            if problem:  # the step's own damage: try the one before
                failed.append((candidate, problem))
                logging.warning(
                    "checkpoint step %d (%s) failed to restore, trying the previous one: %s",
                    candidate,
                    path,
                    problem,
                )
                continue
            self._set_aside_all(failed)
            return restored["state"], restored["data"]
        if all("tree structures do not match" in p for _, p in failed):
            # Not damage: the run's state has another structure than what was saved.
            raise ConfigError(
                f"the checkpoints in {self.directory!r} hold a train state of another "
                "structure than this run's (another model, trainable set or optimizer, or "
                "one saved by a jaxtrain before 2026-12-08, whose optimizer state had no "
                "injected learning rate): use another --workdir"
            )
        if not self._restart_if_all_damaged:
            raise ConfigError(
                f"no checkpoint in {self.directory!r} restores ("
                + "; ".join(f"step {s}: {p}" for s, p in failed)
                + "); set --config.checkpoint.restart_if_all_damaged=True to start again "
                "from step 0 (the damaged steps are kept, as <step>.damaged)"
            )
        self._set_aside_all(failed)
        return None

    def _set_aside_all(self, failed) -> None:
        if jax.process_index() == 0:
            for bad, problem in failed:
                self._set_aside(bad, f"failed to restore: {problem}")
        _sync("jaxtrain_checkpoint_restore")
        if failed:
            self.manager.reload()

    def wait_until_finished(self) -> None:
        """Blocks until the background save, if any, has committed.

        Raises:
          CheckpointWriteError: it failed; raised once, later calls return quietly.
        """
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            if self._failed:
                return
            raise self._write_error(self._pending_step, e) from e

    def _write_error(self, step, error: Exception) -> CheckpointWriteError:
        self._failed = True
        good = newest_whole_step(self.directory)
        return CheckpointWriteError(
            f"could not save checkpoint step {step} in {self.directory!r}: {reason(error)}; "
            + (
                f"the newest whole checkpoint, step {good}, is intact"
                if good is not None
                else "there is no whole checkpoint there"
            )
        )

    def close(self) -> None:
        """Waits for pending saves (raising their errors) and releases the manager."""
        try:
            self.wait_until_finished()
        finally:
            try:
                self.manager.close()
            except Exception:
                if not self._failed:  # after a reported failure Orbax re-raises it here
                    raise


def _sync(name: str) -> None:
    if jax.process_count() > 1:  # the other processes wait for process 0's renames
        multihost_utils.sync_global_devices(name)
