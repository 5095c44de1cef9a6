"""The README's "Use it from your own code" example, run as a user would run it.

examples/custom_model.py defines its own NNX model (BatchNorm, dropout with its own RNG
stream), loss and numpy data, and trains them through the public API on 8 simulated
devices with fsdp x tensor sharding. Here it is killed and resumed bitwise, and restored
onto another mesh, and the README's plain-Orbax block reads its checkpoint in a 1-device
process.
"""

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO, TIMINGS, read_metrics
from jax.sharding import PartitionSpec as P

EXAMPLE = os.path.join(REPO, "examples", "custom_model.py")
STEPS = 400


def _example():
    spec = importlib.util.spec_from_file_location("custom_model", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_shows_the_example_file():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    with open(EXAMPLE, encoding="utf-8") as f:
        assert f.read() in blocks


def test_user_model_trains_sharded_with_its_batch_statistics(tmp_path):
    state, metrics = _example().main(str(tmp_path), {"fsdp": 4, "tensor": 2}, steps=100)
    assert metrics["accuracy"] > 0.75  # 4 classes: chance is 0.25
    # The user's logical names, mapped by the config's rules, shard the weights.
    up = state.params["up"]["kernel"]  # (32, 256): (embed, mlp) -> (fsdp, tensor)
    assert up.sharding.spec == P("fsdp", "tensor")
    assert up.addressable_shards[0].data.shape == (8, 128)
    # BatchNorm's running statistics and the dropout RNG stream live in the model state,
    # were updated by training, and were checkpointed with it.
    norm = state.model_state["norm"]
    assert np.abs(np.asarray(norm["mean"])).max() > 0.01
    assert int(state.model_state["dropout"]["rngs"]["count"]) == 100
    assert (tmp_path / "checkpoints" / "100").is_dir()


def _command(workdir, mesh="fsdp=4,tensor=2"):
    return [sys.executable, EXAMPLE, f"--workdir={workdir}", f"--mesh={mesh}", f"--steps={STEPS}"]


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    return env


def _run(command):
    return subprocess.run(
        command, check=True, timeout=300, capture_output=True, text=True, env=_env()
    )


def _final_state(workdir):
    with ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"), options=ocp.CheckpointManagerOptions(read_only=True)
    ) as manager:
        assert manager.latest_step() == STEPS
        restored = manager.restore(STEPS, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return restored["state"]


def _bits(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # the dropout RNG stream's key
        x = jax.random.key_data(x)
    return np.asarray(x)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    _run(_command(workdir))
    return workdir


def test_killed_and_resumed_bitwise(reference, tmp_path):
    proc = subprocess.Popen(
        _command(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env()
    )
    committed = tmp_path / "checkpoints" / "100"  # Orbax renames a step into place on commit
    deadline = time.monotonic() + 240
    while proc.poll() is None and not committed.is_dir() and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "the run ended before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert max(read_metrics(tmp_path)) < STEPS
    assert "resumed at " in _run(_command(tmp_path)).stdout
    for split in ("train", "eval"):
        got, want = read_metrics(tmp_path, split), read_metrics(reference, split)
        assert sorted(got) == sorted(want)
        for step in want:
            strip = lambda r: {k: v for k, v in r.items() if k not in TIMINGS}  # noqa: E731
            assert strip(got[step]) == strip(want[step]), (split, step)
    got, want = _final_state(tmp_path), _final_state(reference)
    for part in ("params", "model_state", "opt_state"):
        jax.tree.map(
            lambda a, b: np.testing.assert_array_equal(_bits(a), _bits(b)), got[part], want[part]
        )


@pytest.mark.slow
def test_restored_onto_another_mesh(reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    for step in os.listdir(workdir / "checkpoints"):
        if int(step) > 300:
            shutil.rmtree(workdir / "checkpoints" / step)
    rerun = _run(_command(workdir, mesh="data=2,fsdp=2,tensor=2"))
    assert "resumed at 300" in rerun.stdout
    got, want = read_metrics(workdir), read_metrics(reference)
    steps = [s for s in want if s > 300]
    np.testing.assert_allclose(
        [got[s]["loss"] for s in steps], [want[s]["loss"] for s in steps], rtol=1e-5
    )


# Runs the README's block (argv[1]) and saves what it restored (argv[2]).
READ_BACK = """
import runpy, sys
import jax, numpy as np
namespace = runpy.run_path(sys.argv[1])
assert jax.device_count() == 1, jax.devices()
leaves = jax.tree_util.tree_flatten_with_path(namespace["restored"]["state"])[0]
def bits(x):  # the dropout RNG stream's key as its raw data
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(x))
    return np.asarray(x)
np.savez(sys.argv[2], **{jax.tree_util.keystr(p): bits(x) for p, x in leaves})
assert namespace["params"] is namespace["restored"]["state"]["params"]
"""


def _readme_orbax_block():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme.split("## Checkpoints are plain Orbax\n", 1)[1].split("\n## ", 1)[0]
    [block] = re.findall(r"```python\n(.*?)```", section, re.S)
    return block


def test_readme_orbax_block_restores_in_one_device(reference, tmp_path):
    (tmp_path / "runs").mkdir()
    os.symlink(reference, tmp_path / "runs" / "gpt_pysource")  # the path the block names
    (tmp_path / "block.py").write_text(_readme_orbax_block())
    (tmp_path / "read_back.py").write_text(READ_BACK)
    env = {**_env(), "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}  # one device, not eight
    proc = subprocess.run(
        [sys.executable, "read_back.py", "block.py", "restored.npz"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "restored.npz")
    want = jax.tree_util.tree_flatten_with_path(_final_state(reference))[0]
    assert sorted(got.files) == sorted(jax.tree_util.keystr(p) for p, _ in want)
    for path, x in want:
        np.testing.assert_array_equal(got[jax.tree_util.keystr(path)], _bits(x))
