"""Input pipeline: examples -> grain -> per-process numpy batches -> global device arrays.

Every data set, a user's arrays or a TFDS data set alike, becomes a random-access
`grain.MapDataset` of examples (dicts of arrays), so the order is a pure function of the
seed, each process reads only its own slice, and the iterator position is a small dict
that the checkpoint stores.
"""

import contextlib
import errno
import fcntl
import json
import math
import os
import queue
import re
import threading
import time
from collections.abc import Mapping

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tensorflow_datasets.core.utils import file_utils

from jaxtrain.errors import ConfigError, DataError, StorageError, did_you_mean
from jaxtrain.sharding import Rules, batch_axes, check_divisible

BUNDLED = ("digits", "pysource")
_METADATA = ("dataset_info.json", "features.json")


def get_builder(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """The TFDS builder for a bundled or catalog data set name.

    Writes nothing, except that a bundled data set whose metadata no longer loads is set
    aside (its version directory renamed `*.damaged`) to be built again on first use.

    Raises:
      ConfigError: no such data set (with the closest name).
      DataError: a catalog data set whose metadata (dataset_info.json) does not load.
    """
    from jaxtrain.data import builders  # noqa: F401  (registers digits and pysource)

    if not name:
        raise ConfigError(
            f"config.data.name is empty: name a bundled data set {BUNDLED} or a TFDS catalog one"
        )
    try:
        return _builder(name, data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        known = [*BUNDLED, *tfds.list_builders(with_community_datasets=False)]
        raise ConfigError(
            f"unknown data set {name!r}{did_you_mean(name, known)}: neither bundled "
            f"{BUNDLED}, nor 'synthetic' (random examples, for timing), nor in the TFDS catalog"
        ) from None
    except _Damaged as damage:
        if not damage.bundled:
            raise damage.error() from damage.__cause__
        with _data_dir_lock(damage.root, damage.data_set):
            try:
                return _builder(name, data_dir)  # another run set it aside while this one waited
            except _Damaged:
                target = _set_aside(damage)
        print(f"data set {name!r}: {damage.cause()}; set aside as {target}", flush=True)
        return _builder(name, data_dir)  # built again by from_tfds, on first use


def _builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    try:
        return tfds.builder(name, data_dir=data_dir or None, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError:
        raise
    except Exception as e:  # the data set is there, but is its metadata what failed?
        root, version_dir = _version_dir(name, data_dir)
        if version_dir is None or not os.path.exists(os.path.join(version_dir, _METADATA[0])):
            raise
        bundled = str(tfds.core.naming.parse_builder_name_kwargs(name)[0]) in BUNDLED
        path = _metadata_file(version_dir)
        raise _Damaged(name, version_dir, path, e, bundled, root=root) from e


def _version_dir(name: str, data_dir: str | None) -> tuple[str | None, str | None]:
    """(data dir, `<data dir>/<name>/<config>/<version>`) as TFDS lays them out, or Nones."""
    try:
        dataset, kwargs = tfds.core.naming.parse_builder_name_kwargs(name)
        cls = tfds.builder_cls(str(dataset))
        configs = getattr(cls, "BUILDER_CONFIGS", None) or []
        default = getattr(cls, "DEFAULT_BUILDER_CONFIG_NAME", None)
        config = kwargs.get("config") or default or (configs[0].name if configs else None)
        root, version_dir = file_utils.get_data_dir_and_dataset_dir(
            data_dir or None, cls.name, config, kwargs.get("version") or cls.VERSION
        )
        return os.fspath(root), os.fspath(version_dir)
    except Exception:  # a name TFDS resolves some other way: not one we can name
        return None, None


def from_tfds(builder, split: str, *, data_dir: str | None = None) -> grain.MapDataset:
    """A split of a TFDS data set as examples (its records), prepared on first use.

    A bundled data set is checked too, each record of `split` read and its checksums
    verified (0.07 s for pysource's 30 MB training split): when damaged, its version
    directory is set aside as `*.damaged` (kept, never deleted), built again, and one
    line says so. Damage found later, as records are read, is a DataError naming the
    file, for every data set.

    Args:
      builder: a data set name (bundled or catalog) or a `tfds.core.DatasetBuilder`, such
        as the user's own `GeneratorBasedBuilder`; built as ArrayRecord, which needs no
        TensorFlow.
      split: the split's name ("train", "test", ...).
      data_dir: where TFDS keeps data sets, for a name; TFDS's default when None.

    Returns:
      A random-access `grain.MapDataset` of the split's records.

    Raises:
      ConfigError: an unknown data set or split.
      DataError: a data set that is not bundled is damaged (its metadata, or a shard
        missing); or a record fails to read.
    """
    if isinstance(builder, str):
        builder = get_builder(builder, data_dir)
    if jax.process_index() == 0:
        builder = _prepare(builder, split)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"jaxtrain:prepared:{builder.name}")
        builder = _from_directory(builder)  # as process 0 wrote (or checked) it
    known = builder.info.splits  # empty only for a mocked builder (tfds.testing.mock_data)
    if known and split not in known:
        raise ConfigError(
            f"data set {builder.name!r} has no split {split!r}; splits: {sorted(known)}"
        )
    return grain.MapDataset.source(CheckedSource(builder, split))


def _prepare(builder, split: str):
    """Builds a data set on first use, or a bundled one again when it is damaged; two
    runs sharing a data dir take turns, and only the first builds.

    Returns:
      The builder to read with (reloaded when another run built the data set meanwhile).

    Raises:
      ConfigError: the data dir cannot be used (not a directory, read-only, no access).
      StorageError: the disk filled or failed while building.
      DataError: a data set jaxtrain does not build is damaged (no dataset_info.json).
    """
    bundled = _is_bundled(builder)
    if builder.is_prepared() and not (bundled and _damage(builder, split)):
        return builder  # checked without the lock: the common case waits for no other run
    root = str(builder.data_dir_root)
    with _data_dir_lock(root, builder.name):
        if bundled:
            builder = _reloaded(builder)  # as the run that held the lock may have left it
            damage = _damage(builder, split) if builder.is_prepared() else _no_metadata(builder)
            if builder.is_prepared() and damage is None:
                return builder
            reason = "first use"
            if damage is not None:
                reason = f"again: {damage.cause()}; set aside as {_set_aside(damage)}"
                builder = _reloaded(builder)
        else:
            if builder.is_prepared():  # the other run built it while this one waited
                return tfds.builder_from_directory(builder.data_dir)
            if (damage := _no_metadata(builder)) is not None:
                raise damage.error()
            reason = "first use"
        print(f"preparing data set {builder.name!r} in {builder.data_dir} ({reason})", flush=True)
        tfds.disable_progress_bar()
        builder.download_and_prepare(file_format="array_record")
        return builder


@contextlib.contextmanager
def _data_dir_lock(root: str, data_set: str):
    """Holds the data dir's lock: one run at a time prepares, sets aside or rebuilds.

    Raises:
      ConfigError: the data dir cannot be used (not a directory, read-only, no access).
      StorageError: the disk filled or failed.
    """
    try:
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, ".jaxtrain-prepare.lock"), "a") as lock:
            # TFDS writes to a temporary directory and renames it into place, but two
            # builders of one data set at once collide on that rename (FileExistsError).
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
    except OSError as e:
        message = f"cannot prepare data set {data_set!r} in {root!r}: {e.strerror or e}"
        if e.errno in (errno.ENOSPC, errno.EIO, errno.EDQUOT):
            raise StorageError(message) from e
        raise ConfigError(message + " (set config.data.data_dir to a writable directory)") from e


