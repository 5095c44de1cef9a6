"""Optimizers and schedules by name: today's AdamW bitwise, every optimizer's state sharded
like its parameters, resumed exactly, restored onto another mesh; the logged lr is the
one the optimizer used; fields that do not apply are refused or left unrecorded."""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import CONFIGS, TIMINGS, build, gpt_smoke_config, load_config, read_metrics
from test_resume import _logged_step, _start_and_kill

from jaxtrain import cli, optim, sharding
from jaxtrain import config as config_lib
from jaxtrain.errors import ConfigError
from jaxtrain.train import train_and_evaluate

JAXTRAIN = os.path.join(os.path.dirname(sys.executable), "jaxtrain")
GPT = os.path.join(CONFIGS, "gpt_pysource.py")
DIGITS = os.path.join(CONFIGS, "digits_cnn.py")


def _overrides(name, **more):
    """Config overrides choosing optimizer `name` (a schedule it takes)."""
    fields = {"optim__name": name, **more}
    if name == "schedule_free_adamw":
        fields["optim__schedule"] = "constant"
    if name == "adafactor":  # the smoke GPT's dims are small: factor them anyway
        fields["optim__adafactor__min_dim_size_to_factor"] = 16
    return fields


def test_adamw_is_todays_optimizer_bitwise():
    config = load_config("gpt_pysource", optim__warmup_steps=2)
    o = config.optim
    schedule = optim.make_schedule(o, 10)
    today = optax.chain(
        optax.clip_by_global_norm(o.grad_clip_norm),
        optax.adamw(
            learning_rate=optax.warmup_cosine_decay_schedule(0.0, o.lr, 2, 10, o.lr * 0.1),
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p),
        ),
    )
    now = optim.make_optimizer(o, schedule)
    keys = jax.random.split(jax.random.key(0), 3)
    params = {"w": jax.random.normal(keys[0], (8, 4)), "b": jax.random.normal(keys[1], (4,))}
    a, b = (params, today.init(params)), (params, now.init(params))

    @functools.partial(jax.jit, static_argnums=0)
    def step(tx, params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for i in range(5):
        key = jax.random.fold_in(keys[2], i)
        grads = {k: jax.random.normal(key, v.shape) for k, v in params.items()}
        a, b = step(today, *a, grads), step(now, *b, grads)
    jax.tree.map(np.testing.assert_array_equal, a[0], b[0])
    assert float(optim.learning_rate(b[1])) == float(schedule(4))  # the last update's rate


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_weight_decay_is_scaled_by_the_learning_rate(name):
    # config.optim.weight_decay is decoupled decay times the lr for every optimizer: at lr
    # 0 nothing moves (optax.adafactor's own weight_decay_rate would shrink each weight
    # by a tenth per step at 0.1, whatever the lr), and at lr 1e-2 the decay is 1e-3.
    from jaxtrain.configs import base

    o = base.get_config().optim
    o.update(name=name, weight_decay=0.1, schedule="constant")
    axes = {"w": ("embed", "mlp"), "b": ("mlp",)} if name == "muon" else None
    params = {"w": jnp.full((8, 8), 0.5), "b": jnp.ones((8,))}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    for lr in (0.0, 1e-2):
        o.lr = lr
        tx = optim.make_optimizer(o, optim.make_schedule(o, 10, 32), axes=axes)
        updates, _ = tx.update(grads, tx.init(params), params)
        moved = float(jnp.max(jnp.abs(updates["w"])))
        if lr == 0:
            assert moved == 0.0, (name, moved)
        else:
            assert 0 < moved < 0.05, (name, moved)  # a step of about lr, not of the decay


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_opt_state_is_sharded_like_the_parameters(name):
    config = gpt_smoke_config(mesh={"fsdp": 4, "tensor": 2}, **_overrides(name))
    config_lib.validate(config)
    _, layout, _, _ = build(config)
    params = {
        sharding.path_str(p): (leaf.shape, leaf.sharding.spec)
        for p, leaf in jax.tree_util.tree_flatten_with_path(layout.abstract_state.params)[0]
    }
    moments, factored_sharded, on_fsdp, on_tensor = 0, 0, False, False
    for path, leaf in jax.tree_util.tree_flatten_with_path(layout.abstract_state.opt_state)[0]:
        path = sharding.path_str(path)
        param = next((p for p in params if path.endswith("/" + p)), None)
        spec = tuple(leaf.sharding.spec)
        on_fsdp |= "fsdp" in spec
        on_tensor |= "tensor" in spec
        if param is None:  # a counter, a learning rate, Newton-Schulz coefficients
            assert not any(spec), (path, spec)
            continue
        shape, param_spec = params[param]
        param_spec = tuple(param_spec) + (None,) * (len(shape) - len(param_spec))
        if leaf.shape == shape:
            moments += 1
            assert spec == tuple(param_spec)[: len(spec)] and len(spec) <= len(shape), path
            continue
        factored = [  # a factored moment: the parameter's shape less one dimension
            param_spec[:d] + param_spec[d + 1 :]
            for d in range(len(shape))
            if leaf.shape == shape[:d] + shape[d + 1 :]
        ]
        if factored:
            assert spec in factored, (path, spec, param_spec)
            factored_sharded += any(spec)
        else:
            assert not any(spec), (path, spec)
    # Moments sharded as their parameters, over both axes: replicated ones would fail this.
    assert on_fsdp and on_tensor
    assert moments >= (0 if name == "adafactor" else 16)
    assert factored_sharded >= (16 if name == "adafactor" else 0)  # rows and columns
    bytes_per_param = optim.state_bytes_per_parameter(layout)
    assert 0 < bytes_per_param < 13, bytes_per_param


def test_muon_treats_scanned_stacks_per_layer_and_leaves_vocab_to_adam():
    dims = optim.muon_dimensions
    assert dims(3, ("embed", "heads", "head_dim")) == ((0,), (1, 2))
    assert dims(4, ("layers", "embed", "heads", "head_dim")) == ((1,), (2, 3))
    assert dims(4, ("layers", "heads", "head_dim", "embed")) == ((1, 2), (3,))
    assert dims(3, ("layers", "embed", "mlp")) == ((1,), (2,))
    assert dims(2, ("mlp", "embed")) == ((0,), (1,))
    assert dims(2, ("vocab", "embed")) is None and dims(2, ("embed", "vocab")) is None
    assert dims(2, ("layers", "norm")) is None and dims(1, ("norm",)) is None
    assert dims(4, ()) == ((0, 1, 2), (3,))  # an unnamed conv kernel: HWIO
    config = gpt_smoke_config(mesh={"fsdp": 4, "tensor": 2}, optim__name="muon")
    config.model.scan_layers = True
    _, layout, _, _ = build(config)
    state = layout.abstract_state.opt_state[1].inner_state.inner_states
    muon_mu = state["muon"].inner_state[0].mu
    assert muon_mu["blocks"]["attn"]["query"]["kernel"].shape == (2, 64, 4, 16)
    assert muon_mu["blocks"]["attn"]["query"]["kernel"].sharding.spec[1] == "fsdp"
    assert isinstance(muon_mu["embed"]["embedding"], optax.MaskedNode)
    assert state["adam"].inner_state[0].mu["embed"]["embedding"].shape == (256, 64)


def _lr(name, step, steps=100, **fields):
    config = load_config("gpt_pysource", optim__schedule=name, optim__warmup_steps=10, **fields)
    config.optim.lr = 1.0
    config.optim.min_lr_ratio = 0.1
    return float(optim.make_schedule(config.optim, steps, config.global_batch_size)(step))


@pytest.mark.parametrize("name", optim.SCHEDULES)
def test_every_schedule_warms_up_linearly_from_zero(name):
    assert _lr(name, 0) == 0.0
    assert _lr(name, 5) == pytest.approx(0.5)
    assert _lr(name, 10) == pytest.approx(1.0)


def test_schedules_after_warmup():
    assert _lr("constant", 99) == 1.0
    assert _lr("linear", 55) == pytest.approx(0.55)  # halfway from 1 to 0.1
    assert _lr("linear", 100) == pytest.approx(0.1)
    assert _lr("rsqrt", 40) == pytest.approx(0.5)  # sqrt(10 / 40)
    assert _lr("warmup_cosine", 100) == pytest.approx(0.1)
    # wsd: stable until the last 20% of the steps, then down to lr * min_lr_ratio.
    assert _lr("wsd", 80) == 1.0
    assert _lr("wsd", 90) == pytest.approx(0.55)
    assert _lr("wsd", 100) == pytest.approx(0.1)
    assert _lr("wsd", 90, optim__wsd_decay_shape="sqrt") == pytest.approx(1 - 0.9 * 0.5**0.5)
    assert _lr("wsd", 90, optim__wsd_decay_shape="cosine") == pytest.approx(0.55)
    # The peak for the batch size: the smoke-free GPT config's global batch is 32.
    batch = load_config("gpt_pysource").global_batch_size
    ratio = batch / 8
    assert _lr("constant", 50, optim__lr_scaling="linear", optim__reference_batch_size=8) == ratio
    assert _lr(
        "constant", 50, optim__lr_scaling="sqrt", optim__reference_batch_size=8
    ) == pytest.approx(ratio**0.5)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"optim__name": "adam"}, "config.optim.name must be one of adamw, lamb, lion"),
        ({"optim__schedule": "cosine"}, "config.optim.schedule must be one of warmup_cosine"),
        ({"optim__name": "lion", "optim__lion__b1": 1.5}, "config.optim.lion.b1 must be in [0, 1)"),
        ({"optim__sgd__momentum": 2.0}, None),  # not chosen: not checked by validate
        ({"optim__lr_scaling": "cube"}, "config.optim.lr_scaling must be none or linear"),
        ({"optim__name": "schedule_free_adamw"}, "optim.schedule must be 'constant'"),
    ],
)
def test_bad_optim_fields_are_named(fields, message):
    config = load_config("gpt_pysource", **fields)
    if message is None:
        config_lib.validate(config)
        return
    with pytest.raises(ConfigError, match=None) as error:
        config_lib.validate(config)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_an_old_flat_field_names_its_new_place(tmp_path):
    path = tmp_path / "old.py"
    path.write_text(
        "from jaxtrain.configs import base\n\ndef get_config(arg=None):\n"
        "    c = base.get_config()\n    c.optim.update(b2=0.95)\n    return c\n"
    )
    with pytest.raises(ConfigError, match=r"config.optim.b2 is now config.optim.adamw.b2"):
        config_lib.validate(config_lib.load_config(str(path)))


