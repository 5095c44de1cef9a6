"""Precision: the "auto" rule, the dtype of every matmul, and float16 loss scaling."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import build, gpt_smoke_config, load_config, read_metrics

import jaxtrain
from jaxtrain import precision, sharding, steps
from jaxtrain.errors import ConfigError
from jaxtrain.nonfinite import NonFiniteError
from jaxtrain.train import train_and_evaluate


@pytest.mark.parametrize(
    "platform, kind, capability, expected",
    [
        ("cpu", "cpu", None, jnp.float32),
        ("tpu", "TPU v5 lite", None, jnp.bfloat16),
        ("gpu", "Tesla T4", "7.5", jnp.float16),  # Colab's free GPU
        ("gpu", "Tesla V100-SXM2-16GB", "7.0", jnp.float16),
        ("gpu", "NVIDIA A100-SXM4-80GB", "8.0", jnp.bfloat16),
        ("gpu", "NVIDIA L4", "8.9", jnp.bfloat16),
        ("gpu", "NVIDIA H100 80GB HBM3", "9.0", jnp.bfloat16),
        ("gpu", "Tesla T4", None, jnp.float16),  # no capability reported: by name
        ("gpu", "AMD Instinct MI300X", None, jnp.bfloat16),
    ],
)
def test_auto_picks_bfloat16_where_the_hardware_has_it(platform, kind, capability, expected):
    device = types.SimpleNamespace(
        platform=platform, device_kind=kind, compute_capability=capability
    )
    assert precision.resolve_dtype("auto", device=device) == expected
    # The loss is scaled exactly where the compute dtype is float16.
    scaling = precision.loss_scale(load_config("gpt_pysource").precision, device=device)
    assert (scaling is not None) == (expected == jnp.float16)


def _matmuls(jaxpr) -> list[tuple[str, tuple[str, ...]]]:
    """(primitive, operand dtypes) of every dot_general and convolution, in sub-jaxprs
    (scan, remat, cond, custom_vjp, ...) too."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            # An algorithm would name other types for the products than the operands'.
            assert not isinstance(eqn.params.get("precision"), jax.lax.DotAlgorithmPreset)
            found.append((eqn.primitive.name, tuple(str(v.aval.dtype) for v in eqn.invars)))
        for param in eqn.params.values():
            for sub in param if isinstance(param, list | tuple) else [param]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    found += _matmuls(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    found += _matmuls(sub)
    return found


# Matmuls in one train step (forward and backward) of each smoke model.
GPT_MATMULS = 2 * 9 + 1  # per layer: q, k, v, scores, values, out, gate, up, down; lm_head
CNN_MATMULS = 2 + 2  # two convolutions, hidden and head


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize(
    "name, forward", [("gpt_pysource", GPT_MATMULS), ("digits_cnn", CNN_MATMULS)]
)
def test_every_matmul_computes_in_the_compute_dtype(name, forward, compute_dtype, data_dir):
    config = load_config(
        name, "smoke", data_dir=data_dir, mesh={"data": 1}, precision__compute_dtype=compute_dtype
    )
    mesh, layout, task, batch = build(config, devices=jax.devices()[:1])
    scaling = precision.loss_scale(config.precision)
    with jax.set_mesh(mesh), sharding.use_rules(sharding.Rules(config.rules)):
        train_step = steps.make_train_step(task.loss, layout, loss_scale=scaling)
        jaxpr = jax.make_jaxpr(train_step)(layout.abstract_state, batch).jaxpr
    found = _matmuls(jaxpr)
    # Forward, and in the backward pass one or two per forward matmul (the first layer's
    # input needs no gradient): every one is there, none in float32 by default.
    assert 2 * forward <= len(found) <= 3 * forward, found
    wrong = [(op, dtypes) for op, dtypes in found if set(dtypes) != {compute_dtype}]
    assert not wrong, f"matmuls not in {compute_dtype}: {wrong}"


def test_loss_scale_halves_on_overflow_and_grows_after_finite_steps():
    rule = precision.LossScale(init=8.0, growth_steps=3)
    state = rule.initial_state()
    yes, no = jnp.bool_(True), jnp.bool_(False)
    assert bool(rule.is_overflow(state, loss_finite=yes, grads_finite=no))
    assert not bool(rule.is_overflow(state, loss_finite=no, grads_finite=no))  # real: the loss
    state = rule.update(state, grads_finite=no, overflow=yes)
    assert float(state["scale"]) == 4.0 and int(state["overflows"]) == 1
    for expected in (4.0, 4.0, 8.0, 8.0):  # doubles after 3 finite steps in a row
        state = rule.update(state, grads_finite=yes, overflow=no)
        assert float(state["scale"]) == expected
    one = {**state, "scale": jnp.float32(1.0)}
    # At a scale of 1 nothing is scaled up: a non-finite gradient is a real one.
    assert not bool(rule.is_overflow(one, loss_finite=yes, grads_finite=no))


def test_float16_recovers_from_an_overflow_without_aborting(data_dir, tmp_path):
    # 2**22 times the loss overflows float16 (max 65504) in the backward pass at once.
    steps_ = 20
    config = gpt_smoke_config(
        data_dir,
        steps=steps_,
        mesh={"data": 2},
        precision__compute_dtype="float16",
        precision__loss_scale_init=2.0**22,
        optim__warmup_steps=0,
        checkpoint_every_steps=10,
    )
    assert config.nonfinite.policy == "abort"
    state, result = train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:2])
    logged = read_metrics(tmp_path)
    scales = [2.0**22] + [logged[s]["loss_scale"] for s in range(1, steps_ + 1)]
    overflowed = [logged[s]["loss_scale_overflows"] for s in range(1, steps_ + 1)]
    assert scales[1] == 2.0**21 and overflowed[0] == 1  # step 1 overflowed: scale halved
    # Each step's scale halved exactly when that step overflowed (and so was skipped);
    # growth needs 2000 finite steps in a row.
    halved = [after == before / 2 for before, after in zip(scales, scales[1:], strict=False)]
    counted = [b > a for a, b in zip([0, *overflowed], overflowed, strict=False)]
    assert halved == counted and all(
        after in (before, before / 2) for before, after in zip(scales, scales[1:], strict=False)
    )
    assert 1 <= overflowed[-1] <= 12  # it found a scale that fits, and kept training
    assert int(state.step) == steps_ and int(state.skipped) == 0  # not non-finite steps
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state.params))
    losses = [logged[s]["loss"] for s in range(1, steps_ + 1)]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5  # the applied steps trained it
    assert np.isfinite(result["loss"])
    # The scale is part of the train state, so every checkpoint carries it.
    assert float(state.loss_scale["scale"]) == scales[-1]
    assert int(state.loss_scale["overflows"]) == overflowed[-1]
    saved = jaxtrain.load_run(str(tmp_path), mesh={"data": -1}).state.loss_scale
    assert float(saved["scale"]) == scales[-1] and int(saved["overflows"]) == overflowed[-1]


def test_float16_still_aborts_on_a_real_non_finite_loss(data_dir, tmp_path):
    import dataclasses

    from jaxtrain import data, tasks

    config = gpt_smoke_config(data_dir, steps=4, precision__compute_dtype="float16")
    task = tasks.from_config(config)
    examples = data.as_dataset(task.data)
    # A token past the vocabulary: the embedding gives NaN, so the loss itself is NaN.
    poisoned = examples.map(lambda e: {**e, "inputs": np.full_like(e["inputs"], 256)})
    with pytest.raises(NonFiniteError, match="step 1: non-finite loss"):
        train_and_evaluate(config, str(tmp_path), task=dataclasses.replace(task, data=poisoned))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("loss_scaling", "always", "config.precision.loss_scaling='always'"),
        ("param_dtype", "float16", "config.precision.param_dtype='float16'"),
        ("loss_scale_init", 0.5, "loss_scale_init must be in"),
        ("loss_scale_growth_steps", 0, "loss_scale_growth_steps must be a positive integer"),
    ],
)
def test_bad_precision_fields_are_refused(field, value, message):
    config = load_config("gpt_pysource")
    config.precision[field] = value
    with pytest.raises(ConfigError, match=message):
        precision.check_config(config.precision)