# --- Damaged data sets: found, named, set aside --------------------------------------------


class _Damaged(Exception):
    """What is wrong with one version directory of a data set (internal: becomes a
    DataError, or for a bundled data set a rebuild)."""

    def __init__(self, data_set, version_dir, path, error, bundled, root=None):
        super().__init__(f"{path}: {error}")
        self.data_set, self.version_dir, self.path = data_set, os.fspath(version_dir), path
        self.reason, self.bundled, self.root = _short(error), bundled, root

    def cause(self) -> str:
        return f"{self.path} is damaged: {self.reason}"

    def error(self) -> StorageError:
        return _read_failure(self.data_set, self.path, self.reason, self.bundled, self.version_dir)


def _short(error) -> str:
    """The first clause of a reader's message (riegeli appends offsets and hashes)."""
    text = " ".join(str(error).split()) or type(error).__name__
    text = re.sub(r'^Failed to construct dataset "[^"]*", builder_kwargs "[^"]*": ', "", text)
    return text.split(" (computed")[0].split("; opening ")[0].split(". This likely")[0].rstrip(".")


def _read_failure(data_set, path, reason, bundled, version_dir) -> StorageError:
    """The error a file of a data set that failed to read becomes (one line)."""
    if any(s in reason for s in ("Permission denied", "Input/output error")):
        return StorageError(f"cannot read data set {data_set!r}: {path}: {reason}")
    if bundled:
        fix = "rerun: a damaged bundled data set is set aside and rebuilt when a run starts"
    else:
        fix = (
            f"rebuild it: mv {version_dir} {version_dir}.damaged, then rerun (a TFDS data "
            "set is prepared on first use) or regenerate it with its builder (tfds build)"
        )
    return DataError(f"data set {data_set!r} is damaged: {path}: {reason}; {fix}")


