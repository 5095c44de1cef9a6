"""Unmodified Flax models sharded by parameter path patterns (`config.param_axes`).

The two models here are written the way Flax's own examples write them, with plain
`nnx.Conv`, `nnx.Linear`, `nnx.BatchNorm` and `nnx.Dropout` and no partitioning metadata
anywhere: a CNN of the NNX MNIST tutorial's kind and a small VAE that keeps state of its
own in an `nnx.Variable` subclass. Only the config's patterns shard them.
"""

import logging
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import read_metrics
from flax import nnx

import jaxtrain
from jaxtrain import optim, paths, sharding
from jaxtrain.errors import ConfigError
from jaxtrain.state import create_state, make_state_layout

RULES = (("activation_batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"))
LOGICAL_TO_MESH = {"embed": "fsdp", "mlp": "tensor"}


class CNN(nnx.Module):
    """Two convolutions with BatchNorm, average pooling, dropout, two dense layers."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 16, kernel_size=(3, 3), rngs=rngs)
        self.norm1 = nnx.BatchNorm(16, rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, kernel_size=(3, 3), rngs=rngs)
        self.norm2 = nnx.BatchNorm(32, rngs=rngs)
        self.linear1 = nnx.Linear(4 * 4 * 32, 64, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.linear2 = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.norm1(self.conv1(x)))
        x = nnx.relu(self.norm2(self.conv2(x)))
        x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = self.dropout(nnx.relu(self.linear1(x.reshape(x.shape[0], -1))))
        return self.linear2(x)


def cnn_loss(model, batch, rngs):
    logits = model(batch["image"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return jnp.mean(ce), {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}


def cnn_data(n=512):
    images = np.random.default_rng(0).normal(size=(n, 8, 8, 1)).astype(np.float32)
    directions = np.random.default_rng(1).normal(size=(64, 10))
    labels = np.argmax(images.reshape(n, 64) @ directions, axis=1).astype(np.int32)
    return {"image": images, "label": labels}


# Each kernel's logical axes, by pattern; conv1 has one input channel, so its outputs split.
CNN_PATTERNS = (
    (r"conv1/kernel", (None, None, None, "embed")),
    (r"conv\d/kernel", (None, None, "embed", "mlp")),
    (r"linear\d/kernel", ("embed", "mlp")),
)


class KLDivergence(nnx.Variable):
    """The VAE's own record of its last batch's KL term."""


class Encoder(nnx.Module):
    def __init__(self, features, hidden, latent, *, rngs):
        self.linear1 = nnx.Linear(features, hidden, rngs=rngs)
        self.linear_mean = nnx.Linear(hidden, latent, rngs=rngs)
        self.linear_logvar = nnx.Linear(hidden, latent, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.linear1(x))
        return self.linear_mean(h), self.linear_logvar(h)


class Decoder(nnx.Module):
    def __init__(self, latent, hidden, features, *, rngs):
        self.linear1 = nnx.Linear(latent, hidden, rngs=rngs)
        self.linear2 = nnx.Linear(hidden, features, rngs=rngs)

    def __call__(self, z):
        return self.linear2(nnx.relu(self.linear1(z)))


class VAE(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.encoder = Encoder(64, 32, 8, rngs=rngs)
        self.decoder = Decoder(8, 32, 64, rngs=rngs)
        self.kl = KLDivergence(jnp.zeros(()))

    def __call__(self, x, noise_rng):
        mean, logvar = self.encoder(x)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(noise_rng, mean.shape)
        self.kl[...] = jnp.mean(-0.5 * jnp.sum(1 + logvar - mean**2 - jnp.exp(logvar), -1))
        return self.decoder(z)


def vae_loss(model, batch, rngs):
    logits = model(batch["image"], rngs.noise())
    reconstruction = jnp.mean(
        jnp.sum(optax.sigmoid_binary_cross_entropy(logits, batch["image"]), -1)
    )
    return reconstruction + 0.1 * model.kl[...], {"kl": model.kl[...]}


def vae_data(n=512):
    pixels = np.random.default_rng(2).normal(size=(n, 64)) > 0.3
    return {"image": pixels.astype(np.float32)}


VAE_PATTERNS = ((r".*/kernel", ("embed", "mlp")),)  # every Linear's (in, out)

MODELS = {
    "cnn": (lambda rngs: CNN(rngs=rngs), cnn_loss, cnn_data, CNN_PATTERNS),
    "vae": (lambda rngs: VAE(rngs=rngs), vae_loss, vae_data, VAE_PATTERNS),
}


def _expected_ways(path: str, shape, patterns, mesh_shape) -> int:
    """How many ways the test means `path` to split: its pattern's axes on this mesh."""
    for pattern, axes in patterns:
        if re.fullmatch(pattern, path):
            assert len(axes) == len(shape)
            return math.prod(mesh_shape[LOGICAL_TO_MESH[a]] for a in axes if a is not None)
    return 1


