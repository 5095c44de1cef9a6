"""`train_and_evaluate(config, workdir, task=...)`: the training loop, in the order it runs.

    config -> task -> mesh -> model + optimizer (the state, abstract) -> data
           -> train step (traced) -> workdir -> XLA compiles the step in the background
           -> state (restored, or created already sharded) -> compiled step -> loop

Everything that can reject the request (config values, mesh, batch split, names, a
workdir another run holds, an incompatible checkpoint or config, a missing split) runs
before the first byte is written to the workdir.
"""

import contextlib
import json
import math
import os
import time
from concurrent import futures

import jax
import numpy as np
from absl import logging

from jaxtrain import (
    checkpoint,
    compilation_cache,
    data,
    energy,
    hardware,
    hlo,
    metrics,
    metrics_jsonl,
    nonfinite,
    optim,
    precision,
    profiling,
    sharding,
    steps,
)
from jaxtrain import config as config_lib
from jaxtrain import state as state_lib
from jaxtrain import tasks as tasks_lib
from jaxtrain import weights as weights_lib
from jaxtrain import workdir as workdir_lib
from jaxtrain.preemption import EvalAbandoned, StopWatcher


def train_and_evaluate(config, workdir: str, *, task=None, devices=None):
    """Trains and evaluates as `config` says, logging and checkpointing to `workdir`.

    Rerunning with the same workdir resumes from its latest checkpoint. SIGTERM and
    Ctrl-C stop the run cleanly at the next step boundary, after a checkpoint of it.

    Args:
      config: an ml_collections ConfigDict (see configs/ and `jaxtrain.load_config`).
      workdir: where config.json, metrics, TensorBoard files and checkpoints go.
      task: what to train (`jaxtrain.Task`); by default the task `config.task` names.
      devices: devices for the mesh; all devices by default.

    Returns:
      (state, metrics): the final TrainState (sharded over the mesh) and the final
      evaluation metrics plus the last logged training loss as `train_loss`.

    Raises:
      ConfigError: bad input (or another run holds the workdir); the workdir is unchanged.
      StorageError: the disk or file system failed; the last whole checkpoint is intact.
      Preempted: SIGTERM or Ctrl-C; a checkpoint of the step it stopped at has committed.
      NonFiniteError: a non-finite loss, gradient or update under config.nonfinite.
    """
    with contextlib.ExitStack() as run:
        stop = run.enter_context(StopWatcher())  # from here on a signal stops the run cleanly
        config_lib.validate(config)
        cache_dir = compilation_cache.enable(config.compilation_cache)  # before any compile
        task = task or tasks_lib.from_config(config)

        # --- Mesh: the devices, the logical-axis rules, how a global batch splits --------
        mesh, rules = sharding.mesh_and_rules(config, devices)

        # --- Model and optimizer: the train state's shapes and shardings, no memory yet ---
        tx, _ = optim.optimizer_and_schedule(
            config, task.optimizer, model=task.model, trainable=task.trainable
        )
        loss_scale = precision.loss_scale(config.precision, device=mesh.devices.flat[0])
        layout = state_lib.make_state_layout(
            task.model, tx, mesh, rules, trainable=task.trainable, loss_scale=loss_scale
        )

        # --- Data: examples, and the batch they make --------------------------------------
        train_data = data.as_dataset(task.data)
        eval_data = None if task.eval_data is None else data.as_dataset(task.eval_data)
        example = task.example or data.example_spec(train_data)
        batch_shardings = data.batch_shardings(example, mesh, rules, task.batch_axes)
        abstract_batch = data.abstract_batch(example, config.global_batch_size, batch_shardings)

        # --- One train step, traced before the workdir is touched -------------------------
        # A loss the step cannot take (a variable the model makes in __call__) is refused
        # here, with nothing written.
        run.enter_context(jax.set_mesh(mesh))
        run.enter_context(sharding.use_rules(rules))
        compile_start = time.perf_counter()
        lowered = steps.trace_train_step(
            steps.make_train_step(
                task.loss,
                layout,
                microbatches=config.microbatches,
                loss_scale=loss_scale,
            ),
            layout,
            abstract_batch,
        ).lower()
        trace_s = time.perf_counter() - compile_start

        # --- Workdir: this run's alone; a checkpoint there must be this run's -------------
        lock = run.enter_context(workdir_lib.WorkdirLock(workdir))
        stop.hold()  # a signal from here on stops the run before step 1, not inside Orbax
        resume_step = checkpoint.latest_compatible_step(
            workdir,
            layout.abstract_state,
            restart_if_all_damaged=config.checkpoint.restart_if_all_damaged,
        )
        config_dict = json.loads(config.to_json_best_effort())
        # Only what applies is recorded (and compared on resume): the chosen optimizer's
        # fields, and whether a task's own optimizer ran instead of optim.name's.
        config_dict["optim"] = optim.recorded_config(
            config_dict["optim"], task_optimizer=task.optimizer is not None
        )
        if resume_step is not None:
            workdir_lib.check_resume_config(
                checkpoint.saved_config(workdir, resume_step),
                config_dict,
                allow=config.checkpoint.allow_config_changes,
                step=resume_step,
            )
        lock.claim()  # the first write: everything that can refuse the run has passed
        workdir_lib.write_config(workdir, config_dict)
        meter = energy.EnergyMeter(config.energy, mesh.devices.flat)
        run.push(_closer(lambda: energy.finish(meter, workdir)))  # after the last save
        ckpt = checkpoint.Checkpointer(workdir, config.checkpoint)
        run.push(_closer(ckpt.close))  # waits for the last save; before the lock is freed
        train_iter = data.TrainIterator(
            train_data,
            global_batch_size=config.global_batch_size,
            seed=config.data.seed,
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
            read_threads=config.data.read_threads,
        )

        # --- The train step compiled in the background -----------------------------------
        # XLA compiles outside Python's lock: the state is restored or created meanwhile.
        compiler = run.enter_context(futures.ThreadPoolExecutor(1, "jaxtrain-compile"))
        compiling = compiler.submit(_timed, lowered.compile)

        # --- State: restored, or created directly in its sharded layout -------------------
        # restore() may fall back to an older step when this one fails to read or verify.
        restored = None if resume_step is None else ckpt.restore(resume_step, layout.abstract_state)
        if restored is None:
            state = state_lib.create_state(layout, config.seed)
        else:
            state, data_state = restored
            train_iter.set_state(data_state)
        start_step = int(state.step)

        # Batches are made ahead from here on, while the step compiles.
        batches = data.DevicePrefetcher(train_iter, batch_shardings, size=config.data.prefetch)
        run.push(_closer(batches.close))

        # --- The compiled train step; its memory and FLOPs known before step 1 ------------
        train_step, xla_s = compiling.result()  # raises what compiling raised
        compile_s = trace_s + xla_s  # tracing, lowering and XLA's compile (or cache load)
        eval_step = steps.jit_eval_step(
            steps.make_eval_step(task.evaluation(), layout), layout, abstract_batch
        )
        stats = hlo.compiled_stats(train_step)
        flops = steps.flops_per_device_step(
            task.flops_per_example, layout, config.global_batch_size, stats
        )
        _describe_run(config, task, layout, abstract_batch, stats, flops, start_step)
        metrics.console(
            f"train step compiled in {compile_s:.2f} s"
            + (f" (persistent compilation cache: {cache_dir})" if cache_dir else "")
        )

        # --- The loop ---------------------------------------------------------------------
        writer = metrics.MetricWriter(
            workdir, total_steps=config.num_train_steps, start_step=start_step, config=config_dict
        )
        run.push(_closer(writer.close))
        guard = nonfinite.NonFinitePolicy(config.nonfinite, workdir, ckpt, layout.abstract_state)
        reporter = StepReporter(config, task, writer, guard, flops[0], start_step, batches)
        reporter.log_once({"compile_time_s": compile_s})
        tracer = profiling.StepTracer(config.profile, workdir, start_step)
        run.push(_closer(tracer.stop))
        result: dict[str, float] = {}
        late = None  # (step, metrics on device, local batch) the host has not read yet
        meter.track()
        stop.start_loop()

        def evaluate_state(state):  # a signal abandons it between two batches
            return evaluate(eval_step, state, eval_data, batch_shardings, task, config, stop=stop)

        evaluate_state.num_batches = (
            None if eval_data is None else _eval_batch_count(eval_data, config, layout)
        )

        if eval_data is not None and _eval_was_abandoned(workdir, start_step):
            # The stopped run abandoned this step's evaluation (and saved the step without
            # it): evaluate it first, so that the eval curve has every point it asked for
            # and the last step's evaluation, the run's result, is not lost. The state is
            # only read: training goes on bitwise as if it had never stopped.
            metrics.console(f"step {start_step}: evaluating it again (abandoned when stopped)")
            eval_metrics = _evaluate_step(start_step, evaluate_state, state, writer)
            if eval_metrics is None:  # abandoned again: its checkpoint is there already
                raise stop.stop(start_step)
            result.update(eval_metrics)
            reporter.timer.reset(start_step)
        for step in range(start_step + 1, config.num_train_steps + 1):
            with tracer.step(step):  # annotated for profiles; traced as config.profile says
                state, step_metrics = train_step(state, next(batches))
            writer.advance()
            if late is not None:  # the device runs `step` now: read `step - 1`
                state = reporter.settle(*late, state)
            late = (step, step_metrics, batches.local)
            last = step == config.num_train_steps
            stopping = stop.reached(step) and not last  # last: just finish
            evaluate_now = eval_data is not None and (step % config.eval_every_steps == 0 or last)
            save_now = step % config.checkpoint_every_steps == 0 or last or stopping
            if not (evaluate_now or save_now):
                continue
            # Read this step now: its state passes the non-finite guard before it is
            # evaluated or saved, and its timing ends before evaluation starts.
            state, late = reporter.settle(*late, state), None
            eval_metrics = None
            if evaluate_now:
                # Stopping already: a whole-split evaluation could outlast the notice.
                skip = stop.signal_name if stopping else None
                eval_metrics = _evaluate_step(step, evaluate_state, state, writer, skip)
                if eval_metrics is None:  # abandoned on a signal: save this step, then stop
                    save_now = stopping = True
                else:
                    result.update(eval_metrics)
                reporter.timer.reset(step)
            if save_now:  # eval metrics, when this step has them, let retention keep the best
                ckpt.save(step, state, batches.state, config_dict, eval_metrics)
            if stopping:
                ckpt.wait_until_finished()  # committed, or its error, before Preempted
                raise stop.stop(step)
    result.update(reporter.last_train)
    return state, result


