"""Checkpoints restore onto any mesh, never load garbage, keep what the config says, and
fail clearly when they cannot be written."""

import glob
import json
import logging
import os
import shutil
import subprocess

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import build, gpt_smoke_config, load_config, read_metrics
from orbax.checkpoint._src.serialization import serialization as orbax_serialization

from jaxtrain import checkpoint, integrity
from jaxtrain.errors import ConfigError
from jaxtrain.state import create_state
from jaxtrain.train import train_and_evaluate

# Losses after a restore onto another mesh match the uninterrupted 8-device run to this
# relative tolerance: only the order of floating-point reductions differs (measured
# worst case 1.7e-7 over steps 3-6 and the final eval).
RTOL = 1e-5


def _train(data_dir, workdir, steps, mesh=None, devices=None):
    """Trains (or resumes) `workdir` up to `steps`; returns the final eval metrics."""
    config = gpt_smoke_config(data_dir, steps, mesh)
    return train_and_evaluate(config, str(workdir), devices=devices)[1]


def _losses(workdir):
    return {step: r["loss"] for step, r in read_metrics(workdir).items()}


def _snapshot(directory):
    """{relative path: bytes, or None for a directory} of everything under `directory`."""
    files = {}
    for root, dirs, names in os.walk(directory):
        files.update({os.path.relpath(os.path.join(root, d), directory): None for d in dirs})
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, directory)] = f.read()
    return files


# --- Restore anywhere ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """The uninterrupted run: 6 steps on 8 devices, data parallel."""
    workdir = tmp_path_factory.mktemp("reference")
    result = _train(data_dir, workdir, 6)
    return _losses(workdir), result["loss"]


@pytest.fixture(scope="module")
def after_two_steps(data_dir, tmp_path_factory):
    """A workdir checkpointed at step 2 on 8 devices, data parallel (replicated weights)."""
    workdir = tmp_path_factory.mktemp("two_steps")
    _train(data_dir, workdir, 2)
    return workdir


def _continue(data_dir, source, workdir, legs):
    shutil.copytree(source, workdir)
    for steps, mesh, devices in legs:
        result = _train(data_dir, workdir, steps, mesh, devices)
    return _losses(workdir), result["loss"]


def _assert_matches(run, reference):
    losses, eval_loss = run
    want_losses, want_eval = reference
    assert sorted(losses) == list(range(1, 7))  # each step logged once across the restores
    np.testing.assert_allclose(
        [losses[s] for s in range(3, 7)], [want_losses[s] for s in range(3, 7)], rtol=RTOL
    )
    np.testing.assert_allclose(eval_loss, want_eval, rtol=RTOL)


def test_restore_onto_fewer_devices_continues_the_run(
    data_dir, tmp_path, reference, after_two_steps
):
    # 8 devices (data) -> 4 devices (fsdp x tensor) -> 1 device.
    run = _continue(
        data_dir,
        after_two_steps,
        tmp_path / "run",
        [(4, {"fsdp": 2, "tensor": 2}, jax.devices()[:4]), (6, {"data": 1}, jax.devices()[:1])],
    )
    _assert_matches(run, reference)


def test_rerun_on_another_strategy_skips_an_unfinished_step(
    data_dir, tmp_path, reference, after_two_steps
):
    workdir = tmp_path / "run"
    shutil.copytree(after_two_steps, workdir)
    # A step whose save never finished (a non-atomic copy or file system leaves these). Orbax
    # lists it, and would silently skip saving step 6 again, were it not set aside.
    unfinished = workdir / "checkpoints" / "6"
    shutil.copytree(workdir / "checkpoints" / "2", unfinished)
    os.remove(unfinished / "commit_success.txt")

    # data=8 -> fsdp=4 x tensor=2 on the same 8 devices (kv_heads=2 caps tensor at 2).
    run = _continue(data_dir, workdir, tmp_path / "resumed", [(6, {"fsdp": 4, "tensor": 2}, None)])
    _assert_matches(run, reference)
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["2", "6", "6.damaged"]
    assert integrity.damage(str(tmp_path / "resumed" / "checkpoints" / "6")) is None