def _held_bytes(tree) -> dict:
    """Bytes of `tree`'s arrays held by each device (for abstract arrays: would hold)."""
    totals: dict = {}
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            held = [(shard.device, shard.data.nbytes) for shard in leaf.addressable_shards]
        else:  # a ShapeDtypeStruct: the slice of it each device's shard would be
            held = []
            for device, index in leaf.sharding.devices_indices_map(leaf.shape).items():
                dims = zip(index, leaf.shape, strict=True)
                size = math.prod(len(range(*part.indices(n))) for part, n in dims)
                held.append((device, size * leaf.dtype.itemsize))
        for device, nbytes in held:
            totals[device] = totals.get(device, 0) + nbytes
    return totals


def _check_per_device_bytes(state, patterns, mesh_shape):
    """Each device holds each weight's 1/ways (and its Adam moments likewise)."""
    flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
    nbytes = lambda leaf: math.prod(leaf.shape) * leaf.dtype.itemsize  # noqa: E731
    expected = sum(
        nbytes(leaf) // _expected_ways(sharding.path_str(p), leaf.shape, patterns, mesh_shape)
        for p, leaf in flat
    )
    whole = sum(nbytes(leaf) for _, leaf in flat)
    held = _held_bytes(state.params)
    assert set(held.values()) == {expected}, (held, expected)
    # AdamW's two moments mirror the parameters, sharded as they are; its step count
    # (a scalar) is whole everywhere.
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
    assert set(_held_bytes(moments).values()) == {2 * expected}
    return expected, whole


def _layout(name, mesh_shape, patterns=None):
    model, *_, default_patterns = MODELS[name]
    mesh = jaxtrain.make_mesh(mesh_shape)
    tx = optim.make_optimizer(jaxtrain.load_config("base.py").optim, optax.constant_schedule(1e-3))
    return make_state_layout(
        model, tx, mesh, RULES, param_axes=default_patterns if patterns is None else patterns
    )


@pytest.mark.parametrize("name", ["cnn", "vae"])
def test_fsdp_by_patterns_holds_a_quarter_of_each_kernel(name):
    mesh_shape = {"data": 2, "fsdp": 4, "tensor": 1}
    layout = _layout(name, mesh_shape)  # laid out, not created (the slow test trains it)
    expected, whole = _check_per_device_bytes(layout.abstract_state, MODELS[name][3], mesh_shape)
    # The kernels are most of each model, so each device holds little more than a quarter.
    assert expected < 0.3 * whole