def _evaluate_step(step, evaluate_state, state, writer, skip=None):
    """Evaluates `step` and writes its metrics; None when a signal abandoned it, which is
    then recorded as abandoned (a console line and an `eval_abandoned` record), never as
    a result: no eval record for the step, and no best-checkpoint rank from its part.
    `skip`: a signal's name: the run stops at this step, abandon before the first batch."""
    try:
        if skip is not None:
            raise EvalAbandoned(0, evaluate_state.num_batches, skip)
        eval_metrics = evaluate_state(state)
    except EvalAbandoned as e:
        metrics.console(
            f"evaluation at step {step} abandoned after {e.done} of {e.total} batches "
            f"({e.signal_name}); saving step {step} without it, a rerun evaluates it first"
        )
        writer.write(step, "eval_abandoned", {"batches_done": e.done, "batches": e.total})
        return None
    writer.write(step, "eval", eval_metrics)
    _report_nonfinite_eval(step, eval_metrics)
    return eval_metrics


def _eval_was_abandoned(workdir: str, step: int) -> bool:
    """Whether `step`'s last evaluation record in metrics.jsonl says it was abandoned (the
    same answer on every process: process 0 reads the file, which is its own)."""
    if not step:
        return False
    abandoned = False
    if jax.process_index() == 0:
        try:
            records = metrics_jsonl.read_records(os.path.join(workdir, "metrics.jsonl"))
        except OSError:
            records = []  # no log to read: nothing known to be missing
        for record in records:  # the step's last evaluation record decides
            if record["step"] == step and record["split"] in ("eval", "eval_abandoned"):
                abandoned = record["split"] == "eval_abandoned"
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        abandoned = bool(multihost_utils.broadcast_one_to_all(np.int32(abandoned)))
    return abandoned


