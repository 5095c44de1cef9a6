"""The GPT's KV-cache decoding path, and sampling from it, against the plain forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import gpt_smoke_config
from flax import nnx

import jaxtrain
from jaxtrain import models, sample, steps, tasks
from jaxtrain.runs import Run

MESH = {"data": 2, "fsdp": 2, "tensor": 2}


def _model(**fields):
    config = gpt_smoke_config()
    config.model.update(fields)
    with nnx.use_eager_sharding(False):
        model = models.make_model(config.model, dtype=jnp.float32, param_dtype=jnp.float32)(
            nnx.Rngs(0)
        )
    return steps.set_mode(model, train=False)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_cached_logits_equal_the_forward_pass_at_every_position(scan_layers):
    model = _model(scan_layers=scan_layers)  # 4 heads over 2 KV heads: grouped queries
    tokens = jax.random.randint(jax.random.key(1), (3, 24), 0, 256)
    want = model(tokens)
    graphdef, variables = nnx.split(model)
    decode = jax.jit(lambda variables, *args: nnx.merge(graphdef, variables).decode(*args))
    # Prefill 7 positions, then one position per call.
    cache = model.init_cache(3, 32)
    logits, cache = decode(variables, tokens[:, :7], cache, 0)
    got = [logits]
    for index in range(7, 24):
        logits, cache = decode(variables, tokens[:, index : index + 1], cache, index)
        got.append(logits)
    got = jnp.concatenate(got, axis=1)
    assert got.shape == want.shape == (3, 24, 256)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
    # The cache holds keys and values for the 24 positions written, and nothing after.
    first = cache["key"][0] if scan_layers else cache[0]["key"]
    assert (np.abs(np.asarray(first[:, :24])).max(axis=(0, 2, 3)) > 0).all()
    assert not np.asarray(first[:, 24:]).any()


@pytest.fixture(scope="module")
def random_run():
    """A Run of the smoke GPT, freshly initialised and sharded over data x fsdp x tensor."""
    config = gpt_smoke_config(mesh=MESH)
    task = tasks.from_config(config)
    mesh = jaxtrain.make_mesh(config.mesh)
    layout = jaxtrain.make_state_layout(task.model, optax.sgd(0.1), mesh, config.rules)
    return Run(config, task, layout, jaxtrain.create_state(layout, seed=0))


def _argmax_without_cache(run, prompt, n):
    """Greedy decoding the slow way: the whole sequence through the forward pass per token."""
    model = run.model()
    forward = jax.jit(lambda tokens: model(tokens))
    length = prompt.shape[1]
    # Zero-padded to the final length, compiled once: a causal model's logits at a
    # position do not depend on the positions after it.
    sequence = np.pad(prompt, ((0, 0), (0, n)))
    for position in range(length, length + n):
        logits = np.asarray(forward(sequence))[:, position - 1]
        top2 = np.sort(logits, axis=-1)[:, -2:]
        # The comparison means something only where float noise cannot flip the argmax.
        assert (top2[:, 1] - top2[:, 0] > 1e-4).all()
        sequence[:, position] = logits.argmax(-1)
    return sequence[:, length:]


@pytest.mark.parametrize("batch_size", [1, 4])  # 1 does not split over data x fsdp = 4
def test_greedy_sampling_is_argmax_decoding_without_cache(random_run, batch_size):
    prompt = np.random.default_rng(0).integers(1, 256, (batch_size, 9)).astype(np.int32)
    got = sample.generate(random_run, prompt, max_new_tokens=12)
    assert got.shape == (batch_size, 12) and got.dtype == np.int32
    np.testing.assert_array_equal(got, _argmax_without_cache(random_run, prompt, 12))
    np.testing.assert_array_equal(got, sample.generate(random_run, prompt, max_new_tokens=12))


def test_sampling_is_reproducible_by_seed(random_run):
    prompt = sample.encode("def f(x):")
    draw = lambda seed, **kw: sample.generate(
        random_run, prompt, max_new_tokens=32, temperature=1.0, seed=seed, **kw
    )
    np.testing.assert_array_equal(draw(3), draw(3))
    assert (draw(3) != draw(4)).any()
    # The likeliest token only: greedy decoding, whatever the seed.
    greedy = sample.generate(random_run, prompt, max_new_tokens=32)
    np.testing.assert_array_equal(draw(5, top_k=1), greedy)


def test_prompt_bytes_and_continuation_text():
    assert sample.encode("é!").tolist() == [[0, 0xC3, 0xA9, ord("!")]]
    assert sample.decode_bytes([104, 105, 0xC3, 0, 120]) == "hi\ufffd"  # stops at the separator


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(max_new_tokens=4, temperature=-1.0), "temperature must be >= 0"),
        (dict(max_new_tokens=4, top_k=300), "top_k must be between 0 and the vocabulary size 256"),
    ],
)
def test_bad_sampling_arguments(random_run, kwargs, message):
    with pytest.raises(jaxtrain.ConfigError, match=message):
        sample.generate(random_run, sample.encode("x"), **kwargs)
