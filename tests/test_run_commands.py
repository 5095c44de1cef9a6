"""After training: `jaxtrain.load_run` and the `sample`, `eval`, `plot` and `export` commands,
used from outside on real (tiny) runs."""

import hashlib
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config, read_metrics, train_gpt_smoke
from flax import nnx

import jaxtrain
from jaxtrain import cli, export, plot, runs, sample
from jaxtrain.train import train_and_evaluate

MESH = {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory, data_dir):
    """A 4-step smoke GPT run on data x fsdp x tensor, checkpointed at steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("runs") / "gpt"
    state, result, _ = train_gpt_smoke(data_dir, workdir, MESH, steps=4, checkpoint_every_steps=2)
    return workdir, state, result


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, data_dir):
    """A 2-step smoke CNN run: a task that is not a language model."""
    workdir = tmp_path_factory.mktemp("runs") / "digits"
    config = load_config(
        "digits_cnn", "smoke", data_dir=data_dir, num_train_steps=2, checkpoint_every_steps=2
    )
    train_and_evaluate(config, str(workdir))
    return workdir


def _snapshot(directory):
    """Every directory and file under `directory`, files with a hash of their bytes."""
    result = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            result[os.path.relpath(os.path.join(root, name), directory)] = "dir"
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                result[os.path.relpath(os.path.join(root, name), directory)] = hashlib.sha256(
                    f.read()
                ).hexdigest()
    return result


def _cli(capsys, *argv):
    """(status, stdout, stderr lines) of `jaxtrain ARGV...` run in this process."""
    status = cli.main(["jaxtrain", *map(str, argv)])
    out, err = capsys.readouterr()
    return status, out, err.strip().splitlines()


def _one_error(capsys, *argv):
    status, _, err = _cli(capsys, *argv)
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith("jaxtrain: error: ")
    return err[0]


def test_load_run_restores_the_trained_state_and_writes_nothing(gpt_run):
    workdir, trained, _ = gpt_run
    before = _snapshot(workdir)
    config, task, layout, state = jaxtrain.load_run(str(workdir))
    assert int(state.step) == 4 and config.task == "lm" and task.name == "gpt"
    assert layout.mesh.shape == {"data": 2, "fsdp": 2, "sequence": 1, "tensor": 2}
    kernel = state.params["blocks"][0]["mlp"]["up"]["kernel"]
    assert kernel.sharding == trained.params["blocks"][0]["mlp"]["up"]["kernel"].sharding
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(trained))
    # An older step, onto another mesh of 4 devices.
    older = jaxtrain.load_run(str(workdir), step=2, mesh={"fsdp": 4}, devices=jax.devices()[:4])
    assert older.step == 2 and older.layout.mesh.devices.size == 4
    assert not np.array_equal(
        older.state.params["embed"]["embedding"], state.params["embed"]["embedding"]
    )
    assert _snapshot(workdir) == before


class Regressor(nnx.Module):
    """A model of the test's own, with BatchNorm statistics (model state beyond params)."""

    def __init__(self, rngs):
        self.up = nnx.Linear(4, 16, kernel_metadata={"out_sharding": ("embed", "mlp")}, rngs=rngs)
        self.norm = nnx.BatchNorm(16, rngs=rngs)
        self.down = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.relu(self.norm(self.up(x))))[:, 0]


def _mse(model, batch, rngs):
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2), {}


def test_load_run_of_a_task_given_in_code(tmp_path):
    x = np.random.default_rng(0).normal(size=(96, 4)).astype(np.float32)
    examples = {"x": x, "y": x.sum(1)}
    task = jaxtrain.Task(
        model=lambda rngs: Regressor(rngs), loss=_mse, data=examples, eval_data=examples
    )
    config = jaxtrain.load_config("base.py")
    config.update(
        mesh={"fsdp": 2, "tensor": 2, "data": 2},
        rules=(("activation_batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor")),
        global_batch_size=16,
        num_train_steps=3,
        eval_every_steps=3,
        checkpoint_every_steps=3,
    )
    state, result = jaxtrain.train_and_evaluate(config, str(tmp_path), task=task)
    with pytest.raises(jaxtrain.ConfigError, match=r"config.task is empty\): pass the same"):
        jaxtrain.load_run(str(tmp_path))
    run = jaxtrain.load_run(str(tmp_path), task=task, mesh={"data": 1}, devices=jax.devices()[:1])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(run.state), jax.device_get(state))
    assert runs.eval_split_name(run) == "eval_data"
    assert runs.evaluate_run(run)["loss"] == pytest.approx(result["loss"], rel=1e-5)
    # The NNX model in eval mode: BatchNorm's trained statistics, so a row's output does
    # not depend on the rest of its batch.
    model = run.model()
    np.testing.assert_allclose(model(x[:5]), model(x)[:5], rtol=1e-5, atol=1e-6)
    with pytest.raises(jaxtrain.ConfigError, match="--split works for the bundled tasks"):
        runs.evaluate_run(run, split="train")


