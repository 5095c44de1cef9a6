"""The `jaxtrain` command: flags and subcommands. It holds no training logic.

    jaxtrain train --config=gpt_pysource.py[:arg] --workdir=DIR [--config.key=value ...]
    jaxtrain plan --config=gpt_pysource.py[:arg] --topology=v5p-64 [--json] [...]
    jaxtrain sample --workdir=DIR --prompt=TEXT [--max_new_tokens=N --temperature=T ...]
    jaxtrain eval --workdir=DIR [--split=NAME] [--step=N]
    jaxtrain plot DIR [DIR ...] [--metric=loss] --out=curves.png
    jaxtrain export --workdir=DIR --out=FILE [--step=N]
    jaxtrain sweep --config=FILE.py[:ARG] --space=FIELD=SPEC|FILE --trials=N --workdir=DIR
    jaxtrain lr-find --config=FILE.py[:ARG] --workdir=DIR [--min_lr=1e-6 --max_lr=1 --steps=200]

`main` dispatches to one function per command (COMMANDS). `train`, `plan`, `sweep` and
`lr-find` read a config (`--config` is a config file's path or the name of a bundled config,
configs/); `sample`, `eval` and `export` read a run directory (`jaxtrain.load_run`),
`plot` its metrics.

Exit status (see jaxtrain/errors.py): 0 done; 2 bad input (a missing config file, an
unknown or mistyped override, a mesh that does not fit the devices, a workdir another run
holds, ...: one line `jaxtrain: error: ...`, and the workdir untouched); 3 a non-finite
loss, gradient or update stopped the run (config.nonfinite); 65 a data set's files are
damaged (one line naming the file and what rebuilds it); 74 the disk or file system
failed (one line naming the path and the cause); 75 preempted (SIGTERM): a checkpoint of
the last step has committed, rerun the same command; 130 Ctrl-C, likewise.

A signal is handled from the command's first line (`run`), before jax, flax and orbax
are imported: this module imports only light ones at its top, and `jaxtrain/__init__.py`
imports nothing until a name is used. Every command then stops with one line and 75 (or
130) when a signal comes before it is done, `train` as `jaxtrain.preemption` describes.
"""

import collections
import difflib
import gc
import sys

from jaxtrain import preemption
from jaxtrain.errors import EXIT_BAD_INPUT, EXIT_DATA, EXIT_IO, ConfigError, DataError, StorageError

USAGE = """usage: jaxtrain train --config=FILE.py[:ARG] --workdir=DIR [--config.KEY=VALUE ...]
                      [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]
       jaxtrain plan --config=FILE.py[:ARG] --topology=NAME [--json] [--config.KEY=VALUE ...]
       jaxtrain sample --workdir=DIR [--prompt=TEXT] [--max_new_tokens=N] [--temperature=T]
                       [--top_k=K] [--seed=S] [--step=N] [--mesh=AXIS=SIZE,...]
                       [--weights=ema|raw]
       jaxtrain eval --workdir=DIR [--split=NAME] [--step=N] [--eval_steps=N] [--mesh=...]
                     [--weights=ema|raw]
       jaxtrain plot DIR [DIR ...] --out=FILE.png [--metric=NAME]
       jaxtrain export --workdir=DIR --out=FILE [--step=N] [--input_key=KEY]
                       [--platforms=cpu,cuda,tpu] [--mesh=...] [--weights=ema|raw]
       jaxtrain sweep --config=FILE.py[:ARG] --space=FIELD=SPEC|FILE [--space=...] --trials=N
                      --workdir=DIR [--sampler=grid|random|tpe] [--pruner=none|median|hyperband]
                      [--storage=URL] [--metric=loss --mode=min] [--config.KEY=VALUE ...]
       jaxtrain lr-find --config=FILE.py[:ARG] --workdir=DIR [--min_lr=LR] [--max_lr=LR]
                        [--steps=N] [--config.KEY=VALUE ...]

commands:
  train   train and evaluate; rerunning with the same --workdir resumes from its checkpoint
  plan    compile the train step for a topology that need not be attached (v5p-64, v5e-16,
          h100x8x4, cpu-8, ...): per-device memory and whether it fits, FLOPs per step,
          collectives; --json for machine-readable output
  sample  continue a UTF-8 prompt with a language-model run's checkpoint (KV cache)
  eval    evaluate a checkpoint on a data split; append the metrics to metrics.jsonl
  plot    train and eval curves of one or more runs on one figure (PNG)
  export  the model's inference function and weights as one jax.export file
  sweep   a hyperparameter search on optuna, each trial a `train` run under DIR/trials;
          workers running the same command on one DIR share the study (jaxtrain/sweep.py)
  lr-find the learning-rate range test: a short run whose lr rises exponentially, the loss
          against it (DIR/lr_find.png, .csv) and a suggested lr (jaxtrain/lr_find.py)
"""


