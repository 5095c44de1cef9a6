"""The non-finite policy: abort (with a report and the batch), skip, rollback."""

import json
import os

import jax
import numpy as np
import pytest
from conftest import gpt_smoke_config, read_metrics

from jaxtrain.data import pipeline
from jaxtrain.nonfinite import NonFiniteError
from jaxtrain.train import train_and_evaluate


def _config(data_dir, policy, inject, steps=6, **overrides):
    return gpt_smoke_config(
        data_dir,
        steps,
        checkpoint_every_steps=2,
        nonfinite__policy=policy,
        nonfinite__inject_at_steps=inject,
        **overrides,
    )


def _all_finite(tree):
    return all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(tree))


def test_abort_reports_step_leaf_and_saves_the_batch(data_dir, tmp_path):
    config = _config(data_dir, "abort", (3,))
    with pytest.raises(NonFiniteError) as error:
        train_and_evaluate(config, str(tmp_path))
    message = str(error.value)
    # The first gradient leaf in tree order is the one the injection poisons.
    assert "step 3: non-finite" in message
    assert "first non-finite gradient: blocks/0/attn/key/kernel" in message
    with open(tmp_path / "nonfinite_step3.json") as f:
        report = json.load(f)
    assert report["step"] == 3 and report["batch"] == "nonfinite_step3.process0.npz"
    # The saved rows are exactly step 3's batch from the input pipeline.
    examples = pipeline.make_examples(config.data, "lm", "train")
    batches = pipeline.make_train_iterator(
        examples, local_batch_size=16, seed=0, shard_index=0, shard_count=1
    )
    third = [next(batches) for _ in range(3)][-1]
    saved = np.load(tmp_path / "nonfinite_step3.process0.npz")
    np.testing.assert_array_equal(saved["inputs"], third["inputs"])
    # Nothing after the bad step was checkpointed; what was is clean.
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def test_skip_drops_the_update_and_counts_it(data_dir, tmp_path):
    state, result = train_and_evaluate(_config(data_dir, "skip", (3, 4)), str(tmp_path))
    assert int(state.step) == 6 and int(state.skipped) == 2
    assert _all_finite(state.params) and _all_finite(state.opt_state)
    logged = read_metrics(tmp_path)
    assert [logged[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 2, 2, 2]
    assert np.isfinite(result["loss"])


def test_skip_aborts_after_too_many_in_a_row(data_dir, tmp_path):
    config = _config(data_dir, "skip", (2, 3, 4), nonfinite__max_consecutive_skips=2)
    with pytest.raises(NonFiniteError, match="step 4: .*; 3 in a row"):
        train_and_evaluate(config, str(tmp_path))


def test_rollback_restores_the_last_checkpoint_and_moves_on(data_dir, tmp_path, capsys):
    state, result = train_and_evaluate(_config(data_dir, "rollback", (5,), steps=8), str(tmp_path))
    out = capsys.readouterr().out
    assert "step 5: non-finite" in out and "rolled back to checkpoint 4" in out
    assert int(state.step) == 8 and int(state.skipped) == 1
    assert _all_finite(state.params) and np.isfinite(result["loss"])
    assert sorted(read_metrics(tmp_path)) == list(range(1, 9))  # each step logged once


def test_unknown_policy_is_a_config_error(data_dir, tmp_path):
    from jaxtrain.errors import ConfigError

    with pytest.raises(ConfigError, match="config.nonfinite.policy='ignore'"):
        train_and_evaluate(_config(data_dir, "ignore", ()), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
