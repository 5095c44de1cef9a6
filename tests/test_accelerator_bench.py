"""benchmarks/accelerator.py, the GPU benchmark of issue 24, run for real on CPU (--smoke).

It waits for a GPU machine, which is lent rarely and for minutes: these runs make sure
that when one is, every part works, a failing or overrunning part costs only itself, and
a kill of the whole command keeps the parts done and leaves no process behind.
"""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
from conftest import REPO

SCRIPT = os.path.join(REPO, "benchmarks", "accelerator.py")


def _env():
    """This environment without the tests' 8 simulated devices: one, as on the GPU machine."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(f for f in flags if "device_count" not in f)
    return env


def _command(out, *flags):
    return [sys.executable, SCRIPT, "--smoke", f"--out={out}", *flags]


def _record(out):
    with open(out / "accelerator.json") as f:
        return json.load(f)


def _descendants(pid: int) -> set[int]:
    """Every living process below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_bad_parts_are_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        _command(out, "--parts=1,9"), env=_env(), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "--parts: no part 9 (parts are 1-5)" in proc.stderr.splitlines()[-1]
    assert not out.exists()


@pytest.mark.slow
def test_smoke_runs_every_part_and_a_failing_part_costs_only_itself(tmp_path):
    proc = subprocess.run(
        _command(tmp_path, "--fail=2", "--trace"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # part 2 failed
    record = _record(tmp_path)
    parts = record["parts"]
    assert sorted(parts) == ["1", "2", "3", "4", "5"]
    assert parts["2"]["status"] == "error"
    assert "injected failure (--fail=2)" in parts["2"]["error"]
    for key in "1345":
        assert parts[key]["status"] == "ok", parts[key]
    assert record["meta"]["device"]["platform"] == "cpu"
    assert record["meta"]["device"]["versions"]["jax"]
    assert record["meta"]["date_utc"].startswith("20")

    one_b = parts["1"]["results"]
    variants = one_b["variants"]
    assert [v["remat"] for v in variants] == ["save_dots", "full"]  # XLA attention only on CPU
    for variant in variants:
        assert variant["step_s"] > 0 and variant["tokens_per_s"] > 0, variant
        assert variant["compile_s"] > 0 and variant["flops_per_device"] > 0
        assert variant["flops_source"] == "model"
        assert variant["memory_analysis"]["temp_size_in_bytes"] > 0
        assert variant["peak_flops"] is None and "mfu" not in variant  # no CPU peak: no MFU
    assert one_b["best"]["step_s"] == min(v["step_s"] for v in variants)
    with tarfile.open(tmp_path / "trace_part1.tgz") as tar:
        assert any(name.endswith(".xplane.pb") for name in tar.getnames())

    save = parts["3"]["results"]
    assert len(save["measurement"]["plain_window_s"]) == 1 and save["checkpoint_mib"] > 0
    assert save["measurement"]["save_window_s"][0] > 0 and "amortised_percent" in save

    resume = parts["4"]["results"]
    assert resume["bitwise_equal"] is True and resume["rerun_said_resumed"]
    assert resume["comparison"]["losses_equal"] and resume["comparison"]["leaves"] > 0

    cache = parts["5"]["results"]
    assert 0 < cache["warm"]["step_1_starts_s"] and 0 < cache["cold"]["step_1_starts_s"]
    assert cache["warm"]["compile_s"] < cache["cold"]["compile_s"]  # loaded, not compiled

    assert "part 2: main job's model: tokens/s: error" in proc.stdout
    assert "injected failure" in proc.stdout


@pytest.mark.slow
def test_an_overrun_is_stopped_and_a_killed_command_keeps_its_parts(tmp_path):
    # Part 1 cannot finish in 2 s; part 2 then runs; part 5 is killed with the command.
    proc = subprocess.Popen(
        _command(tmp_path, "--parts=1,2,5", "--budgets=1=2"),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        launched = set()
        while time.monotonic() < deadline and proc.poll() is None:
            below = _descendants(proc.pid)
            launched = {
                pid
                for pid in below
                if b"jaxtrain\x00train" in open(f"/proc/{pid}/cmdline", "rb").read()
            }
            if launched:  # part 5's first launch of `jaxtrain train`
                break
            time.sleep(0.2)
        assert launched, f"part 5 never launched a run ({proc.poll()=})"
        below = _descendants(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in below) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in below if _alive(pid)]
    finally:
        proc.kill()
    parts = _record(tmp_path)["parts"]
    assert sorted(parts) == ["1", "2"]
    assert parts["1"]["status"] == "timeout" and "budget of 2 s" in parts["1"]["error"]
    assert parts["2"]["status"] == "ok"
    assert parts["2"]["results"]["tokens_per_s"] > 0 and parts["2"]["results"]["vs_cpu"]


@pytest.mark.slow
def test_a_step_too_big_for_the_device_is_tried_at_half_the_batch_then_skipped(tmp_path):
    env = {**_env(), "ACCELERATOR_MEMORY_LIMIT_BYTES": "1000"}  # a device of 1,000 bytes
    proc = subprocess.run(
        _command(tmp_path, "--parts=1"), env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 1
    part = _record(tmp_path)["parts"]["1"]
    assert part["status"] == "error" and "no variant ran: does not fit" in part["error"]
    for variant in part["results"]["variants"]:
        assert variant["halved_from"] == 4 and variant["global_batch_size"] == 2, variant
        assert variant["skipped"].startswith("does not fit") and "step_s" not in variant
        assert variant["predicted_bytes"] > variant["memory_limit_bytes"] == 1000
