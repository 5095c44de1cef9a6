"""Multi-process runs: real processes on localhost, 4 CPU devices each, gloo collectives.

Two processes of 4 devices must train exactly like this test process's 8 devices (same
losses, same final parameters), with only process 0 logging and both writing the
checkpoint; when one process is killed the other must exit, not hang; and tasks that
SLURM started must join with no flags at all.
"""

import collections
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import portpicker
import pytest
from conftest import CONFIGS, load_config, read_metrics

from jaxtrain import distributed
from jaxtrain.errors import ConfigError
from jaxtrain.sharding import path_str
from jaxtrain.train import train_and_evaluate

GPT = os.path.join(CONFIGS, "gpt_pysource.py")
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")
# The environment variables jax's cluster detectors read (Cloud TPU VMs are detected
# only on a machine with TPU chips, so there is nothing to clear for them).
LAUNCHER_VARS = (
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "OMPI_MCA_orte_hnp_uri",
    "TPU_WORKER_HOSTNAMES",
    "TPU_PROCESS_ADDRESSES",
    "KUBERNETES_SERVICE_HOST",
)
# Six steps after a two-step warmup, so that the parameters move and losses differ.
SHORT_RUN = dict(
    num_train_steps=6,
    log_every_steps=1,
    eval_every_steps=6,
    checkpoint_every_steps=3,
    optim__warmup_steps=2,
    mesh__data=2,
    mesh__fsdp=2,
    mesh__tensor=2,
)


@pytest.fixture
def no_launcher(monkeypatch):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)


def _slurm(monkeypatch, ntasks: int):
    for var, value in {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_NODELIST": "node[001-004]",
        "SLURM_NTASKS": str(ntasks),
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
    }.items():
        monkeypatch.setenv(var, value)


# --- Without processes: detection, argument checks, layout ---------------------------------


def test_a_single_process_run_does_not_start_jax_distributed(no_launcher):
    assert distributed.detect_launcher() is None
    assert distributed.initialize() is False
    assert not jax.distributed.is_initialized()


def test_a_one_task_slurm_job_is_single_process(no_launcher, monkeypatch):
    _slurm(monkeypatch, ntasks=1)
    assert distributed.detect_launcher() == ("SlurmCluster", 1)
    assert distributed.initialize() is False
    assert not jax.distributed.is_initialized()


def test_a_multi_task_slurm_job_lets_jax_fill_in_the_job(no_launcher, monkeypatch):
    _slurm(monkeypatch, ntasks=4)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # initialize replaces it
    assert distributed.detect_launcher() == ("SlurmCluster", 4)
    assert distributed.initialize(heartbeat_timeout_s=17) is True
    [(args, kwargs)] = calls
    assert args == (None, None, None)  # jax reads address, count and id from SLURM
    assert kwargs["heartbeat_timeout_seconds"] == 17
    assert kwargs["shutdown_timeout_seconds"] == distributed.SHUTDOWN_TIMEOUT_S


@pytest.mark.parametrize(
    "args, names",
    [
        (("localhost:1234", None, 0), "--num_processes"),
        ((None, 2, None), "--coordinator_address, --process_id"),
        (("localhost", 2, 0), "--coordinator_address='localhost'"),
        (("localhost:1234", 0, 0), "--num_processes=0"),
        (("localhost:1234", 2, 2), "--process_id=2"),
    ],
)
def test_bad_explicit_arguments_name_the_flag(no_launcher, args, names):
    with pytest.raises(ConfigError, match="^" + re.escape(names)):
        distributed.initialize(*args)
    assert not jax.distributed.is_initialized()


def test_initialize_after_the_backend_started_fails_loudly():
    # The test process already has its 8 devices: jax refuses to resize the job.
    with pytest.raises(RuntimeError, match="must be called before"):
        distributed.initialize(
            "localhost:1", num_processes=2, process_id=0, initialization_timeout_s=5
        )


