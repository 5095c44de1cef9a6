"""The public API, used from outside the package as research code would use it.

The models, losses and data here are the test's own, written the plain Flax way; nothing
in jaxtrain knows them.
"""

import dataclasses
import importlib
import logging
import os
import pydoc
import re
import subprocess
import sys
import textwrap

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
from conftest import REPO, read_metrics
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxtrain
from jaxtrain import data, optim
from jaxtrain.nonfinite import NonFiniteError
from jaxtrain.tasks import lm

RULES = (("activation_batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"))


class Calls(nnx.Variable):
    """A variable of the user's own type: how many training forward passes ran."""


class Net(nnx.Module):
    """BatchNorm, dropout drawing from the loss's rngs, its own variable, a sown value."""

    def __init__(self, rngs: nnx.Rngs, features: int = 8):
        self.up = nnx.Linear(
            features, 32, kernel_metadata={"out_sharding": ("embed", "mlp")}, rngs=rngs
        )
        self.norm = nnx.BatchNorm(32, rngs=rngs)
        self.dropout = nnx.Dropout(0.25)
        self.down = nnx.Linear(32, 3, kernel_metadata={"out_sharding": ("mlp", None)}, rngs=rngs)
        self.calls = Calls(jnp.zeros((), jnp.int32))

    def __call__(self, x, rngs=None):
        self.calls[...] += 1
        h = jax.nn.relu(self.norm(self.up(x)))
        self.sow(nnx.Intermediate, "activation_energy", jnp.mean(h**2))
        return self.down(self.dropout(h, rngs=rngs))


def loss(model, batch, rngs):
    """Cross-entropy plus a small auxiliary term the model sows."""
    logits, sown = nnx.capture(model, nnx.Intermediate)(batch["x"], rngs=rngs)
    energy = sum(jax.tree.leaves(sown))
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]))
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["y"])
    return ce + 1e-3 * energy, {"accuracy": accuracy, "energy": energy}


def arrays(n, seed=0, features=8):
    x = np.random.default_rng(seed).normal(size=(n, features)).astype(np.float32)
    return {"x": x, "y": (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 1).astype(np.int32)}


def config(steps=6, mesh=None, **fields):
    c = jaxtrain.load_config("base.py")
    c.update(
        mesh=mesh or {"fsdp": 4, "tensor": 2},
        rules=RULES,
        global_batch_size=16,
        num_train_steps=steps,
        log_every_steps=1,
        eval_every_steps=steps,
        checkpoint_every_steps=3,
        **fields,
    )
    return c


def task(**fields):
    return jaxtrain.Task(
        model=lambda rngs: Net(rngs),
        loss=loss,
        data=arrays(256),
        eval_data=arrays(40, seed=1),
        **fields,
    )


def test_public_names_are_documented():
    text = pydoc.render_doc(jaxtrain, renderer=pydoc.plaintext)
    for name in jaxtrain.__all__:
        value = getattr(jaxtrain, name)
        assert (value.__doc__ or "").strip(), f"jaxtrain.{name} has no docstring"
        assert name in text
    assert len(jaxtrain.__all__) <= 20  # small


# Modules whose pieces are documented for use from outside, beyond jaxtrain.__all__.
DOCUMENTED_MODULES = ("jaxtrain.tasks.lm", "jaxtrain.tasks.classification")


@pytest.mark.parametrize("name", DOCUMENTED_MODULES)
def test_bundled_task_pieces_are_documented(name):
    module = importlib.import_module(name)
    assert module.__all__ and "make_task" in module.__all__ and "loss" in module.__all__
    text = pydoc.render_doc(module, renderer=pydoc.plaintext)
    for piece in module.__all__:
        value = getattr(module, piece)
        if callable(value):
            assert (value.__doc__ or "").strip(), f"{name}.{piece} has no docstring"
        assert piece in text
    assert "dataclasses.replace" in module.__doc__  # how to wrap one
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        assert name in f.read()


class Twice:
    """The bundled LM loss doubled, reporting the original: which loss trained is visible."""

    def __call__(self, model, batch, rngs):
        value, metrics = lm.loss(model, batch, rngs)
        return 2 * value, {**metrics, "lm_loss": value}


