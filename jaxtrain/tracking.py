"""Experiment tracking beside `metrics.jsonl`: TensorBoard's HParams, Weights & Biases.

`MetricWriter` (process 0) owns both. At its start the run's config goes to TensorBoard's
HParams dashboard, in the run's own event directory (`DIR/tensorboard`), and, when
`config.logging.wandb` is on, to a W&B run's config; every record it writes then goes to
W&B as well, as `split/metric` at its step.

wandb is optional (`pip install "jaxtrain[wandb]"`) and imported only when enabled. It
works without a network with `WANDB_MODE=offline`: the run is kept under `DIR/wandb/`
for `wandb sync` later. A resumed run continues the same W&B run: its id is kept in
`DIR/wandb/run_id`.
"""

import importlib.util
import json
import os
import secrets
import string

from absl import logging

from jaxtrain import files
from jaxtrain.checks import require
from jaxtrain.errors import ConfigError

# Where a run directory keeps the id of its W&B run, so a rerun (resume) continues it.
WANDB_RUN_ID_FILE = os.path.join("wandb", "run_id")


def check_config(logging_config) -> None:
    """Rejects a bad `config.logging` before anything is written.

    Raises:
      ConfigError: a field of the wrong type, or W&B enabled without wandb installed.
    """
    wandb = logging_config.wandb
    require(isinstance(wandb, bool), "logging.wandb", wandb, "True or False")
    for key in ("wandb_project", "wandb_entity", "wandb_name"):
        value = logging_config[key]
        require(isinstance(value, str), f"logging.{key}", value, "a string")
    if logging_config.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "config.logging.wandb=True needs the wandb package, which is not installed: "
            "pip install 'jaxtrain[wandb]' (or pip install wandb)"
        )


def flatten(config: dict, prefix: str = "") -> dict[str, bool | int | float | str]:
    """A nested config dict as `{"optim.lr": 0.003, ...}` with values HParams can show.

    Numbers, booleans and strings stay as they are; anything else (the rules, a tuple of
    features, None) becomes its JSON text, so every field appears.
    """
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def write_hparams(event_file, config: dict) -> None:
    """Records the config in TensorBoard's HParams dashboard, in the run's event file.

    Args:
      event_file: a `jaxtrain.metrics.EventFile` (anything with `add_summary(summary)`).
      config: the run's resolved config, as a nested dict.

    tensorboardX's `add_hparams` would open a new, timestamped subdirectory: a second run
    in TensorBoard's list, apart from the run's scalars. Writing only the session-start
    summary into the run's own event file keeps one run, and leaves the metric columns
    to TensorBoard, which takes them from the run's scalar tags (train/loss, eval/loss...).
    """
    from tensorboardX.summary import hparams

    _, session_start, _ = hparams(flatten(config), {})
    event_file.add_summary(session_start)


class WandbRun:
    """A W&B run that mirrors the MetricWriter's records (`config.logging.wandb`).

    W&B is a copy of what `metrics.jsonl` holds: if it fails (no login, no network, its
    service gone), there is one warning and training goes on without it.

    Args:
      workdir: the run directory; W&B keeps its files under `workdir/wandb/`.
      config: the run's resolved config, as a nested dict (W&B's run config).
    """

    def __init__(self, workdir: str, config: dict):
        import wandb

        fields = config["logging"]
        self._run = None
        run_id = _run_id(workdir)  # outside the try: a file of ours that fails is exit 74
        try:
            self._run = wandb.init(
                project=fields["wandb_project"] or None,
                entity=fields["wandb_entity"] or None,
                name=fields["wandb_name"]
                or os.environ.get("WANDB_NAME")
                or os.path.basename(os.path.abspath(workdir)),
                id=run_id,
                resume="allow",
                dir=workdir,
                config=config,
            )
        except Exception as e:  # wandb raises its own kinds (UsageError, CommError, ...)
            self._warn("cannot start a W&B run", e)

    def log(self, step: int, split: str, scalars: dict[str, float]) -> None:
        """Logs `{split}/{metric}` at `step` (train and eval of one step share a row)."""
        if self._run is None:
            return
        try:
            self._run.log({f"{split}/{k}": v for k, v in scalars.items()}, step=step)
        except Exception as e:
            self._warn(f"cannot log step {step} to W&B", e)
            self._run = None

    def close(self) -> None:
        """Finishes the run (an offline run is then complete for `wandb sync`)."""
        run, self._run = self._run, None
        if run is not None:
            try:
                run.finish()
            except Exception as e:
                self._warn("cannot finish the W&B run", e)

    @staticmethod
    def _warn(what: str, error: Exception) -> None:
        logging.warning(
            "%s (%s: %s); training goes on, logging to metrics.jsonl and TensorBoard only",
            what,
            type(error).__name__,
            error,
        )


def _run_id(workdir: str) -> str:
    """The W&B run id of this run directory: read back on a rerun, made on the first.

    Raises:
      StorageError: the file cannot be read or written, naming it.
    """
    path = os.path.join(workdir, WANDB_RUN_ID_FILE)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            run_id = f.read().strip()
        if run_id:
            return run_id
    except FileNotFoundError:
        pass
    except OSError as e:
        raise files.storage_error("read", path, e) from e
    # W&B's own ids look like this: 8 lowercase letters and digits.
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        files.write_atomically(path, run_id + "\n")
    except OSError as e:
        raise files.storage_error("write", path, e) from e
    return run_id