def test_a_config_file_setting_another_optimizers_field_is_refused(tmp_path):
    path = tmp_path / "lion_b1.py"
    path.write_text(
        "from jaxtrain.configs import base\n\ndef get_config(arg=None):\n"
        "    c = base.get_config()\n    c.optim.lion.b1 = 0.95\n    return c\n"
    )
    with pytest.raises(
        ConfigError, match=r"config.optim.lion.b1 does not apply: optim.name is 'adamw'"
    ):
        config_lib.load_config(str(path))


def test_an_override_of_another_optimizers_field_is_one_line_exit_2(tmp_path, capsys):
    workdir = tmp_path / "run"
    status = cli.main(
        [
            "jaxtrain",
            "train",
            f"--config={GPT}:smoke",
            f"--workdir={workdir}",
            "--config.optim.lion.b1=0.95",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err == [
        "jaxtrain: error: --config overrides: config.optim.lion.b1 does not apply: optim.name is "
        "'adamw' (set optim.name='lion', or leave it at 0.9)"
    ]
    assert not workdir.exists()


def test_recorded_config_keeps_only_what_applies():
    o = load_config("gpt_pysource", optim__name="lion").optim.to_dict()
    recorded = optim.recorded_config(o)
    assert "lion" in recorded and not set(optim.OPTIMIZERS) - {"lion"} & set(recorded)
    assert "task_optimizer" not in recorded
    assert optim.recorded_config(o, task_optimizer=True)["task_optimizer"] is True


# --- Slow: real training with each optimizer ----------------------------------------------


def _params(workdir, step):
    with ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"), options=ocp.CheckpointManagerOptions(read_only=True)
    ) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return restored["state"]["params"]


def _train(data_dir, workdir, name, steps, mesh, devices=None):
    config = gpt_smoke_config(
        data_dir, steps, mesh, checkpoint_every_steps=2, **_overrides(name, optim__warmup_steps=1)
    )
    return train_and_evaluate(config, str(workdir), devices=devices)[1]


def _strip(record):
    return {k: v for k, v in record.items() if k not in TIMINGS}


@pytest.mark.slow
@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_optimizer_resumes_bitwise_and_restores_onto_another_mesh(name, data_dir, tmp_path):
    mesh = {"fsdp": 4, "tensor": 2}
    whole, halves, moved = tmp_path / "whole", tmp_path / "halves", tmp_path / "moved"
    result = _train(data_dir, whole, name, 4, mesh)
    _train(data_dir, halves, name, 2, mesh)
    shutil.copytree(halves, moved)
    _train(data_dir, halves, name, 4, mesh)  # resumes from step 2
    want, got = read_metrics(whole), read_metrics(halves)
    assert sorted(got) == [1, 2, 3, 4]
    assert [_strip(got[s]) for s in got] == [_strip(want[s]) for s in want]
    assert all("lr" in want[s] for s in want) and want[1]["lr"] == 0.0  # warmup from 0
    jax.tree.map(np.testing.assert_array_equal, _params(halves, 4), _params(whole, 4))
    # The step-2 checkpoint onto 4 devices as data x fsdp: the same run, to float rounding.
    moved_result = _train(data_dir, moved, name, 4, {"data": 2, "fsdp": 2}, jax.devices()[:4])
    moved_losses = [read_metrics(moved)[s]["loss"] for s in (3, 4)]
    np.testing.assert_allclose(moved_losses, [want[s]["loss"] for s in (3, 4)], rtol=1e-4)
    np.testing.assert_allclose(moved_result["loss"], result["loss"], rtol=1e-4)
    recorded = json.loads((whole / "config.json").read_text())["optim"]
    assert recorded["name"] == name and set(optim.OPTIMIZERS) & set(recorded) == {name}


@pytest.mark.slow
def test_a_task_optimizer_without_an_injected_rate_logs_no_lr(data_dir, tmp_path):
    from jaxtrain import tasks

    config = gpt_smoke_config(data_dir, 2)
    task = tasks.from_config(config)
    import dataclasses

    own = dataclasses.replace(task, optimizer=lambda schedule: optax.sgd(schedule))
    train_and_evaluate(config, str(tmp_path / "own"), task=own)
    assert all("lr" not in r for r in read_metrics(tmp_path / "own").values())
    recorded = json.loads((tmp_path / "own" / "config.json").read_text())["optim"]
    assert recorded["task_optimizer"] is True


def _cli_command(config, workdir, data_dir, *flags):
    return [
        JAXTRAIN,
        "train",
        f"--config={config}:smoke",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        *flags,
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, flags",
    [
        (GPT, ["--config.optim.name=lion", "--config.optim.lion.b2=0.98"]),
        (DIGITS, ["--config.optim.name=muon", "--config.optim.schedule=wsd"]),
        (DIGITS, ["--config.optim.name=sgd", "--config.optim.schedule=rsqrt"]),
    ],
)
def test_the_command_line_trains_with_another_optimizer(config, flags, data_dir, tmp_path):
    subprocess.run(
        _cli_command(config, tmp_path, data_dir, *flags),
        check=True,
        timeout=600,
        capture_output=True,
    )
    recorded = json.loads((tmp_path / "config.json").read_text())["optim"]
    name = flags[0].split("=")[1]
    assert recorded["name"] == name and set(optim.OPTIMIZERS) & set(recorded) == {name}
    records = read_metrics(tmp_path)
    assert records and all(np.isfinite(r["loss"]) and "lr" in r for r in records.values())


@pytest.mark.slow
def test_lion_resumes_bitwise_after_kill_9(data_dir, tmp_path):
    flags = [
        "--config.optim.name=lion",
        "--config.num_train_steps=16",
        "--config.checkpoint_every_steps=4",
        "--config.log_every_steps=1",
        "--config.eval_every_steps=16",
    ]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(_cli_command(GPT, reference, data_dir, *flags), check=True, timeout=600)
    status, _ = _start_and_kill(
        _cli_command(GPT, killed, data_dir, *flags), _logged_step(killed, 6)
    )
    assert status == -signal.SIGKILL
    subprocess.run(_cli_command(GPT, killed, data_dir, *flags), check=True, timeout=600)
    for split in ("train", "eval"):
        want, got = read_metrics(reference, split), read_metrics(killed, split)
        assert sorted(got) == sorted(want)
        assert all(_strip(got[s]) == _strip(want[s]) for s in want), split
    jax.tree.map(np.testing.assert_array_equal, _params(killed, 16), _params(reference, 16))
    assert jnp.all(jnp.isfinite(jnp.asarray(read_metrics(killed)[16]["lr"])))


def test_a_checkpoint_of_another_optimizer_is_refused_by_name_not_set_aside(data_dir, tmp_path):
    # Resuming an adamw run with lion (config changes allowed): the saved optimizer state
    # has another structure. That is a one-line error saying so, not "damaged" steps.
    workdir = tmp_path / "run"
    train_and_evaluate(gpt_smoke_config(data_dir, steps=2), str(workdir))
    steps_before = sorted(os.listdir(workdir / "checkpoints"))
    config = gpt_smoke_config(
        data_dir, steps=4, optim__name="lion", checkpoint__allow_config_changes=True
    )
    with pytest.raises(ConfigError) as error:
        train_and_evaluate(config, str(workdir))
    assert "hold a train state of another structure" in str(error.value)
    assert "\n" not in str(error.value)
    assert sorted(os.listdir(workdir / "checkpoints")) == steps_before  # none set aside