@pytest.mark.slow
def test_a_bundled_task_wrapped_trains_with_its_new_loss_and_optimizer(tmp_path):
    c = jaxtrain.load_config("gpt_pysource.py:smoke")
    c.update(num_train_steps=2, log_every_steps=1, eval_every_steps=2, eval_steps=1)
    c.data.name = "synthetic"  # no data set to build
    frozen = lambda schedule: optax.chain(  # noqa: E731
        optim.make_optimizer(c.optim, schedule), optax.scale(0.0)
    )
    task = dataclasses.replace(lm.make_task(c), loss=Twice(), optimizer=frozen)
    state, result = jaxtrain.train_and_evaluate(c, str(tmp_path), task=task)
    logged = read_metrics(tmp_path)
    assert sorted(logged) == [1, 2]
    for record in logged.values():  # the wrapped loss trained, on the bundled model
        assert record["loss"] == 2 * record["lm_loss"] and record["lm_loss"] > 1
    # The wrapped optimizer: its updates are scaled to nothing, so the weights are the
    # initial ones, bit for bit.
    layout = jaxtrain.make_state_layout(
        task.model, frozen(optim.make_schedule(c.optim, 2)), jaxtrain.make_mesh(c.mesh), c.rules
    )
    initial = jaxtrain.create_state(layout, c.seed)
    jax.tree.map(np.testing.assert_array_equal, state.params, initial.params)
    # Evaluation is still the bundled per-token metrics (and their perplexity).
    assert {"loss", "accuracy", "perplexity"} <= set(result)

    # The README's wrapper, run as written: its loss is half the bundled one, its
    # optimizer the config's after its own.
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        [block] = [b for b in re.findall(r"```python\n(.*?)```", f.read(), re.S) if "lm.loss" in b]
    namespace = {}
    exec(block, namespace)
    wrapped = namespace["make_task"](c)
    with nnx.use_eager_sharding(False):  # one device's model, no mesh
        model = wrapped.model(nnx.Rngs(0))
    batch = {k: jnp.asarray(v) for k, v in wrapped.data[0].items()}
    batch = {k: v[None] for k, v in batch.items()}
    half, _ = wrapped.loss(model, batch, nnx.Rngs(1))
    whole, _ = lm.loss(model, batch, nnx.Rngs(1))
    assert float(half) == 0.5 * float(whole)
    params = nnx.state(model, nnx.Param)
    assert len(wrapped.optimizer(optim.make_schedule(c.optim, 2)).init(params)) == 2


def poisoned(examples, step, global_batch_size=16, seed=0):
    """`examples` with NaN features in every example of training step `step`'s batch."""
    order = data.TrainIterator(
        grain.MapDataset.range(len(examples["y"])),
        global_batch_size=global_batch_size,
        seed=seed,
        shard_index=0,
        shard_count=1,
    )
    rows = [next(order) for _ in range(step)][-1]
    x = examples["x"].copy()
    x[rows] = np.nan
    return {**examples, "x": x}


def test_user_task_keeps_state_beyond_params_and_resumes_bitwise(tmp_path):
    straight, result = jaxtrain.train_and_evaluate(config(), str(tmp_path / "a"), task=task())
    assert int(straight.step) == 6 and np.isfinite(result["loss"])
    assert {"loss", "accuracy", "energy"} <= set(result) and "train_loss" in result
    # Sharded as the user's names and the rules say.
    assert straight.params["up"]["kernel"].sharding.spec == P("fsdp", "tensor")
    # The model's own state: updated by every training step, never by evaluation.
    assert int(straight.model_state["calls"]) == 6
    assert np.abs(np.asarray(straight.model_state["norm"]["mean"])).max() > 0
    assert "activation_energy" not in str(jax.tree_util.tree_structure(straight.model_state))

    # A run stopped by a bad batch at step 5 (after step 3's checkpoint), rerun on good
    # data: the same numbers as the straight run, bit for bit.
    workdir = str(tmp_path / "b")
    bad = dataclasses.replace(task(), data=poisoned(arrays(256), step=5))
    with pytest.raises(NonFiniteError, match="step 5: non-finite"):
        jaxtrain.train_and_evaluate(config(), workdir, task=bad)
    assert max(read_metrics(workdir)) == 5
    resumed, _ = jaxtrain.train_and_evaluate(config(), workdir, task=task())
    for step, record in read_metrics(tmp_path / "a").items():
        got = read_metrics(workdir)[step]
        assert {k: got[k] for k in ("loss", "accuracy", "energy")} == {
            k: record[k] for k in ("loss", "accuracy", "energy")
        }
    jax.tree.map(
        np.testing.assert_array_equal,
        (straight.params, straight.model_state),
        (resumed.params, resumed.model_state),
    )


