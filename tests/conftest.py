"""Test setup: 8 simulated CPU devices, set before anything imports jax."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TFDS reads this once, at import: every bundled data set the tests build lands in a
# temporary directory, never in ~/tensorflow_datasets.
_DATA_DIR = tempfile.mkdtemp(prefix="jaxtrain_tfds_")
os.environ["TFDS_DATA_DIR"] = _DATA_DIR
atexit.register(shutil.rmtree, _DATA_DIR, ignore_errors=True)
# jax's persistent compilation cache ("auto": $XDG_CACHE_HOME/jaxtrain/xla) goes to a
# temporary directory too, for this process and the runs it starts: never the user's.
_CACHE_HOME = tempfile.mkdtemp(prefix="jaxtrain_cache_")
os.environ["XDG_CACHE_HOME"] = _CACHE_HOME
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
atexit.register(shutil.rmtree, _CACHE_HOME, ignore_errors=True)

import jax  # noqa: E402
import pytest  # noqa: E402

from jaxtrain.config import load_config as load_config_file  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")


@pytest.fixture(scope="session")
def data_dir():
    """One TFDS data_dir for the session, so each bundled data set is built once."""
    return _DATA_DIR


@pytest.fixture(scope="session")
def wheel_install(tmp_path_factory):
    """jaxtrain as `pip install .` makes it: a wheel built from the checkout, installed
    without its dependencies (this environment has them) into a directory of its own.

    Returns:
      (the directory, to put on PYTHONPATH; the file names the wheel holds).
    """
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(root), REPO],
        check=True,
        capture_output=True,
        timeout=600,
    )
    [wheel] = [f for f in os.listdir(root) if f.endswith(".whl")]
    with zipfile.ZipFile(root / wheel) as archive:
        names = archive.namelist()
    site = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site)]
        + [str(root / wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return site, names


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    assert jax.device_count() == 8, "tests expect 8 simulated CPU devices"


# Measured, so they differ between two runs of the same steps.
TIMINGS = {
    "step_time_s",
    "examples_per_s",
    "tokens_per_s",
    "mfu",
    "input_wait",
    "compile_time_s",
    "peak_memory_gib",
}


def load_config(name: str, arg: str | None = None, data_dir: str | None = None, **overrides):
    """Loads configs/<name>.py[:arg], points it at `data_dir` and applies dotted overrides."""
    spec = os.path.join(CONFIGS, f"{name}.py") + (f":{arg}" if arg else "")
    config = load_config_file(spec)
    if data_dir is not None:
        config.data.data_dir = data_dir
    for key, value in overrides.items():
        *parents, leaf = key.split("__")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def read_metrics(workdir, split="train"):
    """{step: record} from workdir/metrics.jsonl for one split.

    Raises:
      AssertionError: a step is logged twice for the split (a dict keyed by step must not
        hide a repeated line).
    """
    import json

    records = {}
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            # Non-finite values are strings in the file (jaxtrain.metrics_jsonl): floats here.
            record = {
                k: float(v) if v in ("NaN", "Infinity", "-Infinity") else v
                for k, v in record.items()
            }
            if record["split"] == split:
                assert record["step"] not in records, f"step {record['step']} logged twice"
                records[record["step"]] = record
    return records


def build(config, mesh_config=None, devices=None):
    """The pieces `train_and_evaluate` builds for `config`, up to the compiled step.

    Returns:
      (mesh, layout, task, abstract batch); `mesh_config` replaces `config.mesh`.
    """
    from jaxtrain import data, optim, sharding, state, tasks

    if mesh_config is not None:
        config.mesh = mesh_config
    task = tasks.from_config(config)
    mesh, rules = sharding.mesh_and_rules(config, devices)
    tx, _ = optim.optimizer_and_schedule(
        config, task.optimizer, model=task.model, trainable=task.trainable
    )
    layout = state.make_state_layout(task.model, tx, mesh, rules, trainable=task.trainable)
    example = task.example
    batch = data.abstract_batch(
        example, config.global_batch_size, data.batch_shardings(example, mesh, rules)
    )
    return mesh, layout, task, batch


def compile_step(config, mesh_config=None, devices=None):
    """The compiled train step of `config` (on `mesh_config`), and the layout."""
    from jaxtrain import sharding, steps

    mesh, layout, task, batch = build(config, mesh_config, devices)
    with jax.set_mesh(mesh), sharding.use_rules(sharding.Rules(config.rules)):
        train_step = steps.make_train_step(task.loss, layout, microbatches=config.microbatches)
        return steps.compile_train_step(train_step, layout, batch), layout


def gpt_smoke_config(data_dir=None, steps=4, mesh=None, **overrides):
    """The GPT smoke config for a `steps`-step run on `mesh` (all devices by default).

    It logs every step and evaluates and checkpoints at the end, unless `overrides`
    (`a__b=value` for nested fields) say otherwise.
    """
    fields = dict(
        num_train_steps=steps,
        log_every_steps=1,
        eval_every_steps=steps,
        checkpoint_every_steps=steps,
        mesh=mesh or {"data": -1},
    )
    return load_config("gpt_pysource", "smoke", data_dir=data_dir, **{**fields, **overrides})


def train_gpt_smoke(data_dir, workdir, mesh, devices=None, steps=5, **overrides):
    """Trains the GPT smoke config for `steps`, logging every step.

    Returns:
      (final state, final eval metrics, [train loss per step]).
    """
    from jaxtrain.train import train_and_evaluate

    config = gpt_smoke_config(data_dir, steps, mesh, **overrides)
    state, result = train_and_evaluate(config, str(workdir), devices=devices)
    losses = [r["loss"] for _, r in sorted(read_metrics(workdir).items())]
    return state, result, losses


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs mount point, which the test may resize (`mount -o remount,size=`)."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs permission to mount a tmpfs (root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)
