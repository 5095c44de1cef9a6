"""Models written elsewhere, as Flax's own examples write them, through the public API.

A model that makes a variable while it runs (not in `__init__`) is refused before
anything is written, with the variable and the fix named; a model that draws noise from
an RNG stream of its own (a VAE's reparameterisation) gives each evaluation example its
own draw, the same on every mesh.
"""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxtrain
from jaxtrain import data

RULES = (("activation_batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"))


class Seen(nnx.Variable):
    """A variable of the user's own type."""


class Remembers(nnx.Module):
    """Keeps its last input in a variable it makes in `__call__`, not in `__init__`."""

    def __init__(self, rngs: nnx.Rngs):
        self.layer = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        self.last_input = Seen(x)
        self.sow(nnx.Intermediate, "hidden", x)  # sown and not read: never kept, allowed
        return self.layer(x)


def squared_error(model, batch, rngs):
    return jnp.mean((model(batch["x"]) - batch["x"]) ** 2), {}


def popping(model, batch, rngs):
    """The same loss, dropping what the model made as it ran."""
    value, metrics = squared_error(model, batch, rngs)
    nnx.pop(model, Seen)
    return value, metrics


def examples(n=64):
    return {"x": np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32)}


def config(steps=2, **fields):
    c = jaxtrain.load_config("base.py")
    c.update(
        global_batch_size=16,
        num_train_steps=steps,
        log_every_steps=1,
        eval_every_steps=steps,
        checkpoint_every_steps=steps,
        **fields,
    )
    return c


def test_a_variable_made_in_call_is_refused_before_anything_is_written(tmp_path):
    task = jaxtrain.Task(model=Remembers, loss=squared_error, data=examples())
    workdir = tmp_path / "run"
    for microbatches in (1, 2):  # a step with and without its accumulation scan
        with pytest.raises(jaxtrain.ConfigError) as error:
            jaxtrain.train_and_evaluate(config(microbatches=microbatches), str(workdir), task=task)
        message = str(error.value)
        assert "\n" not in message
        assert "'last_input' (Seen)" in message and "__init__" in message
        assert "nnx.pop(model, Seen)" in message
        assert not workdir.exists()

    # Evaluation never keeps model state: there the variable is harmless.
    layout = jaxtrain.make_state_layout(
        Remembers, optax.sgd(0.1), jaxtrain.make_mesh({"data": 8}), RULES
    )
    evaluation = jax.jit(jaxtrain.make_eval_step(jaxtrain.per_example(squared_error), layout))
    state = jaxtrain.create_state(layout, seed=0)
    batch = jax.tree.map(jnp.asarray, examples(8))
    sums = evaluation(state.params, state.model_state, batch, jnp.ones(8), 0)
    assert float(sums["loss"]["count"]) == 8


@pytest.mark.slow
def test_the_fix_it_names_trains(tmp_path):
    """The same model trains, and evaluates, once the loss pops the variable."""
    fixed = jaxtrain.Task(model=Remembers, loss=popping, data=examples(), eval_data=examples(12))
    state, result = jaxtrain.train_and_evaluate(config(), str(tmp_path), task=fixed)
    assert int(state.step) == 2 and np.isfinite(result["loss"])
    assert state.model_state == {}  # nothing of what __call__ made


TASK_MODULE = """
import numpy as np
import jaxtrain
from test_user_models import Remembers, squared_error


def make_task(config):
    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    return jaxtrain.Task(model=Remembers, loss=squared_error, data={"x": x})
"""


