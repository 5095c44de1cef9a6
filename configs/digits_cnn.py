"""A small CNN on the bundled 8x8 `digits` data set (scikit-learn's handwritten digits).

jaxtrain train --config=configs/digits_cnn.py --workdir=runs/digits
jaxtrain train --config=configs/digits_cnn.py:smoke --workdir=/tmp/digits_smoke
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # parameter init and dropout
    c.global_batch_size = 128  # the whole step, split over ("data", "fsdp")
    c.num_train_steps = 600
    c.log_every_steps = 50
    c.eval_every_steps = 200
    # Gradient accumulation: each global batch runs as this many sequential parts (same
    # update, 1/microbatches of the activation memory).
    c.microbatches = 1
    c.eval_steps = -1  # eval batches per evaluation; -1 = the whole eval split

    # Mesh axis sizes; -1 takes the devices left over. Order: data, fsdp, sequence, tensor.
    c.mesh = dict(data=-1, fsdp=1, sequence=1, tensor=1)
    # Logical axis -> mesh axes. Parameters: conv_in/conv_out/embed/mlp/classes.
    c.rules = (
        ("activation_batch", ("data", "fsdp")),
        ("activation_mlp", "tensor"),
        ("conv_in", None),
        ("conv_out", "tensor"),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("classes", None),
    )

    c.data = dict(
        name="digits",  # bundled: digits, pysource; or any TFDS catalog image data set
        data_dir="",  # TFDS data_dir; "" = TFDS default (~/tensorflow_datasets)
        train_split="train",
        eval_split="test",
        image_key="image",
        label_key="label",
        text_key="text",  # unused by image models
        seq_len=0,  # unused by image models
        seed=0,  # shuffle order
        prefetch=2,  # batches made ready on device ahead of the step
    )
    c.model = dict(
        name="cnn",
        num_classes=10,
        image_shape=(8, 8, 1),
        features=(32, 64),
        hidden_dim=128,
        dropout_rate=0.1,
    )
    c.optim = dict(
        lr=3e-3,
        min_lr_ratio=0.01,  # cosine decays to lr * min_lr_ratio
        warmup_steps=50,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=1e-4,
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
    c.checkpoint_every_steps = 200
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
        c.checkpoint_every_steps = 2
        c.global_batch_size = 32
    return c