def _timed(function):
    """(function(), the seconds it took)."""
    start = time.perf_counter()
    return function(), time.perf_counter() - start


def _closer(close):
    """An ExitStack exit callback that runs `close`; an error it raises while another error
    is already on its way out is logged, never raised in its place: a full disk must be
    reported as the checkpoint that failed, not as whatever failed after it."""

    def exit_(exc_type, exc, traceback):
        try:
            close()
        except Exception as e:
            if exc is None:
                raise
            logging.warning("while stopping after %s: %s", exc_type.__name__, e)
        return False

    return exit_


def _report_nonfinite_eval(step: int, eval_metrics: dict) -> None:
    bad = {k: v for k, v in eval_metrics.items() if not math.isfinite(v)}
    if bad:
        shown = ", ".join(f"{k}={v}" for k, v in bad.items())
        metrics.console(
            f"step {step}: evaluation is not finite ({shown}); the training state passed "
            "the non-finite guard, so suspect the eval data or the model's eval mode"
        )


def evaluate(
    eval_step, state, examples, batch_shardings, task, config, *, stop=None, weights=None
) -> dict[str, float]:
    """The task's eval metrics over `examples` (or `config.eval_steps` batches of them), for
    each weight set of `state` (`jaxtrain.weights.evaluation_weights`).

    The trained weights' metrics keep the task's names ("loss"; a schedule-free optimizer's
    are of its evaluation parameters); those of the weights' moving average, when the run
    keeps one, are prefixed: "ema_loss".

    Args:
      eval_step: the compiled eval step (`jaxtrain.jit_eval_step`).
      state: the TrainState to evaluate.
      examples: the eval split (a grain MapDataset, `jaxtrain.data.as_dataset`).
      batch_shardings: the batch's shardings (`jaxtrain.data.batch_shardings`).
      task: the Task (its `summarize_eval`, if any, finishes each set's result).
      config: the run's config (`global_batch_size`, `eval_steps`).
      stop: a `jaxtrain.preemption.StopWatcher` (the loop's), asked before each batch;
        None: the evaluation always runs to its end.
      weights: "raw" or "ema": that weight set only; None: every set.

    Returns:
      {metric: mean over the evaluated examples}.

    Raises:
      EvalAbandoned: `stop` asked for a stop (a signal); nothing of the batches already
        evaluated is returned. Every process abandons at the same batch.
      ConfigError: `weights` names a set the state does not have.
    """
    sets = weights_lib.evaluation_weights(state.opt_state, state.params)
    sets = weights_lib.choose(sets, weights)
    per_set = _eval_batch_count(examples, config)
    result = {}
    for i, (name, params) in enumerate(sets.items()):
        done = (i * per_set, len(sets) * per_set)  # batches before this set's, of them all
        means = _evaluate_weights(
            eval_step, params, state.model_state, examples, batch_shardings, config, stop, done
        )
        means = task.summarize_eval(means) if task.summarize_eval else means
        result.update({weights_lib.metric_name(name, k): v for k, v in means.items()})
    return result