def _error(message: str, status: int = EXIT_BAD_INPUT) -> int:
    # What a library made of the start-up handler's exception (a flag error, an ImportError
    # from an extension that was initialising) is not the user's error: say what came.
    signal_name = preemption.signal_seen()
    if signal_name is not None:
        raise preemption.Preempted(None, signal_name)
    # One write call: Orbax's and tensorstore's threads may still be writing to stderr, and
    # print() writes the text and its newline separately, so a line of theirs could land
    # between them.
    sys.stderr.flush()
    sys.stderr.write(f"jaxtrain: error: {' '.join(str(message).split())}\n")
    sys.stderr.flush()
    return status


def _flag_value(argv, name):
    for arg in argv:
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def _dotted_keys(config, prefix=""):
    for key, value in config.items():
        path = f"{prefix}{key}"
        yield path
        if hasattr(value, "items"):
            yield from _dotted_keys(value, f"{path}.")


def _diagnose(argv, error: Exception, base) -> str:
    """Turns a flag-parsing failure into one line that names what was wrong.

    `base` is the config as its file gave it, before the overrides in `argv`.
    """
    valid = set(_dotted_keys(base))
    for arg in argv:
        if arg.startswith("--config.") and "=" in arg:
            key = arg[len("--config.") :].split("=", 1)[0]
            if key not in valid:
                close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                return f"unknown config key {key!r} in {arg!r}{hint}"
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def main(argv: list[str]) -> int:
    """Runs the command line `argv` (argv[0] is the program name); returns the exit status."""
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(USAGE, file=sys.stderr if len(argv) < 2 else sys.stdout)
        return EXIT_BAD_INPUT if len(argv) < 2 else 0
    command, args = argv[1], argv[2:]
    if command not in COMMANDS:
        names = [repr(name) for name in COMMANDS]
        return _error(
            f"unknown command {command!r}; commands are {', '.join(names[:-1])} and {names[-1]}"
        )
    preemption.name_command(command)
    try:
        return COMMANDS[command](argv[0], args)
    except Exception as e:
        # The start-up handler raises `Preempted`; on its way out a library may have turned
        # it into something else (jaxlib's extension init makes it an ImportError).
        if isinstance(e, preemption.Preempted):
            signal_name = e.signal_name
        elif (signal_name := preemption.signal_seen()) is None:
            raise
        preemption.disarm()  # one line, even under a flood of signals
        if isinstance(e, preemption.Preempted) and (command == "train" or e.step is not None):
            stopped = e
        elif command == "train":
            stopped = preemption.Preempted(None, signal_name)
        else:  # a read-only command: nothing of a run to save or resume
            stopped = preemption.Preempted(None, signal_name, what=f"jaxtrain {command}")
        sys.stderr.write(f"jaxtrain: {stopped}\n")
        sys.stderr.flush()
        return stopped.exit_status


# --- train and plan: a config file and its --config.KEY=VALUE overrides -----------------


