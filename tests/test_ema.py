"""Weight EMA (`config.optim.ema_decay`) and the weight sets a run evaluates and serves:
its math, its layout and checkpoints, both sets in the eval log, the commands' --weights,
and schedule-free AdamW evaluated at its evaluation parameters."""

import dataclasses
import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import build, gpt_smoke_config, load_config, read_metrics, train_gpt_smoke
from flax import nnx
from jax.sharding import PartitionSpec

import jaxtrain
from jaxtrain import cli, optim, runs, sample, steps, tasks, weights
from jaxtrain import config as config_lib
from jaxtrain import state as state_lib
from jaxtrain.errors import ConfigError
from jaxtrain.train import train_and_evaluate

MESH = {"data": 2, "fsdp": 2, "tensor": 2}
# A 6-step smoke GPT, evaluated and checkpointed every 3 steps, at a constant learning rate
# (no warmup, so the EMA, 0.9: an average over about 10 steps, lags the weights visibly;
# constant, so a 3-step run's schedule is the 6-step run's, to resume from).
RUN = dict(
    steps=6,
    eval_every_steps=3,
    checkpoint_every_steps=3,
    optim__warmup_steps=0,
    optim__min_lr_ratio=1.0,
)
EMA = dict(optim__ema_decay=0.9, checkpoint__keep_best=1, checkpoint__best_metric="ema_loss")


def test_ema_follows_a_numpy_reference():
    params = {"w": jnp.asarray([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.asarray([0.1, -0.3])}
    rng = np.random.default_rng(0)
    grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)]
    grads += [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)]
    grads += grads[:1]
    for warmup in (False, True):
        decay = 0.8
        inner = optax.adam(0.1)
        tx = weights.with_ema(inner, decay, warmup=warmup)
        state, inner_state = tx.init(params), inner.init(params)
        p, want = params, jax.tree.map(np.asarray, params)
        for t, g in enumerate(grads):
            updates, state = tx.update(g, state, p)
            inner_updates, inner_state = inner.update(g, inner_state, p)
            # The updates are the wrapped optimizer's, bitwise: training is unchanged.
            jax.tree.map(np.testing.assert_array_equal, updates, inner_updates)
            p = optax.apply_updates(p, updates)
            d = min(decay, (1 + t) / (10 + t)) if warmup else decay
            want = jax.tree.map(lambda e, x, d=d: d * e + (1 - d) * np.asarray(x), want, p)
            jax.tree.map(
                lambda got, w: np.testing.assert_allclose(got, w, rtol=1e-6), state.ema, want
            )
        assert int(state.count) == len(grads)
        sets = weights.evaluation_weights(state, p)
        assert list(sets) == ["", "ema"]
        jax.tree.map(np.testing.assert_array_equal, sets[""], p)
        jax.tree.map(np.testing.assert_array_equal, sets["ema"], state.ema)
    # bfloat16 weights keep a float32 average, and are served as bfloat16.
    state = weights.with_ema(optax.sgd(1.0), 0.999).init({"w": jnp.ones(3, jnp.bfloat16)})
    assert state.ema["w"].dtype == jnp.float32
    assert weights.evaluation_weights(state, {"w": jnp.ones(3, jnp.bfloat16)})["ema"][
        "w"
    ].dtype == (jnp.bfloat16)


def test_ema_decay_zero_leaves_the_optimizer_as_it_was():
    config = load_config("gpt_pysource", "smoke")
    assert config.optim.ema_decay == 0
    tx, schedule = optim.optimizer_and_schedule(config)
    plain = optim.make_optimizer(config.optim, schedule)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    assert jax.tree.structure(tx.init(params)) == jax.tree.structure(plain.init(params))
    # A config.json written before the field existed: no EMA either.
    del config.optim["ema_decay"], config.optim["ema_warmup"]
    tx, _ = optim.optimizer_and_schedule(config)
    assert jax.tree.structure(tx.init(params)) == jax.tree.structure(plain.init(params))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("ema_decay", 1.0, "config.optim.ema_decay must be in [0, 1) (0: off), got 1.0"),
        ("ema_decay", -0.1, "config.optim.ema_decay must be in [0, 1)"),
        ("ema_decay", True, "config.optim.ema_decay must be in [0, 1)"),
        ("ema_warmup", None, "config.optim.ema_warmup must be True or False, got None"),
    ],
)
def test_bad_ema_fields_are_one_error_naming_them(field, value, message):
    config = load_config("gpt_pysource", "smoke")
    config.optim[field] = value
    with pytest.raises(ConfigError) as error:
        config_lib.validate(config)
    assert str(error.value).startswith(message)