def test_tensor_by_patterns_splits_the_chosen_dimension():
    mesh_shape = {"data": 4, "fsdp": 1, "tensor": 2}
    # Patterns reach the model's other variables too: here the BatchNorm statistics.
    patterns = CNN_PATTERNS + ((r"norm\d/(mean|var)", ("mlp",)),)
    layout = _layout("cnn", mesh_shape, patterns)
    with jax.set_mesh(layout.mesh):
        state = create_state(layout, seed=0)
    _check_per_device_bytes(state, patterns, mesh_shape)
    kernel = state.params["linear1"]["kernel"]  # (512, 64): ("embed", "mlp")
    assert kernel.addressable_shards[0].data.shape == (512, 32)
    conv = state.params["conv2"]["kernel"]  # (3, 3, 16, 32): output channels split
    assert conv.addressable_shards[0].data.shape == (3, 3, 16, 16)
    assert state.params["conv1"]["kernel"].addressable_shards[0].data.shape == (3, 3, 1, 16)
    mean = state.model_state["norm2"]["mean"]
    assert mean.addressable_shards[0].data.shape == (16,)
    assert state.model_state["norm1"]["var"].addressable_shards[0].data.shape == (8,)


def test_without_patterns_the_warning_names_the_pattern_way(caplog):
    with caplog.at_level(logging.WARNING):
        layout = _layout("vae", {"fsdp": 8}, patterns=())
    # Nothing names the kernels: each device holds the whole model...
    assert all(s.spec == jax.sharding.PartitionSpec() for s in jax.tree.leaves(layout.shardings))
    [warning] = [r.getMessage() for r in caplog.records if "replicated" in r.getMessage()]
    # ...and the warning says how to shard it without editing it, with an example.
    assert "5 weight matrices" in warning and "decoder/linear1/kernel" in warning
    assert "config.param_axes = ((r'decoder/linear1/kernel', ('embed', 'mlp')),)" in warning


def test_a_weights_own_names_come_before_patterns():
    class Mixed(nnx.Module):
        def __init__(self, rngs):
            named = {"kernel_metadata": {"out_sharding": ("mlp", "embed")}}
            self.named = nnx.Linear(16, 32, **named, rngs=rngs)
            self.plain = nnx.Linear(32, 16, rngs=rngs)

    mesh = jaxtrain.make_mesh({"fsdp": 4, "tensor": 2})
    layout = make_state_layout(
        lambda rngs: Mixed(rngs), optax.sgd(0.1), mesh, RULES, param_axes=VAE_PATTERNS
    )
    specs = layout.shardings.params
    assert specs["named"]["kernel"].spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert specs["plain"]["kernel"].spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    # A pattern that reaches only weights with names of their own does nothing: an error.
    with pytest.raises(ConfigError, match=r"'named/kernel' selects only variables that name"):
        make_state_layout(
            lambda rngs: Mixed(rngs),
            optax.sgd(0.1),
            mesh,
            RULES,
            param_axes=(("named/kernel", ("embed", "mlp")), (".*", None)),
        )


@pytest.mark.parametrize(
    "patterns, message",
    [
        (
            ((r".*lnear.*/kernel", ("embed", "mlp")),),
            r"^config.param_axes pattern '\.\*lnear\.\*/kernel' matches no variable path .*"
            r"paths look like conv1/bias, conv1/kernel",
        ),
        (
            ((r".*/kernel", ("embed", "mlp")),),
            r"^config.param_axes pattern '\.\*/kernel' -> \('embed', 'mlp'\) gives 2 logical "
            r"axes to parameter conv1/kernel of shape \(3, 3, 1, 16\), which has 4 dimensions$",
        ),
        (
            ((r"conv1/kernel", (None, None, "embed", None)),),
            r"^parameter conv1/kernel of shape \(3, 3, 1, 16\) cannot be split over mesh "
            r"axis 'fsdp' \(size 4\) along dimension 2 .*by config.param_axes pattern "
            r"'conv1/kernel'",
        ),
        (
            ((r"linear\d/kernel", ("embed", "mlp")), (r"linear1/kernel", ("mlp", "embed"))),
            r"pattern 'linear1/kernel' selects nothing: an earlier pattern, "
            r"'linear\\\\d/kernel', takes every path it matches",
        ),
        (((r".*/kernel", ("embed", "heads")),), r"\[0\] names logical axis 'heads', which has no"),
        (((r"(conv", None),), r"config.param_axes\[0\] pattern '\(conv' is not a regular"),
        ((r".*/kernel",), r"config.param_axes\[0\] must be a pair"),
        (((r".*/kernel", "embed"),), r"must give a tuple of logical axis names"),
    ],
)
def test_a_bad_pattern_is_one_line_naming_it(patterns, message):
    with pytest.raises(ConfigError, match=message) as error:
        _layout("cnn", {"data": 2, "fsdp": 4}, patterns)
    assert "\n" not in str(error.value)


