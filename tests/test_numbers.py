"""Numbers in every run: compilation cache, profiler trace, logged timing and memory,
energy estimate, and the synthetic data set."""

import glob
import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from conftest import gpt_smoke_config, load_config, read_metrics

from jaxtrain import cli, compilation_cache, data, energy, metrics
from jaxtrain.data import synthetic
from jaxtrain.train import train_and_evaluate


def test_the_compilation_cache_is_the_tests_own_not_the_users():
    # conftest points $XDG_CACHE_HOME at a temporary directory, for subprocesses too.
    home = os.path.expanduser("~")
    assert not compilation_cache.default_dir().startswith(os.path.join(home, ".cache"))
    assert compilation_cache.default_dir() == os.path.join(
        os.environ["XDG_CACHE_HOME"], "jaxtrain", "xla"
    )


def _train_cli(workdir, data_dir, cache_home, *flags):
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home), "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = ""  # one device: what a user's laptop has
    command = [sys.executable, "-m", "jaxtrain", "train", "--config=gpt_pysource.py:smoke"]
    result = subprocess.run(
        [*command, f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_a_second_launch_loads_the_train_step_from_the_cache(data_dir, tmp_path):
    cache = tmp_path / "cache"
    out = _train_cli(tmp_path / "a", data_dir, cache)
    directory = cache / "jaxtrain" / "xla"
    assert f"persistent compilation cache: {directory}" in out
    entries = sorted(os.listdir(directory))
    step_entries = [e for e in entries if e.startswith("jit_train_step-") and e.endswith("-cache")]
    assert len(step_entries) == 1
    used = directory / step_entries[0].replace("-cache", "-atime")
    first_use = used.read_bytes()
    # The same job again, in a new process and workdir: nothing new to store, and the
    # stored train step was read (jax's LRU cache records each read in its -atime file).
    _train_cli(tmp_path / "b", data_dir, cache)
    assert sorted(os.listdir(directory)) == entries
    assert used.read_bytes() != first_use
    # Turned off, nothing is written.
    _train_cli(tmp_path / "c", data_dir, tmp_path / "off", "--config.compilation_cache.dir=")
    assert not (tmp_path / "off").exists()


def test_a_profile_traces_the_chosen_steps_and_names_them(data_dir, tmp_path, capsys):
    config = gpt_smoke_config(
        data_dir, steps=6, profile__num_steps=2, profile__skip_steps=2, checkpoint_every_steps=6
    )
    train_and_evaluate(config, str(tmp_path))
    traces = glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(traces) == 1
    assert "profiler trace of steps 3-4" in capsys.readouterr().out
    steps = set()
    for plane in jax.profiler.ProfileData.from_file(traces[0]).planes:
        for line in plane.lines:
            steps |= {dict(e.stats)["step_num"] for e in line.events if e.name == "train"}
    assert steps == {3, 4}


def test_each_log_has_input_wait_and_compile_time_once(data_dir, tmp_path, capsys):
    state, _ = train_and_evaluate(gpt_smoke_config(data_dir, steps=4), str(tmp_path))
    records = read_metrics(tmp_path)
    assert all(0 <= r["input_wait"] <= 1 for r in records.values())
    assert [s for s, r in records.items() if "compile_time_s" in r] == [1]
    out = capsys.readouterr().out
    seconds = records[1]["compile_time_s"]
    assert f"train step compiled in {seconds:.2f} s" in out
    assert out.index("train step compiled") < out.index("step      1 train")
    # CPU reports no device memory: the metric is left out, not made up.
    assert jax.devices()[0].memory_stats() is None
    assert not any("peak_memory_gib" in r for r in records.values())


def test_peak_memory_is_the_largest_any_device_reports():
    devices = [
        types.SimpleNamespace(memory_stats=lambda: {"peak_bytes_in_use": 3 * 2**30}),
        types.SimpleNamespace(memory_stats=lambda: {"peak_bytes_in_use": 5 * 2**30}),
        types.SimpleNamespace(memory_stats=lambda: None),
    ]
    assert metrics.peak_memory_bytes(devices) == 5 * 2**30
    assert metrics.peak_memory_bytes(devices[2:]) is None


def test_input_wait_is_the_share_of_the_interval_spent_waiting():
    waited = [0.0]
    timer = metrics.StepTimer(0, lambda: waited[0])
    waited[0] = 1e9  # more than the interval: capped at all of it
    assert timer.measure(2)["input_wait"] == 1.0
    assert timer.measure(2) == {}  # no steps since the mark


def test_energy_is_written_per_run_and_added_up(data_dir, tmp_path):
    config = gpt_smoke_config(data_dir, steps=2)
    train_and_evaluate(config, str(tmp_path))
    config.num_train_steps = 4  # resumed: a second part of the same run
    train_and_evaluate(config, str(tmp_path))
    with open(tmp_path / "energy.json") as f:
        report = json.load(f)
    assert report["estimate"] is True and len(report["runs"]) == 2
    for run in report["runs"]:
        # On this CPU codecarbon measures: a load model of the CPU and the memory.
        assert run["method"].startswith("codecarbon")
        assert run["energy_kwh"] > 0 and run["parts_kwh"]["ram"] > 0
        assert run["emissions_kg_co2e"] == pytest.approx(run["energy_kwh"] * 0.48)
    assert report["energy_kwh"] == pytest.approx(sum(r["energy_kwh"] for r in report["runs"]))


def test_energy_from_the_chip_table_or_the_config():
    tpus = [types.SimpleNamespace(platform="tpu", device_kind="TPU v5 lite")] * 4
    config = load_config("gpt_pysource").energy
    meter = energy.EnergyMeter(config, tpus)  # TPUs: no codecarbon, the table (200 W)
    meter._start -= 3600  # an hour ago
    record = meter.stop()
    assert record["energy_kwh"] == pytest.approx(4 * 0.2, rel=1e-3)
    assert "chip table" in record["method"]
    config.device_watts = 50.0
    config.grid_kg_co2e_per_kwh = 0.1
    meter = energy.EnergyMeter(config, tpus)
    meter._start -= 3600
    record = meter.stop()
    assert record["energy_kwh"] == pytest.approx(4 * 0.05, rel=1e-3)
    assert record["emissions_kg_co2e"] == pytest.approx(4 * 0.05 * 0.1, rel=1e-3)
    unknown = [types.SimpleNamespace(platform="tpu", device_kind="TPU v99")]
    record = energy.EnergyMeter(load_config("gpt_pysource").energy, unknown).stop()
    assert record["energy_kwh"] is None and record["emissions_kg_co2e"] is None


def test_synthetic_examples_depend_on_seed_split_and_index_alone():
    tokens = synthetic.SyntheticTokens("train", 7, seq_len=16, vocab_size=50)
    again = synthetic.SyntheticTokens("train", 7, seq_len=16, vocab_size=50)
    np.testing.assert_array_equal(tokens[123]["inputs"], again[123]["inputs"])
    np.testing.assert_array_equal(tokens[123]["inputs"][1:], tokens[123]["targets"][:-1])
    assert tokens[123]["inputs"].dtype == np.int32 and tokens[123]["inputs"].max() < 50
    for other in (
        synthetic.SyntheticTokens("train", 8, seq_len=16, vocab_size=50)[123],
        synthetic.SyntheticTokens("eval", 7, seq_len=16, vocab_size=50)[123],
        tokens[124],
    ):
        assert not np.array_equal(tokens[123]["inputs"], other["inputs"])
    images = synthetic.SyntheticImages("train", 0, image_shape=(8, 8, 1), num_classes=10)
    assert images[5]["inputs"].shape == (8, 8, 1) and images[5]["inputs"].dtype == np.uint8
    assert 0 <= images[5]["targets"] < 10
    with pytest.raises(IndexError):
        tokens[len(tokens)]


@pytest.mark.parametrize("name", ["gpt_pysource", "digits_cnn"])
def test_synthetic_data_trains_and_resumes_like_any_data(name, tmp_path):
    config = load_config(
        name, "smoke", num_train_steps=4, checkpoint_every_steps=2, data__name="synthetic"
    )
    config.data.data_dir = str(tmp_path / "no_data_here")
    train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "no_data_here").exists()  # no data set was built or read
    records = read_metrics(tmp_path / "run")
    assert sorted(records) == [2, 4] and all(np.isfinite(r["loss"]) for r in records.values())
    # The data position is saved like any other: the pipeline is the usual one.
    with open(tmp_path / "run" / "checkpoints" / "4" / "data" / "metadata") as f:
        assert json.load(f) == {"examples_seen": 4 * config.global_batch_size}


def test_synthetic_batches_are_the_same_across_processes_and_resume():
    examples = data.as_dataset(synthetic.SyntheticTokens("train", 0, seq_len=8, vocab_size=256))

    def batches(shard_index, shard_count, skip=0):
        it = data.TrainIterator(
            examples, global_batch_size=8, seed=0, shard_index=shard_index, shard_count=shard_count
        )
        it.set_state({"examples_seen": 8 * skip})
        return next(it)["inputs"]

    whole = batches(0, 1, skip=3)
    halves = np.concatenate([batches(0, 2, skip=3), batches(1, 2, skip=3)])
    assert sorted(map(tuple, whole)) == sorted(map(tuple, halves))


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.profile.num_steps=-1", "config.profile.num_steps must be an integer >= 0"),
        ("--config.compilation_cache.min_compile_time_s=-1", "min_compile_time_s must be a"),
        ("--config.energy.grid_kg_co2e_per_kwh=-0.5", "grid_kg_co2e_per_kwh must be a number"),
        ("--config.energy.device_watts=inf", "config.energy.device_watts must be a number >= 0"),
        ("--config.precision.loss_scaling=sometimes", "config.precision.loss_scaling="),
        ("--config.precision.compute_dtype=float8", "unknown dtype 'float8'"),
    ],
)
def test_bad_new_fields_are_one_line_exit_2(flag, message, tmp_path, capsys):
    status = cli.main(
        ["jaxtrain", "train", "--config=gpt_pysource.py:smoke", f"--workdir={tmp_path}/w", flag]
    )
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("jaxtrain: error: ") and message in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()