def test_process_layout_of_this_process():
    assert distributed.process_layout() == {
        "process_index": 0,
        "process_count": 1,
        "local_device_count": 8,
        "device_count": 8,
    }
    assert distributed.describe() == "process 0 of 1 | 8 of 8 cpu devices local"


def test_failure_message_names_the_process_and_the_likely_cause():
    lost = jax.errors.JaxRuntimeError("UNKNOWN: Gloo all-reduce failed: Connection reset by peer")
    message = distributed.failure_message(lost)
    assert message.startswith("jaxtrain: error: process 0 of 1 failed (JaxRuntimeError: ")
    assert "Connection reset by peer" in message
    assert "another process died first" in message
    disk = distributed.failure_message(OSError(28, "No space left on device"))
    assert "No space left on device" in disk
    assert "another process" not in disk  # not every failure is a peer's


# --- Real processes ---------------------------------------------------------------------


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    # conftest gives this process 8 devices through XLA_FLAGS; each worker gets 4.
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(f for f in flags if "xla_force_host_platform_device_count" not in f)
    env["JAX_NUM_CPU_DEVICES"] = "4"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"  # a process that aborts keeps all it printed
    return env


def _start_workers(tmp_path, workdir, data_dir, overrides, heartbeat_timeout_s=None):
    """Starts 2 worker processes; returns [(Popen, stdout path, stderr path)]."""
    address = f"localhost:{portpicker.pick_unused_port()}"
    settings = [f"data.data_dir={str(data_dir)!r}"]
    settings += [f"{key.replace('__', '.')}={value!r}" for key, value in overrides.items()]
    if heartbeat_timeout_s:
        settings.append(f"--heartbeat_timeout_s={heartbeat_timeout_s}")
    workers = []
    for process_id in range(2):
        out, err = tmp_path / f"worker{process_id}.out", tmp_path / f"worker{process_id}.err"
        command = [sys.executable, WORKER, address, "2", str(process_id), f"{GPT}:smoke"]
        with open(out, "w") as stdout, open(err, "w") as stderr:
            proc = subprocess.Popen(
                [*command, str(workdir), *settings],
                stdout=stdout,
                stderr=stderr,
                env=_child_env(),
            )
        workers.append((proc, out, err))
    return workers


def _stop(workers):
    for proc, _, _ in workers:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _tensorboard_scalars(directory) -> list[tuple[str, int]]:
    """(tag, step) of every scalar in the one event file under `directory`."""
    from tensorboardX.proto import event_pb2

    [name] = os.listdir(directory)
    with open(os.path.join(directory, name), "rb") as f:
        data = f.read()
    scalars, pos = [], 0
    while pos < len(data):  # TFRecord: length, its CRC, the record, its CRC
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
        scalars += [(value.tag, event.step) for value in event.summary.value]
        pos += 12 + length + 4
    return scalars


def _has_logged_a_step(workdir) -> bool:
    path = workdir / "metrics.jsonl"
    return path.exists() and '"split": "train"' in path.read_text()


def _read_params(workdir, step):
    """The checkpoint's parameters as numpy, read with Orbax alone onto one local device."""
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    handlers = {
        "state": ocp.StandardCheckpointHandler(),
        "data": ocp.JsonCheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
    }
    with ocp.CheckpointManager(workdir / "checkpoints", item_handlers=handlers) as manager:
        metadata = manager.item_metadata(step)["state"]
        # Saved on devices of two processes, so restore onto explicit local shardings.
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device), metadata
        )
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
    return _flat(restored["state"]["params"])


def _flat(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_str(path): np.asarray(leaf) for path, leaf in leaves}


