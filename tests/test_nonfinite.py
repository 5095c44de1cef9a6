"""The non-finite policy: abort (with a report and the batch), skip, rollback.

Each test poisons the training batches of chosen steps as a broken tokenizer would: a
token id past the vocabulary, which the embedding lookup turns into NaN.
"""

import dataclasses
import json
import os

import grain
import jax
import numpy as np
import pytest
from conftest import gpt_smoke_config, read_metrics

from jaxtrain import data, tasks
from jaxtrain.nonfinite import NonFiniteError
from jaxtrain.train import train_and_evaluate


def _config(data_dir, policy, steps=6, **overrides):
    return gpt_smoke_config(
        data_dir, steps, checkpoint_every_steps=2, nonfinite__policy=policy, **overrides
    )


def _batches(config, examples, count):
    """The first `count` training batches the run will draw from `examples`."""
    it = data.TrainIterator(
        examples,
        global_batch_size=config.global_batch_size,
        seed=config.data.seed,
        shard_index=0,
        shard_count=1,
    )
    return [next(it) for _ in range(count)]


def _poisoned(config, steps):
    """The config's task, with every example of the batches of `steps` poisoned."""
    task = tasks.from_config(config)
    examples = data.as_dataset(task.data)
    indices = grain.MapDataset.range(len(examples))
    bad = {
        int(i)
        for s, batch in enumerate(_batches(config, indices, max(steps)), 1)
        for i in batch
        if s in steps
    }

    def example(index):
        if index in bad:
            return {**examples[index], "inputs": np.full(config.data.seq_len, 256, np.int32)}
        return examples[index]

    return dataclasses.replace(task, data=indices.map(example))


def _train(config, workdir, steps):
    return train_and_evaluate(config, str(workdir), task=_poisoned(config, steps))


def _all_finite(tree):
    return all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(tree))


def test_abort_reports_step_leaf_and_saves_the_batch(data_dir, tmp_path):
    config = _config(data_dir, "abort")
    task = _poisoned(config, (3,))
    with pytest.raises(NonFiniteError) as error:
        train_and_evaluate(config, str(tmp_path), task=task)
    message = str(error.value)
    # Every gradient is NaN; the report names the first in tree order.
    assert "step 3: non-finite" in message
    assert "first non-finite gradient: blocks/0/attn/key/kernel" in message
    with open(tmp_path / "nonfinite_step3.json") as f:
        report = json.load(f)
    assert report["step"] == 3 and report["batch"] == "nonfinite_step3.process0.npz"
    # The saved rows are exactly step 3's batch from the input pipeline: the poisoned one.
    third = _batches(config, data.as_dataset(task.data), 3)[-1]
    saved = np.load(tmp_path / "nonfinite_step3.process0.npz")
    np.testing.assert_array_equal(saved["inputs"], third["inputs"])
    assert (saved["inputs"] == 256).all()
    # Nothing after the bad step was checkpointed; what was is clean.
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def test_skip_drops_the_update_and_counts_it(data_dir, tmp_path):
    state, result = _train(_config(data_dir, "skip"), tmp_path, (3, 4))
    assert int(state.step) == 6 and int(state.skipped) == 2
    assert _all_finite(state.params) and _all_finite(state.opt_state)
    logged = read_metrics(tmp_path)
    assert [logged[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 2, 2, 2]
    assert np.isfinite(result["loss"])


def test_skip_aborts_after_too_many_in_a_row(data_dir, tmp_path):
    config = _config(data_dir, "skip", nonfinite__max_consecutive_skips=2)
    with pytest.raises(NonFiniteError, match="step 4: .*; 3 in a row"):
        _train(config, tmp_path, (2, 3, 4))


def test_rollback_restores_the_last_checkpoint_and_moves_on(data_dir, tmp_path, capsys):
    state, result = _train(_config(data_dir, "rollback", steps=8), tmp_path, (5,))
    out = capsys.readouterr().out
    assert "step 5: non-finite" in out and "rolled back to checkpoint 4" in out
    assert int(state.step) == 8 and int(state.skipped) == 1
    assert _all_finite(state.params) and np.isfinite(result["loss"])
    assert sorted(read_metrics(tmp_path)) == list(range(1, 9))  # each step logged once


def test_unknown_policy_is_a_config_error(data_dir, tmp_path):
    from jaxtrain.errors import ConfigError

    with pytest.raises(ConfigError, match="config.nonfinite.policy='ignore'"):
        train_and_evaluate(_config(data_dir, "ignore"), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