def _config_command(command: str, program: str, args: list[str]) -> int:
    """Parses `train`, `plan` and `sweep` flags (the config, its overrides) and runs it."""
    from jaxtrain.config import load_config

    spec = _flag_value(args, "config")
    if not spec:
        return _error("--config=FILE.py[:ARG] is required")
    if command in ("train", "sweep", "lr-find") and not _flag_value(args, "workdir"):
        return _error("--workdir=DIR is required")
    if command == "plan" and not _flag_value(args, "topology"):
        return _error("--topology=NAME is required (v5p-64, v5e-16, h100x8, h100x8x4, cpu-8, ...)")
    if command == "sweep":
        try:
            import optuna  # noqa: F401
        except ImportError:
            return _error('jaxtrain sweep needs optuna: pip install "jaxtrain[sweep]"')
    try:
        # Loaded once, as jaxtrain.load_config loads it (a bundled config's name, a file
        # that does not load, a get_config that returns no run config: one line each);
        # config_flags then applies the --config.KEY=VALUE overrides to it.
        base = load_config(spec)
    except ConfigError as e:
        return _error(e)
    args = [a for a in args if a != f"--config={spec}"]
    file_optim = base.optim.to_dict()  # before the overrides change `base` in place

    from absl import flags
    from ml_collections import config_flags

    flag_values = flags.FlagValues()
    command_line = [program, *args]
    # config_flags finds the --config.KEY overrides in `sys_argv`, not in what is parsed,
    # and defines a flag for each now: a key the config lacks fails here.
    try:
        config_flags.DEFINE_config_dict(
            "config",
            base,  # locked: an override changes a value, never which keys there are
            "Config file (get_config(arg)); override fields with --config.KEY=VALUE.",
            flag_values=flag_values,
            lock_config=True,
            sys_argv=command_line,
        )
    except Exception as e:
        return _error(_diagnose(args, e, base))
    if command == "train":
        flags.DEFINE_string(
            "workdir", None, "Run directory: config, metrics, checkpoints.", flag_values=flag_values
        )
        flags.DEFINE_string(
            "coordinator_address",
            None,
            "Multi-process runs where jax detects no cluster (TPU pods, SLURM and Open MPI "
            "need no flags): HOST:PORT of process 0, reachable from every process.",
            flag_values=flag_values,
        )
        flags.DEFINE_integer(
            "num_processes",
            None,
            "With --coordinator_address: how many processes the job has.",
            flag_values=flag_values,
        )
        flags.DEFINE_integer(
            "process_id",
            None,
            "With --coordinator_address: this process's index, 0 to num_processes - 1.",
            flag_values=flag_values,
        )
    elif command == "sweep":
        _sweep_flags(flags, flag_values)
    elif command == "lr-find":
        _lr_find_flags(flags, flag_values)
    else:
        flags.DEFINE_string(
            "topology",
            None,
            "Target, e.g. v5p-64, h100x8x4 (see jaxtrain/plan.py).",
            flag_values=flag_values,
        )
        flags.DEFINE_boolean("json", False, "Print the plan as JSON.", flag_values=flag_values)
    try:
        flag_values(command_line)
    except Exception as e:  # absl flag errors, unknown config keys, bad values
        return _error(_diagnose(args, e, base))
    try:
        from jaxtrain.checks import check_unused_optimizer_fields

        # An override of an optimizer's field that another optimizer's name makes moot.
        check_unused_optimizer_fields(flag_values.config.optim, file_optim, "--config overrides")
        if command == "sweep":
            return _sweep(flag_values, spec, [a for a in args if a.startswith("--config.")])
        if command == "lr-find":
            return _lr_find(flag_values)
        return _train(flag_values) if command == "train" else _plan(flag_values)
    except ConfigError as e:
        return _error(e)
    except DataError as e:  # a StorageError, but its own status
        return _error(e, EXIT_DATA)
    except StorageError as e:
        return _error(e, EXIT_IO)


def _train(flag_values) -> int:
    from jaxtrain.errors import EXIT_NONFINITE

    # Before anything slow: a signal until the run installs its own handling (in
    # train_and_evaluate) stops the command at once, with nothing to save (`main` says so).
    # The `jaxtrain` command installed this in its first line already (`run`).
    previous = preemption.stop_at_once_on_signals()
    try:
        from jaxtrain import distributed
        from jaxtrain.nonfinite import NonFiniteError
        from jaxtrain.train import train_and_evaluate

        preemption.check_signals()  # one that an import caught on its way out
        _freeze_imports()
        # First: jax sizes its backend to the whole job when the backend starts.
        if distributed.initialize(
            flag_values.coordinator_address, flag_values.num_processes, flag_values.process_id
        ):
            print(distributed.describe(), flush=True)  # each host's log says which it is
        try:
            train_and_evaluate(flag_values.config, flag_values.workdir)
        except NonFiniteError as e:
            return _error(e, EXIT_NONFINITE)
    finally:  # called from Python (tests, notebooks): put them back
        preemption.restore_signal_handlers(previous)
    return 0