def test_two_processes_train_like_one_with_eight_devices(tmp_path, data_dir):
    # Reference: this process, 8 devices, the same mesh and data.
    config = load_config("gpt_pysource", "smoke", data_dir, **SHORT_RUN)
    reference_state, _ = train_and_evaluate(config, str(tmp_path / "reference"))

    workdir = tmp_path / "two_processes"
    workers = _start_workers(tmp_path, workdir, data_dir, SHORT_RUN)
    try:
        for proc, _, err in workers:
            proc.wait(timeout=300)
            assert proc.returncode == 0, err.read_text()[-3000:]
    finally:
        _stop(workers)
    (_, out0, _), (_, out1, _) = workers
    assert "process 0 of 2 | 4 of 8 cpu devices local" in out0.read_text()
    assert "process 1 of 2 | 4 of 8 cpu devices local" in out1.read_text()

    # Same examples in each global batch, so the same losses up to float reordering.
    # Measured: at most 5e-7 apart (about 1e-7 relative).
    want, got = read_metrics(tmp_path / "reference"), read_metrics(workdir)
    assert sorted(got) == list(range(1, 7))
    np.testing.assert_allclose(
        [got[s]["loss"] for s in got], [want[s]["loss"] for s in got], rtol=1e-5
    )
    assert read_metrics(workdir, "eval")[6]["loss"] == pytest.approx(
        read_metrics(tmp_path / "reference", "eval")[6]["loss"], rel=1e-5
    )

    # Only process 0 logs: each line once in metrics.jsonl and TensorBoard, and process
    # 1 prints no metrics.
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert len({(r["step"], r["split"]) for r in records}) == len(records) >= 7
    scalars = _tensorboard_scalars(workdir / "tensorboard")
    assert collections.Counter(scalars)[("train/loss", 3)] == 1
    assert max(collections.Counter(scalars).values()) == 1
    assert " train | loss " in out0.read_text()
    assert " train | loss " not in out1.read_text()

    # Both processes wrote their shards of a committed checkpoint holding the reference's
    # final parameters (measured: at most 2.4e-7 apart).
    state_dir = workdir / "checkpoints" / "6" / "state"
    assert (workdir / "checkpoints" / "6" / "commit_success.txt").exists()
    assert (state_dir / "ocdbt.process_0").is_dir() and (state_dir / "ocdbt.process_1").is_dir()
    want_params, got_params = _flat(reference_state.params), _read_params(workdir, 6)
    assert sorted(got_params) == sorted(want_params)
    for path, value in want_params.items():
        np.testing.assert_allclose(got_params[path], value, rtol=1e-5, atol=1e-5, err_msg=path)

    # Restore onto another process count: as if the job had died after step 3, this one
    # process with 8 devices picks up the two processes' checkpoint and carries on.
    shutil.rmtree(workdir / "checkpoints" / "6")
    train_and_evaluate(config, str(workdir))
    resumed = read_metrics(workdir)
    assert sorted(resumed) == list(range(1, 7))
    np.testing.assert_allclose(
        [resumed[s]["loss"] for s in (4, 5, 6)], [want[s]["loss"] for s in (4, 5, 6)], rtol=1e-5
    )


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path, data_dir):
    """Only process 1 is signalled; jax's preemption sync makes both stop at one step."""
    address = f"localhost:{portpicker.pick_unused_port()}"
    workdir = tmp_path / "run"
    script = os.path.join(os.path.dirname(sys.executable), "jaxtrain")
    workers = []
    for process_id in range(2):
        err = tmp_path / f"worker{process_id}.err"
        command = [
            script,
            "train",
            f"--config={GPT}:smoke",
            f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}",
            "--config.num_train_steps=5000",
            "--config.log_every_steps=1",
            "--config.checkpoint_every_steps=1000",
            "--config.eval_every_steps=1000",
            "--config.mesh.data=2",
            "--config.mesh.fsdp=2",
            "--config.mesh.tensor=2",
            f"--coordinator_address={address}",
            "--num_processes=2",
            f"--process_id={process_id}",
        ]
        with open(err, "w") as stderr:
            proc = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=stderr, env=_child_env()
            )
        workers.append((proc, err))
    try:

        def trained_three_steps():
            try:
                return _has_logged_a_step(workdir) and max(read_metrics(workdir)) >= 3
            except ValueError:  # a line being written
                return False

        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and all(p.poll() is None for p, _ in workers):
            if trained_three_steps():
                break
            time.sleep(0.05)
        assert all(p.poll() is None for p, _ in workers), "a worker ended before the signal"
        workers[1][0].send_signal(signal.SIGTERM)
        for proc, _ in workers:
            proc.wait(timeout=120)
    finally:
        _stop([(p, None, None) for p, _ in workers])
    errors = [err.read_text() for _, err in workers]
    assert [p.returncode for p, _ in workers] == [75, 75], errors
    stopped = {int(m) for e in errors for m in re.findall(r"preempted at step (\d+)", e)}
    assert len(stopped) == 1, errors  # the same step on both processes
    step = stopped.pop()
    assert (workdir / "checkpoints" / str(step) / "commit_success.txt").exists()
    assert max(read_metrics(workdir)) == step


