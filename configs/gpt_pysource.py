"""A byte-level GPT on the bundled `pysource` corpus (the Python standard library's source).

The README's main job: on a 2-core CPU it trains in a few minutes to below 2.5 nats per
byte of validation loss (a uniform guess is ln 256 = 5.55).

    jaxtrain train --config=configs/gpt_pysource.py --workdir=runs/gpt
    jaxtrain train --config=configs/gpt_pysource.py:smoke --workdir=/tmp/gpt_smoke
    jaxtrain train --config=configs/gpt_pysource.py --workdir=runs/gpt2 --config.optim.lr=1e-3
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # parameter init and dropout
    c.global_batch_size = 32  # sequences per step, split over ("data", "fsdp")
    c.num_train_steps = 300
    c.log_every_steps = 25
    c.eval_every_steps = 100
    # Gradient accumulation: each global batch runs as this many sequential parts (same
    # update, 1/microbatches of the activation memory).
    c.microbatches = 1
    c.eval_steps = 16  # eval batches per evaluation, spread over the split; -1 = all of it

    # Mesh axis sizes; -1 takes the devices left over. Order: data, fsdp, sequence, tensor.
    c.mesh = dict(data=-1, fsdp=1, sequence=1, tensor=1)
    # Logical axis -> mesh axes. Changing parallelism is an edit here, not in the model.
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

    c.data = dict(
        name="pysource",  # bundled: pysource, digits; or a TFDS catalog text data set
        data_dir="",  # TFDS data_dir; "" = TFDS default (~/tensorflow_datasets)
        train_split="train",
        eval_split="validation",
        text_key="text",  # the record field holding the text (bytes are the tokens)
        image_key="image",  # unused by language models
        label_key="label",  # unused by language models
        seq_len=128,
        seed=0,  # shuffle order
        prefetch=2,  # batches made ready on device ahead of the step
    )
    c.model = dict(
        name="gpt",
        vocab_size=256,  # bytes
        num_layers=4,
        embed_dim=128,
        num_heads=4,
        num_kv_heads=4,  # < num_heads for grouped-query attention
        head_dim=32,
        mlp_dim=384,
        rope_base=10_000.0,
        dropout_rate=0.0,
        attention_impl="auto",  # "xla", "cudnn" (GPU, bf16) or "auto" (jax picks)
        scan_layers=False,  # stack the blocks' weights and scan: compile time flat in depth
        remat="none",  # recompute in backward: "none", "full" or "save_dots"
    )
    c.optim = dict(
        lr=3e-3,
        min_lr_ratio=0.1,  # cosine decays to lr * min_lr_ratio
        warmup_steps=50,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        grad_clip_norm=1.0,
    )
    # A step whose loss or gradients are not finite never updates the state. Then:
    # "abort" stops with a report (step, loss, first bad gradient) and the batch saved in
    # the workdir; "skip" goes on (aborting after max_consecutive_skips in a row);
    # "rollback" restores the last checkpoint and goes on past the offending batches.
    c.nonfinite = dict(
        policy="abort",
        max_consecutive_skips=10,
        inject_at_steps=(),  # testing aid: these steps' gradients are made NaN
    )
    # "auto": bfloat16 compute on GPU/TPU, float32 on CPU; parameters stay float32.
    c.precision = dict(compute_dtype="auto", param_dtype="float32")
    c.checkpoint_every_steps = 100
    c.checkpoint = dict(
        keep_latest=3,  # the newest N steps are kept (>= 1: a rerun resumes from the newest)
        keep_best=0,  # also keep the K best evaluated steps by best_metric; 0 = off
        best_metric="loss",  # the eval metric that ranks steps for keep_best
        best_mode="min",  # "min" or "max": which end of best_metric is best
        keep_every_steps=0,  # also keep, permanently, every step that is a multiple; 0 = off
        async_save=True,  # write in the background while training goes on
    )

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