def _freeze_imports() -> None:
    """In the command's own process, puts everything imported so far (jax, flax, orbax,
    ...: objects that live to the end) out of reach of Python's garbage collector.

    Tracing makes many short-lived objects, and each full collection would otherwise
    walk the libraries' ~180,000 objects again: about 0.3 s of a warm start of the main
    job (benchmarks/startup.py, BENCHMARKS.md). Not when called from Python (tests,
    notebooks): there it would also freeze whatever garbage the caller has not yet freed.
    """
    if _CONSOLE:
        gc.freeze()


def _plan(flag_values) -> int:
    # Nothing before this may start jax's backend: plan first sets the CPU device count.
    from jaxtrain import plan

    _freeze_imports()
    report = plan.make_plan(flag_values.config, flag_values.topology)
    print(plan.to_json(report) if flag_values.json else plan.format_plan(report))
    return 0


def _sweep_flags(flags, flag_values):
    flags.DEFINE_string("workdir", None, "The sweep's directory.", flag_values=flag_values)
    flags.DEFINE_multi_string(
        "space",
        [],
        "A swept field, FIELD=SPEC (uniform(LO,HI), loguniform(LO,HI), int(LO,HI), "
        "[A,B,...]), or a YAML, JSON or Python space file; repeat for more.",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "trials",
        None,
        "Trials in all workers together; grid: default all.",
        flag_values=flag_values,
    )
    flags.DEFINE_string("sampler", "tpe", "grid, random or tpe.", flag_values=flag_values)
    flags.DEFINE_string(
        "pruner",
        None,
        "none, median or hyperband; default: the space file's, or none.",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "storage",
        None,
        "An optuna database URL; default: DIR/study.journal.",
        flag_values=flag_values,
    )
    flags.DEFINE_string("metric", "loss", "The eval metric to optimize.", flag_values=flag_values)
    flags.DEFINE_string("mode", "min", "min or max.", flag_values=flag_values)


def _sweep(flag_values, spec: str, fixed: list[str]) -> int:
    from jaxtrain import sweep

    checked = sweep.make_sweep(  # every input, before anything is written
        flag_values.config,
        spec,
        fixed,
        flag_values.space,
        flag_values.workdir,
        trials=flag_values.trials,
        sampler=flag_values.sampler,
        pruner=flag_values.pruner,
        storage=flag_values.storage,
        metric=flag_values.metric,
        mode=flag_values.mode,
    )
    return sweep.run_worker(checked)


def _lr_find_flags(flags, flag_values):
    flags.DEFINE_string("workdir", None, "The range test's run directory.", flag_values=flag_values)
    flags.DEFINE_float("min_lr", 1e-6, "The first step's learning rate.", flag_values=flag_values)
    flags.DEFINE_float("max_lr", 1.0, "The last step's learning rate.", flag_values=flag_values)
    flags.DEFINE_integer("steps", 200, "Steps, one learning rate each.", flag_values=flag_values)


def _lr_find(flag_values) -> int:
    from jaxtrain import lr_find

    lr_find.check_range(flag_values.min_lr, flag_values.max_lr, flag_values.steps)
    _freeze_imports()
    result = lr_find.range_test(
        flag_values.config,
        flag_values.workdir,
        min_lr=flag_values.min_lr,
        max_lr=flag_values.max_lr,
        steps=flag_values.steps,
    )
    diverged = result["diverged_lr"]
    print(
        f"suggested lr: {result['suggested_lr']:.3g} (a tenth of the lowest loss's, "
        f"{result['min_loss_lr']:.3g}); steepest fall at {result['steepest_lr']:.3g}; "
        + (f"diverged from lr {diverged:.3g}" if diverged else "did not diverge (raise --max_lr)")
    )
    print(f"curve: {result['csv']}, {result['png']}")
    return 0


# --- sample, eval, plot, export: a run directory -------------------------------------------