def test_ema_is_sharded_like_the_params_on_fsdp_and_tensor():
    config = load_config("gpt_pysource", "smoke", optim__ema_decay=0.99)
    _, layout, _, _ = build(config, {"fsdp": 4, "tensor": 2})
    [ema_state] = weights._find(layout.shardings.opt_state, weights.EmaState)
    specs = jax.tree.map(lambda s: s.spec, (ema_state.ema, layout.shardings.params))
    assert specs[0] == specs[1]
    kernel = ema_state.ema["blocks"][0]["mlp"]["up"]["kernel"]
    assert kernel.spec == PartitionSpec("fsdp", "tensor")  # sharded, not replicated
    assert ema_state.count.spec == PartitionSpec()
    abstract = layout.abstract_state
    [ema_abstract] = weights._find(abstract.opt_state, weights.EmaState)
    dtypes = jax.tree.map(lambda x: x.dtype, (ema_abstract.ema, abstract.params))
    assert dtypes[0] == dtypes[1]


class _Linear(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(3, 1, rngs=rngs)

    def __call__(self, x):
        return self.dense(x)[:, 0]


def _mse(model, batch, rngs):
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2), {}


def test_a_skipped_step_leaves_the_ema_unchanged():
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    tx = weights.with_ema(optax.sgd(0.1), 0.5)
    layout = state_lib.make_state_layout(lambda rngs: _Linear(rngs), tx, mesh, ())
    state = state_lib.create_state(layout, 0)
    step = jax.jit(steps.make_train_step(_mse, layout))
    x = np.ones((4, 3), np.float32)
    bad = {"x": x.copy(), "y": np.zeros(4, np.float32)}
    bad["x"][0, 0] = np.nan
    skipped, metrics = step(state, bad)
    assert not bool(metrics["finite"]) and int(skipped.skipped) == 1
    jax.tree.map(np.testing.assert_array_equal, skipped.opt_state, state.opt_state)
    applied, metrics = step(skipped, {"x": x, "y": np.zeros(4, np.float32)})
    assert bool(metrics["finite"]) and int(applied.opt_state.count) == 1
    new_ema = applied.opt_state.ema["dense"]["kernel"]
    assert not np.array_equal(new_ema, state.opt_state.ema["dense"]["kernel"])
    want = 0.5 * state.params["dense"]["kernel"] + 0.5 * applied.params["dense"]["kernel"]
    np.testing.assert_allclose(new_ema, want, rtol=1e-6)


# --- Real runs (slow) -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, data_dir):
    """A 6-step smoke GPT with weight EMA on data x fsdp x tensor, keeping its best step by
    the EMA's eval loss."""
    workdir = tmp_path_factory.mktemp("runs") / "ema"
    state, result, _ = train_gpt_smoke(data_dir, workdir, MESH, **RUN, **EMA)
    return workdir, state, result


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, data_dir):
    """The same run without EMA."""
    workdir = tmp_path_factory.mktemp("runs") / "plain"
    state, result, _ = train_gpt_smoke(data_dir, workdir, MESH, **RUN)
    return workdir, state, result


def _ema(state):
    [found] = weights._find(state.opt_state, weights.EmaState)
    return found.ema


