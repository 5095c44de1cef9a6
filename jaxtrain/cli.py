"""The `jaxtrain` command: flags and subcommands. It holds no training logic.

    jaxtrain train --config=gpt_pysource.py[:arg] --workdir=DIR [--config.key=value ...]
    jaxtrain plan --config=gpt_pysource.py[:arg] --topology=v5p-64 [--json] [...]

`--config` is a config file's path or the name of a bundled config (configs/).

Exit status (see jaxtrain/errors.py): 0 done; 2 bad input (a missing config file, an
unknown or mistyped override, a mesh that does not fit the devices, a workdir another run
holds, ...: one line `jaxtrain: error: ...`, and the workdir untouched); 3 a non-finite
loss, gradient or update stopped the run (config.nonfinite); 74 the disk or file system
failed (one line naming the path and the cause); 75 preempted (SIGTERM): a checkpoint of
the last step has committed, rerun the same command; 130 Ctrl-C, likewise.
"""

import difflib
import signal
import sys

from jaxtrain.config import config_path, load_config
from jaxtrain.errors import EXIT_BAD_INPUT, ConfigError

USAGE = """usage: jaxtrain train --config=FILE.py[:ARG] --workdir=DIR [--config.KEY=VALUE ...]
                      [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]
       jaxtrain plan --config=FILE.py[:ARG] --topology=NAME [--json] [--config.KEY=VALUE ...]

commands:
  train   train and evaluate; rerunning with the same --workdir resumes from its checkpoint
  plan    compile the train step for a topology that need not be attached (v5p-64, v5e-16,
          h100x8x4, cpu-8, ...): per-device memory and whether it fits, FLOPs per step,
          collectives; --json for machine-readable output
"""


def _error(message: str) -> int:
    print(f"jaxtrain: error: {' '.join(str(message).split())}", file=sys.stderr)
    return EXIT_BAD_INPUT


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


def _diagnose(argv, error: Exception) -> str:
    """Turns a flag-parsing failure into one line that names what was wrong."""
    spec = _flag_value(argv, "config")
    try:
        base = load_config(spec)
    except Exception as e:  # the file itself does not load
        return f"config file {spec.partition(':')[0]!r} failed to load: {type(e).__name__}: {e}"
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
    if command not in ("train", "plan"):
        return _error(f"unknown command {command!r}; commands are 'train' and 'plan'")

    spec = _flag_value(args, "config")
    if not spec:
        return _error("--config=FILE.py[:ARG] is required")
    try:  # a bundled config's name becomes its path, for config_flags
        resolved = config_path(spec) + spec[len(spec.partition(":")[0]) :]
    except ConfigError as e:
        return _error(e)
    args = [f"--config={resolved}" if a == f"--config={spec}" else a for a in args]
    if command == "train" and not _flag_value(args, "workdir"):
        return _error("--workdir=DIR is required")
    if command == "plan" and not _flag_value(args, "topology"):
        return _error("--topology=NAME is required (v5p-64, v5e-16, h100x8, h100x8x4, cpu-8, ...)")

    from absl import flags
    from ml_collections import config_flags

    flag_values = flags.FlagValues()
    command_line = [argv[0], *args]
    # config_flags finds the --config.KEY overrides in `sys_argv`, not in what is parsed.
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Config file (get_config(arg)); override fields with --config.KEY=VALUE.",
        flag_values=flag_values,
        lock_config=True,
        sys_argv=command_line,
    )
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
        return _error(_diagnose(args, e))

    from jaxtrain.errors import EXIT_IO, EXIT_NONFINITE, StorageError
    from jaxtrain.nonfinite import NonFiniteError
    from jaxtrain.preemption import Preempted, restore_signal_handlers, stop_at_once_on_signals

    try:
        if command == "train":
            # Before anything slow: a signal until the run installs its own handling (in
            # train_and_evaluate) stops the command at once, with nothing to save.
            previous = stop_at_once_on_signals()
            try:
                return _train(flag_values)
            except Preempted as e:
                print(f"jaxtrain: {e}", file=sys.stderr)
                return e.exit_status
            except NonFiniteError as e:
                print(f"jaxtrain: error: {e}", file=sys.stderr)
                return EXIT_NONFINITE
            except StorageError as e:
                print(f"jaxtrain: error: {' '.join(str(e).split())}", file=sys.stderr)
                return EXIT_IO
            finally:
                if _CONSOLE:
                    # Python resets its own handlers to the default (terminate) while the
                    # interpreter shuts down: only SIG_IGN keeps a late signal from turning
                    # the status into 143.
                    restore_signal_handlers(dict.fromkeys(previous, signal.SIG_IGN))
                else:  # called from Python (tests, notebooks): put them back
                    restore_signal_handlers(previous)
        else:
            # Nothing before this may start jax's backend: plan first sets the CPU device count.
            from jaxtrain import plan

            report = plan.make_plan(flag_values.config, flag_values.topology)
            print(plan.to_json(report) if flag_values.json else plan.format_plan(report))
    except ConfigError as e:
        return _error(e)
    return 0


def _train(flag_values) -> int:
    from jaxtrain import distributed
    from jaxtrain.train import train_and_evaluate

    # First: jax sizes its backend to the whole job when the backend starts.
    if distributed.initialize(
        flag_values.coordinator_address, flag_values.num_processes, flag_values.process_id
    ):
        print(distributed.describe(), flush=True)  # each host's log says which it is
    train_and_evaluate(flag_values.config, flag_values.workdir)
    return 0


# True in the `jaxtrain` process itself, whose signal handlers stay ours to its end.
_CONSOLE = False


def run() -> None:
    """Console-script entry point."""
    global _CONSOLE
    _CONSOLE = True
    sys.exit(main(sys.argv))


if __name__ == "__main__":
    run()
