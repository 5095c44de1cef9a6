"""jaxtrain: sharded JAX training with Flax NNX, Optax, Orbax and TFDS."""

__version__ = "0.1.0"