def test_restore_reads_only_each_devices_shards(after_two_steps, monkeypatch):
    reads = []
    original = orbax_serialization._read_array_index_and_device_put

    async def recording(devices, index, t, *, global_shape, new_shard_shape, **kwargs):
        read = tuple(len(range(*s.indices(n))) for s, n in zip(index, global_shape, strict=True))
        reads.append((read, tuple(new_shard_shape), tuple(global_shape)))
        return await original(
            devices, index, t, global_shape=global_shape, new_shard_shape=new_shard_shape, **kwargs
        )

    monkeypatch.setattr(orbax_serialization, "_read_array_index_and_device_put", recording)
    config = gpt_smoke_config(mesh={"data": 1, "fsdp": 4, "tensor": 2})
    _, layout, _, _ = build(config)
    ckpt = checkpoint.Checkpointer(str(after_two_steps), config.checkpoint)
    try:
        state, data_state = ckpt.restore(2, layout.abstract_state)
    finally:
        ckpt.close()
    assert data_state == {"examples_seen": 32}  # two batches of 16
    # Every restored array carries the new layout...
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(layout.shardings), strict=True):
        assert got.sharding == want
    up = state.params["blocks"][0]["mlp"]["up"]["kernel"]  # (embed, mlp) over (fsdp, tensor)
    assert {s.data.shape for s in up.addressable_shards} == {(16, 64)}
    # ...and was read slice by slice: no read is larger than one device's shard.
    assert all(read == shard for read, shard, _ in reads)
    assert ((16, 64), (16, 64), (64, 128)) in reads

    # The same step restored onto one device holds the same numbers.
    config_one = gpt_smoke_config(mesh={"data": 1})
    _, layout_one, _, _ = build(config_one, devices=jax.devices()[:1])
    ckpt = checkpoint.Checkpointer(str(after_two_steps), config_one.checkpoint)
    try:
        single, _ = ckpt.restore(2, layout_one.abstract_state)
    finally:
        ckpt.close()
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(single), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- Never load garbage ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke():
    config = gpt_smoke_config()
    _, layout, _, _ = build(config)
    return config, layout, create_state(layout, 0)


@pytest.fixture(scope="module")
def three_steps(smoke, tmp_path_factory):
    """A workdir with whole checkpoints at steps 2, 4 and 6 (step 4 has eval metrics)."""
    config, _, state = smoke
    workdir = tmp_path_factory.mktemp("three_steps")
    ckpt = checkpoint.Checkpointer(str(workdir), config.checkpoint)
    try:
        for step in (2, 4, 6):
            metrics = {"loss": 3.0} if step == 4 else None
            ckpt.save(
                step, state.replace(step=state.step + step), {"next_index": step}, {}, metrics
            )
    finally:
        ckpt.close()
    return workdir


def _array_files(step_dir):
    return sorted(glob.glob(f"{step_dir}/state/**/d/*", recursive=True), key=os.path.getsize)


