"""`train_and_evaluate(config, workdir)`: the training loop, in the order it runs.

    config -> mesh -> model (abstract) + shardings -> checks -> data -> workdir
           -> state (restored or created already sharded) -> compiled steps -> loop

Everything that can reject the request (mesh, batch split, names, an incompatible
checkpoint, a missing split) runs before the first byte is written to the workdir.
"""

import json
import math
import os

import jax

from jaxtrain import checkpoint, data, metrics, nonfinite, sharding, steps
from jaxtrain.errors import ConfigError
from jaxtrain.preemption import Preempted, PreemptionWatcher
from jaxtrain.state import (
    Setup,
    compile_train_step,
    create_state,
    flops_per_device_step,
    jit_eval_step,
    make_setup,
)


def _check_config(config) -> None:
    for key in (
        "global_batch_size",
        "num_train_steps",
        "log_every_steps",
        "eval_every_steps",
        "checkpoint_every_steps",
        "microbatches",
    ):
        if config[key] <= 0:
            raise ConfigError(f"config.{key} must be positive, got {config[key]}")
    checkpoint.check_config(config.checkpoint)
    nonfinite.check_config(config.nonfinite)


def train_and_evaluate(config, workdir: str, *, devices=None) -> tuple[steps.TrainState, dict]:
    """Trains and evaluates as `config` says, logging and checkpointing to `workdir`.

    Rerunning with the same workdir resumes from its latest checkpoint.

    Args:
      config: an ml_collections ConfigDict (see configs/).
      workdir: where config.json, metrics, TensorBoard files and checkpoints go.
      devices: devices for the mesh; all devices by default (a subset is for tests and
        notebooks).

    Returns:
      (state, metrics): the final TrainState (sharded over the mesh) and the final
      evaluation metrics plus the last logged training loss as `train_loss`.

    Raises:
      ConfigError: bad input; nothing has been written to `workdir`.
      Preempted: SIGTERM arrived; a checkpoint of the step it stopped at has committed.
      NonFiniteError: a non-finite loss or gradient under config.nonfinite's policy.
    """
    _check_config(config)

    # --- Mesh and batch split ------------------------------------------------------------
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = tuple(tuple(rule) for rule in config.rules)
    sharding.check_batch_split(config.global_batch_size, config.microbatches, mesh, rules)
    if config.global_batch_size % jax.process_count():
        raise ConfigError(
            f"config.global_batch_size={config.global_batch_size} is not divisible "
            f"by the {jax.process_count()} processes"
        )
    local_batch_size = config.global_batch_size // jax.process_count()

    # --- The run, abstract: model, optimizer, shardings; no device memory yet ------------
    setup = make_setup(config, mesh)

    # --- Checks against the workdir and the data, still writing nothing -------------------
    resume_step = checkpoint.latest_compatible_step(workdir, setup.abstract_state)
    # An unknown data set name fails here, before anything is downloaded or built.
    train_examples = data.pipeline.make_examples(config.data, setup.task, config.data.train_split)
    eval_examples = data.pipeline.make_examples(config.data, setup.task, config.data.eval_split)

    # --- Workdir ------------------------------------------------------------------------
    config_dict = json.loads(config.to_json_best_effort())
    if jax.process_index() == 0:
        try:
            os.makedirs(workdir, exist_ok=True)
            with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
                json.dump(config_dict, f, indent=2)
        except OSError as e:
            raise ConfigError(f"cannot write workdir {workdir!r}: {e.strerror}") from e
    ckpt = checkpoint.Checkpointer(workdir, config.checkpoint)
    train_iter = data.make_train_iterator(
        train_examples,
        local_batch_size=local_batch_size,
        seed=config.data.seed,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )

    with jax.set_mesh(mesh), sharding.use_rules(rules):
        # --- State: restored, or created directly in its sharded layout ------------------
        if resume_step is not None:
            state, data_state = ckpt.restore(resume_step, setup.abstract_state)
            train_iter.set_state(data_state)
            # restore() may fall back to an older step when this one fails to read.
            metrics.truncate_metrics(workdir, int(state.step))
        else:
            state = create_state(setup, config.seed)
        start_step = int(state.step)

        # --- One compiled train step; memory and FLOPs known before step 1 ---------------
        train_step = compile_train_step(setup)
        eval_step = jit_eval_step(setup)
        step_stats = metrics.compiled_stats(train_step)
        flops_per_device, flops_source = flops_per_device_step(setup, mesh.devices.size, step_stats)
        _describe_run(config, mesh, setup, step_stats, flops_per_device, flops_source, start_step)

        def evaluate(params) -> dict[str, float]:
            totals = steps.zero_eval_totals()
            for local in data.eval_batches(
                eval_examples,
                global_batch_size=config.global_batch_size,
                max_batches=config.eval_steps,
                shard_index=jax.process_index(),
                shard_count=jax.process_count(),
            ):
                batch = jax.tree.map(
                    lambda x: jax.make_array_from_process_local_data(setup.batch_sharding, x),
                    local,
                )
                totals = eval_step(params, batch, totals)
            totals = jax.device_get(totals)
            loss = totals["loss_sum"] / totals["count"]
            result = {"loss": loss, "accuracy": totals["correct_sum"] / totals["count"]}
            if setup.task == "lm":
                result["perplexity"] = math.exp(min(loss, 50.0))
            return result

        # --- The loop ----------------------------------------------------------------------
        writer = metrics.MetricWriter(
            workdir, total_steps=config.num_train_steps, initial_step=start_step
        )
        batches = data.DevicePrefetcher(train_iter, setup.batch_sharding, size=config.data.prefetch)
        timer = metrics.Throughput(start_step)
        peak = metrics.peak_flops(mesh.devices.flat[0])
        examples_per_step = config.global_batch_size
        tokens_per_step = examples_per_step * (config.data.seq_len if setup.task == "lm" else 0)
        preemption = PreemptionWatcher()
        nonfinite_policy = nonfinite.NonFinitePolicy(
            config.nonfinite, workdir, ckpt, setup.abstract_state
        )
        previous = None  # (step, metrics, local batch): its finiteness is read one step late
        pending = None  # (step, metrics on device): fetched one step late, never blocking
        result: dict[str, float] = {}

        def flush_pending():
            nonlocal pending
            if pending is None:
                return
            logged_step, logged = pending
            pending = None
            scalars = {
                k: float(v)
                for k, v in jax.device_get(logged).items()
                if k not in ("finite", "first_nonfinite_leaf")
            }
            seconds = timer.measure(logged_step)
            if seconds:
                scalars["step_time_s"] = seconds
                scalars["examples_per_s"] = examples_per_step / seconds
                if tokens_per_step:
                    scalars["tokens_per_s"] = tokens_per_step / seconds
                if peak and flops_per_device:
                    scalars["mfu"] = flops_per_device / seconds / peak
            writer.write(logged_step, "train", scalars)
            result["train_loss"] = scalars["loss"]

        try:
            for step in range(start_step + 1, config.num_train_steps + 1):
                state, step_metrics = train_step(state, next(batches))
                writer.advance()
                flush_pending()  # the device is busy with `step` now; read `step - 1`
                if previous is not None:  # may raise, or roll the state back
                    state = nonfinite_policy.check(*previous, state)
                previous = (step, step_metrics, batches.local)
                last = step == config.num_train_steps
                if step % config.log_every_steps == 0 or last:
                    pending = (step, step_metrics)
                eval_metrics = None
                if step % config.eval_every_steps == 0 or last:
                    flush_pending()  # first, so the eval is not counted as step time
                    eval_metrics = evaluate(state.params)
                    writer.write(step, "eval", eval_metrics)
                    result.update(eval_metrics)
                    timer.reset(step)
                preempted = preemption.reached(step) and not last  # last: just finish
                if step % config.checkpoint_every_steps == 0 or last or preempted:
                    # Eval metrics (when this step has them) let retention keep the best.
                    ckpt.save(step, state, batches.state, config_dict, eval_metrics)
                if preempted:
                    flush_pending()
                    raise Preempted(step)  # `finally` waits for the save to commit
            flush_pending()
            if previous is not None:
                state = nonfinite_policy.check(*previous, state)
        finally:
            preemption.close()
            batches.close()
            writer.close()
            ckpt.close()
    return state, result