# A namedtuple, not a dataclass: `dataclasses` (with `inspect`) would be a third of what
# the command imports before its signal handlers are in.
class _RunCommand(
    collections.namedtuple("_RunCommand", "define run required positional", defaults=((), False))
):
    """A command over run directories: its flags, then `run(flag_values, positional)`.

    Fields: `define(flags, flag_values)` declares the command's flags; `run(flag_values,
    positional args)` runs it and returns the exit status; `required`: the flags that
    must be given; `positional`: whether it takes positional arguments.

    Bad input (a flag, a run directory, an argument) is one line `jaxtrain: error: ...`
    and exit status 2.
    """

    def __call__(self, program: str, args: list[str]) -> int:
        from absl import flags

        flag_values = flags.FlagValues()
        self.define(flags, flag_values)
        try:
            rest = flag_values([program, *args])[1:]
        except Exception as e:  # unknown flags, values that do not convert
            return _error(str(e).splitlines()[0] if str(e) else type(e).__name__)
        if rest and not self.positional:
            return _error(f"unexpected argument {rest[0]!r}")
        for name in self.required:
            if getattr(flag_values, name) is None:
                return _error(f"--{name}=... is required")
        try:
            return self.run(flag_values, rest)
        except ConfigError as e:
            return _error(e)
        except DataError as e:  # a StorageError, but its own status
            return _error(e, EXIT_DATA)
        except StorageError as e:
            return _error(e, EXIT_IO)


def _run_flags(flags, flag_values):
    """The flags of the commands that load a run: --workdir, --step, --mesh."""
    flags.DEFINE_string("workdir", None, "The run directory.", flag_values=flag_values)
    flags.DEFINE_integer(
        "step", None, "Checkpoint step; default: the newest whole one.", flag_values=flag_values
    )
    flags.DEFINE_string(
        "mesh",
        None,
        "Mesh axis sizes replacing the run's config.mesh, e.g. data=-1 or fsdp=4,tensor=2.",
        flag_values=flag_values,
    )
    flags.DEFINE_enum(
        "weights",
        None,
        ["ema", "raw"],
        "ema: the weights' moving average (config.optim.ema_decay); raw: the trained weights. "
        "Default: sample and export use ema when the run keeps one, eval evaluates both.",
        flag_values=flag_values,
    )


def _mesh(value: str | None) -> dict[str, int] | None:
    """`fsdp=4,tensor=2` -> {"fsdp": 4, "tensor": 2}."""
    if value is None:
        return None
    try:
        return {k.strip(): int(v) for k, v in (part.split("=") for part in value.split(","))}
    except ValueError:
        raise ConfigError(
            f"--mesh={value!r} is not AXIS=SIZE[,AXIS=SIZE...], e.g. data=-1 or fsdp=4,tensor=2"
        ) from None


def _load(flag_values):
    from jaxtrain.runs import load_run

    return load_run(flag_values.workdir, flag_values.step, mesh=_mesh(flag_values.mesh))


def _load_weights(flag_values):
    """The run with the weights --weights names as its params (default: its EMA, if any)."""
    return _load(flag_values).with_weights(flag_values.weights)


def _sample_flags(flags, flag_values):
    _run_flags(flags, flag_values)
    flags.DEFINE_string("prompt", "", "Text to continue (UTF-8).", flag_values=flag_values)
    flags.DEFINE_integer(
        "max_new_tokens", 200, "Tokens (bytes) to generate.", flag_values=flag_values
    )
    flags.DEFINE_float(
        "temperature", 0.0, "0: the likeliest token (greedy); > 0: sample.", flag_values=flag_values
    )
    flags.DEFINE_integer(
        "top_k", 0, "Sample among the k likeliest tokens; 0: all.", flag_values=flag_values
    )
    flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=flag_values)


def _sample(flag_values, rest) -> int:
    from jaxtrain import sample

    text = sample.sample_text(
        _load_weights(flag_values),
        flag_values.prompt,
        max_new_tokens=flag_values.max_new_tokens,
        temperature=flag_values.temperature,
        top_k=flag_values.top_k,
        seed=flag_values.seed,
    )
    print(text)
    return 0


def _eval_flags(flags, flag_values):
    _run_flags(flags, flag_values)
    flags.DEFINE_string(
        "split",
        None,
        "Data split to evaluate (bundled tasks); default: config.data.eval_split.",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "eval_steps",
        None,
        "Global batches to evaluate, spread over the split; -1: all of it; "
        "default: config.eval_steps, as in training.",
        flag_values=flag_values,
    )


def _eval(flag_values, rest) -> int:
    from jaxtrain import metrics, runs
    from jaxtrain.checks import check_eval_steps

    if flag_values.eval_steps is not None:  # before the run loads: nothing else to wait for
        check_eval_steps(flag_values.eval_steps, "--eval_steps")
    run = _load(flag_values)
    split = runs.eval_split_name(run, flag_values.split)
    result = runs.evaluate_run(
        run, flag_values.split, flag_values.eval_steps, weights=flag_values.weights
    )
    record = metrics.append(flag_values.workdir, run.step, f"eval:{split}", result)
    print(metrics.format_record(record))
    return 0