@pytest.mark.slow
def test_both_weight_sets_are_evaluated_and_training_is_unchanged(ema_run, plain_run):
    workdir, state, result = ema_run
    evals = read_metrics(workdir, "eval")
    assert sorted(evals) == [3, 6]
    for record in evals.values():
        assert {"loss", "accuracy", "ema_loss", "ema_accuracy", "ema_perplexity"} <= set(record)
        assert record["ema_loss"] != record["loss"]  # the average lags the weights
    assert result["ema_loss"] == evals[6]["ema_loss"]
    # checkpoint.best_metric="ema_loss" ranks the saved steps by the EMA's loss.
    with ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"), options=ocp.CheckpointManagerOptions(read_only=True)
    ) as manager:
        assert manager.metadata(6).metrics["ema_loss"] == evals[6]["ema_loss"]
    # The EMA changes nothing of the training: the same weights and losses bitwise, and
    # the same metrics under the same names.
    plain_dir, plain_state, _ = plain_run
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.device_get(state.params),
        jax.device_get(plain_state.params),
    )
    plain_evals = read_metrics(plain_dir, "eval")
    for step in (3, 6):
        assert {k: v for k, v in evals[step].items() if not k.startswith("ema_")} == (
            plain_evals[step]
        )
    assert [r["loss"] for r in read_metrics(workdir).values()] == [
        r["loss"] for r in read_metrics(plain_dir).values()
    ]
    # The EMA is sharded as its weights are, in the run's own state.
    ema = _ema(state)
    kernel = ema["blocks"][0]["mlp"]["up"]["kernel"]
    assert kernel.sharding == state.params["blocks"][0]["mlp"]["up"]["kernel"].sharding


@pytest.mark.slow
def test_a_resumed_ema_run_is_bitwise_the_uninterrupted_one(ema_run, data_dir, tmp_path):
    _, reference, _ = ema_run
    workdir = tmp_path / "resumed"
    train_gpt_smoke(data_dir, workdir, MESH, **{**RUN, "steps": 3}, **EMA)
    state, _, _ = train_gpt_smoke(data_dir, workdir, MESH, **RUN, **EMA)
    assert int(state.step) == 6
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(reference))
    assert read_metrics(workdir, "eval")[6] == read_metrics(ema_run[0], "eval")[6]


@pytest.mark.slow
def test_an_ema_run_restores_onto_another_mesh(ema_run):
    workdir, trained, _ = ema_run
    run = jaxtrain.load_run(str(workdir), mesh={"fsdp": 4, "tensor": 2, "data": 1})
    assert run.layout.mesh.shape["fsdp"] == 4
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.device_get(_ema(run.state)),
        jax.device_get(_ema(trained)),
    )
    specs = jax.tree.map(lambda x: x.sharding.spec, (_ema(run.state), run.state.params))
    assert specs[0] == specs[1]
    assert specs[0]["blocks"][0]["mlp"]["up"]["kernel"] == PartitionSpec("fsdp", "tensor")
    # Its weight sets evaluate there as they did in training.
    result = runs.evaluate_run(run)
    training = read_metrics(workdir, "eval")[6]
    for key in ("loss", "ema_loss"):
        assert result[key] == pytest.approx(training[key], rel=1e-5)


def _cli(capsys, *argv):
    status = cli.main(["jaxtrain", *map(str, argv)])
    out, err = capsys.readouterr()
    return status, out, err.strip().splitlines()


def _snapshot(directory):
    found = {}
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                found[os.path.join(root, name)] = hashlib.sha256(f.read()).hexdigest()
    return found