def _describe_run(config, mesh, setup: Setup, stats, flops, flops_source, start_step) -> None:
    """Prints what will run: sizes, layout, per-device memory and FLOPs of the step."""
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(setup.abstract_state.params))
    shapes = {k: tuple(v.shape) for k, v in setup.abstract_batch.items()}
    lines = [
        f"model {config.model.name}: {num_params:,} parameters | "
        f"mesh {dict(mesh.shape)} on {mesh.devices.size} {mesh.devices.flat[0].platform} devices"
        + (f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""),
        f"global batch {config.global_batch_size} {shapes} | steps {start_step} -> "
        f"{config.num_train_steps}" + (f" (resumed at {start_step})" if start_step else ""),
    ]
    if flops:
        xla = f" (XLA counts {metrics.human(stats['flops'])})" if flops_source == "model" else ""
        lines.append(
            f"train step: {metrics.human(flops)}FLOP per device, {flops_source} FLOPs{xla}"
        )
    if "temp_size_in_bytes" in stats:
        lines.append(
            "train step memory per device: "
            f"arguments {metrics.human(stats['argument_size_in_bytes'])}B, "
            f"temporaries {metrics.human(stats['temp_size_in_bytes'])}B, "
            f"outputs {metrics.human(stats['output_size_in_bytes'])}B "
            f"(aliased with donated inputs {metrics.human(stats.get('alias_size_in_bytes', 0))}B)"
        )
    for line in lines:
        metrics.console(line)
