"""The training loop end to end on the bundled data sets, on 8 simulated devices."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import load_config, read_metrics, train_gpt_smoke
from jax.sharding import PartitionSpec as P

from jaxtrain.train import train_and_evaluate


def test_digits_cnn_learns(data_dir, tmp_path):
    config = load_config(
        "digits_cnn",
        data_dir=data_dir,
        num_train_steps=120,
        log_every_steps=10,
        eval_every_steps=120,
        checkpoint_every_steps=120,
    )
    _, result = train_and_evaluate(config, str(tmp_path))
    losses = [r["loss"] for r in read_metrics(tmp_path).values()]
    assert losses[-1] < 0.5 * losses[0]
    assert result["accuracy"] > 0.9  # the full config reaches >= 97% (see README)


def test_gpt_learns_pysource(data_dir, tmp_path):
    config = load_config(
        "gpt_pysource",
        "smoke",
        data_dir=data_dir,
        num_train_steps=40,
        log_every_steps=5,
        eval_every_steps=40,
        checkpoint_every_steps=40,
        optim__lr=3e-3,
        optim__warmup_steps=5,
    )
    _, result = train_and_evaluate(config, str(tmp_path))
    losses = [r["loss"] for r in read_metrics(tmp_path).values()]
    assert losses[0] > 5.0  # about ln(256) = 5.55 at the start
    assert losses[-1] < losses[0] - 1.5
    assert result["loss"] < 4.0
    assert result["perplexity"] == pytest.approx(np.exp(result["loss"]), rel=1e-6)


def test_sharded_run_matches_one_device(data_dir, tmp_path):
    _, single_eval, single = train_gpt_smoke(
        data_dir, tmp_path / "one", {"data": 1}, devices=jax.devices()[:1]
    )
    state, sharded_eval, sharded = train_gpt_smoke(
        data_dir, tmp_path / "eight", {"data": 2, "fsdp": 2, "tensor": 2}
    )
    assert len(single) == len(sharded) == 5
    # Same data, same init; only the order of floating-point reductions differs.
    np.testing.assert_allclose(sharded, single, rtol=2e-5)
    np.testing.assert_allclose(sharded_eval["loss"], single_eval["loss"], rtol=2e-5)

    # The parameters really are laid out as the rules say (embed->fsdp, mlp/heads->tensor).
    params = state.params
    up = params["blocks"][0]["mlp"]["up"]["kernel"]  # (embed, mlp) = (64, 128)
    assert up.sharding.spec == P("fsdp", "tensor")
    assert up.addressable_shards[0].data.shape == (32, 64)
    query = params["blocks"][1]["attn"]["query"]["kernel"]  # (embed, heads, head_dim)
    assert query.sharding.spec == P("fsdp", "tensor", None)
    assert query.addressable_shards[0].data.shape == (32, 2, 16)
    embedding = params["embed"]["embedding"]  # (vocab, embed)
    assert embedding.sharding.spec == P("tensor", "fsdp")
    assert params["final_norm"]["scale"].sharding.spec == P(None)
    # Adam's moments follow their parameters' layout.
    mu = state.opt_state[1].inner_state[0].mu["blocks"][0]["mlp"]["up"]["kernel"]
    assert mu.sharding.spec == P("fsdp", "tensor")


def test_checkpoint_is_plain_orbax(data_dir, tmp_path):
    state, _, _ = train_gpt_smoke(data_dir, tmp_path, {"data": -1}, steps=3)
    # Read back with Orbax alone: no jaxtrain types, no target tree.
    with ocp.CheckpointManager(
        os.path.join(tmp_path, "checkpoints"), options=ocp.CheckpointManagerOptions(read_only=True)
    ) as manager:
        assert manager.latest_step() == 3
        restored = manager.restore(
            3,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(),
                data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(),
            ),
        )
    assert int(restored["state"]["step"]) == 3
    saved = restored["state"]["params"]["blocks"]["1"]["attn"]["out"]["kernel"]
    np.testing.assert_array_equal(saved, state.params["blocks"][1]["attn"]["out"]["kernel"])
    assert restored["data"] == {"examples_seen": 48}  # three batches of 16 consumed
    assert restored["config"]["model"]["name"] == "gpt"
    with open(tmp_path / "config.json") as f:
        assert json.load(f) == restored["config"]


def test_rerun_resumes_with_next_step_and_batch(data_dir, tmp_path):
    _, _, reference = train_gpt_smoke(data_dir, tmp_path / "straight", {"data": -1}, steps=6)
    workdir = tmp_path / "resumed"
    train_gpt_smoke(data_dir, workdir, {"data": -1}, steps=3)
    state, _, resumed = train_gpt_smoke(data_dir, workdir, {"data": -1}, steps=6)
    assert int(state.step) == 6
    # Steps 4-6 ran after the restore; equal losses mean the same params *and* batches.
    np.testing.assert_array_equal(resumed, reference)
