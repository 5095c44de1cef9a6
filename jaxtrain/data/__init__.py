"""Input: any examples (arrays, grain, TFDS) through one checkpointable grain pipeline."""

from jaxtrain.data.pipeline import (
    DevicePrefetcher,
    TrainIterator,
    abstract_batch,
    as_dataset,
    batch_shardings,
    eval_batch_count,
    eval_batches,
    example_sharding,
    example_spec,
    from_tfds,
    to_global,
)

__all__ = [
    "DevicePrefetcher",
    "TrainIterator",
    "abstract_batch",
    "as_dataset",
    "batch_shardings",
    "eval_batch_count",
    "eval_batches",
    "example_sharding",
    "example_spec",
    "from_tfds",
    "to_global",
]
