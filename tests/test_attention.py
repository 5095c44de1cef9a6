"""The attention implementations agree, and Pallas kernels' FLOPs are counted.

Splash attention is a TPU kernel; here it runs in Pallas's interpreter on 8 CPU devices,
under the same `jax.shard_map` split (examples over data x FSDP, heads over tensor) that
a TPU mesh uses.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from jaxtrain import plan, sharding
from jaxtrain.errors import ConfigError
from jaxtrain.models import attention
from jaxtrain.pallas_flops import pallas_flops

RULES = [
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", "sequence"),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
]
_QUERIES = ("activation_batch", "activation_length", "activation_heads", None)


def _qkv(batch=4, length=256, heads=4, kv_heads=2, head_dim=64, dtype=jnp.float32):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(batch, length, heads, head_dim))
    k, v = (rng.normal(size=(batch, length, kv_heads, head_dim)) for _ in range(2))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _loss(fn):
    # Weighted so that every output position and feature gets its own gradient.
    def loss(q, k, v):
        out = fn(q, k, v)
        weights = jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape) / out.size
        return jnp.sum(out.astype(jnp.float32) * weights)

    return loss


def _splash(q, k, v):
    return attention.splash_attention(q, k, v, interpret=True)


def _split_splash(q, k, v):
    # Queries arrive laid out as the model's are: split over the sequence axis too.
    return _splash(sharding.constrain(q, _QUERIES), k, v)


@pytest.mark.parametrize(
    "mesh_shape",
    [dict(data=2, fsdp=2, sequence=1, tensor=2), dict(data=2, fsdp=1, sequence=2, tensor=2)],
)
def test_splash_matches_xla_attention_and_its_gradients_on_a_sharded_mesh(mesh_shape):
    q, k, v = _qkv()
    want = attention.causal_attention(q, k, v, "xla")
    want_grads = jax.grad(_loss(attention.causal_attention), argnums=(0, 1, 2))(q, k, v)
    mesh = sharding.make_mesh(mesh_shape)
    with jax.set_mesh(mesh), sharding.use_rules(RULES):
        got = jax.jit(_split_splash)(q, k, v)
        grads = jax.jit(jax.grad(_loss(_split_splash), argnums=(0, 1, 2)))(q, k, v)
        # It ran per device: the output keeps the examples and heads split (a sequence
        # split is gathered first: the kernel needs every key).
        assert got.sharding.spec[0] in (("data", "fsdp"), "data")
        assert got.sharding.spec[2] == "tensor"
    np.testing.assert_allclose(got, want, atol=2e-5)
    for g, w in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-4)


def test_splash_is_causal():
    q, k, v = _qkv(batch=1, length=128)
    out = attention.splash_attention(q, k, v, interpret=True)
    later = v.at[:, 64:].set(100.0)  # changing later positions' values ...
    changed = attention.splash_attention(q, k, later, interpret=True)
    np.testing.assert_array_equal(out[:, :64], changed[:, :64])  # ... leaves earlier ones
    assert not np.allclose(out[:, 64:], changed[:, 64:])


def test_splash_tiles_a_sequence_no_512_block_divides():
    assert [attention.splash_block(n) for n in (32, 512, 1024, 640, 768, 1152)] == [
        32,
        512,
        512,
        128,
        384,
        384,
    ]
    q, k, v = _qkv(batch=1, length=640, heads=2, kv_heads=1)  # five tiles of 128
    np.testing.assert_allclose(
        _splash(q, k, v), attention.causal_attention(q, k, v, "xla"), atol=2e-5
    )


def test_splash_outside_a_tpu_is_a_config_error():
    q, k, v = _qkv(batch=2, length=128)
    with jax.set_mesh(sharding.make_mesh(dict(data=-1, fsdp=1, sequence=1, tensor=1))):
        with pytest.raises(ConfigError, match="attention_impl='splash' is a TPU kernel.*cpu"):
            jax.jit(lambda q, k, v: attention.causal_attention(q, k, v, "splash"))(q, k, v)
    config = load_config("gpt_pysource", "smoke", model__attention_impl="splash")
    with pytest.raises(ConfigError, match="attention_impl='splash'"):
        plan.make_plan(config, "cpu-8")


def test_pallas_flops_counts_every_block_of_every_kernel_and_loop_trip():
    batch, length, heads, head_dim = 2, 1024, 4, 64
    q, k, v = (jax.ShapeDtypeStruct(x.shape, jnp.bfloat16) for x in _qkv(2, length, heads, 2))
    # Two matmuls (scores, then values) over the whole [length, length] grid of blocks.
    full = 2 * (2 * batch * heads * length * length * head_dim)

    def forward(q, k, v):
        return jnp.sum(_splash(q, k, v).astype(jnp.float32))

    flops, calls = pallas_flops(jax.make_jaxpr(forward)(q, k, v))
    assert flops == full and sum(calls.values()) == 1
    # The backward pass's two kernels recompute the scores: 2 + 4 (dK, dV) + 3 (dQ) matmuls.
    flops, calls = pallas_flops(jax.make_jaxpr(jax.grad(forward, argnums=(0, 1, 2)))(q, k, v))
    assert flops == 4.5 * full and len(calls) == 3

    def scanned(q, k, v):
        return jax.lax.scan(lambda c, _: (c + forward(q, k, v), None), 0.0, length=3)[0]

    flops, calls = pallas_flops(jax.make_jaxpr(scanned)(q, k, v))
    assert flops == 3 * full and sum(calls.values()) == 3
    # No kernels, no FLOPs: XLA's own matmuls are XLA's to count.
    assert pallas_flops(jax.make_jaxpr(attention.causal_attention)(q, k, v)) == (0.0, {})