def test_evaluation_is_exact_over_a_padded_batch(tmp_path):
    # 40 eval examples in batches of 16: the last batch has 8 rows of padding.
    state, result = jaxtrain.train_and_evaluate(config(), str(tmp_path), task=task())
    layout = jaxtrain.make_state_layout(
        task().model, optax.sgd(0.1), jaxtrain.make_mesh(config().mesh), RULES
    )
    model = layout.merge(state.params, state.model_state)  # the trained model, as NNX
    model = nnx.view(model, deterministic=True, use_running_average=True)
    want = arrays(40, seed=1)
    logits = jax.device_get(model(want["x"]))
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, want["y"])
    np.testing.assert_allclose(result["accuracy"], np.mean(logits.argmax(-1) == want["y"]))
    # The loss with its sown term, per example (as the default per_example evaluation).
    assert result["loss"] == pytest.approx(float(np.mean(losses)), rel=1e-3)
    assert abs(result["loss"] - float(np.mean(losses))) < 1e-3 * 40


class TinyBuilder(tfds.core.GeneratorBasedBuilder):
    """A user's own TFDS data set (ArrayRecord: no TensorFlow needed)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {"x": tfds.features.Tensor(shape=(8,), dtype=np.float32), "y": np.int64}
            ),
        )

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples(arrays(64)),
            "test": self._generate_examples(arrays(16, seed=1)),
        }

    def _generate_examples(self, split):
        for i in range(len(split["y"])):
            yield i, {"x": split["x"][i], "y": int(split["y"][i])}


def test_every_kind_of_data_gives_the_same_examples(tmp_path):
    want = arrays(64)
    records = data.from_tfds(TinyBuilder(data_dir=str(tmp_path)), "train")
    kinds = {
        "dict of arrays": want,
        "grain MapDataset": grain.MapDataset.source(data.pipeline.ArraySource(want)),
        "a function returning one": lambda: want,
        "random-access source": [
            {"x": x, "y": y} for x, y in zip(want["x"], want["y"], strict=True)
        ],
        "user's TFDS builder": records.map(lambda r: {"x": r["x"], "y": np.int32(r["y"])}),
    }
    for kind, source in kinds.items():
        examples = data.as_dataset(source)
        assert len(examples) == 64, kind
        got = sorted((tuple(examples[i]["x"].tolist()), int(examples[i]["y"])) for i in range(64))
        assert got == sorted(
            (tuple(x.tolist()), int(y)) for x, y in zip(want["x"], want["y"], strict=True)
        ), kind
    with pytest.raises(jaxtrain.ConfigError, match="one length"):
        data.as_dataset({"x": np.zeros((3, 2)), "y": np.zeros(4)})
    with pytest.raises(jaxtrain.ConfigError, match="is not a grain.MapDataset"):
        data.as_dataset(42)

    # The user's builder trains through the same pipeline.
    builder_task = dataclasses.replace(task(), data=kinds["user's TFDS builder"], eval_data=None)
    state, _ = jaxtrain.train_and_evaluate(
        config(steps=2), str(tmp_path / "run"), task=builder_task
    )
    assert int(state.step) == 2


class Adapter(nnx.Param):
    """The parameters a fine-tune trains; plain nnx.Param ones stay frozen."""


class Adapted(nnx.Module):
    def __init__(self, rngs):
        self.base = Net(rngs)
        self.scale = Adapter(jnp.ones((3,)))

    def __call__(self, x, rngs=None):
        return self.base(x, rngs=rngs) * self.scale[...]


def test_trainable_filter_freezes_the_other_parameters(tmp_path):
    def adapted_loss(model, batch, rngs):
        logits = model(batch["x"], rngs=rngs)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])), {}

    adapted = jaxtrain.Task(
        model=lambda rngs: Adapted(rngs), loss=adapted_loss, data=arrays(256), trainable=Adapter
    )
    c = config(steps=4)
    state, _ = jaxtrain.train_and_evaluate(c, str(tmp_path), task=adapted)
    assert list(state.params) == ["scale"]  # only the adapter is optimised
    assert not np.allclose(np.asarray(state.params["scale"]), 1.0)
    # The frozen weights are the initial ones, and kept (with the batch statistics).
    layout = jaxtrain.make_state_layout(
        adapted.model, optax.sgd(0.1), jaxtrain.make_mesh(c.mesh), RULES, trainable=Adapter
    )
    initial = jaxtrain.create_state(layout, c.seed)
    np.testing.assert_array_equal(
        np.asarray(state.model_state["base"]["up"]["kernel"]),
        np.asarray(initial.model_state["base"]["up"]["kernel"]),
    )
    assert int(state.model_state["base"]["calls"]) == 4


def test_an_unnamed_weight_is_replicated_with_a_warning(caplog):
    class Plain(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(8, 16, rngs=rngs)

    with caplog.at_level(logging.WARNING):
        layout = jaxtrain.make_state_layout(
            lambda rngs: Plain(rngs), optax.sgd(0.1), jaxtrain.make_mesh({"fsdp": 8}), RULES
        )
    assert layout.shardings.params["hidden"]["kernel"].spec == P()
    [message] = [r.getMessage() for r in caplog.records if "logical axis names" in r.getMessage()]
    assert "1 weight matrices" in message and "hidden/kernel" in message
    assert "hidden/bias" not in message  # vectors are replicated silently


def test_a_loop_of_your_own_from_the_pieces(tmp_path):
    """Mesh, rules, sharded init, compiled steps, the pipeline and the checkpointer, by hand."""
    mesh = jaxtrain.make_mesh({"fsdp": 4, "tensor": 2})
    rules = jaxtrain.Rules(RULES)
    layout = jaxtrain.make_state_layout(lambda rngs: Net(rngs), optax.adam(1e-2), mesh, rules)
    examples = data.as_dataset(arrays(256))
    example = data.example_spec(examples)
    shardings = data.batch_shardings(example, mesh, rules)
    abstract_batch = data.abstract_batch(example, 16, shardings)
    with jax.set_mesh(mesh):
        state = jaxtrain.create_state(layout, seed=0)
        assert isinstance(state, jaxtrain.TrainState)
        train_step = jaxtrain.compile_train_step(
            jaxtrain.make_train_step(loss, layout), layout, abstract_batch
        )
        # The same step traced, not compiled: its program's outputs are the new state
        # (laid out as the layout says) and the metrics.
        traced = jaxtrain.steps.trace_train_step(
            jaxtrain.make_train_step(loss, layout), layout, abstract_batch
        )
        new_state, step_metrics = traced.out_info
        assert jax.tree.map(lambda s: (s.shape, s.dtype, s.sharding), new_state) == jax.tree.map(
            lambda s: (s.shape, s.dtype, s.sharding), layout.abstract_state
        )
        assert "loss" in step_metrics and traced.jaxpr.eqns
        eval_step = jaxtrain.jit_eval_step(
            jaxtrain.make_eval_step(jaxtrain.per_example(loss), layout), layout, abstract_batch
        )
        iterator = data.TrainIterator(
            examples, global_batch_size=16, seed=0, shard_index=0, shard_count=1
        )
        batches = data.DevicePrefetcher(iterator, shardings)
        try:
            losses = []
            for _ in range(5):
                state, step_metrics = train_step(state, next(batches))
                losses.append(float(step_metrics["loss"]))
            data_state = batches.state
        finally:
            batches.close()
        assert losses[-1] < losses[0]
        local, mask = next(
            data.eval_batches(
                examples, global_batch_size=16, max_batches=1, shard_index=0, shard_count=1
            )
        )
        sums = eval_step(
            state.params,
            state.model_state,
            data.to_global(local, shardings),
            data.to_global(mask, data.example_sharding(shardings)),
            0,
        )
        assert float(sums["loss"]["count"]) == 16

    checkpointer = jaxtrain.Checkpointer(str(tmp_path), config().checkpoint)
    try:
        checkpointer.save(5, state, data_state, {"note": "mine"})
    finally:
        checkpointer.close()
    # Restored onto another mesh (4 devices, data parallel): the same numbers.
    other = jaxtrain.make_mesh({"data": 4}, jax.devices()[:4])
    other_layout = jaxtrain.make_state_layout(
        lambda rngs: Net(rngs), optax.adam(1e-2), other, rules
    )
    assert jaxtrain.latest_compatible_step(str(tmp_path), other_layout.abstract_state) == 5
    checkpointer = jaxtrain.Checkpointer(str(tmp_path), config().checkpoint)
    try:
        restored, restored_data = checkpointer.restore(5, other_layout.abstract_state)
    finally:
        checkpointer.close()
    assert restored_data == data_state
    assert restored.params["up"]["kernel"].sharding.mesh.shape["data"] == 4
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
        (state.params, state.model_state),
        (restored.params, restored.model_state),
    )


TASK_MODULE = """
import numpy as np
import optax
import jax.numpy as jnp
from flax import nnx
import jaxtrain


