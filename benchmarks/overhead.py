"""Framework overhead: `train_and_evaluate` against the same compiled step in a bare loop.

    python benchmarks/overhead.py [--config=gpt_pysource.py] [--repeats=3] [--steps=50]
        [--set KEY=VALUE ...]

In one process, alternately:
  jaxtrain: `train_and_evaluate` (what `jaxtrain train` runs) for `warmup + steps` steps
    in a fresh workdir, logging every `warmup` steps; its time per step is read from the
    log lines after the first interval (input pipeline, metric fetches one step late,
    the non-finite guard, logging: everything but evaluation and the final checkpoint,
    which come after the last measured step);
  bare: the train step compiled by the same functions (`make_train_step`,
    `compile_train_step`), called in a Python loop on batches made and put on the device
    beforehand, blocking once at the end.
Reports the median seconds per step of each and jaxtrain's throughput relative to bare
(the ratio of the medians, and the median of each repeat's ratio).
"""

import argparse
import ast
import os
import statistics
import tempfile
import time

import jax

import jaxtrain
from jaxtrain import data, metrics_jsonl, optim, precision, sharding, state, steps, tasks
from jaxtrain.train import train_and_evaluate


def load(spec: str, settings: list[str]):
    config = jaxtrain.load_config(spec)
    for setting in settings:  # dotted.key=python literal
        key, value = setting.split("=", 1)
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        try:
            node[leaf] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            node[leaf] = value
    return config


def jaxtrain_seconds_per_step(config, warmup: int, steps_: int) -> float:
    config.num_train_steps = warmup + steps_
    config.log_every_steps = warmup
    with tempfile.TemporaryDirectory() as workdir:
        train_and_evaluate(config, workdir)
        records = metrics_jsonl.read_records(os.path.join(workdir, "metrics.jsonl"))
    timed = [r for r in records if r["split"] == "train" and r["step"] > warmup]
    # Each record's step_time_s is the mean over its interval: weight by its steps.
    starts = [warmup] + [r["step"] for r in timed[:-1]]
    intervals = [r["step"] - start for r, start in zip(timed, starts, strict=True)]
    total = sum(r["step_time_s"] * n for r, n in zip(timed, intervals, strict=True))
    return total / sum(intervals)


def build(config):
    """What `train_and_evaluate` builds before compiling, by the same functions: (task,
    mesh, rules, layout, loss scale, batch shardings, abstract global batch)."""
    task = tasks.from_config(config)
    mesh, rules = sharding.mesh_and_rules(config, None)
    tx, _ = optim.optimizer_and_schedule(
        config, task.optimizer, model=task.model, trainable=task.trainable
    )
    loss_scale = precision.loss_scale(config.precision, device=mesh.devices.flat[0])
    layout = state.make_state_layout(
        task.model, tx, mesh, rules, trainable=task.trainable, loss_scale=loss_scale
    )
    example = task.example or data.example_spec(data.as_dataset(task.data))
    shardings = data.batch_shardings(example, mesh, rules, task.batch_axes)
    abstract = data.abstract_batch(example, config.global_batch_size, shardings)
    return task, mesh, rules, layout, loss_scale, shardings, abstract


def train_iterator(config, task):
    """The task's training batches, as one process of the run reads them."""
    return data.TrainIterator(
        data.as_dataset(task.data),
        global_batch_size=config.global_batch_size,
        seed=config.data.seed,
        shard_index=0,
        shard_count=1,
        read_threads=config.data.read_threads,
    )


def setup(config, num_batches: int):
    """The pieces `train_and_evaluate` builds, by the same functions: (mesh, layout, the
    compiled train step, `num_batches` global batches already on the device, the data
    iterator after them)."""
    task, mesh, rules, layout, loss_scale, shardings, abstract = build(config)
    with jax.set_mesh(mesh), sharding.use_rules(rules):
        step = steps.compile_train_step(
            steps.make_train_step(
                task.loss,
                layout,
                microbatches=config.microbatches,
                loss_scale=loss_scale,
            ),
            layout,
            abstract,
        )
    iterator = train_iterator(config, task)
    batches = [data.to_global(next(iterator), shardings) for _ in range(num_batches)]
    jax.block_until_ready(batches)
    return mesh, layout, step, batches, iterator


def make_bare(config, warmup: int, steps_: int):
    """A function running `warmup + steps` steps of the compiled step on premade batches,
    returning the seconds per step after the warm-up."""
    mesh, layout, step, batches, _ = setup(config, warmup + steps_)

    def run() -> float:
        with jax.set_mesh(mesh):
            train_state = state.create_state(layout, config.seed)
            for batch in batches[:warmup]:
                train_state, metrics = step(train_state, batch)
            jax.block_until_ready((train_state, metrics))
            start = time.perf_counter()
            for batch in batches[warmup:]:
                train_state, metrics = step(train_state, batch)
            jax.block_until_ready((train_state, metrics))
            return (time.perf_counter() - start) / steps_

    return run


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(spec, repeats, warmup, steps_, settings):
    config = load(spec, settings)
    if config.eval_every_steps <= warmup + steps_:  # no evaluation inside the timed steps
        settings = [*settings, f"eval_every_steps={warmup + steps_ + 1}"]
    if config.checkpoint_every_steps <= warmup + steps_:  # checkpoint_cost.py times saves
        settings = [*settings, f"checkpoint_every_steps={warmup + steps_ + 1}"]
    bare = make_bare(load(spec, settings), warmup, steps_)
    ours, theirs = [], []
    for repeat in range(repeats):
        # Alternate which goes first, so a trend in the machine's load falls on both.
        if repeat % 2:
            theirs.append(bare())
        ours.append(jaxtrain_seconds_per_step(load(spec, settings), warmup, steps_))
        if not repeat % 2:
            theirs.append(bare())
        print(
            f"repeat {repeat}: jaxtrain {ours[-1]:.4f} s/step, bare loop {theirs[-1]:.4f} "
            f"s/step (load average {load_average()})",
            flush=True,
        )
    a, b = statistics.median(ours), statistics.median(theirs)
    # Each repeat's pair ran back to back, under much the same load: their ratio is the
    # steadier figure on a shared machine.
    paired = statistics.median(t / o for o, t in zip(ours, theirs, strict=True))
    device = jax.devices()[0]
    print(
        f"{spec} {' '.join(settings)} on {jax.device_count()} {device.platform} device(s), "
        f"batch {config.global_batch_size}: median jaxtrain {a:.4f} s/step, bare {b:.4f} "
        f"s/step: jaxtrain's throughput is {b / a:.3f}x the bare loop's (median of the "
        f"repeats' ratios {paired:.3f}x)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="gpt_pysource.py")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=25)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--set", action="append", default=[], help="dotted.key=literal")
    args = parser.parse_args()
    main(args.config, args.repeats, args.warmup, args.steps, args.set)