def test_load_run_errors_name_the_problem(gpt_run, tmp_path):
    workdir, _, _ = gpt_run
    cases = {
        str(tmp_path / "nope"): "does not exist or is not a directory",
        str(tmp_path): "has no config.json: not a jaxtrain run directory",
    }
    (tmp_path / "fresh").mkdir()
    shutil.copy(workdir / "config.json", tmp_path / "fresh")
    cases[str(tmp_path / "fresh")] = "has no whole checkpoint"
    for path, message in cases.items():
        with pytest.raises(jaxtrain.ConfigError, match=message):
            jaxtrain.load_run(path)
    with pytest.raises(jaxtrain.ConfigError, match=r"no checkpoint step 3 .*; steps: \[2, 4\]"):
        jaxtrain.load_run(str(workdir), step=3)
    with pytest.raises(jaxtrain.ConfigError, match=r"needs 3 devices.*--mesh=data=-1"):
        jaxtrain.load_run(str(workdir), mesh={"data": 3})


def test_sample_command_prints_a_deterministic_greedy_continuation(gpt_run, capsys):
    workdir, _, _ = gpt_run
    argv = ("sample", f"--workdir={workdir}", "--prompt=def f(x):", "--max_new_tokens=16")
    status, first, _ = _cli(capsys, *argv)
    assert status == 0
    assert _cli(capsys, *argv)[1] == first
    # What it prints is the library's greedy continuation, decoded.
    tokens = sample.generate(
        jaxtrain.load_run(str(workdir)), sample.encode("def f(x):"), max_new_tokens=16
    )
    assert first == sample.decode_bytes(tokens[0]) + "\n"
    # Sampling (reproducible by seed, tested in test_decode.py) draws something else.
    status, drawn, _ = _cli(capsys, *argv, "--temperature=1.0", "--top_k=20", "--seed=7")
    assert status == 0 and drawn != first


def test_sample_bad_input_is_one_line_exit_2(gpt_run, digits_run, capsys, tmp_path):
    workdir, _, _ = gpt_run
    assert "does not exist" in _one_error(capsys, "sample", f"--workdir={tmp_path / 'x'}")
    assert "--workdir=... is required" in _one_error(capsys, "sample", "--prompt=hi")
    message = _one_error(capsys, "sample", f"--workdir={digits_run}", "--prompt=hi")
    assert "task 'classification' (model 'cnn'), not a language model" in message
    assert "temperature must be >= 0" in _one_error(
        capsys, "sample", f"--workdir={workdir}", "--temperature=-1"
    )
    assert "Unknown command line flag 'temprature'" in _one_error(
        capsys, "sample", f"--workdir={workdir}", "--temprature=1"
    )


def test_eval_command_appends_a_record_and_changes_nothing_else(gpt_run, capsys):
    workdir, _, result = gpt_run
    checkpoints = _snapshot(workdir / "checkpoints")
    with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
        log = f.read()
    status, out, _ = _cli(capsys, "eval", f"--workdir={workdir}")
    assert status == 0 and out.startswith("step      4 eval:validation | loss ")
    # The same checkpoint and data as training's evaluation at step 4: the same numbers.
    record = read_metrics(workdir, "eval:validation")[4]
    training = read_metrics(workdir, "eval")[4]
    assert {k: record[k] for k in ("loss", "accuracy", "perplexity")} == {
        k: training[k] for k in ("loss", "accuracy", "perplexity")
    }
    status, _, _ = _cli(capsys, "eval", f"--workdir={workdir}", "--split=train", "--step=2")
    assert status == 0
    assert read_metrics(workdir, "eval:train")[2]["loss"] != record["loss"]
    message = _one_error(capsys, "eval", f"--workdir={workdir}", "--split=test")
    assert "has no split 'test'; splits: ['train', 'validation']" in message
    with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
        grown = f.read()
    assert grown.startswith(log) and len(grown[len(log) :].splitlines()) == 2
    assert _snapshot(workdir / "checkpoints") == checkpoints


