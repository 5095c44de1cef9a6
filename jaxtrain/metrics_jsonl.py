"""The format of `metrics.jsonl`, its reader, and its repair when a run starts.

`metrics.jsonl` is JSON lines, one record per line: `{"step": int, "split": str,
"<metric>": number, ...}`, readable by strict JSON readers (jq, JavaScript, `json.loads`
refusing constants). A non-finite value is written as a string, as protobuf's JSON
mapping writes floats: "NaN", "Infinity", "-Infinity" (`read_records` gives them back as
floats; files written before, with bare `NaN`, are still read, and rewritten strict at
the next start). It is a log, so a start never refuses it: records past the checkpoint
being resumed are dropped (the rerun logs them again), and lines that are not records
(damaged bytes, not UTF-8, not a JSON object, a step that is not an integer) are moved to
`metrics.jsonl.damaged`, with one warning saying how many and where.

Nothing here imports jax: `jaxtrain plot` and notebooks read logs without it.
"""

import json
import math
import os

from absl import logging

from jaxtrain import files

# As protobuf's JSON mapping writes non-finite floats.
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _to_json(value):
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    return value


def encode_record(record: dict) -> str:
    """One record as the JSON line `metrics.jsonl` holds (no newline); strict JSON."""
    return json.dumps({k: _to_json(v) for k, v in record.items()}, allow_nan=False)


def decode_record(value) -> dict | None:
    """A parsed JSON line as a record, non-finite strings back to floats; None where it is
    not one: not an object, a step that is not an integer, a split that is not a string,
    a metric that is not a number."""
    if not isinstance(value, dict):
        return None
    step, split = value.get("step"), value.get("split")
    if not isinstance(step, int) or isinstance(step, bool):
        return None
    if not isinstance(split, str):
        return None
    record = {"step": int(step), "split": split}
    for key, v in value.items():
        if key in record:
            continue
        if isinstance(v, str) and v in _NONFINITE:
            v = _NONFINITE[v]
        elif isinstance(v, bool) or not isinstance(v, int | float):
            return None
        record[key] = v
    return record


def _parse_line(raw: bytes) -> dict | None:
    try:
        return decode_record(json.loads(raw.decode("utf-8")))
    except ValueError:  # not UTF-8 (UnicodeDecodeError is one), or not JSON
        return None


def read_records(path: str) -> list[dict]:
    """The records of a `metrics.jsonl`, in file order; lines that are not records are
    skipped (`resume_log` sets them aside at a run's start).

    Raises:
      OSError: the file cannot be read.
    """
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    return [r for r in map(_parse_line, lines) if r is not None]


def resume_log(path: str, last_step: int) -> None:
    """Makes `metrics.jsonl` the log of a run resuming after `last_step`, before it appends.

    Records logged after `last_step` are dropped (the run logs them again); lines that are
    not records go to `PATH.damaged` (appended, kept for inspection), with one warning; a
    last line without its newline gets one; records with bare `NaN` are rewritten strict.
    Whole records up to `last_step` are kept, byte for byte. The file is replaced in one
    rename, so a failure leaves it as it was.

    Raises:
      StorageError: the file cannot be read or rewritten (disk full, ...), naming it.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return
    except OSError as e:
        raise files.storage_error("read", path, e) from e
    kept, damaged = [], []
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue  # blank, or the end of a file that ends with its newline
        record = _parse_line(raw)
        if record is None:
            damaged.append((number, raw))
        elif record["step"] <= last_step:
            if any(isinstance(v, float) and not math.isfinite(v) for v in record.values()):
                raw = encode_record(record).encode()  # an old bare NaN: strict from now on
            kept.append(raw + b"\n")
    contents = b"".join(kept)
    if contents == data:
        return
    if damaged:
        aside = f"{path}.damaged"
        try:  # first: if rewriting the log then fails, its lines are still in the log
            fd = files.open_for_appending(aside)
            try:
                files.append_line(fd, b"".join(raw + b"\n" for _, raw in damaged))
            finally:
                os.close(fd)
        except OSError as e:
            raise files.storage_error(
                "set aside unreadable lines of metrics.jsonl in", aside, e
            ) from e
        numbers = [n for n, _ in damaged]
        shown = ", ".join(map(str, numbers[:10])) + (", ..." if len(numbers) > 10 else "")
        logging.warning(
            "%s: %d line(s) that are not metric records (line %s) moved to %s; every "
            "whole record is kept",
            path,
            len(damaged),
            shown,
            aside,
        )
    try:
        files.write_atomically(path, contents)
    except OSError as e:
        raise files.storage_error("rewrite", path, e) from e