@pytest.mark.slow
def test_survivor_of_a_killed_process_exits_with_a_clear_error(tmp_path, data_dir):
    heartbeat_timeout_s = 10
    endless = dict(
        num_train_steps=100_000,
        log_every_steps=1,
        eval_every_steps=100_000,
        checkpoint_every_steps=100_000,
    )
    workdir = tmp_path / "run"
    workers = _start_workers(tmp_path, workdir, data_dir, endless, heartbeat_timeout_s)
    (survivor, _, survivor_err), (victim, _, _) = workers
    try:
        deadline = time.monotonic() + 240
        while not _has_logged_a_step(workdir):
            assert survivor.poll() is None and victim.poll() is None, "a worker died early"
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.2)
        victim.send_signal(signal.SIGKILL)  # process 1: only heartbeats tell process 0
        killed_at = time.monotonic()
        try:
            survivor.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("the survivor was still running 120 s after its peer died")
        waited = time.monotonic() - killed_at
    finally:
        _stop(workers)
    assert waited < heartbeat_timeout_s + 30
    stderr = survivor_err.read_text()
    # Either way distributed.py describes: the collective fails first and the survivor
    # exits 1 with jaxtrain's line, or jax's heartbeat check aborts it naming process 1.
    if survivor.returncode == 1:
        assert "jaxtrain: error: process 0 of 2 failed (JaxRuntimeError: " in stderr
        assert "another process died first" in stderr
    else:
        assert survivor.returncode == -signal.SIGABRT
        assert "another task died" in stderr
        assert "stopped sending heartbeats" in stderr


# Joins from SLURM's variables alone, then checks a cross-process sum: 1+1 + 2+2 = 6.
SLURM_TASK = """
from jaxtrain import distributed
assert distributed.initialize(heartbeat_timeout_s=10)
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec
mesh = jax.make_mesh((jax.device_count(),), ("d",))
local = np.full((jax.local_device_count(),), jax.process_index() + 1.0, np.float32)
x = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("d")), local)
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, PartitionSpec()))(x)
print(distributed.describe(), "| sum", float(total))
"""


@pytest.mark.slow
def test_slurm_tasks_join_without_flags(tmp_path):
    port = portpicker.pick_unused_port()
    tasks = []
    for task in range(2):
        env = _child_env()
        env["JAX_NUM_CPU_DEVICES"] = "2"
        env.update(
            SLURM_JOB_ID="4242",
            SLURM_STEP_NODELIST="localhost",
            SLURM_NTASKS="2",
            SLURM_PROCID=str(task),
            SLURM_LOCALID=str(task),
            JAX_COORDINATOR_PORT=str(port),  # instead of one derived from the job id
        )
        tasks.append(
            subprocess.Popen(
                [sys.executable, "-c", SLURM_TASK],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        outputs = [task.communicate(timeout=120)[0] for task in tasks]
    finally:
        _stop([(task, None, None) for task in tasks])
    for task, output in enumerate(outputs):
        assert f"process {task} of 2 | 2 of 4 cpu devices local | sum 6.0" in output, output
