"""Input: TFDS data sources (bundled or catalog) read through grain."""

from jaxtrain.data.pipeline import (
    DevicePrefetcher,
    eval_batches,
    get_data_source,
    make_train_iterator,
)

__all__ = ["DevicePrefetcher", "eval_batches", "get_data_source", "make_train_iterator"]
