"""Input pipeline: TFDS data source -> grain -> per-process numpy batches -> global arrays.

Every data set, bundled or from the TFDS catalog, is read through `as_data_source`
(random access over ArrayRecord files), so the order is a pure function of the seed, each
process reads only its own slice, and the iterator position is a small dict that the
checkpoint stores.
"""

import difflib
import math
import queue
import threading

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

from jaxtrain.errors import ConfigError

BUNDLED = ("digits", "pysource")

# Separates documents in the byte stream of a text data set; source files contain no NULs.
DOCUMENT_SEPARATOR = 0


def get_builder(data_config):
    """The TFDS builder for `data_config.name` (bundled or catalog); writes nothing."""
    from jaxtrain.data import builders  # noqa: F401  (registers digits and pysource)

    name = data_config.name
    try:
        return tfds.builder(name, data_dir=data_config.data_dir or None, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError:
        known = [*BUNDLED, *tfds.list_builders(with_community_datasets=False)]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"unknown data set {name!r}{hint}: neither bundled {BUNDLED} nor in the TFDS catalog"
        ) from None


def get_data_source(data_config, split: str):
    """Prepares the data set on first use (process 0 only) and returns a split's source."""
    builder = get_builder(data_config)
    if jax.process_index() == 0 and not builder.is_prepared():
        print(f"preparing data set {builder.name!r} in {builder.data_dir} (first use)", flush=True)
        tfds.disable_progress_bar()
        builder.download_and_prepare(file_format="array_record")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"jaxtrain:prepared:{data_config.name}")
        builder = get_builder(data_config)
    known = builder.info.splits  # empty only for a mocked builder (tfds.testing.mock_data)
    if known and split not in known:
        raise ConfigError(
            f"data set {data_config.name!r} has no split {split!r}; splits: {sorted(known)}"
        )
    return builder.as_data_source(split=split)


class TokenWindows:
    """Random-access language-model examples: consecutive windows of a byte stream."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self._tokens = tokens
        self._seq_len = seq_len

    def __len__(self):
        return max(0, (len(self._tokens) - 1) // self._seq_len)

    def __getitem__(self, index):
        start = index * self._seq_len
        window = self._tokens[start : start + self._seq_len + 1].astype(np.int32)
        return {"inputs": window[:-1], "targets": window[1:]}


def load_tokens(source, text_key: str) -> np.ndarray:
    """Concatenates a text split's records into one uint8 byte stream (byte-level tokens).

    Holds the whole split in host memory: right for the bundled corpus (tens of MB);
    a catalog corpus of many GB wants a pre-tokenised data set instead.
    """
    parts = []
    for index in range(len(source)):
        text = source[index][text_key]
        parts.append(np.frombuffer(text if isinstance(text, bytes) else text.encode(), np.uint8))
        parts.append(np.array([DOCUMENT_SEPARATOR], np.uint8))
    return np.concatenate(parts) if parts else np.zeros((0,), np.uint8)


def make_examples(data_config, task: str, split: str) -> grain.MapDataset:
    """A random-access dataset of `{"inputs", "targets"}` examples for the model's task."""
    source = get_data_source(data_config, split)
    if task == "lm":
        windows = TokenWindows(load_tokens(source, data_config.text_key), data_config.seq_len)
        if not len(windows):
            raise ConfigError(
                f"split {split!r} of {data_config.name!r} is shorter than one "
                f"sequence of config.data.seq_len={data_config.seq_len}"
            )
        return grain.MapDataset.source(windows)
    image_key, label_key = data_config.image_key, data_config.label_key

    def to_example(record):
        return {"inputs": np.asarray(record[image_key]), "targets": np.int32(record[label_key])}

    return grain.MapDataset.source(source).map(to_example)


def make_train_iterator(
    examples: grain.MapDataset,
    *,
    local_batch_size: int,
    seed: int,
    shard_index: int,
    shard_count: int,
):
    """An endless, checkpointable iterator of this process's training batches.

    One global order, reshuffled every epoch from `seed`, is shared by all processes;
    process `shard_index` reads only every `shard_count`-th position of it. So each global
    batch holds the same examples whatever the number of processes (only their row order
    differs), the processes' reads are disjoint, and together they cover every epoch.

    Returns:
      A grain DatasetIterator with `get_state()` / `set_state()`.
    """
    ds = examples.seed(seed).shuffle().repeat()[shard_index::shard_count]
    ds = ds.batch(local_batch_size, drop_remainder=True)
    return iter(ds.to_iter_dataset())


def eval_batches(
    examples: grain.MapDataset,
    *,
    global_batch_size: int,
    max_batches: int,
    shard_index: int,
    shard_count: int,
):
    """Yields this process's padded evaluation batches, each with a 0/1 `mask`.

    Covers the whole split, or `max_batches` global batches of examples spread evenly
    over it when `max_batches > 0` and the split is larger. Every process yields the same
    number of equally shaped batches; padding rows have mask 0.
    """
    total = len(examples)
    num_batches = math.ceil(total / global_batch_size)
    if max_batches > 0:
        num_batches = min(num_batches, max_batches)
    slots = num_batches * global_batch_size
    if slots < total:
        indices = (np.arange(slots) * total) // slots  # evenly spaced, distinct
    else:
        indices = np.concatenate([np.arange(total), np.full(slots - total, -1)])
    local = indices[shard_index::shard_count].reshape(num_batches, -1)
    for row in local:
        batch = [examples[int(i)] for i in np.where(row < 0, 0, row)]
        stacked = jax.tree.map(lambda *xs: np.stack(xs), *batch)
        stacked["mask"] = (row >= 0).astype(np.float32)
        yield stacked


_END = object()


class DevicePrefetcher:
    """Global device batches made `size` steps ahead in a background thread.

    Wraps an iterator of per-process numpy batches. `state` is the wrapped iterator's
    state right after the last batch *handed out* (not the last one read ahead), so a
    checkpoint that stores it resumes with exactly the next batch; `local` is that
    batch's numpy arrays (this process's rows).
    """

    def __init__(self, iterator, sharding, size: int = 2):
        self._iterator = iterator
        self._sharding = sharding
        self._queue = queue.Queue(maxsize=max(1, size))
        self._stop = threading.Event()
        self.state = iterator.get_state()
        self.local = None
        self._thread = threading.Thread(target=self._fill, name="jaxtrain-prefetch", daemon=True)
        self._thread.start()

    def _fill(self):
        try:
            for batch in self._iterator:
                state = self._iterator.get_state()
                arrays = jax.tree.map(
                    lambda x: jax.make_array_from_process_local_data(self._sharding, x), batch
                )
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
        item = self._queue.get()
        if item is _END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise RuntimeError(f"input pipeline failed: {item}") from item
        batch, self.local, self.state = item
        return batch

    def close(self):
        self._stop.set()
        self._thread.join(timeout=10)
