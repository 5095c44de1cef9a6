"""Every kind of parallelism is a config edit, and each gives the same numbers."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import REPO, build, compile_step, load_config, train_gpt_smoke
from flax import nnx

from jaxtrain import hlo, sharding, steps, tasks
from jaxtrain.models import make_model
from jaxtrain.state import create_state

# Heads, KV heads, vocab, MLP and embed of the smoke GPT all divide by 8 with these.
DIVISIBLE_BY_8 = dict(model__num_heads=8, model__num_kv_heads=8, model__head_dim=8)
GOLDEN = os.path.join(REPO, "tests", "golden", "gpt_pysource_partition_specs.json")


@pytest.fixture(scope="module")
def one_device_losses(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one_device")
    return train_gpt_smoke(
        data_dir, workdir, {"data": 1}, devices=jax.devices()[:1], **DIVISIBLE_BY_8
    )[2]


@pytest.mark.slow
@pytest.mark.parametrize(
    "data, fsdp, tensor, sequence",
    [
        (8, 1, 1, 1),
        (1, 8, 1, 1),
        (1, 1, 8, 1),
        (2, 2, 2, 1),
        (2, 1, 2, 2),
    ],
)
def test_every_mesh_matches_one_device(
    data, fsdp, tensor, sequence, one_device_losses, data_dir, tmp_path
):
    mesh = dict(data=data, fsdp=fsdp, tensor=tensor, sequence=sequence)
    _, _, losses = train_gpt_smoke(data_dir, tmp_path, mesh, **DIVISIBLE_BY_8)
    assert len(losses) == 5
    # Five optimizer steps; only the order of float32 reductions differs.
    np.testing.assert_allclose(losses, one_device_losses, rtol=5e-5)


def _per_device_bytes(state) -> dict:
    totals: dict = {}
    for leaf in jax.tree.leaves((state.params, state.opt_state)):
        for shard in leaf.addressable_shards:
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return totals


def test_fsdp_and_tensor_parallelism_shrink_per_device_state():
    config = load_config("gpt_pysource")  # 918,656 parameters
    held = {}
    for name, mesh_config in {
        "data": {"data": 8},
        "fsdp": {"fsdp": 8},
        "fsdp+tensor": {"fsdp": 4, "tensor": 2},
    }.items():
        mesh, layout, _, _ = build(config, mesh_config)
        with jax.set_mesh(mesh):
            per_device = _per_device_bytes(create_state(layout, seed=0))
        assert len(set(per_device.values())) == 1  # balanced over the 8 devices
        held[name] = next(iter(per_device.values()))
    # The optimizer's scalars (step counts, the injected learning rate), on every device.
    scalars = sum(
        x.dtype.itemsize for x in jax.tree.leaves(layout.abstract_state.opt_state) if not x.ndim
    )
    assert 0 < scalars <= 32
    # Params + Adam moments, float32: 3 x 918,656 x 4 bytes (+ the scalars) on every device.
    assert held["data"] == 3 * 918_656 * 4 + scalars
    # Every matrix has an `embed` (fsdp) and, under tensor parallelism, a heads/mlp/vocab
    # dimension: all shard 8 ways. Only the 9 RMSNorm scales (1,152 values) stay whole.
    for name in ("fsdp", "fsdp+tensor"):
        assert held[name] == 3 * ((918_656 - 1_152) // 8 + 1_152) * 4 + scalars
        assert held["data"] / held[name] > 7.9


def test_microbatches_give_the_large_batch_update(data_dir, tmp_path):
    _, _, whole = train_gpt_smoke(
        data_dir, tmp_path / "whole", {"data": 2, "fsdp": 2, "tensor": 2}, steps=3
    )
    _, _, accumulated = train_gpt_smoke(
        data_dir, tmp_path / "micro", {"data": 2, "fsdp": 2, "tensor": 2}, steps=3, microbatches=4
    )
    np.testing.assert_allclose(accumulated, whole, rtol=2e-5)


def _temp_bytes(config, mesh_config):
    compiled, _ = compile_step(config, mesh_config, jax.devices()[:1])
    return compiled.memory_analysis().temp_size_in_bytes


def test_microbatch_memory_does_not_grow_with_their_number():
    small = load_config("gpt_pysource", "smoke", global_batch_size=16)
    many = load_config("gpt_pysource", "smoke", global_batch_size=128, microbatches=8)
    whole = load_config("gpt_pysource", "smoke", global_batch_size=128)
    one, eight, unsplit = (_temp_bytes(c, {"data": 1}) for c in (small, many, whole))
    # 8 microbatches of 16 need about what one batch of 16 needs, far less than 128 at once.
    assert eight < 1.25 * one
    assert unsplit > 4 * one


def test_bad_microbatch_split_is_a_config_error(tmp_path):
    from jaxtrain.errors import ConfigError
    from jaxtrain.train import train_and_evaluate

    config = load_config("gpt_pysource", "smoke", microbatches=3)  # 16 rows over 8 devices
    with pytest.raises(ConfigError, match="does not split into config.microbatches=3 parts"):
        train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def _smoke_model(**fields):
    config = load_config("gpt_pysource", "smoke")
    model_config = ml_collections.ConfigDict({**dict(config.model), "dropout_rate": 0.1, **fields})
    with nnx.use_eager_sharding(False):
        model = make_model(model_config, dtype=jnp.float32, param_dtype=jnp.float32)(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(params)


@pytest.mark.parametrize("remat", ["none", "full", "save_dots"])
def test_scan_and_remat_compute_the_same_loss_and_gradients(remat):
    loop_def, loop_params = _smoke_model()
    scan_def, scan_params = _smoke_model(scan_layers=True, remat=remat)
    # The scanned model stores each block weight once, stacked on a leading layers axis.
    assert scan_params["blocks"]["mlp"]["up"]["kernel"].shape == (2, 64, 128)
    scan_params["blocks"] = jax.tree.map(
        lambda *xs: jnp.stack(xs), *(loop_params["blocks"][i] for i in range(2))
    )
    for key in ("embed", "final_norm", "lm_head"):
        scan_params[key] = loop_params[key]
    tokens = (jnp.arange(64).reshape(2, 32) * 7) % 256

    def loss(graphdef, params):  # dropout on, so per-layer keys must line up too
        model = steps.set_mode(nnx.merge(graphdef, params), train=True)
        logits = model(tokens, rngs=nnx.Rngs(dropout=3))
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0])

    loop_loss, loop_grads = jax.value_and_grad(lambda p: loss(loop_def, p))(loop_params)
    scan_loss, scan_grads = jax.value_and_grad(lambda p: loss(scan_def, p))(scan_params)
    np.testing.assert_allclose(scan_loss, loop_loss, rtol=1e-6)
    for i in range(2):
        np.testing.assert_allclose(
            scan_grads["blocks"]["attn"]["query"]["kernel"][i],
            loop_grads["blocks"][i]["attn"]["query"]["kernel"],
            rtol=1e-4,
            atol=1e-7,
        )


def test_remat_policies_save_activation_memory():
    def temp(remat):
        config = load_config(
            "gpt_pysource",
            "smoke",
            global_batch_size=32,
            model__num_layers=8,
            model__scan_layers=True,
            model__remat=remat,
        )
        return _temp_bytes(config, {"data": 1})

    none, full, save_dots = temp("none"), temp("full"), temp("save_dots")
    # Measured on XLA:CPU (BENCHMARKS.md): about 64 MB -> 12.5 MB (full), 24 MB (save_dots).
    assert full < 0.3 * none
    assert full < save_dots < 0.5 * none


def test_scanned_model_trains_sharded(data_dir, tmp_path):
    state, result, losses = train_gpt_smoke(
        data_dir,
        tmp_path,
        {"fsdp": 4, "tensor": 2},
        steps=3,
        model__scan_layers=True,
        model__remat="save_dots",
    )
    kernel = state.params["blocks"]["mlp"]["up"]["kernel"]  # (layers, embed, mlp)
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (2, 16, 64)
    assert losses[-1] < losses[0] and np.isfinite(result["loss"])


def _partition_specs(config) -> dict[str, str]:
    _, layout, _, _ = build(config, {"data": -1})
    specs = jax.tree_util.tree_flatten_with_path(layout.shardings.params)[0]
    return {sharding.path_str(path): str(s.spec) for path, s in specs}


def test_partition_specs_match_the_golden_snapshot():
    """Sharding changes must be deliberate: regenerate with JAXTRAIN_UPDATE_GOLDEN=1."""
    specs = _partition_specs(load_config("gpt_pysource"))
    if os.environ.get("JAXTRAIN_UPDATE_GOLDEN"):
        with open(GOLDEN, "w", encoding="utf-8") as f:
            json.dump(specs, f, indent=1, sort_keys=True)
            f.write("\n")
    with open(GOLDEN, encoding="utf-8") as f:
        golden = json.load(f)
    changed = {
        k: (golden.get(k), specs.get(k))
        for k in set(golden) | set(specs)
        if golden.get(k) != specs.get(k)
    }
    assert not changed, f"PartitionSpecs changed (golden, now): {changed}"


def test_model_flops_agree_with_xla_and_survive_scan():
    def flops(**overrides):
        config = load_config("gpt_pysource", global_batch_size=8, **overrides)
        compiled, layout = compile_step(config, {"data": 1}, jax.devices()[:1])
        stats = hlo.compiled_stats(compiled)
        task = tasks.from_config(config)
        model, _ = steps.flops_per_device_step(task.flops_per_example, layout, 8, stats)
        return model, stats["flops"], stats["flops_per_step"]

    model, xla, xla_per_step = flops()
    # 918,656 weights less the 256 x 128 embedding table, 6 FLOPs each per token, plus
    # attention: 12 x 4 layers x 4 heads x 32 x 128 per token; 8 x 128 tokens.
    assert model == (6 * (918_656 - 256 * 128) + 12 * 4 * 4 * 32 * 128) * 8 * 128
    assert 0.9 * model < xla < 1.3 * model  # XLA also counts softmax, norms, the optimizer
    assert xla_per_step == xla  # no loops: nothing to add
    scanned_model, scanned_xla, scanned_per_step = flops(model__scan_layers=True)
    assert scanned_model == model
    assert scanned_xla < 0.6 * xla  # XLA's cost analysis counts the scanned block once...
    # ...and with each of the 4 trips counted, the scanned step's FLOPs are the unrolled's
    # (within the little the two programs differ by).
    assert scanned_per_step == pytest.approx(xla, rel=0.02)
