"""`config.data.name = "synthetic"`: random examples, no I/O, for timing the step alone.

Example i is drawn from (seed, split, i) alone, so the set is random-access like any
other: the pipeline shuffles, shards over processes and resumes it unchanged, and the same
index gives the same example in every process and every run. There is nothing to learn
(uniform tokens, labels independent of the images): the loss stays near its start.
"""

import numpy as np

NAME = "synthetic"
# Long enough that no run of interest sees an epoch end; examples are made on demand.
TRAIN_EXAMPLES = 2**24
EVAL_EXAMPLES = 2**12
_SPLITS = {"train": 0, "eval": 1}


def _rng(seed: int, split: str, index) -> np.random.Generator:
    return np.random.default_rng([seed % 2**32, _SPLITS[split], int(index)])


class _Synthetic:
    def __init__(self, split: str, seed: int):
        self._split, self._seed = split, seed
        self._length = TRAIN_EXAMPLES if split == "train" else EVAL_EXAMPLES

    def __len__(self):
        return self._length

    def __getitem__(self, index):
        if not -self._length <= index < self._length:
            raise IndexError(index)
        return self._example(_rng(self._seed, self._split, index % self._length))


class SyntheticTokens(_Synthetic):
    """Language-model examples: uniform random tokens, targets the inputs shifted by one.

    Args:
      split: "train" or "eval" (different examples).
      seed: the data set's seed.
      seq_len: tokens per example.
      vocab_size: tokens are in [0, vocab_size).
    """

    def __init__(self, split: str, seed: int, *, seq_len: int, vocab_size: int):
        super().__init__(split, seed)
        self._seq_len, self._vocab_size = seq_len, vocab_size

    def _example(self, rng):
        window = rng.integers(0, self._vocab_size, self._seq_len + 1, dtype=np.int32)
        return {"inputs": window[:-1], "targets": window[1:]}


class SyntheticImages(_Synthetic):
    """Classification examples: uniform random uint8 images and integer labels.

    Args:
      split: "train" or "eval" (different examples).
      seed: the data set's seed.
      image_shape: (height, width, channels).
      num_classes: labels are in [0, num_classes).
    """

    def __init__(self, split: str, seed: int, *, image_shape, num_classes: int):
        super().__init__(split, seed)
        self._image_shape, self._num_classes = tuple(image_shape), num_classes

    def _example(self, rng):
        image = rng.integers(0, 256, self._image_shape, dtype=np.uint8)
        return {"inputs": image, "targets": np.int32(rng.integers(self._num_classes))}