def _png_size(path):
    with open(path, "rb") as f:
        header = f.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def test_plot_command_draws_runs_on_one_figure(gpt_run, digits_run, capsys, tmp_path):
    workdir, _, _ = gpt_run
    out = tmp_path / "curves.png"
    status, printed, _ = _cli(capsys, "plot", workdir, digits_run, f"--out={out}")
    assert status == 0 and printed.strip() == str(out)
    assert _png_size(out) == (800, 500)
    figure = plot.plot_runs([str(workdir), str(digits_run)], metric="accuracy")
    labels = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert f"{workdir} train" in labels and f"{digits_run} eval" in labels
    message = _one_error(capsys, "plot", workdir, f"--out={tmp_path / 'x.png'}", "--metric=lozz")
    assert f"run '{workdir}' has no metric 'lozz'; it has ['accuracy'" in message
    assert "has no metrics.jsonl" in _one_error(capsys, "plot", tmp_path, f"--out={out}")
    assert not (tmp_path / "x.png").exists()


LOAD_AND_CALL = """
import sys
import jax
import numpy as np

with open(sys.argv[1], "rb") as f:
    forward = jax.export.deserialize(bytearray(f.read()))
want = np.load(sys.argv[2])
for name in sorted(want.files):
    if name.startswith("inputs"):
        got = np.asarray(forward.call(want[name]))
        logits = want[name.replace("inputs", "logits")]
        np.testing.assert_allclose(got, logits, rtol=1e-5, atol=1e-5)
        print(name, got.shape)
loaded = sorted(m.split(".")[0] for m in sys.modules)
assert not {"jaxtrain", "flax", "optax", "orbax"} & set(loaded), loaded
"""


@pytest.mark.parametrize("kind", ["gpt", "digits"])
def test_exported_model_runs_with_jax_alone(kind, gpt_run, digits_run, capsys, tmp_path):
    workdir = gpt_run[0] if kind == "gpt" else digits_run
    out = tmp_path / "model.jaxexport"
    status, printed, _ = _cli(capsys, "export", f"--workdir={workdir}", f"--out={out}")
    assert status == 0 and f"to {out} (" in printed
    model = jaxtrain.load_run(str(workdir)).model()
    rng = np.random.default_rng(0)
    if kind == "gpt":  # batch and length symbolic
        inputs = [rng.integers(0, 256, shape).astype(np.int32) for shape in ((2, 32), (3, 11))]
        assert "int32[b,t] -> float32[b,t,256]" in printed
    else:
        inputs = [rng.integers(0, 256, (n, 8, 8, 1)).astype(np.uint8) for n in (2, 5)]
        assert "uint8[b,8,8,1] -> float32[b,10]" in printed
    want = tmp_path / "want.npz"
    np.savez(
        want,
        **{f"inputs{i}": x for i, x in enumerate(inputs)},
        **{f"logits{i}": np.asarray(model(x)) for i, x in enumerate(inputs)},
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(LOAD_AND_CALL), str(out), str(want)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.splitlines()) == 2, proc.stdout


