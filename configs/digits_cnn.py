"""A small CNN on the bundled 8x8 `digits` data set (scikit-learn's handwritten digits).

jaxtrain train --config=digits_cnn.py --workdir=runs/digits
jaxtrain train --config=digits_cnn.py:smoke --workdir=/tmp/digits_smoke
"""

import ml_collections
from jaxtrain.configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base.get_config()
    c.task = "classification"
    c.global_batch_size = 128  # images per step
    c.num_train_steps = 600
    c.log_every_steps = 50
    c.eval_every_steps = 200
    c.checkpoint_every_steps = 200

    # Parameters: conv_in/conv_out/embed/mlp/classes.
    c.rules = (
        ("activation_batch", ("data", "fsdp")),
        ("activation_mlp", "tensor"),
        ("conv_in", None),
        ("conv_out", "tensor"),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("classes", None),
    )

    c.data.update(
        name="digits",  # bundled: digits; or any TFDS catalog image data set
        data_dir="",  # TFDS data_dir; "" = TFDS default (~/tensorflow_datasets)
        train_split="train",  # the split training reads
        eval_split="test",  # the split evaluation reads (`jaxtrain eval --split`)
        image_key="image",  # the record field holding the uint8 image
        label_key="label",  # the record field holding the integer class
    )
    c.model = dict(
        name="cnn",  # the bundled CNN, or "package.module:Class" taking these fields
        num_classes=10,  # outputs of the classifier head
        image_shape=(8, 8, 1),  # height, width, channels of one image
        features=(32, 64),  # channels of each conv + pool stage
        hidden_dim=128,  # width of the dense layer after the convolutions
        dropout_rate=0.1,  # dropout on that layer's output, in training
    )
    c.optim.update(lr=3e-3, min_lr_ratio=0.01, warmup_steps=50, weight_decay=1e-4)

    if arg == "smoke":  # a few steps in seconds, for tests and quick checks
        c.num_train_steps = 4
        c.log_every_steps = 2
        c.eval_every_steps = 4
        c.checkpoint_every_steps = 2
        c.global_batch_size = 32
    return c