def test_command_line_names_the_variable_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from jaxtrain import cli

    (tmp_path / "remembering.py").write_text(textwrap.dedent(TASK_MODULE))
    monkeypatch.chdir(tmp_path)
    status = cli.main(
        [
            "jaxtrain",
            "train",
            "--config=base.py",
            "--workdir=run",
            "--config.task=remembering:make_task",
            "--config.global_batch_size=8",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith("jaxtrain: error: ") and "'last_input' (Seen)" in err[0]
    assert not (tmp_path / "run").exists()


class Noisy(nnx.Module):
    """Adds noise from an RNG stream it holds (the toy VAE's `self.rngs.noise()`)."""

    def __init__(self, rngs: nnx.Rngs):
        self.scale = nnx.Linear(1, 1, kernel_metadata={"out_sharding": (None, None)}, rngs=rngs)
        self.rngs = rngs

    def __call__(self, x):
        return self.scale(x) + jax.random.normal(self.rngs.noise(), x.shape)


def noisy_loss(model, batch, rngs):
    """The model's noise, and the loss's own (`rngs`), per example."""
    own_noise = jax.random.normal(rngs.noise(), batch["x"].shape)
    return jnp.mean(model(batch["x"])), {"loss_noise": jnp.mean(own_noise)}


def identical(n):
    return {"x": np.ones((n, 1), np.float32)}


def test_each_evaluation_example_draws_its_own_noise():
    mesh = jaxtrain.make_mesh({"data": 8})
    layout = jaxtrain.make_state_layout(Noisy, optax.sgd(0.1), mesh, RULES)
    state = jaxtrain.create_state(layout, seed=0)
    evaluation = jaxtrain.per_example(noisy_loss)

    @jax.jit
    def per_example_values(params, model_state, batch):
        return evaluation(layout.merge(params, model_state), batch, nnx.Rngs(0))

    batch = jax.tree.map(jnp.asarray, identical(16))
    values = per_example_values(state.params, state.model_state, batch)
    for name in ("loss", "loss_noise"):  # the model's own stream, and the loss's rngs
        got = np.asarray(values[name])
        assert np.var(got) > 0.1 and len(set(got.tolist())) == 16, (name, got)
    again = per_example_values(state.params, state.model_state, batch)
    jax.tree.map(np.testing.assert_array_equal, values, again)  # the same every time


def _noisy_batch_sums(mesh_shape, num_examples, indices=None):
    """The eval sums of each padded global batch of 16 over `num_examples` identical
    examples, each batch evaluated with its own index (or the one `indices` gives)."""
    mesh = jaxtrain.make_mesh(mesh_shape)
    rules = jaxtrain.Rules(RULES)
    layout = jaxtrain.make_state_layout(Noisy, optax.sgd(0.1), mesh, rules)
    examples = data.as_dataset(identical(num_examples))
    example = data.example_spec(examples)
    shardings = data.batch_shardings(example, mesh, rules)
    with jax.set_mesh(mesh):
        state = jaxtrain.create_state(layout, seed=0)
        eval_step = jaxtrain.jit_eval_step(
            jaxtrain.make_eval_step(jaxtrain.per_example(noisy_loss), layout),
            layout,
            data.abstract_batch(example, 16, shardings),
        )
        batches = data.eval_batches(
            examples, global_batch_size=16, max_batches=-1, shard_index=0, shard_count=1
        )
        return [
            jax.device_get(
                eval_step(
                    state.params,
                    state.model_state,
                    data.to_global(local, shardings),
                    data.to_global(mask, data.example_sharding(shardings)),
                    index if indices is None else indices[index],
                )
            )
            for index, (local, mask) in enumerate(batches)
        ]


def _evaluate_on(mesh_shape):
    """The eval means of 12 identical examples in one padded global batch of 16."""
    [sums] = _noisy_batch_sums(mesh_shape, 12)
    return jaxtrain.steps.eval_means(sums)


def test_each_evaluation_batch_draws_its_own_noise():
    # Identical examples in two batches: row i of batch 1 must not draw row i of batch 0's
    # noise (the loss's rngs and the model's own stream), and an evaluation repeats.
    def sums(batches):
        return [{name: float(t["sum"]) for name, t in b.items()} for b in batches]

    first, second = sums(_noisy_batch_sums({"data": 8}, 32))
    again, _ = sums(_noisy_batch_sums({"data": 8}, 32))
    assert first == again  # the same keys every evaluation
    # And what differs is the index: batch 1 evaluated as batch 0 draws batch 0's noise.
    [_, second_as_first] = sums(_noisy_batch_sums({"data": 8}, 32, indices=[0, 0]))
    assert second_as_first == first
    for name in ("loss", "loss_noise"):
        assert abs(first[name] - second[name]) > 1e-3, (name, first, second)


def test_noisy_evaluation_is_the_same_on_two_meshes():
    data_parallel = _evaluate_on({"data": 8})
    sharded = _evaluate_on({"data": 2, "fsdp": 2, "tensor": 2})
    assert data_parallel.keys() == {"loss", "loss_noise"}
    for name, value in data_parallel.items():
        assert sharded[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
