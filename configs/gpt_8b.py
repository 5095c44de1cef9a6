"""A 7.2B-parameter Llama-style GPT (Llama 3 8B's shape, a 32,000-token vocabulary).

Sized for a TPU v5p-64 (32 chips). Plan it before booking one:

    jaxtrain plan --config=gpt_8b.py --topology=v5p-64
    jaxtrain train --config=gpt_8b.py --workdir=gs://.../runs/gpt_8b
    jaxtrain train --config=gpt_8b.py:smoke --workdir=/tmp/gpt_8b_smoke   # CPU, seconds

Its data is the bundled `pysource` corpus, byte-level (token ids 0-255 of the 32,000):
a stand-in that needs no download, so the config runs anywhere. `jaxtrain plan` never
loads it (the lm task takes the batch shape from `config.data.seq_len`).
"""

import ml_collections
from jaxtrain.configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base.get_config()
    c.task = "lm"  # next-token cross-entropy (jaxtrain/tasks/lm.py)
    c.global_batch_size = 256  # sequences per step: 256 x 4,096 = 1,048,576 tokens
    # Each step runs as 2 sequential parts of 128 sequences (gradients accumulated): the
    # activation memory of 128, which save_dots needs to fit (see model.remat).
    c.microbatches = 2
    c.num_train_steps = 50_000  # about 52B tokens
    c.log_every_steps = 10
    c.eval_every_steps = 1_000
    c.eval_steps = 32  # eval batches per evaluation
    c.checkpoint_every_steps = 1_000

    # Two data-parallel replicas, each fully sharded (FSDP) over 16 chips of a v5p-64:
    # weights, gradients and Adam moments split 16 ways, gathered layer by layer. The TPU
    # compiler estimates this 26% faster than FSDP over all 32 chips (its gathers span
    # half the chips); BENCHMARKS.md has what was tried.
    c.mesh = dict(data=2, fsdp=-1, sequence=1, tensor=1)
    c.rules = (
        # activations
        ("activation_batch", ("data", "fsdp")),  # examples split over every chip
        ("activation_length", "sequence"),  # sequence parallelism, when mesh.sequence > 1
        ("activation_embed", None),
        ("activation_heads", "tensor"),
        ("activation_kv_heads", "tensor"),
        ("activation_mlp", "tensor"),
        ("activation_vocab", "tensor"),
        # parameters
        ("vocab", "tensor"),
        ("embed", "fsdp"),  # every weight matrix has an embed dimension: FSDP splits it
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("mlp", "tensor"),
        ("norm", None),  # RMSNorm scales: small, replicated
        ("layers", None),  # the stacked-layers axis of scan_layers
    )

    c.data.update(
        name="pysource",  # a stand-in corpus; any TFDS text data set works the same way
        data_dir="",  # TFDS data_dir; "" = TFDS default (~/tensorflow_datasets)
        train_split="train",
        eval_split="validation",
        text_key="text",  # the record field holding the text (bytes are the tokens)
        seq_len=4_096,  # tokens per training sequence
        read_threads=0,  # windows of text held in memory: threads would only contend
    )
    c.model = dict(
        name="gpt",  # the bundled GPT (RoPE, RMSNorm, SwiGLU, grouped-query attention)
        vocab_size=32_000,  # Llama 2's vocabulary size
        num_layers=32,
        embed_dim=4_096,
        num_heads=32,
        num_kv_heads=8,  # grouped-query attention: 4 query heads per key/value head
        head_dim=128,
        mlp_dim=14_336,  # hidden width of the SwiGLU MLP
        rope_base=500_000.0,  # RoPE's wavelength base (Llama 3's)
        dropout_rate=0.0,  # none, as in Llama pretraining
        attention_impl="auto",  # splash on TPU, XLA elsewhere; or "xla", "cudnn" (GPU), "splash"
        scan_layers=True,  # one compiled block scanned 32 times: compile time flat in depth
        # Keep the matmul outputs for the backward pass, recompute the rest (attention,
        # elementwise work). With splash attention the TPU compiler prices it 5% faster
        # than "full" at 256 sequences at once; 256 at once with save_dots does not fit.
        remat="save_dots",
    )
    c.optim.update(
        lr=3e-4,  # peak learning rate (Llama 2 7B's)
        min_lr_ratio=0.1,  # cosine decay to 3e-5
        warmup_steps=2_000,
        weight_decay=0.1,
        grad_clip_norm=1.0,
    )
    c.optim.adamw.update(b2=0.95, eps=1e-8)  # AdamW as Llama pretraining set it

    if arg == "smoke":  # the same architecture, tiny: trains a few steps on CPU in seconds
        c.num_train_steps = 4
        c.log_every_steps = 2
        c.eval_every_steps = 4
        c.eval_steps = 2
        c.checkpoint_every_steps = 2
        c.global_batch_size = 16
        c.mesh = dict(data=1, fsdp=-1, sequence=1, tensor=1)  # FSDP over any devices
        c.data.seq_len = 32
        c.model.update(
            vocab_size=256,  # bytes: the data's token ids must be below it
            num_layers=2,
            embed_dim=64,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            mlp_dim=192,
        )
        c.optim.warmup_steps = 2
    return c