def test_export_bad_input(gpt_run, capsys, tmp_path):
    workdir, _, _ = gpt_run
    assert "--out=... is required" in _one_error(capsys, "export", f"--workdir={workdir}")
    message = _one_error(capsys, "export", f"--workdir={workdir}", f"--out={tmp_path / 'no' / 'm'}")
    assert "cannot write" in message and "No such file or directory" in message
    message = _one_error(
        capsys, "export", f"--workdir={workdir}", f"--out={tmp_path / 'm'}", "--input_key=x"
    )
    assert "the task's examples have no 'x'; they have ['inputs', 'targets']" in message


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max_new_tokens=0"], "max_new_tokens must be >= 1"),
        (["--max_new_tokens=-3"], "max_new_tokens must be >= 1"),
        (["--max_new_tokens=3000000000"], "(positions are int32), got 3000000000"),
        # The KV cache of 2e9 positions (terabytes): refused with the size it needs and the
        # memory there is, before any of it is allocated (it was an allocation traceback).
        (["--max_new_tokens=2000000000"], "max_new_tokens=2000000000 needs "),
        (["--top_k=-1"], "top_k must be between 0 and the vocabulary size 256"),
        (["--temperature=nan"], "temperature must be >= 0 and finite, got nan"),
        (["--temperature=inf"], "temperature must be >= 0 and finite, got inf"),
        (["--seed=100000000000000000000"], "seed must be a 64-bit integer"),
        (["--prompt=\ud800"], "the prompt is not text: '\\ud800' at position 0 is a lone"),
        (["--mesh=data=0"], "config.mesh sizes must be positive"),
    ],
)
def test_sample_refuses_what_it_cannot_generate_in_one_line(flags, message, gpt_run, capsys):
    workdir, _, _ = gpt_run
    before = _snapshot(workdir)
    line = _one_error(capsys, "sample", f"--workdir={workdir}", *flags)
    assert message in line, line
    if "needs" in message:  # the size, the memory it has, and what would fit
        assert re.search(r"needs [\d,.]+ GiB .*KV cache of 2,000,000,001 positions", line), line
        assert re.search(r"but the host has [\d,.]+ GiB available: about [\d,]+ new", line), line
    assert _snapshot(workdir) == before


def test_sample_takes_a_prompt_of_bytes_that_are_not_utf8(gpt_run, capsys):
    # A byte-level model reads bytes: the argument's bytes are the prompt, as they are.
    # Python hands a command line's non-UTF-8 bytes over escaped (surrogateescape).
    workdir, _, _ = gpt_run
    raw = b"caf\xe9 \xff"  # Latin-1, not UTF-8
    status, printed, _ = _cli(
        capsys,
        "sample",
        f"--workdir={workdir}",
        f"--prompt={os.fsdecode(raw)}",
        "--max_new_tokens=8",
    )
    assert status == 0
    run = jaxtrain.load_run(str(workdir))
    np.testing.assert_array_equal(sample.encode(os.fsdecode(raw)), sample.encode(raw))
    assert list(sample.encode(raw)[0]) == [0, *raw]
    tokens = sample.generate(run, sample.encode(raw), max_new_tokens=8)
    assert printed == sample.decode_bytes(tokens[0]) + "\n"


@pytest.mark.parametrize("steps", ["0", "-5", "1.5"])
def test_eval_steps_other_than_positive_or_minus_one_are_refused(steps, gpt_run, capsys):
    workdir, _, _ = gpt_run
    before = _snapshot(workdir)  # metrics.jsonl included: no record appended
    line = _one_error(capsys, "eval", f"--workdir={workdir}", f"--eval_steps={steps}")
    assert "--eval_steps" in line and steps in line, line
    if steps != "1.5":  # that one absl refuses: not an integer
        assert "must be a positive integer or -1 (all of the split)" in line
    assert _snapshot(workdir) == before
    with pytest.raises(jaxtrain.ConfigError, match="eval_steps must be a positive integer or -1"):
        runs.evaluate_run(jaxtrain.load_run(str(workdir)), eval_steps=0)


@pytest.mark.parametrize(
    "platforms, message",
    [
        ("bogus", "unknown export platform 'bogus'; choose from cpu, cuda, rocm, tpu"),
        ("CPU", "unknown export platform 'CPU' (did you mean 'cpu'?)"),
        ("gpu", "'cuda' (NVIDIA) or 'rocm' (AMD), not 'gpu'"),
        ("tpu,tpu", "export platform 'tpu' is listed twice"),
        ("cpu,", "unknown export platform ''"),
    ],
)
def test_export_refuses_platforms_jax_does_not_export_for(platforms, message, gpt_run, capsys):
    workdir, _, _ = gpt_run
    out = workdir.parent / "model.jaxexport"
    line = _one_error(
        capsys, "export", f"--workdir={workdir}", f"--out={out}", f"--platforms={platforms}"
    )
    assert message in line, line
    assert not out.exists()