def _is_bundled(builder) -> bool:
    from jaxtrain.data import builders

    return isinstance(builder, builders.Digits | builders.Pysource)


def _reloaded(builder):
    """A bundled builder made again, reading its version directory as it is now."""
    config = builder.builder_config.name if builder.builder_config else None
    return type(builder)(data_dir=builder.data_dir_root, config=config, file_format="array_record")


def _metadata_file(version_dir: str) -> str:
    """The first metadata file that is missing or not JSON, or the directory."""
    for name in _METADATA:
        path = os.path.join(version_dir, name)
        try:
            with open(path, encoding="utf-8") as f:
                json.load(f)
        except (OSError, ValueError):
            return path
    return version_dir


def _no_metadata(builder) -> _Damaged | None:
    """A version directory without dataset_info.json: TFDS would "reuse" it, unreadable."""
    if not os.path.isdir(builder.data_dir):
        return None
    return _Damaged(
        builder.name,
        builder.data_dir,
        os.path.join(builder.data_dir, _METADATA[0]),
        "missing",
        _is_bundled(builder),
    )


def _from_directory(builder):
    """The data set as its files describe it (what every process reads)."""
    try:
        return tfds.builder_from_directory(builder.data_dir)
    except Exception as e:
        path = _metadata_file(builder.data_dir)
        raise _Damaged(builder.name, builder.data_dir, path, e, _is_bundled(builder)).error() from e


def _damage(builder, split: str) -> _Damaged | None:
    """What is wrong with a prepared data set's metadata or `split`'s shards, or None.

    Reads every record of the split: ArrayRecord checks each chunk's hash as it reads,
    so a flipped byte, a cut-short or empty shard and a missing one all show.
    """
    from array_record.python import array_record_module

    try:
        on_disk = tfds.builder_from_directory(builder.data_dir)  # both metadata files
    except Exception as e:
        return _Damaged(builder.name, builder.data_dir, _metadata_file(builder.data_dir), e, True)
    if split not in on_disk.info.splits:
        return None  # an unknown split: from_tfds says so
    for shard in on_disk.info.splits[split].file_instructions:
        path = os.fspath(shard.filename)
        try:
            reader = array_record_module.ArrayRecordReader(path)
            try:
                if reader.num_records() != shard.examples_in_shard:
                    raise ValueError(
                        f"{reader.num_records()} records, dataset_info.json says "
                        f"{shard.examples_in_shard}"
                    )
                reader.read_all()
            finally:
                reader.close()
        except (RuntimeError, ValueError, OSError) as e:
            return _Damaged(builder.name, builder.data_dir, path, e, True)
    return None


def _set_aside(damage: _Damaged) -> str:
    """Renames the damaged version directory out of TFDS's way; returns the new name."""
    target = f"{damage.version_dir}.damaged"
    n = 1
    while os.path.exists(target):
        n += 1
        target = f"{damage.version_dir}.damaged-{n}"
    os.rename(damage.version_dir, target)
    return target


class CheckedSource:
    """A TFDS split's records, random access; a record that fails to read (a chunk
    checksum, a cut-short or missing shard) raises DataError naming its file.

    Args:
      builder: a prepared TFDS builder.
      split: the split's name.
    """

    def __init__(self, builder, split: str):
        self._source = builder.as_data_source(split=split)
        self._builder, self._split = builder, split

    def __len__(self):
        return len(self._source)

    def __getitem__(self, index):
        try:
            return self._source[index]
        except (RuntimeError, OSError) as e:  # riegeli's errors are RuntimeErrors
            raise self._failure([index], e) from e

    def __getitems__(self, indices):
        try:
            return self._source.__getitems__(indices)
        except (RuntimeError, OSError) as e:
            raise self._failure(indices, e) from e

    def __repr__(self):
        return f"CheckedSource({self._source!r})"

    def _failure(self, indices, error) -> StorageError:
        builder = self._builder
        path = builder.data_dir
        try:  # the shard holding the first record asked for
            offset, first = 0, int(indices[0])
            for shard in builder.info.splits[self._split].file_instructions:
                if first < offset + shard.take:
                    path = os.fspath(shard.filename)
                    break
                offset += shard.take
        except Exception:  # a mocked builder has no file instructions: name the directory
            pass
        return _read_failure(
            builder.name, path, _short(error), _is_bundled(builder), builder.data_dir
        )


