"""Your own NNX model, loss and data through jaxtrain's sharded, resumable loop.

    python examples/custom_model.py --workdir=runs/mine [--mesh=fsdp=4,tensor=2] [--steps=200]

Rerun the same command after a kill to resume; change --mesh to restore onto another one.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxtrain


class Classifier(nnx.Module):
    """An MLP with BatchNorm and dropout, written the plain Flax way."""

    def __init__(self, features: int, hidden: int, classes: int, *, rngs: nnx.Rngs):
        # Logical axis names on the weights: config.rules maps them to mesh axes.
        self.up = nnx.Linear(
            features, hidden, kernel_metadata={"out_sharding": ("embed", "mlp")}, rngs=rngs
        )
        self.norm = nnx.BatchNorm(hidden, scale_metadata={"out_sharding": ("mlp",)}, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.down = nnx.Linear(
            hidden, classes, kernel_metadata={"out_sharding": ("mlp", None)}, rngs=rngs
        )

    def __call__(self, x):
        return self.down(self.dropout(jax.nn.gelu(self.norm(self.up(x)))))


def loss(model, batch, rngs):
    logits = model(batch["x"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["y"])
    return jnp.mean(ce), {"accuracy": accuracy}


def make_data(n: int, seed: int) -> dict[str, np.ndarray]:
    """Points in 32 dimensions, labelled by which of 4 fixed directions they lean to most."""
    x = np.random.default_rng(seed).normal(size=(n, 32)).astype(np.float32)
    directions = np.random.default_rng(1234).normal(size=(32, 4))
    return {"x": x, "y": np.argmax(x @ directions, axis=1).astype(np.int32)}


def main(workdir: str, mesh: dict[str, int], steps: int):
    config = jaxtrain.load_config("base.py")  # the shared fields, with their defaults
    config.mesh = mesh
    config.rules = (("activation_batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"))
    config.global_batch_size = 64
    config.num_train_steps = steps
    config.eval_every_steps = config.checkpoint_every_steps = 50
    task = jaxtrain.Task(
        model=lambda rngs: Classifier(32, 256, 4, rngs=rngs),
        loss=loss,
        data=make_data(8192, seed=0),
        eval_data=make_data(1000, seed=1),
    )
    return jaxtrain.train_and_evaluate(config, workdir, task=task)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--mesh", default="data=-1")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    mesh = {k: int(v) for k, v in (part.split("=") for part in args.mesh.split(","))}
    state, metrics = main(args.workdir, mesh, args.steps)
    print(f"eval accuracy {metrics['accuracy']:.3f}")