def test_an_export_for_each_platform_deserializes_as_that_platform(gpt_run, capsys, tmp_path):
    # Exported on this CPU host for every platform jax.export builds in, the file loads
    # and says which platform it runs on (calling it needs that device: cpu here).
    workdir, _, _ = gpt_run
    for platform in export.PLATFORMS:
        out = tmp_path / f"{platform}.jaxexport"
        status, printed, _ = _cli(
            capsys, "export", f"--workdir={workdir}", f"--out={out}", f"--platforms={platform}"
        )
        assert status == 0 and f"on {platform} to {out}" in printed
        loaded = jax.export.deserialize(bytearray(out.read_bytes()))
        assert loaded.platforms == (platform,)
        assert str(loaded.in_avals[0]) == "int32[b,t]"
    tokens = np.arange(6, dtype=np.int32)[None]
    cpu = jax.export.deserialize(bytearray((tmp_path / "cpu.jaxexport").read_bytes()))
    assert cpu.call(tokens).shape == (1, 6, 256)
    tpu = jax.export.deserialize(bytearray((tmp_path / "tpu.jaxexport").read_bytes()))
    with pytest.raises(ValueError, match="exported for platforms .*tpu.* but it is used on"):
        tpu.call(tokens)


# --- Reading a run that is still training -----------------------------------------------------


def test_a_step_deleted_while_read_gives_way_to_the_newest(gpt_run, tmp_path, monkeypatch):
    workdir = tmp_path / "gpt"
    shutil.copytree(gpt_run[0], workdir)
    checkpoints = workdir / "checkpoints"
    original, reads = runs.restore_state, []

    def retention_strikes(directory, step, abstract_state):
        # As a run with keep_latest=1 does: a newer step commits, then the old one goes,
        # here while the reader is on its way to it.
        reads.append(step)
        if len(reads) == 1:
            shutil.copytree(checkpoints / "4", checkpoints / "6")
            shutil.rmtree(checkpoints / "4")
        return original(directory, step, abstract_state)

    monkeypatch.setattr(runs, "restore_state", retention_strikes)
    run = jaxtrain.load_run(str(workdir))
    assert reads == [4, 6] and run.step == 4  # step 6 is a copy of step 4's bytes
    assert sorted(os.listdir(checkpoints)) == ["2", "6"]  # nothing set aside: not damaged

    # A step asked for by number that retention deletes: said so, not called damaged.
    reads.clear()
    monkeypatch.setattr(
        runs,
        "restore_state",
        lambda d, step, a: (shutil.rmtree(checkpoints / "2"), original(d, step, a))[1],
    )
    with pytest.raises(jaxtrain.ConfigError, match="step 2 .* was deleted while it was read"):
        jaxtrain.load_run(str(workdir), step=2)


@pytest.mark.slow
def test_reading_a_run_that_trains_with_keep_latest_1_always_works(data_dir, tmp_path):
    workdir = tmp_path / "live"
    jaxtrain_bin = os.path.join(os.path.dirname(sys.executable), "jaxtrain")
    train = subprocess.Popen(
        [
            jaxtrain_bin,
            "train",
            "--config=gpt_pysource.py:smoke",
            f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}",
            "--config.num_train_steps=100000",
            "--config.checkpoint_every_steps=1",
            "--config.checkpoint.keep_latest=1",
            "--config.eval_every_steps=100000",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while not os.path.isdir(workdir / "checkpoints" / "2") and time.monotonic() < deadline:
            assert train.poll() is None, "the training run ended early"
            time.sleep(0.1)
        results = []
        for command in (["eval", "--eval_steps=1"], ["sample", "--max_new_tokens=4"]) * 4:
            done = subprocess.run(
                [jaxtrain_bin, command[0], f"--workdir={workdir}", *command[1:]],
                capture_output=True,
                text=True,
                timeout=240,
            )
            results.append((command[0], done.returncode, done.stderr.strip()[-300:]))
        assert train.poll() is None, "the training run ended while it was read"
    finally:
        train.kill()
        train.wait()
    assert all(status == 0 for _, status, _ in results), results
    assert not [n for n in os.listdir(workdir / "checkpoints") if "damaged" in n]