class Tiny(nnx.Module):
    def __init__(self, width, rngs):
        names = {"out_sharding": ("embed", "mlp")}
        self.layer = nnx.Linear(4, width, kernel_metadata=names, rngs=rngs)

    def __call__(self, x):
        return self.layer(x)


def loss(model, batch, rngs):
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2), {}


VERSION = 1


def not_a_task(config):
    return {"model": Tiny}


def make_task(config):
    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    return jaxtrain.Task(
        model=lambda rngs: Tiny(config.model.width, rngs),
        loss=loss,
        data={"x": x, "y": np.repeat(x.sum(1, keepdims=True), config.model.width, 1)},
        name="tiny",
    )
"""

CONFIG_FILE = """
from jaxtrain.configs import base


def get_config(arg=None):
    c = base.get_config()
    c.task = "my_tasks:make_task"
    c.rules = (("activation_batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"))
    c.mesh = dict(data=-1, fsdp=2, tensor=2)
    c.global_batch_size = 8
    c.num_train_steps = 3
    c.model = dict(width=4)
    return c
"""


@pytest.fixture
def user_project(tmp_path, monkeypatch):
    (tmp_path / "my_tasks.py").write_text(textwrap.dedent(TASK_MODULE))
    (tmp_path / "my_config.py").write_text(textwrap.dedent(CONFIG_FILE))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow
def test_command_line_trains_a_task_named_by_import_path(user_project):
    script = os.path.join(os.path.dirname(sys.executable), "jaxtrain")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run(
        [script, "train", "--config=my_config.py", "--workdir=run"],
        cwd=user_project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "model tiny: 20 parameters" in proc.stdout
    assert sorted(read_metrics(user_project / "run")) == [3]  # the last step is always logged


@pytest.mark.parametrize(
    "path, message",
    [
        (
            "my_tasks:make_tsk",
            "config.task='my_tasks:make_tsk': 'my_tasks' has no attribute 'make_tsk'",
        ),
        ("no_such_module:make_task", "cannot import 'no_such_module' (ModuleNotFoundError"),
        ("my_tasks", "unknown task 'my_tasks'"),
        ("my_tasks:VERSION", "config.task='my_tasks:VERSION' is not callable"),
        ("my_tasks:not_a_task", "returned dict, not a jaxtrain.Task"),
    ],
)
def test_bad_task_path_is_one_line_exit_2(path, message, user_project, capsys):
    from jaxtrain import cli

    status = cli.main(
        ["jaxtrain", "train", "--config=my_config.py", "--workdir=run", f"--config.task={path}"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert message in err[0]
    assert not (user_project / "run").exists()


def test_load_config_finds_bundled_configs_by_name():
    by_name = jaxtrain.load_config("gpt_pysource.py:smoke")
    by_path = jaxtrain.load_config(os.path.join(REPO, "configs", "gpt_pysource.py:smoke"))
    assert by_name.to_dict() == by_path.to_dict() and by_name.model.num_layers == 2
    with pytest.raises(jaxtrain.ConfigError, match="config file not found: 'gtp_pysource.py'"):
        jaxtrain.load_config("gtp_pysource.py")