def _evaluate_weights(
    eval_step, params, model_state, examples, batch_shardings, config, stop, done
) -> dict[str, float]:
    """`evaluate` of one weight set; `done`: (batches evaluated before it, batches in all),
    for the count an abandoned evaluation reports."""
    mask_sharding = data.example_sharding(batch_shardings)
    before, num_batches = done
    totals = previous = None
    for index, (local, mask) in enumerate(
        data.eval_batches(
            examples,
            global_batch_size=config.global_batch_size,
            max_batches=config.eval_steps,
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
        )
    ):
        signal_name = stop.abandon_eval() if stop is not None else None
        if signal_name is not None:
            raise EvalAbandoned(before + index, num_batches, signal_name)
        sums = eval_step(
            params,
            model_state,
            data.to_global(local, batch_shardings),
            data.to_global(mask, mask_sharding),
            np.int32(index),
        )
        totals = steps.add(totals, sums)
        if stop is not None:
            # At most two batches queued on the device: unbounded, the host would dispatch
            # the whole split ahead, and a stop could not save before the device had run
            # it all (the save's copy of the state waits behind them).
            if previous is not None:
                jax.block_until_ready(previous)
            previous = totals
    return steps.eval_means(jax.device_get(totals))


def _eval_batch_count(examples, config, layout=None) -> int:
    """Batches one weight set's evaluation reads; with `layout`, all its sets' together."""
    count = data.eval_batch_count(len(examples), config.global_batch_size, config.eval_steps)
    if layout is None:
        return count
    abstract = layout.abstract_state
    sets = jax.eval_shape(weights_lib.evaluation_weights, abstract.opt_state, abstract.params)
    return count * len(sets)


