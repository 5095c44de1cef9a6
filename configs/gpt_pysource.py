"""A byte-level GPT on the bundled `pysource` corpus (the Python standard library's source).

The README's main job: on a 2-core CPU it trains in a few minutes to below 2.5 nats per
byte of validation loss (a uniform guess is ln 256 = 5.55).

    jaxtrain train --config=gpt_pysource.py --workdir=runs/gpt
    jaxtrain train --config=gpt_pysource.py:smoke --workdir=/tmp/gpt_smoke
    jaxtrain train --config=gpt_pysource.py --workdir=runs/gpt2 --config.optim.lr=1e-3
"""

import ml_collections
from jaxtrain.configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base.get_config()
    c.task = "lm"
    c.global_batch_size = 32  # sequences per step
    c.num_train_steps = 300
    c.log_every_steps = 25
    c.eval_every_steps = 100
    c.eval_steps = 16
    c.checkpoint_every_steps = 100

    c.rules = (
        # activations
        ("activation_batch", ("data", "fsdp")),
        ("activation_length", "sequence"),
        ("activation_embed", None),
        ("activation_heads", "tensor"),
        ("activation_kv_heads", "tensor"),
        ("activation_mlp", "tensor"),
        ("activation_vocab", "tensor"),
        # parameters
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("mlp", "tensor"),
        ("norm", None),
        ("layers", None),  # the stacked-layers axis when model.scan_layers=True
    )

    c.data.update(
        name="pysource",  # bundled: pysource; or a TFDS catalog text data set
        data_dir="",  # TFDS data_dir; "" = TFDS default (~/tensorflow_datasets)
        train_split="train",  # the split training reads
        eval_split="validation",  # the split evaluation reads (`jaxtrain eval --split`)
        text_key="text",  # the record field holding the text (bytes are the tokens)
        seq_len=128,  # tokens per training sequence
        read_threads=0,  # windows of text held in memory: threads would only contend
    )
    c.model = dict(
        name="gpt",  # the bundled GPT, or "package.module:Class" taking these fields
        vocab_size=256,  # bytes
        num_layers=4,  # transformer blocks
        embed_dim=128,  # width of the residual stream
        num_heads=4,  # query heads per attention layer
        num_kv_heads=4,  # < num_heads for grouped-query attention
        head_dim=32,  # width of each attention head
        mlp_dim=384,  # hidden width of the gated MLP
        rope_base=10_000.0,  # RoPE's wavelength base
        dropout_rate=0.0,  # dropout on each block's attention and MLP outputs, in training
        attention_impl="auto",  # splash on TPU, XLA elsewhere; or "xla", "cudnn" (GPU), "splash"
        scan_layers=False,  # stack the blocks' weights and scan: compile time flat in depth
        remat="none",  # recompute in backward: "none", "full" or "save_dots"
    )
    c.optim.update(lr=3e-3, warmup_steps=50, weight_decay=0.1)
    c.optim.adamw.b2 = 0.95  # a shorter second-moment memory, as GPT recipes use

    if arg == "smoke":  # a few steps in seconds, for tests and quick checks
        c.num_train_steps = 4
        c.log_every_steps = 2
        c.eval_every_steps = 4
        c.eval_steps = 2
        c.checkpoint_every_steps = 2
        c.global_batch_size = 16
        c.data.seq_len = 32
        c.model.num_layers = 2
        c.model.embed_dim = 64
        c.model.num_heads = 4
        c.model.num_kv_heads = 2
        c.model.head_dim = 16
        c.model.mlp_dim = 128
    return c
