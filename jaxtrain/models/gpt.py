"""GPT-style decoder: RoPE, RMSNorm, gated (SwiGLU) MLP, causal attention.

Every parameter names its dimensions with logical axes (see jaxtrain.sharding); the
config's rules table decides how each is laid out over the mesh. Activations are
constrained at block boundaries so XLA does not invent surprising layouts.

Its hyperparameters are one typed `GPTConfig` with no defaults: every one comes from the
config file (`config.model`), so a field deleted there is an error, not a silent default.

Decoding with a KV cache is a second path beside the training forward pass, sharing its
weights and projections but not its code path, so training numerics never depend on it:

    cache = model.init_cache(batch_size, max_length)     # keys and values, per layer
    logits, cache = model.decode(prompt, cache, 0)       # prefill: every prompt position
    logits, cache = model.decode(next_tokens, cache, n)  # then one position at a time

`jaxtrain.sample` runs that loop inside one jitted `lax.fori_loop`.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrain.checks import is_int, is_number
from jaxtrain.models.attention import causal_attention
from jaxtrain.sharding import constrain

BLE = ("activation_batch", "activation_length", "activation_embed")
_HEADS = ("activation_batch", "activation_length", "activation_heads", None)
_KV_HEADS = ("activation_batch", "activation_length", "activation_kv_heads", None)
# A KV cache's layout: [batch, max_length, kv_heads, head_dim]. Its length is never split:
# each decoding step reads all of it.
_CACHE = ("activation_batch", None, "activation_kv_heads", None)

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")  # see models/attention.py

# What the backward pass may keep from the forward pass of a block, by config name:
# "none" keeps everything (fastest, most memory), "full" keeps only the block's input and
# recomputes the rest, "save_dots" keeps matmul outputs and recomputes the cheap
# elementwise work between them (and splash attention's forward kernel: its output is no
# dot, and naming its residuals for the policy to keep, tried, did not stop the rerun).
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _init(std: float):
    return nnx.initializers.normal(stddev=std)


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotary position embedding over the last dimension of x: [batch, length, heads, dim]."""
    half = x.shape[-1] // 2
    freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[:, None].astype(jnp.float32) * freqs[None, :]  # [length, half]
    sin, cos = jnp.sin(angles)[None, :, None, :], jnp.cos(angles)[None, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head (or grouped-query, num_kv_heads < num_heads) causal self-attention."""

    def __init__(
        self,
        embed_dim,
        num_heads,
        num_kv_heads,
        head_dim,
        rope_base,
        attention_impl,
        num_layers,
        *,
        dtype,
        param_dtype,
        rngs,
    ):
        self.rope_base = rope_base
        self.attention_impl = attention_impl  # "auto": see models/attention.py
        std = embed_dim**-0.5
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query = nnx.Einsum(
            "bld,dhk->blhk",
            (embed_dim, num_heads, head_dim),
            kernel_init=_init(std),
            kernel_metadata={"out_sharding": ("embed", "heads", "head_dim")},
            **kw,
        )
        self.key = nnx.Einsum(
            "bld,dhk->blhk",
            (embed_dim, num_kv_heads, head_dim),
            kernel_init=_init(std),
            kernel_metadata={"out_sharding": ("embed", "kv_heads", "head_dim")},
            **kw,
        )
        self.value = nnx.Einsum(
            "bld,dhk->blhk",
            (embed_dim, num_kv_heads, head_dim),
            kernel_init=_init(std),
            kernel_metadata={"out_sharding": ("embed", "kv_heads", "head_dim")},
            **kw,
        )
        # Residual-branch outputs scaled down with depth (GPT-2).
        out_std = (num_heads * head_dim) ** -0.5 / (2 * num_layers) ** 0.5
        self.out = nnx.Einsum(
            "blhk,hkd->bld",
            (num_heads, head_dim, embed_dim),
            kernel_init=_init(out_std),
            kernel_metadata={"out_sharding": ("heads", "head_dim", "embed")},
            **kw,
        )

    def _project(self, x, positions):
        q = constrain(rope(self.query(x), positions, self.rope_base), _HEADS)
        k = constrain(rope(self.key(x), positions, self.rope_base), _KV_HEADS)
        v = constrain(self.value(x), _KV_HEADS)
        return q, k, v

    def __call__(self, x, positions):
        q, k, v = self._project(x, positions)
        y = causal_attention(q, k, v, self.attention_impl)
        return self.out(constrain(y, _HEADS))

    def decode(self, x, positions, cache):
        """Causal attention of `x` over the cached positions and its own.

        Args:
          x: [batch, length, embed] at `positions`.
          positions: [length] consecutive positions; the cache holds those before them.
          cache: {"key", "value"}, each [batch, max_length, kv_heads, head_dim].

        Returns:
          (output [batch, length, embed], the cache with `x`'s keys and values written
          at `positions`).
        """
        q, k, v = self._project(x, positions)
        start = (0, positions[0], 0, 0)
        cache = {
            "key": jax.lax.dynamic_update_slice(cache["key"], k.astype(cache["key"].dtype), start),
            "value": jax.lax.dynamic_update_slice(
                cache["value"], v.astype(cache["value"].dtype), start
            ),
        }
        cache = jax.tree.map(lambda c: constrain(c, _CACHE), cache)
        # Slots past a query's own position are empty (or hold a later token): masked out.
        slots = jnp.arange(cache["key"].shape[1])
        mask = (slots[None, :] <= positions[:, None])[None, None]  # [1, 1, length, max_length]
        # XLA's implementation: cuDNN's fused kernel takes causal or padding masks only.
        y = jax.nn.dot_product_attention(
            q, cache["key"], cache["value"], mask=mask, implementation="xla"
        )
        return self.out(constrain(y, _HEADS)), cache


class MLP(nnx.Module):
    """Gated MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, embed_dim, mlp_dim, num_layers, *, dtype, param_dtype, rngs):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        std = embed_dim**-0.5
        self.gate = nnx.Linear(
            embed_dim,
            mlp_dim,
            kernel_init=_init(std),
            kernel_metadata={"out_sharding": ("embed", "mlp")},
            **kw,
        )
        self.up = nnx.Linear(
            embed_dim,
            mlp_dim,
            kernel_init=_init(std),
            kernel_metadata={"out_sharding": ("embed", "mlp")},
            **kw,
        )
        self.down = nnx.Linear(
            mlp_dim,
            embed_dim,
            kernel_init=_init(mlp_dim**-0.5 / (2 * num_layers) ** 0.5),
            kernel_metadata={"out_sharding": ("mlp", "embed")},
            **kw,
        )

    def __call__(self, x):
        h = jax.nn.silu(self.gate(x)) * self.up(x)
        h = constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
        return self.down(h)


