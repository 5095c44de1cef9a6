"""The run directory: one run at a time, and a resumed run that is the same run.

with WorkdirLock(workdir):          # exclusive for the run's life; the OS frees it on death
    check_resume_config(saved, config_dict, allow=...)
    write_config(workdir, config_dict)
"""

import datetime
import fcntl
import json
import os
import socket

import jax

from jaxtrain import files
from jaxtrain.errors import ConfigError, StorageError

LOCK_FILE = ".jaxtrain.lock"

# Config fields a resumed run may change on purpose: how long it runs, what it logs,
# measures and keeps and where to (logging), where it runs (mesh, rules, precision,
# microbatches: the same math elsewhere).
# Any other change (model, data, batch, seed, optimizer, task) makes a different run.
CHANGEABLE = (
    "num_train_steps",
    "log_every_steps",
    "eval_every_steps",
    "eval_steps",
    "checkpoint_every_steps",
    "checkpoint",
    "nonfinite",
    "logging",
    "mesh",
    "rules",
    "param_axes",
    "microbatches",
    "precision",
    "data.prefetch",
    "data.read_threads",
    "data.data_dir",
    "compilation_cache",
    "profile",
    "energy",
)


class WorkdirLock:
    """An exclusive lock on a workdir for one run's lifetime (process 0 of a job takes it).

    `flock` on `workdir/.jaxtrain.lock`: the OS releases it when the process dies, kill -9
    included, so a rerun after a crash is never refused. Taking it changes no byte of an
    existing lock file; `claim()` records this run (pid, host, start time) once the run's
    checks have passed, for the message a second run gets.

    Raises (on entry):
      ConfigError: another run holds the workdir: one line naming it (pid, host); or the
        path is not a directory (a file, a dangling symlink, under a file).
      StorageError: the lock file cannot be created (read-only file system, ...).
    """

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_FILE)
        self._fd = None

    def __enter__(self):
        if jax.process_index() != 0:
            return self
        _check_is_directory(self.workdir)
        try:
            os.makedirs(self.workdir, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except NotADirectoryError:  # a parent became a file after the check
            _check_is_directory(self.workdir)
            raise
        except OSError as e:
            raise StorageError(f"cannot lock workdir {self.workdir!r}: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise ConfigError(
                f"workdir {self.workdir!r} is in use by another run ({holder}); wait for it "
                "to end, or stop it, or use another --workdir"
            ) from None
        self._fd = fd
        return self

    def claim(self) -> None:
        """Records this run as the holder."""
        if self._fd is None:
            return
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        data = json.dumps(record).encode()
        try:
            # Over the old record, then cut to length: on a full disk its pages are still
            # there to write over (truncating first would give them up).
            written = 0
            while written < len(data):  # a partial write, then EFBIG past `ulimit -f`
                written += os.pwrite(self._fd, data[written:], written)
            os.ftruncate(self._fd, len(data))
        except OSError as e:
            raise files.storage_error("write", self.path, e) from e

    def __exit__(self, *exc):
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None
        return False


def _check_is_directory(workdir: str) -> None:
    """Refuses a workdir path that is, or is under, something other than a directory.

    Raises:
      ConfigError: naming the path and what it is.
    """
    path = os.path.abspath(workdir)
    while True:
        if os.path.islink(path) and not os.path.exists(path):
            what = f"a symlink to {os.readlink(path)!r}, which does not exist"
        elif os.path.lexists(path) and not os.path.isdir(path):
            what = "a file" if os.path.isfile(path) else "not a directory"
        else:
            parent = os.path.dirname(path)
            if parent == path or os.path.lexists(path):
                return
            path = parent
            continue
        where = "" if path == os.path.abspath(workdir) else f" (under {path!r}, which is {what})"
        raise ConfigError(
            f"workdir {workdir!r} is not a directory"
            + (where or f": it is {what}")
            + "; give a directory (made if missing)"
        )


def _describe_holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        record = {}
    if "pid" not in record:
        return "it has not recorded itself yet"
    return f"pid {record['pid']} on {record.get('host', '?')}, since {record.get('since', '?')}"


def _flatten(tree, prefix="") -> dict[str, object]:
    if isinstance(tree, dict):
        flat = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def config_changes(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(field, saved value, current value) for every field that differs, dotted, sorted.

    A field the saved config lacks that holds configs/base.py's default now is no
    change: jaxtrain added it after the run was saved (`optim.ema_decay`), and its
    default is what the run did without it.
    """
    old, new, default = _flatten(saved), _flatten(current), _flatten(_base_defaults())
    missing = object()
    return [
        (key, old.get(key, missing), new.get(key, missing))
        for key in sorted(set(old) | set(new))
        if old.get(key, missing) != new.get(key, missing)
        and not (key not in old and key in default and new[key] == default[key])
    ]


def _base_defaults() -> dict:
    from jaxtrain.configs import base

    # As config.json holds it (tuples as lists).
    return json.loads(json.dumps(base.get_config().to_dict()))


def check_resume_config(saved: dict, current: dict, *, allow: bool, step: int) -> list[str]:
    """Refuses to resume a run whose config changed what the run means.

    Args:
      saved: the config stored with the checkpoint being resumed (JSON-like dicts).
      current: this run's config, the same way.
      allow: resume anyway (`config.checkpoint.allow_config_changes`).
      step: the checkpoint's step, for the message.

    Returns:
      The changed fields, "field: old -> new", changeable ones included (for the log).

    Raises:
      ConfigError: a field outside CHANGEABLE differs and `allow` is False; one line with
        the differences.
    """
    changes = config_changes(saved, current)
    shown = [f"{key}: {_show(old)} -> {_show(new)}" for key, old, new in changes]
    refused = [
        line
        for (key, _, _), line in zip(changes, shown, strict=True)
        if not any(key == c or key.startswith(c + ".") for c in CHANGEABLE)
    ]
    if refused and not allow:
        raise ConfigError(
            f"the checkpoint (step {step}) was trained with a different config: "
            f"{'; '.join(refused)}. Resuming would not continue the same run; use another "
            "--workdir, or set --config.checkpoint.allow_config_changes=True to resume anyway "
            f"(changeable without it: {', '.join(CHANGEABLE)})"
        )
    return shown


def _show(value) -> str:
    return (
        "(none)"
        if not isinstance(value, str | int | float | bool | list | type(None))
        else json.dumps(value)
    )


def write_config(workdir: str, config_dict: dict) -> None:
    """Writes `workdir/config.json` (process 0), atomically: a kill never leaves half of it.

    Raises:
      StorageError: the workdir cannot be written.
    """
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, "config.json")
    try:
        files.write_atomically(path, json.dumps(config_dict, indent=2))
    except OSError as e:
        raise StorageError(f"cannot write {path!r}: {e.strerror}") from e