def _truncate_largest_array_file(step_dir):
    path = _array_files(step_dir)[-1]
    os.truncate(path, os.path.getsize(path) // 2)


def _edit_json(path, edit):
    """Rewrites a JSON item with `edit` applied: still valid JSON, other content."""
    with open(path, encoding="utf-8") as f:
        value = json.load(f)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(edit(value), f)


DAMAGES = {
    "no commit marker": lambda d: os.remove(f"{d}/commit_success.txt"),
    "no step metadata": lambda d: os.remove(f"{d}/_CHECKPOINT_METADATA"),
    "array file deleted": lambda d: os.remove(_array_files(d)[-1]),
    "array file truncated": _truncate_largest_array_file,
    "array manifest deleted": lambda d: os.remove(f"{d}/state/manifest.ocdbt"),
    "data position cut short": lambda d: os.truncate(f"{d}/data/metadata", 3),
    "empty step directory": lambda d: (shutil.rmtree(d), os.mkdir(d)),
    # Valid JSON with other content: only the digest saved with the step can tell.
    "data position changed": lambda d: _edit_json(
        f"{d}/data/metadata", lambda v: {**v, "next_index": v["next_index"] + 1}
    ),
    "config changed": lambda d: _edit_json(f"{d}/config/metadata", lambda v: {**v, "seed": 1}),
    "an item digest changed": lambda d: _edit_json(
        f"{d}/checksums/metadata", lambda v: {**v, "item:data": "0" * 64}
    ),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_latest_step_is_skipped_and_set_aside(damage, smoke, three_steps, tmp_path, caplog):
    config, layout, state = smoke
    workdir = tmp_path / "run"
    shutil.copytree(three_steps, workdir)
    step_dir = str(workdir / "checkpoints" / "6")
    DAMAGES[damage](step_dir)
    before = _snapshot(workdir)

    with caplog.at_level(logging.WARNING):
        assert checkpoint.latest_compatible_step(str(workdir), layout.abstract_state) == 4
    assert [r.getMessage() for r in caplog.records if step_dir in r.getMessage()]
    assert _snapshot(workdir) == before  # the check wrote nothing

    # Once the run may write, the damaged step moves aside (kept for inspection), so that
    # retention and the next save of step 6 (which Orbax would skip) are not disturbed.
    ckpt = checkpoint.Checkpointer(str(workdir), config.checkpoint)
    try:
        assert ckpt.manager.all_steps() == [2, 4]
        ckpt.save(6, state.replace(step=state.step + 6), {"next_index": 6}, {})
    finally:
        ckpt.close()
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6", "6.damaged"]
    assert checkpoint.latest_compatible_step(str(workdir), layout.abstract_state) == 6


def test_step_that_fails_to_read_falls_back_to_the_previous(smoke, three_steps, tmp_path, caplog):
    config, layout, _ = smoke
    workdir = tmp_path / "run"
    shutil.copytree(three_steps, workdir)
    step_dir = str(workdir / "checkpoints" / "6")
    with open(_array_files(step_dir)[-1], "r+b") as f:  # bad bytes, full length
        f.write(b"\0" * 4096)
    assert integrity.damage(step_dir) is None  # invisible without reading the arrays
    assert checkpoint.latest_compatible_step(str(workdir), layout.abstract_state) == 6

    ckpt = checkpoint.Checkpointer(str(workdir), config.checkpoint)
    try:
        with caplog.at_level(logging.WARNING):
            state, data_state = ckpt.restore(6, layout.abstract_state)
        assert ckpt.manager.all_steps() == [2, 4]
    finally:
        ckpt.close()
    assert int(state.step) == 4 and data_state == {"next_index": 4}
    assert any(step_dir in r.getMessage() for r in caplog.records)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6.damaged"]


# --- Retention ------------------------------------------------------------------------------


def _retention_config(**overrides):
    c = ml_collections.ConfigDict(load_config("gpt_pysource", "smoke").checkpoint.to_dict())
    c.update(async_save=False, **overrides)
    return c


def _kept(workdir):
    return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")))


def test_retention_keeps_latest_best_and_every_mth(tmp_path):
    config = _retention_config(keep_latest=2, keep_best=2, best_metric="loss", keep_every_steps=10)
    workdir = str(tmp_path)
    state = {"w": np.zeros(4, np.float32)}
    # Evaluated every 4th step; the newest (24) has the worst loss and must survive anyway.
    losses = {4: 5.0, 8: 1.0, 12: 2.0, 16: 4.0, 20: 3.0, 24: 9.0}
    ckpt = checkpoint.Checkpointer(workdir, config)
    try:
        for step in range(2, 26, 2):
            metrics = {"loss": losses[step], "accuracy": 0.5} if step in losses else None
            ckpt.save(step, state, {"next_index": step}, {}, metrics)
            assert step in _kept(workdir)
    finally:
        ckpt.close()
    # latest 2: 22, 24; best 2 by loss: 8, 12; every 10th: 10, 20.
    assert _kept(workdir) == [8, 10, 12, 20, 22, 24]

    # A resumed run knows the earlier steps' metrics from disk.
    ckpt = checkpoint.Checkpointer(workdir, config)
    try:
        ckpt.save(26, state, {"next_index": 26}, {}, None)
        ckpt.save(28, state, {"next_index": 28}, {}, {"loss": 0.5})
    finally:
        ckpt.close()
    assert _kept(workdir) == [8, 10, 20, 26, 28]


def test_retention_best_by_max(tmp_path):
    config = _retention_config(keep_latest=1, keep_best=1, best_metric="accuracy", best_mode="max")
    ckpt = checkpoint.Checkpointer(str(tmp_path), config)
    try:
        for step, accuracy in ((1, 0.2), (2, 0.9), (3, 0.4), (4, 0.1)):
            ckpt.save(step, {"w": np.zeros(2)}, {}, {}, {"loss": 1.0, "accuracy": accuracy})
    finally:
        ckpt.close()
    assert _kept(tmp_path) == [2, 4]


@pytest.mark.parametrize(
    "overrides, names",
    [
        ({"keep_latest": 0}, "keep_latest"),
        ({"keep_best": -1}, "keep_best"),
        ({"keep_every_steps": -5}, "keep_every_steps"),
        ({"best_mode": "median"}, "best_mode"),
        ({"best_metric": ""}, "best_metric"),
    ],
)
def test_bad_retention_config_is_refused(overrides, names):
    with pytest.raises(ConfigError, match=f"config.checkpoint.{names}"):
        checkpoint.check_config(_retention_config(**overrides))


def test_best_metric_missing_from_eval_is_named(tmp_path):
    config = _retention_config(keep_best=1, best_metric="bleu")
    ckpt = checkpoint.Checkpointer(str(tmp_path), config)
    try:
        with pytest.raises(ConfigError, match=r"best_metric='bleu'.*\['accuracy', 'loss'\]"):
            ckpt.save(1, {"w": np.zeros(2)}, {}, {}, {"loss": 1.0, "accuracy": 0.5})
    finally:
        ckpt.close()


# --- Cannot write ---------------------------------------------------------------------------


def test_checkpoint_path_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "checkpoints").write_text("not a directory")
    with pytest.raises(checkpoint.CheckpointWriteError, match="checkpoints.*not a directory"):
        checkpoint.Checkpointer(str(tmp_path), _retention_config())
    assert (tmp_path / "checkpoints").read_text() == "not a directory"


def _remount(mount, options):
    subprocess.run(["mount", "-o", f"remount,{options}", str(mount)], check=True)


def test_disk_full_and_read_only_keep_the_last_good_checkpoint(smoke, small_disk):
    config, layout, state = smoke
    workdir = str(small_disk / "run")
    ckpt = checkpoint.Checkpointer(workdir, config.checkpoint)
    ckpt.save(2, state.replace(step=state.step + 2), {"next_index": 2}, {})
    ckpt.wait_until_finished()
    # Shrink the disk to half a checkpoint more than it holds: step 4 cannot fit.
    stat = os.statvfs(small_disk)
    used = (stat.f_blocks - stat.f_bfree) * stat.f_frsize
    _remount(small_disk, f"size={used * 3 // 2}")
    with pytest.raises(checkpoint.CheckpointWriteError) as error:
        try:
            ckpt.save(4, state.replace(step=state.step + 4), {"next_index": 4}, {})
        finally:
            ckpt.close()
    message = str(error.value)
    assert "step 4" in message and os.path.join(workdir, "checkpoints") in message
    assert "No space left on device" in message and "step 2, is intact" in message
    # Nothing half-written counts as a step, for us or for Orbax alone.
    assert checkpoint.latest_compatible_step(workdir, layout.abstract_state) == 2
    with ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"), options=ocp.CheckpointManagerOptions(read_only=True)
    ) as manager:
        assert manager.all_steps() == [2]

    # Read-only: refused before training starts; reading still works.
    _remount(small_disk, "ro")
    with pytest.raises(checkpoint.CheckpointWriteError, match="Read-only file system"):
        checkpoint.Checkpointer(workdir, config.checkpoint)
    assert checkpoint.latest_compatible_step(workdir, layout.abstract_state) == 2

    # With room again, the next run clears the half-written step and saves over it.
    _remount(small_disk, "rw,size=16m")
    ckpt = checkpoint.Checkpointer(workdir, config.checkpoint)
    try:
        restored, _ = ckpt.restore(2, layout.abstract_state)
        assert int(restored.step) == 2
        ckpt.save(4, state.replace(step=state.step + 4), {"next_index": 4}, {})
    finally:
        ckpt.close()
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]


def test_every_json_item_is_vetted_against_its_digest(three_steps, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(three_steps, workdir)
    step_dir = str(workdir / "checkpoints" / "4")
    sums = integrity.saved_json(step_dir, integrity.CHECKSUMS_ITEM)
    assert {"item:data", "item:config", "item:metrics"} <= set(sums)  # step 4 was evaluated
    assert integrity.damage(step_dir) is None
    _edit_json(f"{step_dir}/metrics/metrics", lambda v: {**v, "loss": 2.5})  # a better "best"
    assert "item 'metrics' does not match its digest" in integrity.damage(step_dir)


@pytest.mark.parametrize("kind", ["dangling link", "file"])
def test_a_checkpoints_path_that_cannot_be_one_is_refused_before_writing(kind, data_dir, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    if kind == "file":
        (workdir / "checkpoints").write_text("not a directory")
    else:
        (workdir / "checkpoints").symlink_to(tmp_path / "nowhere")
    message = "does not exist" if kind == "dangling link" else "exists and is not a directory"
    with pytest.raises(ConfigError, match=message):
        train_and_evaluate(gpt_smoke_config(data_dir, 1), str(workdir))
    assert not (workdir / "config.json").exists() and not (tmp_path / "nowhere").exists()