def _norm(embed_dim, dtype, param_dtype, rngs):
    return nnx.RMSNorm(
        embed_dim,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
        scale_metadata={"out_sharding": ("norm",)},
    )


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """The GPT's hyperparameters (`config.model` less its `name`); see configs/gpt_pysource.py."""

    vocab_size: int
    num_layers: int
    embed_dim: int
    num_heads: int
    num_kv_heads: int  # < num_heads for grouped-query attention
    head_dim: int
    mlp_dim: int
    rope_base: float
    dropout_rate: float
    attention_impl: str  # "auto", "xla", "cudnn" (GPU) or "splash" (TPU); models/attention.py
    scan_layers: bool  # stack the blocks' weights and scan over them
    remat: str  # "none", "full" or "save_dots"

    def __post_init__(self):
        for name in (
            "vocab_size",
            "num_layers",
            "embed_dim",
            "num_heads",
            "num_kv_heads",
            "mlp_dim",
        ):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        if not is_int(self.head_dim) or self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim!r} must be a positive even integer (RoPE)")
        if not (is_number(self.rope_base) and self.rope_base > 0):
            raise ValueError(f"rope_base={self.rope_base!r} must be a finite positive number")
        if not (is_number(self.dropout_rate) and 0 <= self.dropout_rate < 1):
            raise ValueError(f"dropout_rate={self.dropout_rate!r} must be in [0, 1)")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"attention_impl={self.attention_impl!r}; choose one of {list(ATTENTION_IMPLS)}"
            )
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"scan_layers={self.scan_layers!r} must be True or False")
        if self.remat != "none" and self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; choose one of {['none', *REMAT_POLICIES]}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )


class Block(nnx.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: GPTConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn_norm = _norm(cfg.embed_dim, dtype, param_dtype, rngs)
        self.attn = Attention(
            cfg.embed_dim,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.rope_base,
            cfg.attention_impl,
            cfg.num_layers,
            **kw,
        )
        self.mlp_norm = _norm(cfg.embed_dim, dtype, param_dtype, rngs)
        self.mlp = MLP(cfg.embed_dim, cfg.mlp_dim, cfg.num_layers, **kw)
        self.dropout = nnx.Dropout(cfg.dropout_rate)

    def __call__(self, x, positions, *, rngs):
        y = self.attn(self.attn_norm(x), positions)
        x = constrain(x + self.dropout(y, rngs=rngs), BLE)
        y = self.mlp(self.mlp_norm(x))
        return constrain(x + self.dropout(y, rngs=rngs), BLE)

    def decode(self, x, positions, cache):
        """The block in eval mode (no dropout) over a KV cache; returns (x, cache)."""
        y, cache = self.attn.decode(self.attn_norm(x), positions, cache)
        x = constrain(x + y, BLE)
        return constrain(x + self.mlp(self.mlp_norm(x)), BLE), cache


class GPT(nnx.Module):
    """Decoder-only language model over integer tokens [batch, length] -> float32 logits.

    Train and eval mode are set the Flax way, `nnx.view(model, deterministic=...)`: in
    train mode (deterministic=False) dropout draws from `rngs` passed to the call.
    """

    def __init__(self, cfg: GPTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.deterministic = False
        # Keys and values are computed in the compute dtype; the cache keeps them so.
        self.cache_dtype = dtype or param_dtype
        self.embed = nnx.Embed(
            cfg.vocab_size,
            cfg.embed_dim,
            embedding_init=_init(1.0),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
            embedding_metadata={"out_sharding": ("vocab", "embed")},
        )
        if cfg.scan_layers:
            # One Block whose parameters carry a leading "layers" axis: the forward pass is
            # a scan over it, so compile time and program size do not grow with depth.
            @nnx.split_rngs(splits=cfg.num_layers)
            @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def stacked(rngs):
                return Block(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

            self.blocks = stacked(rngs)
        else:
            self.blocks = nnx.List(
                [
                    Block(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                    for _ in range(cfg.num_layers)
                ]
            )
        self.final_norm = _norm(cfg.embed_dim, dtype, param_dtype, rngs)
        self.lm_head = nnx.Linear(
            cfg.embed_dim,
            cfg.vocab_size,
            use_bias=False,
            # Small logits at init: the first loss is ~ln(vocab_size).
            kernel_init=_init(0.02),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
            kernel_metadata={"out_sharding": ("embed", "vocab")},
        )

    def set_view(self, deterministic: bool | None = None):
        """Used by `nnx.view`: train mode (False) turns dropout on."""
        if deterministic is not None:
            self.deterministic = deterministic

    def __call__(self, tokens, *, rngs: nnx.Rngs | None = None):
        cfg = self.cfg
        positions = jnp.arange(tokens.shape[1])
        x = constrain(self.embed(tokens), BLE)
        # One dropout key per layer, drawn the same way whether layers are scanned or not.
        dropout = not self.deterministic and cfg.dropout_rate > 0
        if dropout and rngs is None:
            raise ValueError("GPT in train mode with dropout needs `rngs` for its dropout keys")
        keys = jax.random.split(rngs.dropout() if dropout else jax.random.key(0), cfg.num_layers)

        def apply_block(x, block, key):
            return block(x, positions, rngs=nnx.Rngs(dropout=key) if dropout else None)

        if cfg.remat != "none":
            apply_block = nnx.remat(apply_block, policy=REMAT_POLICIES[cfg.remat])
        if cfg.scan_layers:
            scan = nnx.scan(apply_block, in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry)
            x = scan(x, self.blocks, keys)
        else:
            for block, key in zip(self.blocks, keys, strict=True):
                x = apply_block(x, block, key)
        return self._logits(x)

    def _logits(self, x):
        logits = self.lm_head(self.final_norm(x))
        # Loss and softmax in float32 whatever the compute dtype.
        logits = constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))
        return logits.astype(jnp.float32)

    def init_cache(self, batch_size: int, max_length: int):
        """An empty KV cache for `decode`: room for `max_length` positions of each sequence.

        Returns:
          Per layer `{"key", "value"}` of zeros [batch, max_length, kv_heads, head_dim] in
          the compute dtype: a list over layers, or one dict with a leading layers axis
          when the layers are scanned (as their weights are stacked).
        """
        cfg = self.cfg
        shape = (batch_size, max_length, cfg.num_kv_heads, cfg.head_dim)
        if cfg.scan_layers:
            shape = (cfg.num_layers, *shape)
        empty = lambda: {name: jnp.zeros(shape, self.cache_dtype) for name in ("key", "value")}
        return empty() if cfg.scan_layers else [empty() for _ in range(cfg.num_layers)]

    def decode(self, tokens, cache, index):
        """Logits of `tokens` placed at positions `index`, `index + 1`, ..., using the cache.

        The same function of the sequence as `__call__` in eval mode, but each position
        attends to the keys and values cached for the positions before it instead of
        recomputing them, so generating n tokens costs O(n) block evaluations, not O(n^2).

        Args:
          tokens: [batch, length] int, the next `length` tokens of every sequence
            (the whole prompt to prefill, then one token per step).
          cache: from `init_cache` or the previous `decode`, filled up to `index`.
          index: int32 scalar (may be traced), the position of `tokens[:, 0]`.

        Returns:
          (float32 logits [batch, length, vocab], the cache filled up to `index + length`).
        """
        positions = index + jnp.arange(tokens.shape[1])
        x = constrain(self.embed(tokens), BLE)

        def apply_block(x, block, layer_cache):
            return block.decode(x, positions, layer_cache)

        if self.cfg.scan_layers:
            scan = nnx.scan(apply_block, in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0))
            x, cache = scan(x, self.blocks, cache)
        else:
            filled = []
            for block, layer_cache in zip(self.blocks, cache, strict=True):
                x, layer_cache = apply_block(x, block, layer_cache)
                filled.append(layer_cache)
            cache = filled
        return self._logits(x), cache


def train_flops_per_sequence(cfg: GPTConfig, params, seq_len: int) -> float:
    """Model FLOPs to train on one sequence: forward and backward, remat excluded.

    PaLM (appendix B): 6 per weight per token for the matmuls (the input embedding is a
    lookup, not a matmul), plus 12 * layers * heads * head_dim * length per token for
    attention scores and values. This is the numerator of MFU.

    Args:
      cfg: the model's hyperparameters.
      params: its parameters (arrays or ShapeDtypeStructs), nested dicts.
      seq_len: tokens per sequence.
    """
    weights = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    weights -= math.prod(params["embed"]["embedding"].shape)
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    return float((6 * weights + attention) * seq_len)
