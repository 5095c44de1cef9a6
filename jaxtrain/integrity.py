"""Is a checkpoint step whole? Checks that read metadata only and write nothing.

Orbax lists every directory named like a step, committed or not, so each step is checked
before it is used: its commit marker, its metadata, and every file and byte range the
array store's index points at.
"""

import json
import os
import re

import tensorstore as ts
from absl import logging

_STEP_NAME = re.compile(r"0|[1-9]\d*")  # Orbax's default step directory names
COMMIT_MARKER = "commit_success.txt"  # written last, just before the step is renamed in place


def damage(step_dir: str) -> str | None:
    """Why the checkpoint step in `step_dir` is incomplete or damaged, or None if it is whole.

    Reads metadata only (no array data), so it is cheap, and writes nothing. A file that
    is damaged inside its bytes but has its full length still passes; `Checkpointer.restore`
    falls back to an older step when such a file fails to read.
    """
    if not os.path.isfile(os.path.join(step_dir, COMMIT_MARKER)):
        return f"no commit marker ({COMMIT_MARKER}): the save never finished"
    try:
        _read_json(step_dir, "_CHECKPOINT_METADATA")
        for item in ("data", "config"):
            _read_json(step_dir, item, "metadata")
        if os.path.exists(os.path.join(step_dir, "metrics")):
            _read_json(step_dir, "metrics", "metrics")
        if _read_json(step_dir, "state", "_METADATA").get("use_ocdbt", True):
            return _array_store_damage(os.path.join(step_dir, "state"))
    except (OSError, ValueError) as e:  # missing, unreadable or not JSON
        return reason(e, relative_to=step_dir)
    return None


def _read_json(step_dir: str, *parts: str):
    with open(os.path.join(step_dir, *parts), encoding="utf-8") as f:
        try:
            return json.load(f)
        except ValueError:
            raise ValueError(f"{'/'.join(parts)} is not valid JSON") from None


def _array_store_damage(state_dir: str) -> str | None:
    """Walks the OCDBT B-tree and checks each value's file holds the byte range it points at."""
    store = ts.KvStore.open({"driver": "file", "path": state_dir + "/"}).result()
    try:
        manifest = ts.ocdbt.dump(store).result()
        versions = manifest.get("versions") or [{}]
        pending = [versions[-1].get("root", {}).get("location")]
        if pending[0] is None:
            return "the array store is empty"
        sizes: dict[str, int] = {}
        while pending:
            for entry in ts.ocdbt.dump(store, pending.pop()).result()["entries"]:
                if "location" in entry:  # an interior node: its children are checked in turn
                    pending.append(entry["location"])
                elif "indirect_value" in entry:
                    # "value:<base>:<relative path>:<offset>:<length>"
                    file_id, offset, length = entry["indirect_value"].rsplit(":", 2)
                    path = os.path.join(state_dir, *file_id.split(":", 2)[1:])
                    if path not in sizes:
                        sizes[path] = os.path.getsize(path) if os.path.isfile(path) else -1
                    relative = os.path.relpath(path, os.path.dirname(state_dir))
                    if sizes[path] < 0:
                        return f"array file {relative} is missing"
                    if sizes[path] < int(offset) + int(length):
                        return f"array file {relative} is truncated ({sizes[path]} bytes)"
    except ValueError as e:  # tensorstore: a manifest or B-tree node missing or cut short
        return f"the array index does not read: {reason(e)}"
    return None


def reason(error: Exception, relative_to: str | None = None) -> str:
    """A short reason for an I/O failure from Python, Orbax or TensorStore."""
    while error.__cause__ is not None:  # Orbax wraps TensorStore's error, which says what broke
        error = error.__cause__
    if isinstance(error, OSError) and error.strerror:
        if not error.filename:
            return error.strerror
        name = os.path.relpath(error.filename, relative_to) if relative_to else error.filename
        return f"{name}: {error.strerror}"
    code = re.search(r"os_error_code='?(\d+)", str(error))  # TensorStore keeps the errno here
    if code:
        return os.strerror(int(code.group(1)))
    line = (str(error).strip().splitlines() or [""])[0][:200]
    # TensorStore's errors are ValueErrors whose text starts with a status: NOT_FOUND, ...
    return line if isinstance(error, ValueError) and line else f"{type(error).__name__}: {line}"


def steps(directory: str) -> list[int]:
    """Step numbers of the step directories in `directory`, newest first."""
    if not os.path.isdir(directory):
        return []
    names = [n for n in os.listdir(directory) if _STEP_NAME.fullmatch(n)]
    return sorted((int(n) for n in names), reverse=True)


def newest_whole_step(directory: str, warn: bool = False) -> int | None:
    for step in steps(directory):
        path = os.path.join(directory, str(step))
        problem = damage(path)
        if problem is None:
            return step
        if warn:
            logging.warning("skipping checkpoint step %d (%s): %s", step, path, problem)
    return None