class ArraySource:
    """Random access over equally long arrays (a possibly nested dict): example i is row i."""

    def __init__(self, arrays: Mapping):
        leaves = jax.tree.leaves(arrays)
        lengths = {len(x) for x in leaves}
        if len(lengths) != 1:
            raise ConfigError(
                "data arrays must all have one length (the number of examples), "
                f"got lengths {sorted(lengths)}"
            )
        self._arrays, self._length = arrays, lengths.pop()

    def __len__(self):
        return self._length

    def __getitem__(self, index):
        return jax.tree.map(lambda x: np.asarray(x[index]), self._arrays)


def as_dataset(data) -> grain.MapDataset:
    """Examples from what a Task may hold as data (see `jaxtrain.Task.data`).

    Raises:
      ConfigError: `data` is none of the accepted kinds.
    """
    if callable(data) and not isinstance(data, grain.MapDataset | Mapping):
        data = data()
    if isinstance(data, grain.MapDataset):
        return data
    if isinstance(data, Mapping):
        return grain.MapDataset.source(ArraySource(data))
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        return grain.MapDataset.source(data)
    raise ConfigError(
        f"task data of type {type(data).__name__} is not a grain.MapDataset, a dict of "
        "arrays, a random-access source (len() and [i]) or a function returning one"
    )


def example_spec(dataset: grain.MapDataset) -> dict:
    """The structure of one example (`{key: ShapeDtypeStruct}`), read from the first one.

    Raises:
      ConfigError: the data set is empty.
    """
    if len(dataset) == 0:
        raise ConfigError("the task's data has no examples")
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), dataset[0]
    )


def batch_shardings(example, mesh: Mesh, rules: Rules, axes: Mapping | None = None):
    """NamedShardings of the batch arrays: examples split over the data-parallel axes.

    Args:
      example: one example's structure (`{key: ShapeDtypeStruct}`).
      mesh: the device mesh.
      rules: logical-axis rules.
      axes: logical axes of some batch arrays by key, batch dimension first (see
        `jaxtrain.Task.batch_axes`); the others get `batch_axes(ndim)`.
    """
    axes = axes or {}

    def sharding(path, leaf):
        key = path[0].key if path and hasattr(path[0], "key") else None
        names = axes.get(key) or batch_axes(len(leaf.shape) + 1)
        return NamedSharding(mesh, rules.spec(names, where=f"batch array {key!r}"))

    return jax.tree_util.tree_map_with_path(sharding, example)


def example_sharding(batch_shardings) -> NamedSharding:
    """The sharding of a per-example vector (such as an eval mask) laid out like the batch."""
    first = jax.tree.leaves(batch_shardings)[0]
    return NamedSharding(first.mesh, PartitionSpec(first.spec[0] if first.spec else None))


def abstract_batch(example, global_batch_size: int, shardings) -> dict:
    """The global batch as ShapeDtypeStructs carrying their shardings (checked to divide)."""
    batch = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct((global_batch_size, *x.shape), x.dtype, sharding=s),
        example,
        shardings,
    )
    check_divisible(batch, what="batch array")
    return batch


class TrainIterator:
    """An endless, checkpointable iterator of this process's training batches.

    One global order, reshuffled every epoch from `seed`, is shared by all processes: the
    global batch of a step is the next `global_batch_size` examples of it, and process
    `shard_index` reads every `shard_count`-th of them. So each global batch holds the same
    examples whatever the number of processes (only their row order differs), the
    processes' reads are disjoint, and together they cover every epoch.

    Its state is the number of examples of the global order consumed: a run resumed with
    another batch size or process count continues with exactly the next example.

    Args:
      examples: the training examples.
      global_batch_size: examples per step, all processes together.
      seed: the order's seed.
      shard_index: this process's index.
      shard_count: how many processes read.
      read_threads: grain's threads making batches ahead of the reader (grain's default
        16, each batch read on one). 0 makes each batch when it is asked for, in the
        reader's thread (`DevicePrefetcher`'s, already ahead of the step): right for
        examples held in memory, where grain's threads would only contend for Python's
        lock. On 2 CPU cores, 16 threads filling grain's buffer of 500 batches delayed
        the main job's first step by 0.7 s; they help data read from files
        (BENCHMARKS.md).
    """

    def __init__(
        self,
        examples,
        *,
        global_batch_size: int,
        seed: int,
        shard_index: int,
        shard_count: int,
        read_threads: int = 16,
    ):
        self._order = examples.seed(seed).shuffle().repeat()
        self._global_batch_size = global_batch_size
        self._shard_index, self._shard_count = shard_index, shard_count
        # No buffer without threads: grain then reads each batch when it is asked for.
        self._read_options = grain.ReadOptions(
            num_threads=read_threads, prefetch_buffer_size=500 if read_threads else 0
        )
        self.set_state({"examples_seen": 0})

    def set_state(self, state: dict) -> None:
        """Continues after `state["examples_seen"]` examples of the global order."""
        self._seen = int(state["examples_seen"])
        local = self._order[self._seen + self._shard_index :: self._shard_count]
        batches = local.batch(self._global_batch_size // self._shard_count, drop_remainder=True)
        self._batches = iter(batches.to_iter_dataset(self._read_options))

    def get_state(self) -> dict:
        """`{"examples_seen": N}`: where the next batch starts in the global order."""
        return {"examples_seen": self._seen}

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._batches)
        self._seen += self._global_batch_size
        return batch