def _plot_flags(flags, flag_values):
    flags.DEFINE_string("out", None, "The PNG file to write.", flag_values=flag_values)
    flags.DEFINE_string("metric", "loss", "The metric to plot.", flag_values=flag_values)


def _plot(flag_values, rest) -> int:
    from jaxtrain import plot

    if not rest:
        raise ConfigError("no run directories: jaxtrain plot DIR [DIR ...] --out=FILE.png")
    plot.plot_runs(rest, metric=flag_values.metric, out=flag_values.out)
    print(flag_values.out)
    return 0


def _export_flags(flags, flag_values):
    _run_flags(flags, flag_values)
    flags.DEFINE_string("out", None, "The file to write.", flag_values=flag_values)
    flags.DEFINE_string(
        "input_key", "inputs", "The example key the model takes.", flag_values=flag_values
    )
    flags.DEFINE_list(
        "platforms",
        None,
        "Platforms to export for (cpu, cuda, rocm, tpu); default: this machine's.",
        flag_values=flag_values,
    )


def _export(flag_values, rest) -> int:
    from jaxtrain import export

    # Checked before the run is loaded: a bad name costs nothing and writes nothing.
    platforms = export.check_platforms(flag_values.platforms or None)
    run = _load_weights(flag_values)
    exported = export.export_inference(run, input_key=flag_values.input_key, platforms=platforms)
    size = export.save(exported, flag_values.out)
    print(
        f"exported step {run.step} of {flag_values.workdir}: {export.describe(exported)} "
        f"to {flag_values.out} ({size:,} bytes)"
    )
    return 0


COMMANDS = {
    "train": lambda program, args: _config_command("train", program, args),
    "plan": lambda program, args: _config_command("plan", program, args),
    "sweep": lambda program, args: _config_command("sweep", program, args),
    "lr-find": lambda program, args: _config_command("lr-find", program, args),
    "sample": _RunCommand(_sample_flags, _sample, required=("workdir",)),
    "eval": _RunCommand(_eval_flags, _eval, required=("workdir",)),
    "plot": _RunCommand(_plot_flags, _plot, required=("out",), positional=True),
    "export": _RunCommand(_export_flags, _export, required=("workdir", "out")),
}


# True in the `jaxtrain` process itself, whose signal handlers stay ours to its end.
_CONSOLE = False


def _drop_closed_loop_noise(unraisable) -> None:
    """sys.unraisablehook: drops tensorstore's late callbacks into Orbax's closed loop, and
    a `Preempted` that the start-up handler raised inside a callback Python does not let
    exceptions out of (jax's gc callback, a `__del__`): its signal is remembered and acted
    on at the next check (`preemption.check_signals`, the run's `StopWatcher`).

    When a checkpoint write fails (a full disk), Orbax closes the event loop of the failed
    save while tensorstore is still finishing the save's other writes; each of them then
    reports `RuntimeError: Event loop is closed` as an unraisable exception, dozens of
    tracebacks after the one line that says what happened. Nothing is lost by dropping
    them: the failure itself is raised, reported and its checkpoint discarded. Anything
    else goes to Python's own hook.
    """
    if isinstance(unraisable.exc_value, preemption.Preempted):
        return
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == (
        "Event loop is closed"
    ):
        return
    sys.__unraisablehook__(unraisable)


def run() -> None:
    """Console-script entry point (`jaxtrain`, `python -m jaxtrain`)."""
    # First: from here on SIGTERM and Ctrl-C stop the command with one line and 75 / 130
    # (`main`). Only Python's own start-up and this module's light imports came before
    # (milliseconds: about 20 ms from exec on a 2-core CPU host, mostly the interpreter).
    preemption.stop_at_once_on_signals(exit_at_once=True)
    global _CONSOLE
    _CONSOLE = True
    sys.unraisablehook = _drop_closed_loop_noise
    try:
        try:
            status = main(sys.argv)
        finally:
            preemption.disarm()  # a signal from here on changes nothing: the command is done
    except preemption.Preempted as e:  # one that came after `main` had returned or failed
        sys.stderr.write(f"jaxtrain: {e}\n")
        status = e.exit_status
    preemption.ignore_signals_from_now_on()
    sys.exit(status)


if __name__ == "__main__":
    run()