class StepReporter:
    """Reads a step's metrics once the device has moved on to the next step.

    `settle` runs the non-finite guard on the step (which may raise or roll the state
    back) and logs it when it is a log step, with its timing, throughput, MFU, the share
    of the interval spent waiting for input and the devices' peak memory (where the
    backend reports it).
    """

    def __init__(self, config, task, writer, guard, flops_per_device, start_step, batches):
        self.timer = metrics.StepTimer(start_step, lambda: batches.wait_seconds)
        self.last_train: dict[str, float] = {}
        self._once: dict[str, float] = {}
        self._config, self._writer, self._guard = config, writer, guard
        self._examples = config.global_batch_size
        self._tokens = config.global_batch_size * (task.tokens_per_example or 0)
        peak = hardware.peak_flops(jax.devices()[0])
        self._flops_per_peak = flops_per_device / peak if peak and flops_per_device else None

    def log_once(self, scalars: dict[str, float]) -> None:
        """Adds `scalars` to the next train record only (compile time, ...)."""
        self._once.update(scalars)

    def settle(self, step: int, step_metrics, local_batch, state):
        """Returns the state to continue from after `step`'s metrics are read."""
        fetched = jax.device_get(step_metrics)
        if step % self._config.log_every_steps == 0 or step == self._config.num_train_steps:
            scalars = {k: float(v) for k, v in fetched.items() if k not in steps.GUARD_METRICS}
            timing = self.timer.measure(step)
            if timing:
                seconds = timing["step_time_s"]
                scalars.update(timing)
                scalars["examples_per_s"] = self._examples / seconds
                if self._tokens:
                    scalars["tokens_per_s"] = self._tokens / seconds
                if self._flops_per_peak:
                    scalars["mfu"] = self._flops_per_peak / seconds
            peak = metrics.peak_memory_bytes(jax.local_devices())
            if peak is not None:
                scalars["peak_memory_gib"] = peak / 2**30
            scalars.update(self._once)
            self._once = {}
            self._writer.write(step, "train", scalars)
            self.last_train = {"train_loss": scalars["loss"]}
        return self._guard.check(step, fetched, local_batch, state)


def _describe_run(config, task, layout, abstract_batch, stats, flops, start_step) -> None:
    """Prints what will run: sizes, layout, per-device memory and FLOPs of the step."""
    mesh = layout.mesh
    shapes = jax.tree.map(lambda x: tuple(x.shape), abstract_batch)
    lines = [
        f"model {task.name}: {layout.num_parameters:,} parameters | "
        f"mesh {dict(mesh.shape)} on {mesh.devices.size} {mesh.devices.flat[0].platform} devices"
        + (f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""),
        f"global batch {config.global_batch_size} {shapes} | steps {start_step} -> "
        f"{config.num_train_steps}" + (f" (resumed at {start_step})" if start_step else ""),
    ]
    # Both counts, labelled; MFU divides the first (model FLOPs when the task gives them).
    flops_per_device, source = flops
    counted = []
    if source == "model":
        counted.append(f"{metrics.human(flops_per_device)} model (MFU's numerator)")
    if "flops_per_step" in stats:
        numerator = "; MFU's numerator" if source == "XLA" else ""
        counted.append(
            f"{metrics.human(stats['flops_per_step'])} XLA (compiled step, every loop trip "
            f"counted{numerator})"
        )
    if counted:
        lines.append(f"train step FLOPs per device: {' | '.join(counted)}")
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
