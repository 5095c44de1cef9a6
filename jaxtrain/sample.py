"""Text from a trained language model: KV-cached decoding, one compiled program.

    run = jaxtrain.load_run("runs/gpt_pysource")
    print(sample_text(run, "def fibonacci(n):", max_new_tokens=200))

The prompt is prefilled in one pass, then each new token is one step of a `lax.fori_loop`
inside the same jitted function, reading the model's KV cache: n new tokens cost n
single-position steps, and the host dispatches once. The parameters stay sharded as in
training, on the run's mesh.

A model samples if it has the bundled GPT's decoding methods: `init_cache(batch_size,
max_length) -> cache` and `decode(tokens, cache, index) -> (logits, cache)` (see
`jaxtrain/models/gpt.py`).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxtrain import sharding, steps
from jaxtrain.checks import is_int, is_number
from jaxtrain.errors import ConfigError
from jaxtrain.state import StateLayout
from jaxtrain.tasks.lm import DOCUMENT_SEPARATOR


def check_decodes(run) -> int:
    """Checks that `run` is a language model that decodes with a KV cache.

    Returns:
      Its vocabulary size.

    Raises:
      ConfigError: naming the run's task and model otherwise.
    """
    layout = run.layout
    abstract = layout.merge(layout.abstract_state.params, layout.abstract_state.model_state)
    name = f"task {run.config.task or run.task.name!r} (model {run.task.name!r})"
    if not all(callable(getattr(abstract, m, None)) for m in ("init_cache", "decode")):
        raise ConfigError(
            f"the run trains {name}, not a language model that decodes: sampling needs a "
            "model with init_cache(batch_size, max_length) and decode(tokens, cache, index)"
        )

    def one_step(params, model_state):
        model = layout.merge(params, model_state)
        return model.decode(jnp.zeros((1, 1), jnp.int32), model.init_cache(1, 1), 0)[0]

    logits = jax.eval_shape(
        one_step, layout.abstract_state.params, layout.abstract_state.model_state
    )
    return logits.shape[-1]


def decoding_rules(rules, batch_size: int, mesh) -> sharding.Rules:
    """The run's rules for decoding: weights and heads split as in training.

    One position per step does not split over `sequence`, and a few sequences may not
    split over the data-parallel devices: those activations are then replicated.
    """
    rules = sharding.Rules(rules)
    rules.table["activation_length"] = ()
    if batch_size % sharding.data_parallel_size(mesh, rules):
        rules.table[sharding.BATCH_AXIS] = ()
    return rules


def pick(logits: jax.Array, rng: jax.Array, temperature, top_k) -> jax.Array:
    """Next tokens [batch] from logits [batch, vocab].

    Temperature 0 takes the likeliest token; above 0 draws from softmax(logits /
    temperature), among the `top_k` likeliest tokens when top_k > 0. Both may be traced,
    so one compiled program serves every setting.
    """
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
    vocab_size = logits.shape[-1]
    kth = jnp.sort(scaled, axis=-1)[:, vocab_size - jnp.clip(top_k, 1, vocab_size)]
    scaled = jnp.where((top_k > 0) & (scaled < kth[:, None]), -jnp.inf, scaled)
    drawn = jax.random.categorical(rng, scaled, axis=-1)
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


def make_generate(layout: StateLayout, max_new_tokens: int):
    """Returns `generate(params, model_state, prompt, rng, temperature, top_k) -> tokens`,
    pure and jittable.

    `prompt` is [batch, length] int32 (every row the same length); the result is the
    next `max_new_tokens` tokens of each row, [batch, max_new_tokens] int32. Step i draws
    with `fold_in(rng, i)`; `temperature` and `top_k` are scalars (see `pick`).
    """

    def decode(params, model_state, tokens, cache, index):
        # The model is rebuilt from arrays in each traced scope (prefill, loop body):
        # NNX variables must not cross from one trace into another.
        model = steps.set_mode(layout.merge(params, model_state), train=False)
        return model.decode(tokens, cache, index)

    def generate(params, model_state, prompt, rng, temperature, top_k):
        batch_size, length = prompt.shape
        cache = layout.merge(params, model_state).init_cache(batch_size, length + max_new_tokens)
        logits, cache = decode(params, model_state, prompt, cache, 0)
        first = pick(logits[:, -1], jax.random.fold_in(rng, 0), temperature, top_k)
        tokens = jnp.zeros((batch_size, max_new_tokens), jnp.int32).at[:, 0].set(first)

        def step(i, carry):
            tokens, cache = carry
            previous = jax.lax.dynamic_slice_in_dim(tokens, i - 1, 1, axis=1)
            logits, cache = decode(params, model_state, previous, cache, length + i - 1)
            token = pick(logits[:, 0], jax.random.fold_in(rng, i), temperature, top_k)
            return tokens.at[:, i].set(token), cache

        tokens, _ = jax.lax.fori_loop(1, max_new_tokens, step, (tokens, cache))
        return tokens

    return generate


# (layout, max_new_tokens, batch size) -> the jitted generate and its compiled programs
# by prompt shape: a notebook sampling again reuses them (any seed, temperature or top_k).
_JITTED: dict[tuple, tuple] = {}


def _jitted_generate(run, max_new_tokens: int, batch_size: int):
    layout = run.layout
    key = (id(layout), max_new_tokens, batch_size)
    if key in _JITTED and _JITTED[key][0] is layout:  # `is`: an id can be reused
        return _JITTED[key][1:]
    mesh = layout.mesh
    rules = decoding_rules(run.config.rules, batch_size, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    prompt_sharding = NamedSharding(mesh, rules.spec((sharding.BATCH_AXIS, None)))
    state = layout.shardings
    fn = jax.jit(
        make_generate(layout, max_new_tokens),
        in_shardings=(state.params, state.model_state, prompt_sharding, *[replicated] * 3),
        out_shardings=replicated,
    )
    if len(_JITTED) >= 8:
        _JITTED.clear()
    _JITTED[key] = (layout, fn, rules, prompt_sharding, {})
    return fn, rules, prompt_sharding, _JITTED[key][-1]


# Token positions are int32 on device.
MAX_POSITIONS = 2**31 - 1


def _free_bytes(devices) -> tuple[int, int, str]:
    """(bytes one device may still allocate, how many devices share them, where they are).

    GPUs and TPUs report their own memory (`memory_stats()`: bytes_limit less bytes_in_use,
    the least of the mesh's devices); CPU devices share the host's memory, whose available
    bytes Linux reports in /proc/meminfo (free pages elsewhere, which understates it).
    """
    stats = [d.memory_stats() for d in devices]
    if all(stats) and all("bytes_limit" in s for s in stats):
        free = min(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats)
        return free, 1, f"each {devices[0].device_kind} has {_gib(free)} free"
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        free = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    local = [d for d in devices if d.process_index == jax.process_index()]
    return free, max(len(local), 1), f"the host has {_gib(free)} available"


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_memory(compiled, devices, length: int, max_new_tokens: int) -> None:
    """Refuses a generation whose KV cache and tokens do not fit the devices' memory.

    The compiler's own figure for the program (`memory_analysis()`: its outputs and
    temporaries, the cache among them) against what the devices have free, before any
    of it is allocated; the weights are in memory already.

    Raises:
      ConfigError: with the size it needs, the limit, and about how many tokens fit.
    """
    analysis = compiled.memory_analysis()
    if analysis is None:  # a backend that does not say: XLA's own error then
        return
    per_device = analysis.temp_size_in_bytes + analysis.output_size_in_bytes
    free, sharing, limit = _free_bytes(devices)
    need = per_device * sharing
    if need <= free:
        return
    # The cache grows with the positions it holds: the tokens that fit, roughly.
    fits = max(0, int(free / need * (length + max_new_tokens)) - length)
    on = _gib(need) + (f" ({_gib(per_device)} on each of {sharing} devices)" if sharing > 1 else "")
    raise ConfigError(
        f"max_new_tokens={max_new_tokens} needs {on} (the KV cache of {length + max_new_tokens:,} "
        f"positions), but {limit}: about {fits:,} new tokens fit"
    )


def generate(
    run,
    prompt: np.ndarray,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
) -> np.ndarray:
    """The next `max_new_tokens` tokens after each row of `prompt`, from `run`'s model.

    Args:
      run: a `jaxtrain.runs.Run` of a language model (`jaxtrain.load_run`).
      prompt: [batch, length] integer tokens, length >= 1.
      max_new_tokens: how many tokens to generate, >= 1.
      temperature: 0 picks the likeliest token (greedy, deterministic); > 0 samples.
      top_k: with temperature > 0, sample among the k likeliest tokens only; 0: all.
      seed: the sampling RNG seed.

    Returns:
      [batch, max_new_tokens] int32 tokens, on the host.

    Raises:
      ConfigError: a model that does not decode, a bad argument or a token outside the
        vocabulary.
    """
    vocab_size = check_decodes(run)
    prompt = np.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[1] < 1 or prompt.shape[0] < 1:
        raise ConfigError(
            f"the prompt must be [batch >= 1, length >= 1] tokens, got shape {prompt.shape}"
        )
    if not np.issubdtype(prompt.dtype, np.integer):
        raise ConfigError(f"prompt tokens must be integers, got {prompt.dtype}")
    length = prompt.shape[1]
    if not (is_int(max_new_tokens) and 1 <= max_new_tokens <= MAX_POSITIONS - length):
        raise ConfigError(
            f"max_new_tokens must be >= 1, an integer of at most {MAX_POSITIONS - length:,} "
            f"(positions are int32), got {max_new_tokens!r}"
        )
    if not (is_number(temperature) and temperature >= 0):
        raise ConfigError(f"temperature must be >= 0 and finite, got {temperature!r}")
    if not (is_int(top_k) and 0 <= top_k <= vocab_size):
        raise ConfigError(
            f"top_k must be between 0 and the vocabulary size {vocab_size} (an integer), "
            f"got {top_k!r}"
        )
    if not (is_int(seed) and -(2**63) <= seed < 2**63):
        raise ConfigError(f"seed must be a 64-bit integer, got {seed!r}")
    if prompt.min() < 0 or prompt.max() >= vocab_size:
        raise ConfigError(
            f"prompt tokens must be in [0, {vocab_size}), got {prompt.min()}..{prompt.max()}"
        )
    fn, rules, prompt_sharding, compiled = _jitted_generate(run, max_new_tokens, prompt.shape[0])
    args = (
        run.state.params,
        run.state.model_state,
        jax.device_put(prompt.astype(np.int32), prompt_sharding),
        jax.random.key(seed),
        np.float32(temperature),
        np.int32(top_k),
    )
    with jax.set_mesh(run.layout.mesh), sharding.use_rules(rules):
        if prompt.shape not in compiled:
            # Compiled ahead of the call, so its memory is known before any is allocated.
            program = fn.lower(*args).compile()
            check_memory(program, run.layout.mesh.devices.flat, length, max_new_tokens)
            compiled[prompt.shape] = program
        tokens = compiled[prompt.shape](*args)
    return np.asarray(jax.device_get(tokens))


def encode(text: str | bytes) -> np.ndarray:
    """A prompt's byte-level tokens [1, length]: the document separator, then its bytes.

    Every document of the training stream follows a separator (`jaxtrain.tasks.lm`), so a
    prompt starts where a document starts, and an empty prompt is a valid one.

    `text` is UTF-8 encoded; bytes are taken as they are. The model reads bytes, so bytes
    that are not UTF-8 are a prompt too: a command-line argument that is not UTF-8 arrives
    as a str with its bytes escaped (Python's "surrogateescape"), and becomes those bytes.

    Raises:
      ConfigError: a str with other lone surrogates, which stand for no bytes.
    """
    if isinstance(text, str):
        try:
            text = text.encode("utf-8", errors="surrogateescape")
        except UnicodeEncodeError as e:
            raise ConfigError(
                f"the prompt is not text: {text[e.start : e.end]!r} at position {e.start} is "
                "a lone surrogate, which UTF-8 cannot encode"
            ) from None
    data = np.frombuffer(bytes(text), np.uint8).astype(np.int32)
    return np.concatenate([[DOCUMENT_SEPARATOR], data]).astype(np.int32)[None]


def decode_bytes(tokens) -> str:
    """Byte-level tokens as text, up to the first document separator (the document's
    end); bytes that are not valid UTF-8 become U+FFFD."""
    tokens = [int(t) for t in tokens]
    if DOCUMENT_SEPARATOR in tokens:
        tokens = tokens[: tokens.index(DOCUMENT_SEPARATOR)]
    return bytes(tokens).decode("utf-8", errors="replace")


def sample_text(
    run,
    prompt: str | bytes,
    *,
    max_new_tokens: int = 200,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
) -> str:
    """The continuation of `prompt` by a byte-level language model run (see `generate`).

    `prompt` is text (UTF-8 encoded) or bytes (see `encode`).

    Raises:
      ConfigError: as `generate`, or a vocabulary that is not bytes (256 tokens).
    """
    vocab_size = check_decodes(run)
    if vocab_size != 256:
        raise ConfigError(
            f"text prompts are UTF-8 bytes; this model's vocabulary has {vocab_size} tokens, "
            "not 256: call jaxtrain.sample.generate with its own tokens"
        )
    tokens = generate(
        run,
        encode(prompt),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        seed=seed,
    )
    return decode_bytes(tokens[0])
