"""Is a checkpoint step whole, and is what it holds what was saved?

Orbax lists every directory named like a step, committed or not, so each step is checked
before it is used: its commit marker, its metadata, and every file and byte range the
array store's index points at (metadata only, writing nothing). Orbax stores array chunks
without a data checksum, so a flipped bit would load silently: every array's checksum is
saved with the step and compared after restore (`checksums`). Every other item of a step
(the data position, the config, the eval metrics: whatever the step holds as JSON) has its
digest saved beside the arrays' checksums (`item_digests`) and checked whenever the step is
vetted (`damage`): a changed byte there is damage too, never the user's doing.

A failure is either damage (the step is set aside and an older one used) or the
environment failing under the run (permission, an I/O or network file system error):
then the run stops with StorageError and the step is left as it is (`environmental`).
"""

import errno
import hashlib
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from absl import logging

from jaxtrain.errors import StorageError
from jaxtrain.sharding import path_str

_STEP_NAME = re.compile(r"0|[1-9]\d*")  # Orbax's default step directory names
COMMIT_MARKER = "commit_success.txt"  # written last, just before the step is renamed in place
CHECKSUMS_ITEM = "checksums"
# An item's digest sits in the checksums item under this prefix, beside the arrays' paths
# (which never start with it). Steps saved before item digests existed have none: their
# JSON items are vetted for readability only.
ITEM_DIGEST_PREFIX = "item:"
# Where Orbax keeps a JSON item's content inside the step (the step's metrics: its own file).
_ITEM_FILES = {"metrics": ("metrics", "metrics")}

# Errors of the environment, not of the checkpoint's bytes: retrying later may succeed.
_ENVIRONMENTAL = {
    errno.EACCES,
    errno.EPERM,
    errno.EIO,
    errno.ESTALE,
    errno.ENOTCONN,
    errno.ETIMEDOUT,
    errno.EHOSTDOWN,
    errno.ECONNRESET,
    errno.ENOMEM,
}
_ENVIRONMENTAL_STATUS = ("PERMISSION_DENIED", "UNAVAILABLE", "DEADLINE_EXCEEDED")


def environmental(error: BaseException) -> bool:
    """True when a read failed for the environment's sake, not the data's (see module doc)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in _ENVIRONMENTAL:
            return True
        text = str(error)
        code = re.search(r"os_error_code='?(\d+)", text)  # TensorStore keeps the errno here
        if (code and int(code.group(1)) in _ENVIRONMENTAL) or text.startswith(
            _ENVIRONMENTAL_STATUS
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


def _mix(x):
    # murmur3's 32-bit finaliser: a bijection of uint32, so one changed value always
    # changes its term of the sum.
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _array_checksum(x) -> jax.Array:
    """A uint32 of an array's bits and positions, the same for any sharding of it.

    Sum over elements of mix(bits ^ mix(flat index)) modulo 2**32: addition modulo 2**32 is
    associative and commutative, so the devices' partial sums give one answer whatever
    the layout; a single changed element (a flipped bit) always changes it, and any other
    change does but with probability 2**-32.
    """
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)  # 8 bytes: [..., 2]
    index = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(bits.ndim)):  # the flat index, built without a reshape
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, dim) * jnp.uint32(stride)
        stride *= bits.shape[dim]
    return jnp.sum(_mix(bits ^ _mix(index + jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)


_checksums_jit = jax.jit(lambda tree: jax.tree.map(_array_checksum, tree))


def checksums(tree) -> dict[str, int]:
    """{path: checksum} of every array of a (sharded) pytree, computed on its devices."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    sums = jax.device_get(_checksums_jit(tree))
    return {
        path_str(path): int(value)
        for (path, _), value in zip(leaves, jax.tree.leaves(sums), strict=True)
    }


