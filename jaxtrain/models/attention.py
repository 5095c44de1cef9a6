"""Causal self-attention for training, with every matmul in the compute dtype.

`jax.nn.dot_product_attention`'s XLA path computes float32 scores from bfloat16 or
float16 products by asking dot_general for an algorithm (BF16_BF16_F32, F16_F16_F32).
Its backward pass then multiplies the float32 score gradients by the keys and queries
under that algorithm, and F16_F16_F32 does not exist on CPU or TPU: float16 training
fails to compile there. This one writes the same math so that no algorithm is needed:
the scores are float32 (`preferred_element_type`) and their gradient is cast to the
compute dtype before the two backward matmuls, as flash attention does. Softmax stays
float32. On GPU, `implementation="cudnn"` uses cuDNN's fused kernel through jax.

On TPU, `implementation="splash"` uses jax's Pallas splash attention kernel (the flash
attention of MaxText and levanter on TPU): it never materialises the [length, length]
scores, and skips the blocks above the causal diagonal. It runs per device under
`jax.shard_map`, examples and heads split as the active sharding rules say; a sequence
split over the mesh is gathered first (the kernel cannot split keys and values).

`implementation="auto"` is splash on TPU for sequences of a multiple of 128 tokens (the
kernel's tile) and this module's XLA attention everywhere else; on GPU cuDNN is used only
when asked for, as jax's own "auto" does.
"""

import functools

import jax
import jax.numpy as jnp

from jaxtrain.errors import ConfigError
from jaxtrain.sharding import active_spec

# Splash attention's tile: query and key blocks of up to this many positions (MaxText's
# default), a multiple of 128 (TPU lanes) that divides the sequence, or the whole
# sequence when shorter.
SPLASH_BLOCK = 512


@jax.custom_vjp
def _scores(q, k):
    """q [b, l, kv, g, d] . k [b, m, kv, d] -> float32 scores [b, kv, g, l, m]."""
    return jnp.einsum("blkgd,bmkd->bkglm", q, k, preferred_element_type=jnp.float32)


def _scores_fwd(q, k):
    return _scores(q, k), (q, k)


def _scores_bwd(residuals, grad):
    q, k = residuals
    grad = grad.astype(q.dtype)  # the products in the compute dtype, as in the forward pass
    dq = jnp.einsum("bkglm,bmkd->blkgd", grad, k, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bkglm,blkgd->bmkd", grad, q, preferred_element_type=jnp.float32)
    return dq.astype(q.dtype), dk.astype(k.dtype)


_scores.defvjp(_scores_fwd, _scores_bwd)


def _splash_local(q, k, v, *, interpret: bool):
    """Splash attention on one device's share: q [b, heads, l, d], k and v [b, kv, l, d]."""
    # Imported here: Pallas and the kernel take 0.06 s to import, on every start-up of a
    # run that never uses them (every run off TPU).
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    heads, length = q.shape[1], q.shape[2]
    block = splash_block(length)
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * heads)
    kernel = splash.make_splash_mha(
        mask,
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )
    return jax.vmap(kernel)(q, k, v)


def splash_block(length: int) -> int:
    """The tile for a sequence of `length`: itself up to SPLASH_BLOCK, else the largest
    multiple of 128 up to SPLASH_BLOCK that divides it (128 for 640 tokens)."""
    if length <= SPLASH_BLOCK:
        return length
    return next(b for b in range(SPLASH_BLOCK, 0, -128) if length % b == 0)


def _platform() -> str:
    """The platform being traced for: the mesh's devices', else the default backend's."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return getattr(device, "platform", None) or jax.default_backend()


def resolve(implementation: str, length: int) -> str:
    """The implementation "auto" means for a sequence of `length` here (see above)."""
    if implementation != "auto":
        return implementation
    return "splash" if _platform() == "tpu" and length % 128 == 0 else "xla"


def splash_attention(q, k, v, *, interpret: bool = False):
    """Causal (grouped-query) attention by the Pallas splash kernel (TPU).

    Args:
      q, k, v: as `causal_attention`; the length a multiple of 128 when over 512.
      interpret: run the kernel in Pallas's interpreter (any platform, slow: for tests).

    Returns:
      [batch, length, heads, head_dim] in the dtype of q.
    """
    platform = _platform()
    if not interpret and platform != "tpu":
        raise ConfigError(
            f"config.model.attention_impl='splash' is a TPU kernel and the mesh's devices are "
            f"{platform}: use 'xla' (or 'cudnn' on GPU)"
        )
    head_dim = q.shape[-1]
    # The kernel does not scale the scores: scale the queries, as MaxText does.
    q = (q * jnp.asarray(head_dim**-0.5, q.dtype)).transpose(0, 2, 1, 3)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    local = functools.partial(_splash_local, interpret=interpret)
    q_spec = active_spec(("activation_batch", "activation_heads", None, None))
    if q_spec is None:
        out = local(q, k, v)
    else:
        kv_spec = active_spec(("activation_batch", "activation_kv_heads", None, None))
        out = jax.shard_map(
            local, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec, check_vma=False
        )(q, k, v)
    return out.transpose(0, 2, 1, 3)


def causal_attention(q, k, v, implementation: str = "xla"):
    """Causal (grouped-query) attention.

    Args:
      q: queries [batch, length, heads, head_dim].
      k: keys [batch, length, kv_heads, head_dim]; heads is a multiple of kv_heads.
      v: values, as k.
      implementation: "xla" (this module's, any platform), "cudnn" (GPU only),
        "splash" (TPU only) or "auto" (see `resolve`).

    Returns:
      [batch, length, heads, head_dim] in the dtype of v.
    """
    implementation = resolve(implementation, q.shape[1])
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    if implementation == "splash":
        return splash_attention(q, k, v)
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    grouped = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    scores = _scores(grouped, k) * jnp.float32(head_dim**-0.5)
    causal = jnp.tril(jnp.ones((length, k.shape[1]), bool))
    # Large and finite (as jax's): a row's maximum minus it stays representable.
    scores = jnp.where(causal, scores, jnp.float32(-0.7 * jnp.finfo(jnp.float32).max))
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkglm,bmkd->blkgd", probs, v)
    return out.reshape(batch, length, heads, head_dim)