@pytest.mark.slow
def test_sample_eval_and_export_use_the_ema_unless_told(ema_run, capsys, tmp_path):
    workdir, _, _ = ema_run
    run = jaxtrain.load_run(str(workdir))
    ema, raw = run.with_weights("ema"), run.with_weights("raw")
    assert run.with_weights().state.params is not run.state.params
    jax.tree.map(np.testing.assert_array_equal, raw.state.params, run.state.params)
    jax.tree.map(np.testing.assert_array_equal, run.with_weights().state.params, _ema(run.state))

    # sample: the EMA's continuation by default, the raw weights' with --weights=raw.
    argv = ("sample", f"--workdir={workdir}", "--prompt=def f(x):", "--max_new_tokens=24")
    texts = {}
    for flag in ((), ("--weights=ema",), ("--weights=raw",)):
        status, texts[flag], _ = _cli(capsys, *argv, *flag)
        assert status == 0
    for which, chosen in (("ema", ema), ("raw", raw)):
        want = sample.sample_text(chosen, "def f(x):", max_new_tokens=24) + "\n"
        assert texts[(f"--weights={which}",)] == want
    assert texts[()] == texts[("--weights=ema",)] != texts[("--weights=raw",)]

    # eval: both sets by default, named as in training; one with --weights.
    training = read_metrics(workdir, "eval")[6]
    status, out, _ = _cli(capsys, "eval", f"--workdir={workdir}")
    assert status == 0 and "| loss " in out and "| ema_loss " in out
    both = read_metrics(workdir, "eval:validation")[6]
    assert {k: both[k] for k in ("loss", "ema_loss")} == {
        k: training[k] for k in ("loss", "ema_loss")
    }
    for which, keys in (("raw", {"loss", "accuracy"}), ("ema", {"ema_loss", "ema_accuracy"})):
        assert runs.evaluate_run(run, weights=which).keys() >= keys
        assert not {k for k in runs.evaluate_run(run, weights=which)} & (
            {"loss", "ema_loss"} - keys
        )

    # export: the EMA's weights by default, the raw ones with --weights=raw.
    x = np.random.default_rng(0).integers(0, 256, (2, 16)).astype(np.int32)
    logits = {}
    for flag in ("", "--weights=raw"):
        out_file = tmp_path / f"model{flag}.jaxexport"
        argv = ("export", f"--workdir={workdir}", f"--out={out_file}", *([flag] if flag else []))
        status, _, _ = _cli(capsys, *argv)
        assert status == 0
        with open(out_file, "rb") as f:
            logits[flag] = np.asarray(jax.export.deserialize(bytearray(f.read())).call(x))
    np.testing.assert_allclose(logits[""], ema.model()(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits["--weights=raw"], raw.model()(x), rtol=1e-5, atol=1e-5)
    assert np.abs(logits[""] - logits["--weights=raw"]).max() > 1e-3


@pytest.mark.slow
def test_weights_ema_on_a_run_without_one_is_one_line_and_writes_nothing(
    plain_run, capsys, tmp_path
):
    workdir, _, _ = plain_run
    before = _snapshot(workdir)
    out_file = tmp_path / "m.jaxexport"
    for command in (
        ("sample", "--prompt=hi"),
        ("eval",),
        ("export", f"--out={out_file}"),
    ):
        status, _, err = _cli(
            capsys, command[0], f"--workdir={workdir}", *command[1:], "--weights=ema"
        )
        assert status == 2 and len(err) == 1, err
        assert err[0].startswith("jaxtrain: error: weights 'ema': this run keeps no moving ")
        assert "config.optim.ema_decay is 0" in err[0]
        status, _, err = _cli(
            capsys, command[0], f"--workdir={workdir}", *command[1:], "--weights=x"
        )
        assert status == 2 and len(err) == 1 and "--weights" in err[0] and "ema|raw" in err[0]
    assert _snapshot(workdir) == before and not out_file.exists()
    # Without an EMA, the raw weights serve by default.
    run = jaxtrain.load_run(str(workdir))
    jax.tree.map(np.testing.assert_array_equal, run.with_weights().state.params, run.state.params)
    assert "ema_loss" not in runs.evaluate_run(run)


@pytest.mark.slow
def test_schedule_free_adamw_is_evaluated_at_its_eval_params(data_dir, tmp_path):
    config = gpt_smoke_config(data_dir, 4, MESH, optim__warmup_steps=0)
    task = dataclasses.replace(
        tasks.from_config(config),
        optimizer=lambda schedule: optax.contrib.schedule_free_adamw(schedule),
    )
    state, result = train_and_evaluate(config, str(tmp_path), task=task)
    [free] = weights._find(state.opt_state, optax.contrib.ScheduleFreeState)
    eval_params = optax.contrib.schedule_free_eval_params(free, state.params)
    run = jaxtrain.load_run(str(tmp_path), task=task)

    def loss_of(params):  # the same run's evaluation, of exactly these weights
        bare = run._replace(state=run.state.replace(params=params, opt_state=None))
        return runs.evaluate_run(bare)["loss"]

    assert result["loss"] == pytest.approx(loss_of(eval_params), rel=1e-6)
    assert result["loss"] != pytest.approx(loss_of(state.params), rel=1e-4)
    assert runs.evaluate_run(run)["loss"] == pytest.approx(result["loss"], rel=1e-6)
    # What sample and export serve: the eval parameters too ("raw" is schedule-free's).
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
        jax.device_get(run.with_weights().state.params),
        jax.device_get(eval_params),
    )
