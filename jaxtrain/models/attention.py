"""Causal self-attention for training, with every matmul in the compute dtype.

`jax.nn.dot_product_attention`'s XLA path computes float32 scores from bfloat16 or
float16 products by asking dot_general for an algorithm (BF16_BF16_F32, F16_F16_F32).
Its backward pass then multiplies the float32 score gradients by the keys and queries
under that algorithm, and F16_F16_F32 does not exist on CPU or TPU: float16 training
fails to compile there. This one writes the same math so that no algorithm is needed:
the scores are float32 (`preferred_element_type`) and their gradient is cast to the
compute dtype before the two backward matmuls, as flash attention does. Softmax stays
float32. On GPU, `implementation="cudnn"` uses cuDNN's fused kernel through jax.
"""

import jax
import jax.numpy as jnp


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


def causal_attention(q, k, v, implementation: str = "xla"):
    """Causal (grouped-query) attention.

    Args:
      q: queries [batch, length, heads, head_dim].
      k: keys [batch, length, kv_heads, head_dim]; heads is a multiple of kv_heads.
      v: values, as k.
      implementation: "xla" (this module's, any platform) or "cudnn" (GPU only).

    Returns:
      [batch, length, heads, head_dim] in the dtype of v.
    """
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
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
