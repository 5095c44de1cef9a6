"""A small convolutional classifier for images [batch, height, width, channels]."""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrain.checks import is_int, is_number
from jaxtrain.sharding import constrain


@dataclasses.dataclass(frozen=True)
class CNNConfig:
    """The CNN's hyperparameters (`config.model` less its `name`); see configs/digits_cnn.py."""

    num_classes: int
    image_shape: tuple[int, int, int]  # height, width, channels
    features: tuple[int, ...]  # channels of each conv + pool stage
    hidden_dim: int
    dropout_rate: float

    def __post_init__(self):
        for name in ("num_classes", "hidden_dim"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        if not _sizes(self.image_shape) or len(self.image_shape) != 3:
            raise ValueError(
                f"image_shape={self.image_shape!r} must be 3 positive sizes (height, width, "
                "channels)"
            )
        if not _sizes(self.features) or not self.features:
            raise ValueError(
                f"features={self.features!r} must be one or more positive channel counts"
            )
        if not (is_number(self.dropout_rate) and 0 <= self.dropout_rate < 1):
            raise ValueError(f"dropout_rate={self.dropout_rate!r} must be in [0, 1)")
        height, width, _ = self.image_shape
        scale = 2 ** len(self.features)
        if height % scale or width % scale:
            raise ValueError(
                f"image_shape {tuple(self.image_shape)} is not divisible by {scale} "
                f"({len(self.features)} pooling stages)"
            )


def _sizes(value) -> bool:
    """A tuple of positive integers."""
    return isinstance(value, tuple) and all(is_int(v) and v >= 1 for v in value)


class CNN(nnx.Module):
    """Conv-ReLU-avgpool stages, then a two-layer MLP head over the flattened features.

    Dropout keeps its own RNG stream (`nnx.Dropout(rate, rngs=rngs)`, the Flax way), which
    lives in the model's state and is checkpointed with it.
    """

    def __init__(self, cfg: CNNConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        height, width, channels = cfg.image_shape
        scale = 2 ** len(cfg.features)
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        in_out = zip((channels, *cfg.features[:-1]), cfg.features, strict=True)
        self.convs = nnx.List(
            [
                nnx.Conv(
                    c_in,
                    c_out,
                    kernel_size=(3, 3),
                    kernel_metadata={"out_sharding": (None, None, "conv_in", "conv_out")},
                    bias_metadata={"out_sharding": ("conv_out",)},
                    **kw,
                )
                for c_in, c_out in in_out
            ]
        )
        flat = (height // scale) * (width // scale) * cfg.features[-1]
        self.hidden = nnx.Linear(
            flat,
            cfg.hidden_dim,
            **kw,
            kernel_metadata={"out_sharding": ("embed", "mlp")},
            bias_metadata={"out_sharding": ("mlp",)},
        )
        self.head = nnx.Linear(
            cfg.hidden_dim,
            cfg.num_classes,
            **kw,
            kernel_metadata={"out_sharding": ("mlp", "classes")},
            bias_metadata={"out_sharding": ("classes",)},
        )
        self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)

    def __call__(self, images):
        # uint8 pixels in, normalised on device: 4x less host-to-device traffic than float32.
        x = images.astype(self.dtype) / 255.0
        x = constrain(x, ("activation_batch", None, None, None))
        for conv in self.convs:
            x = nnx.avg_pool(jax.nn.relu(conv(x)), window_shape=(2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = self.dropout(jax.nn.relu(self.hidden(x)))
        logits = self.head(constrain(x, ("activation_batch", "activation_mlp")))
        return logits.astype(jnp.float32)