def checksum_mismatch(tree, saved: dict[str, int]) -> str | None:
    """The first array whose checksum differs from the saved one, as a reason, or None."""
    for path, value in checksums(tree).items():
        if path not in saved:
            return f"array {path} has no saved checksum"
        if np.uint32(saved[path]) != np.uint32(value):
            return f"array {path} does not match its checksum (the bytes changed after saving)"
    return None


def _digest(value) -> str:
    # Of the parsed value, not the file's bytes: what a reader gets is what is verified,
    # whatever whitespace or key order the writer chose.
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def item_digests(items: dict) -> dict[str, str]:
    """{"item:NAME": digest} of a step's JSON items, saved in its checksums item.

    Args:
      items: {item name: the JSON value saved as that item}; every JSON item a step holds.
    """
    return {f"{ITEM_DIGEST_PREFIX}{name}": _digest(value) for name, value in items.items()}


def item_mismatch(items: dict, saved: dict) -> str | None:
    """The first of `items` ({name: value read back}) whose digest differs from the saved
    one, as a reason, or None. An item the step saved no digest of is not checked."""
    for name, value in items.items():
        want = saved.get(f"{ITEM_DIGEST_PREFIX}{name}")
        if want is not None and want != _digest(value):
            return f"item {name!r} does not match its digest (its bytes changed after saving)"
    return None


def _read_item(step_dir: str, name: str):
    return _read_json(step_dir, *_ITEM_FILES.get(name, (name, "metadata")))


def _item_damage(step_dir: str, items: dict) -> str | None:
    """The JSON items the checksums item has a digest of, compared with it; `items` holds
    those already read ({name: value}), the others are read here."""
    saved = items[CHECKSUMS_ITEM]
    if not isinstance(saved, dict):
        return f"{CHECKSUMS_ITEM}/metadata is not a JSON object"
    digested = [k[len(ITEM_DIGEST_PREFIX) :] for k in saved if k.startswith(ITEM_DIGEST_PREFIX)]
    read = {name: items[name] if name in items else _read_item(step_dir, name) for name in digested}
    return item_mismatch(read, saved)


def damage(step_dir: str) -> str | None:
    """Why the checkpoint step in `step_dir` is incomplete or damaged, or None if it is whole.

    Reads metadata only (no array data), so it is cheap, and writes nothing. Every JSON
    item with a saved digest (data position, config, metrics) is compared with it. A file that
    is damaged inside its bytes but has its full length still passes; `Checkpointer.restore`
    catches it by its checksum, or when it fails to read, and falls back to an older step.

    Raises:
      StorageError: the step could not be read for the environment's sake (permission, an
        I/O error): nothing is known about the step, which must not be set aside.
    """
    if not os.path.isfile(os.path.join(step_dir, COMMIT_MARKER)):
        return f"no commit marker ({COMMIT_MARKER}): the save never finished"
    try:
        _read_json(step_dir, "_CHECKPOINT_METADATA")
        names = ["data", "config", CHECKSUMS_ITEM]
        if os.path.exists(os.path.join(step_dir, "metrics")):
            names.append("metrics")
        items = {name: _read_item(step_dir, name) for name in names}  # each must parse
        problem = _item_damage(step_dir, items)
        if problem:
            return problem
        if _read_json(step_dir, "state", "_METADATA").get("use_ocdbt", True):
            return _array_store_damage(os.path.join(step_dir, "state"))
    except (OSError, ValueError) as e:  # missing, unreadable or not JSON
        if environmental(e):
            raise StorageError(f"cannot read checkpoint {step_dir!r}: {reason(e)}") from e
        return reason(e, relative_to=step_dir)
    return None


def saved_json(step_dir: str, item: str):
    """A JSON item of a step (`config`, `checksums`, `data`) as Orbax wrote it."""
    return _read_json(step_dir, item, "metadata")


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
        if environmental(e):
            raise StorageError(f"cannot read checkpoint {state_dir!r}: {reason(e)}") from e
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
        if warn and os.path.isdir(path):  # not one that retention has just deleted
            logging.warning("skipping checkpoint step %d (%s): %s", step, path, problem)
    return None
