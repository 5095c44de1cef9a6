"""What the per-array checksums cost a checkpoint: save and restore, with and without.

    python benchmarks/checkpoint_checksums.py [--config=gpt_pysource.py] [--repeats=5] \
        [--set model.embed_dim=1024 --set model.mlp_dim=4096 ...]

Builds the config's train state (one device), then times, each the median of `repeats`:
the checksums alone (one pass over the state on device), a synchronous save of the state
(`Checkpointer.save` + wait, which computes them), and a restore (which verifies them).
"Without" is the same save or restore less the checksum pass, which both run in line.
"""

import argparse
import ast
import statistics
import tempfile
import time

import jax

import jaxtrain
from jaxtrain import integrity, optim, sharding, state, tasks


def median_seconds(fn, repeats):
    fn()  # compile, warm caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(spec: str, repeats: int, settings: list[str]):
    config = jaxtrain.load_config(spec)
    for setting in settings:  # dotted.key=python literal
        key, value = setting.split("=", 1)
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = ast.literal_eval(value)
    config.mesh = {"data": 1}
    config.checkpoint.async_save = False
    task = tasks.from_config(config)
    mesh, rules = sharding.mesh_and_rules(config, jax.devices()[:1])
    tx, _ = optim.optimizer_and_schedule(
        config, task.optimizer, model=task.model, trainable=task.trainable
    )
    layout = state.make_state_layout(task.model, tx, mesh, rules)
    with jax.set_mesh(mesh):
        train_state = state.create_state(layout, 0)
    size = sum(x.nbytes for x in jax.tree.leaves(train_state))
    checksum_s = median_seconds(lambda: integrity.checksums(train_state), repeats)

    with tempfile.TemporaryDirectory() as workdir:
        ckpt = jaxtrain.Checkpointer(workdir, config.checkpoint)
        step = iter(range(1, 10_000))

        def save():
            ckpt.save(next(step), train_state, {"examples_seen": 0}, {})
            ckpt.wait_until_finished()

        save_s = median_seconds(save, repeats)
        last = ckpt.manager.latest_step()
        restore_s = median_seconds(lambda: ckpt.restore(last, layout.abstract_state), repeats)
        ckpt.close()
    device = jax.devices()[0]
    print(
        f"{spec} {' '.join(settings)}: {layout.num_parameters:,} parameters, train state "
        f"{size / 2**20:.1f} MiB on one {device.platform} device ({device.device_kind})"
    )
    print(f"checksums alone: {checksum_s * 1e3:.1f} ms ({size / checksum_s / 2**30:.2f} GiB/s)")
    for name, seconds in (("save", save_s), ("restore", restore_s)):
        without = seconds - checksum_s
        print(
            f"{name}: {seconds * 1e3:.1f} ms with checksums, {without * 1e3:.1f} ms without "
            f"(+{checksum_s / without:.1%})"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="gpt_pysource.py")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], help="dotted.key=literal")
    args = parser.parse_args()
    main(args.config, args.repeats, args.set)
