"""The bundled TFDS data sets and the grain pipeline."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import load_config

from jaxtrain.data import builders, pipeline
from jaxtrain.errors import ConfigError
from jaxtrain.tasks import classification, lm


def test_digits_split_is_fixed_and_complete(data_dir):
    config = load_config("digits_cnn", data_dir=data_dir)
    train = pipeline.from_tfds("digits", "train", data_dir=config.data.data_dir)
    test = pipeline.from_tfds("digits", "test", data_dir=config.data.data_dir)
    assert (len(train), len(test)) == (1438, 359)  # all 1,797 digits, 80/20
    example = train[0]
    assert example["image"].shape == (8, 8, 1) and example["image"].dtype == np.uint8
    assert 0 <= example["label"] < 10
    labels = np.array([test[i]["label"] for i in range(len(test))])
    assert set(labels) == set(range(10))


def test_pysource_splits_by_file(data_dir):
    train = pipeline.from_tfds("pysource", "train", data_dir=data_dir)
    val = pipeline.from_tfds("pysource", "validation", data_dir=data_dir)
    train_paths = {train[i]["path"] for i in range(len(train))}
    val_paths = {val[i]["path"] for i in range(len(val))}
    root, files = builders.stdlib_files()
    assert not train_paths & val_paths
    assert len(train_paths) + len(val_paths) == len(files)
    assert 0.02 < len(val_paths) / len(files) < 0.10
    # The bytes are the file's bytes.
    path = sorted(val_paths)[0]
    record = next(val[i] for i in range(len(val)) if val[i]["path"] == path)
    assert record["text"] == (root / path.decode()).read_bytes()


def test_lm_windows_are_shifted_by_one(data_dir):
    config = load_config("gpt_pysource", "smoke", data_dir=data_dir)
    examples = lm.text_windows(config.data, "validation")
    example = examples[3]
    assert example["inputs"].shape == (config.data.seq_len,)
    np.testing.assert_array_equal(example["inputs"][1:], example["targets"][:-1])
    np.testing.assert_array_equal(examples[4]["inputs"][0], example["targets"][-1])


def test_train_iterator_is_deterministic_and_resumable(data_dir):
    config = load_config("digits_cnn", data_dir=data_dir)
    examples = classification.labelled_images(config.data, "train")
    make = lambda: pipeline.TrainIterator(
        examples, global_batch_size=32, seed=7, shard_index=0, shard_count=1
    )
    first = [next(it)["targets"] for it in [make()] for _ in range(3)][-1]
    it = make()
    next(it), next(it)
    state = it.get_state()
    expected = next(it)["targets"]
    np.testing.assert_array_equal(expected, first)
    resumed = make()
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["targets"], expected)


def test_read_threads_change_when_batches_are_made_not_which():
    order = pipeline.grain.MapDataset.range(500)

    def batches(read_threads, state=None):
        it = pipeline.TrainIterator(
            order,
            global_batch_size=8,
            seed=5,
            shard_index=0,
            shard_count=1,
            read_threads=read_threads,
        )
        if state:
            it.set_state(state)
        return [next(it).tolist() for _ in range(70)]  # past the first epoch (62 batches)

    threaded = batches(16)
    assert batches(0) == threaded
    assert batches(0, {"examples_seen": 40}) == batches(4, {"examples_seen": 40})
    assert batches(0, {"examples_seen": 40})[0] == threaded[5]


def test_process_slices_are_disjoint_and_cover_an_epoch():
    n = 359  # an odd size, so the two slices differ in length
    seen = []
    for index in range(2):
        # Examples are their own indices, so the slices can be compared exactly.
        it = pipeline.TrainIterator(
            pipeline.grain.MapDataset.range(n),
            global_batch_size=2,
            seed=0,
            shard_index=index,
            shard_count=2,
        )
        seen.append([int(next(it)[0]) for _ in range(len(range(index, n, 2)))])
    assert all(len(s) == len(set(s)) for s in seen)  # one epoch, no repeats
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == set(range(n))


def test_position_is_in_examples_so_a_new_batch_size_or_process_count_continues():
    order = pipeline.grain.MapDataset.range(1000)

    def iterator(global_batch_size, shard_index=0, shard_count=1):
        return pipeline.TrainIterator(
            order,
            global_batch_size=global_batch_size,
            seed=3,
            shard_index=shard_index,
            shard_count=shard_count,
        )

    straight = iterator(1000)
    epoch = next(straight).tolist()  # the whole global order of the first epoch
    first = iterator(24)
    for _ in range(2):
        next(first)
    assert first.get_state() == {"examples_seen": 48}
    # Resumed with batches of 16, on one process or on two: examples 48.. of the order.
    bigger = iterator(16)
    bigger.set_state(first.get_state())
    assert next(bigger).tolist() == epoch[48:64]
    halves = [iterator(16, shard, 2) for shard in range(2)]
    for half in halves:
        half.set_state(first.get_state())
    rows = [next(half).tolist() for half in halves]
    assert sorted(rows[0] + rows[1]) == sorted(epoch[48:64])
    assert not set(rows[0]) & set(rows[1])


def test_eval_batches_cover_each_example_once_with_padding(data_dir):
    config = load_config("digits_cnn", data_dir=data_dir)
    examples = classification.labelled_images(config.data, "test")
    batches = list(
        pipeline.eval_batches(
            examples, global_batch_size=100, max_batches=-1, shard_index=0, shard_count=1
        )
    )
    assert len(batches) == 4 and all(b["inputs"].shape[0] == 100 for b, _ in batches)
    assert sum(mask.sum() for _, mask in batches) == len(examples) == 359
    labels = np.concatenate([b["targets"][mask > 0] for b, mask in batches])
    np.testing.assert_array_equal(labels, [examples[i]["targets"] for i in range(359)])


def test_eval_batches_spread_a_capped_sample_over_the_split(data_dir):
    config = load_config("gpt_pysource", "smoke", data_dir=data_dir)
    examples = lm.text_windows(config.data, "validation")
    batches = list(
        pipeline.eval_batches(
            pipeline.as_dataset(examples),
            global_batch_size=8,
            max_batches=2,
            shard_index=0,
            shard_count=1,
        )
    )
    assert len(batches) == 2 and all(mask.all() for _, mask in batches)
    # 16 examples evenly spaced over the whole split, not its first 16 windows.
    n = len(examples)
    chosen = np.concatenate([b["inputs"] for b, _ in batches])
    for slot in (0, 1, 15):
        np.testing.assert_array_equal(chosen[slot], examples[slot * n // 16]["inputs"])


def test_unknown_data_set_is_a_config_error():
    with pytest.raises(
        ConfigError, match="unknown data set 'digitz' \\(did you mean 'digits'\\?\\)"
    ):
        pipeline.get_builder("digitz")


def test_unknown_split_is_a_config_error(data_dir):
    config = load_config("digits_cnn", data_dir=data_dir)
    with pytest.raises(ConfigError, match="no split 'validation'; splits: \\['test', 'train'\\]"):
        pipeline.from_tfds("digits", "validation", data_dir=config.data.data_dir)


def test_catalog_data_sets_go_through_the_same_path(data_dir):
    # tfds.testing.mock_data stands in for a catalog download (mnist) on a machine offline.
    config = load_config("digits_cnn", data_dir=data_dir)
    config.data.name = "mnist"
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        examples = classification.labelled_images(config.data, "train")
        example = examples[0]
    assert len(examples) == 12
    assert example["inputs"].shape == (28, 28, 1) and example["targets"].dtype == np.int32