def test_a_pattern_matching_nothing_refuses_the_run_before_writing(tmp_path):
    model, loss, make_data, _ = MODELS["cnn"]
    config = _config({"fsdp": 4, "data": 2}, steps=1)
    config.param_axes = ((r".*dense.*/kernel", ("embed", "mlp")),)
    task = jaxtrain.Task(model=model, loss=loss, data=make_data(64))
    with pytest.raises(ConfigError, match=r"pattern '\.\*dense\.\*/kernel' matches no variable"):
        jaxtrain.train_and_evaluate(config, str(tmp_path / "run"), task=task)
    assert not (tmp_path / "run").exists()


def test_path_rules_first_match_wins():
    rules = paths.PathRules(
        ((r"a/.*", 1), (r".*/kernel", 2), (r"b/bias", 3)), "config.x", lambda v, name: v * 10
    )
    assert rules.assign(["a/kernel", "b/kernel", "b/bias", "c"]) == {
        "a/kernel": 0,
        "b/kernel": 1,
        "b/bias": 2,
    }
    assert rules.values == (10, 20, 30)
    # A pattern matches the whole path (re.fullmatch), not a part of it.
    assert rules.first("xa/kernel/y") is None
    # Lists, as a config read back from JSON holds them, are pairs too.
    assert paths.PathRules([["a", [1]]]).patterns == ("a",)


def _config(mesh, steps):
    config = jaxtrain.load_config("base.py")
    config.mesh = mesh
    config.rules = RULES
    config.global_batch_size = 32
    config.num_train_steps = steps
    config.log_every_steps = 1
    config.eval_every_steps = config.checkpoint_every_steps = steps
    return config


def _train(name, mesh, workdir, steps=5, patterns=True):
    model, loss, make_data, default_patterns = MODELS[name]
    config = _config(mesh, steps)
    config.param_axes = default_patterns if patterns else ()
    task = jaxtrain.Task(model=model, loss=loss, data=make_data())
    state, _ = jaxtrain.train_and_evaluate(config, str(workdir), task=task)
    return state, [r["loss"] for _, r in sorted(read_metrics(workdir).items())]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cnn", "vae"])
def test_sharded_by_patterns_trains_as_unsharded(name, tmp_path):
    _, unsharded = _train(name, {"data": 8}, tmp_path / "data", patterns=False)
    for label, mesh in (("fsdp", {"data": 2, "fsdp": 4}), ("tensor", {"data": 4, "tensor": 2})):
        state, losses = _train(name, mesh, tmp_path / label)
        full = {"data": 1, "fsdp": 1, "tensor": 1, **mesh}
        expected, whole = _check_per_device_bytes(state, MODELS[name][3], full)
        assert expected < whole
        assert len(losses) == 5
        # The tolerance of the bundled GPT's mesh-equivalence test (test_parallelism.py).
        np.testing.assert_allclose(losses, unsharded, rtol=5e-5)
    # The tensor-parallel run restores onto an FSDP mesh, its config's patterns applied.
    run = jaxtrain.load_run(
        str(tmp_path / "tensor"),
        task=jaxtrain.Task(model=MODELS[name][0], loss=MODELS[name][1], data=None),
        mesh={"data": 2, "fsdp": 4},
    )
    _check_per_device_bytes(run.state, MODELS[name][3], {"data": 2, "fsdp": 4, "tensor": 1})
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
        run.state.params,
        state.params,
    )
