"""What the loop does when a step's loss or gradients are not finite (config.nonfinite).

The train step never applies such an update (see steps.make_train_step); this module
decides what happens next. It reads each step's `finite` flag one step late, while the
device already runs the next step, so the check costs one scalar transfer per step.

A float16 loss-scale overflow (`overflow`: finite loss, gradients that overflowed only
because the loss was scaled up) is not a non-finite step: the train step has skipped it
and halved the scale, as dynamic loss scaling expects, so no policy acts on it, `abort`
included. At a scale of 1 an overflow is real and comes here like any other.
"""

import json
import os

import jax
import numpy as np

from jaxtrain import metrics
from jaxtrain.checks import is_int, require
from jaxtrain.errors import EXIT_NONFINITE, ConfigError  # noqa: F401 (re-exported)
from jaxtrain.sharding import path_str

POLICIES = ("abort", "skip", "rollback")


class NonFiniteError(RuntimeError):
    """The run stopped on a non-finite loss or gradient; the message says where."""


def check_config(nonfinite_config) -> None:
    """Raises ConfigError for an unknown policy (called before a run writes anything)."""
    if nonfinite_config.policy not in POLICIES:
        raise ConfigError(
            f"config.nonfinite.policy={nonfinite_config.policy!r}; choose one of {POLICIES}"
        )
    skips = nonfinite_config.max_consecutive_skips
    require(
        is_int(skips) and skips >= 0, "nonfinite.max_consecutive_skips", skips, "an integer >= 0"
    )


class NonFinitePolicy:
    """Applies config.nonfinite to each step's result.

    Args:
      nonfinite_config: `config.nonfinite` (policy, max_consecutive_skips).
      workdir: where an abort writes its report and the offending batch.
      checkpointer: the run's Checkpointer, for rollback.
      abstract_state: the run's abstract TrainState: target shardings for a rollback
        restore, and the parameter paths a report names.
    """

    def __init__(self, nonfinite_config, workdir, checkpointer, abstract_state):
        check_config(nonfinite_config)
        self._policy = nonfinite_config.policy
        self._max_in_a_row = nonfinite_config.max_consecutive_skips
        self._workdir = workdir
        # In the order of jax.tree.leaves(params), which the step's leaf index refers to.
        self._paths = [
            path_str(path)
            for path, _ in jax.tree_util.tree_flatten_with_path(abstract_state.params)[0]
        ]
        self._checkpointer = checkpointer
        self._abstract_state = abstract_state
        self._in_a_row = 0

    def check(self, step: int, step_metrics: dict, local_batch: dict, state):
        """Returns the state to continue from after `step` (a later step may be queued).

        Raises:
          NonFiniteError: policy "abort", too many non-finite steps in a row, or nothing
            to roll back to.
        """
        if bool(np.asarray(step_metrics["finite"])):  # waits for `step` only
            self._in_a_row = 0
            return state
        if bool(np.asarray(step_metrics.get("overflow", False))):
            return state  # skipped on device, the loss scale halved: nothing to decide
        self._in_a_row += 1
        loss = float(np.asarray(step_metrics["loss"]))
        leaf = int(np.asarray(step_metrics["first_nonfinite_leaf"]))
        if bool(np.asarray(step_metrics["nonfinite_in_update"])):
            what = (
                f"step {step}: the update would make the state non-finite (loss={loss}, "
                f"gradients finite; first non-finite parameter: {self._paths[leaf]}): a NaN "
                "or huge learning rate, or an optimizer state that overflowed"
            )
        else:
            where = f"first non-finite gradient: {self._paths[leaf]}" if leaf >= 0 else "loss"
            what = f"step {step}: non-finite loss or gradients (loss={loss}, {where})"
        if self._in_a_row > self._max_in_a_row and self._policy != "abort":
            return self._abort(step, f"{what}; {self._in_a_row} in a row", local_batch, loss)
        if self._policy == "skip":
            metrics.console(f"{what}; update skipped ({self._in_a_row} in a row)")
            return state
        if self._policy == "rollback":
            self._checkpointer.wait_until_finished()  # a failed save surfaces here, clearly
            good = self._checkpointer.manager.latest_step()
            if good is None:
                return self._abort(
                    step, f"{what}; no checkpoint to roll back to", local_batch, loss
                )
            restored, _ = self._checkpointer.restore(good, self._abstract_state)
            metrics.console(
                f"{what}; rolled back to checkpoint {good}, continuing with the "
                "batches after the offending one"
            )
            # Step numbers and the data stream go on forward: the batches since the
            # checkpoint are passed over, not replayed.
            return restored.replace(
                step=state.step, skipped=state.skipped, loss_scale=state.loss_scale
            )
        return self._abort(step, what, local_batch, loss)

    def _abort(self, step, what, local_batch, loss):
        stem = os.path.join(self._workdir, f"nonfinite_step{step}")
        batch_file = f"{stem}.process{jax.process_index()}.npz"
        # This process's rows, as the pipeline made them.
        flat = jax.tree_util.tree_flatten_with_path(local_batch)[0]
        np.savez(batch_file, **{path_str(path): np.asarray(x) for path, x in flat})
        if jax.process_index() == 0:
            with open(f"{stem}.json", "w", encoding="utf-8") as f:
                json.dump(
                    {
                        "step": step,
                        "loss": loss,
                        "report": what,
                        "batch": os.path.basename(batch_file),
                    },
                    f,
                    indent=2,
                )
        raise NonFiniteError(f"{what}; report and batch saved as {stem}.*")
