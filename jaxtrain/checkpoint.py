"""Thin Orbax wrapper: save, restore onto the current shardings, and a compatibility check.

A checkpoint step holds three items: `state` (the TrainState: step, params, optimizer
state, RNG), `data` (the input iterator's position, JSON) and `config` (JSON), so a rerun
of the same command continues with the next step and the next batch.
"""

import os

import jax
import orbax.checkpoint as ocp

from jaxtrain.errors import ConfigError
from jaxtrain.sharding import path_str

CHECKPOINT_SUBDIR = "checkpoints"


def _item_handlers():
    # Named up front so that a manager that did not write the checkpoint can read it.
    return {
        "state": ocp.StandardCheckpointHandler(),
        "data": ocp.JsonCheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
    }


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)


def latest_compatible_step(workdir: str, abstract_state) -> int | None:
    """The latest checkpoint step in `workdir`, after checking it fits `abstract_state`.

    Reads metadata only and writes nothing, so it can run before a run touches its workdir.

    Raises:
      ConfigError: the checkpoint's parameters differ in structure or shape.
    """
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        return None
    manager = ocp.CheckpointManager(
        directory,
        item_handlers=_item_handlers(),
        options=ocp.CheckpointManagerOptions(read_only=True),
    )
    try:
        step = manager.latest_step()
        if step is None:
            return None
        saved = manager.item_metadata(step)["state"]
        saved = getattr(saved, "tree", saved)["params"]
    finally:
        manager.close()
    want = _shapes(abstract_state.params)
    have = _shapes(saved)
    problem = None
    for path in sorted(set(want) | set(have)):
        if path not in have:
            problem = f"params/{path} is in this config's model but not in the checkpoint"
        elif path not in want:
            problem = f"params/{path} is in the checkpoint but not in this config's model"
        elif have[path] != want[path]:
            problem = (
                f"params/{path} has shape {have[path]} in the checkpoint but "
                f"{want[path]} in this config"
            )
        if problem:
            raise ConfigError(
                f"workdir {workdir!r} holds a checkpoint (step {step}) of a different model: "
                f"{problem}; use another --workdir or the config it was trained with"
            )
    return step


def _shapes(tree) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {path_str(path): tuple(leaf.shape) for path, leaf in leaves}


class Checkpointer:
    """Saves and restores train state, data position and config under `workdir/checkpoints`."""

    def __init__(self, workdir: str, checkpoint_config):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=checkpoint_config.max_to_keep,
            enable_async_checkpointing=checkpoint_config.async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            checkpoint_dir(workdir), options=options, item_handlers=_item_handlers()
        )

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
        """
        self.manager.save(
            step,
            metrics={k: float(v) for k, v in eval_metrics.items()} if eval_metrics else None,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config_dict),
            ),
        )

    def restore(self, step: int, abstract_state):
        """Restores straight onto the shardings in `abstract_state` (no gather to one device).

        Returns:
          (state, data_state).
        """
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], restored["data"]

    def close(self) -> None:
        """Waits for pending saves (raising their errors) and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
