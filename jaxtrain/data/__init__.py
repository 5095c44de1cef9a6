"""Input: any examples (arrays, grain, TFDS) through one checkpointable grain pipeline."""

from jaxtrain.data.pipeline import (
    DevicePrefetcher,
    abstract_batch,
    as_dataset,
    batch_shardings,
    eval_batches,
    example_sharding,
    example_spec,
    from_tfds,
    make_train_iterator,
    to_global,
)

__all__ = [
    "DevicePrefetcher",
    "abstract_batch",
    "as_dataset",
    "batch_shardings",
    "eval_batches",
    "example_sharding",
    "example_spec",
    "from_tfds",
    "make_train_iterator",
    "to_global",
]