def eval_batch_count(num_examples: int, global_batch_size: int, max_batches: int) -> int:
    """How many global batches `eval_batches` makes of `num_examples` examples."""
    num_batches = math.ceil(num_examples / global_batch_size)
    return min(num_batches, max_batches) if max_batches > 0 else num_batches


def eval_batches(
    examples: grain.MapDataset,
    *,
    global_batch_size: int,
    max_batches: int,
    shard_index: int,
    shard_count: int,
):
    """Yields this process's evaluation batches as (batch, mask), padded to full size.

    Covers the whole split, or `max_batches` global batches of examples spread evenly
    over it when `max_batches > 0` and the split is larger. Every process yields the same
    number of equally shaped batches; padding rows repeat the first example and have
    mask 0 (real rows 1).
    """
    total = len(examples)
    num_batches = eval_batch_count(total, global_batch_size, max_batches)
    slots = num_batches * global_batch_size
    if slots < total:
        indices = (np.arange(slots) * total) // slots  # evenly spaced, distinct
    else:
        indices = np.concatenate([np.arange(total), np.full(slots - total, -1)])
    local = indices[shard_index::shard_count].reshape(num_batches, -1)
    for row in local:
        batch = [examples[int(i)] for i in np.where(row < 0, 0, row)]
        yield jax.tree.map(lambda *xs: np.stack(xs), *batch), (row >= 0).astype(np.float32)


_END = object()


class DevicePrefetcher:
    """Global device batches made `size` steps ahead in a background thread.

    Wraps an iterator of per-process numpy batches. `state` is the wrapped iterator's
    state right after the last batch *handed out* (not the last one read ahead), so a
    checkpoint that stores it resumes with exactly the next batch; `local` is that
    batch's numpy arrays (this process's rows). `wait_seconds` is the time callers have
    spent blocked in `next()` waiting for a batch, in all: input the step waited for.

    Args:
      iterator: a grain iterator of this process's batches.
      shardings: the batch's NamedShardings (a tree like the batch, or one for all).
      size: how many batches to make ahead.
    """

    def __init__(self, iterator, shardings, size: int = 2):
        self._iterator = iterator
        self._shardings = shardings
        self._queue = queue.Queue(maxsize=max(1, size))
        self._stop = threading.Event()
        self.state = iterator.get_state()
        self.local = None
        self.wait_seconds = 0.0
        self._thread = threading.Thread(target=self._fill, name="jaxtrain-prefetch", daemon=True)
        self._thread.start()

    def _fill(self):
        try:
            for batch in self._iterator:
                state = self._iterator.get_state()
                arrays = to_global(batch, self._shardings)
                if not self._put((arrays, batch, state)):
                    return
            self._put(_END)
        except BaseException as e:  # surfaced to the training loop by __next__
            self._put(e)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        item = self._queue.get()
        self.wait_seconds += time.perf_counter() - start
        if item is _END:
            raise StopIteration
        if isinstance(item, ConfigError | StorageError):  # one line already (a DataError, ...)
            raise item
        if isinstance(item, BaseException):
            raise RuntimeError(f"input pipeline failed: {item}") from item
        batch, self.local, self.state = item
        return batch

    def close(self):
        self._stop.set()
        self._thread.join(timeout=10)


def to_global(local_batch, shardings):
    """This process's rows of a batch -> global arrays laid out as `shardings` say."""
    if isinstance(shardings, NamedSharding):
        shardings = jax.tree.map(lambda _: shardings, local_batch)
    return jax.tree.map(jax.make_array_from_process_local_data, shardings, local_batch)
