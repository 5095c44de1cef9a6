"""Hyperparameter sweeps on optuna: each trial a normal `jaxtrain train` run under DIR.

    jaxtrain sweep --config=digits_cnn.py --workdir=sweeps/lr --trials=16 \
        --space='optim.lr=loguniform(1e-4,1e-2)' --space='optim.weight_decay=[0,0.01,0.1]'

The space: each swept field is a config field (dotted, as `--config.X` names it) and a
distribution: `uniform(LO,HI)`, `loguniform(LO,HI)` (LO > 0), `int(LO,HI)` (both ends
included) or a list of choices `[A,B,...]` (numbers, quoted strings, true/false). Given as
`--space=FIELD=SPEC` flags, or `--space=FILE`: YAML or JSON, `{FIELD: SPEC, ...}` or
`{space: {FIELD: SPEC}, pruner: NAME or {name: NAME, ARG: VALUE}}`, or a Python file whose
`get_space()` returns that mapping.

Layout of DIR: `study.journal` (optuna's JournalStorage, unless `--storage` names a
database), `trials/<n>/` (trial n's workdir, its `train.log` and `.sweep.lock`),
`sweep.csv` and `sweep.png` (the table and plot every worker writes when no trial is left).

Several workers (machines, a SLURM array) running the same command on the same DIR share
the study: trials are claimed one at a time under an flock on `DIR/.sweep.lock`, so
exactly N trials run between them (optuna's MaxTrialsCallback checks only after a trial
ends, so concurrent workers would overshoot N). A worker holds `trials/<n>/.sweep.lock`
while trial n runs; the OS frees it when the worker dies (kill -9 included), and its
`jaxtrain train` child gets SIGTERM (PR_SET_PDEATHSIG), so it checkpoints. The next
claim finds the RUNNING trial whose locks are free, fails it, and retries it with the same
params (optuna's RetryHeartbeatStaleTrialCallback) in the same trial directory, where the
run resumes from its checkpoint. Optuna's own heartbeat would do this detection, but in
optuna 5 only RDBStorage has one (JournalStorage is no BaseHeartbeat), and the lock works
for every storage and needs no clock.

N counts trials that ended: completed, pruned, or failed (a run that exits 2, 3 or 65
fails again if rerun, so it is not retried). A run that exits 74, 75 or 130 (its disk
failed, or it was signalled) stops the worker with that status and is retried by the next.
"""

import ast
import contextlib
import copy
import csv
import dataclasses
import fcntl
import io
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings

from jaxtrain import files, metrics_jsonl, preemption
from jaxtrain.errors import (
    EXIT_INTERRUPTED,
    EXIT_IO,
    EXIT_PREEMPTED,
    ConfigError,
    did_you_mean,
)

STUDY_NAME = "jaxtrain-sweep"
JOURNAL = "study.journal"
SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "hyperband")
_DISTRIBUTION = re.compile(r"^\s*(uniform|loguniform|int)\s*\((.*)\)\s*$")
_ATTR = "jaxtrain_sweep"  # the study's user attr: what it sweeps, to refuse another
# Config fields that say where and how a trial runs, not what it computes: workers on
# other machines may differ in them (a local data_dir, another GPU count's mesh).
_WHERE = ("data.data_dir", "data.prefetch", "data.read_threads", "mesh", "compilation_cache")
POLL_S = 0.5  # how often a worker reads its trial's metrics.jsonl


# --- The space ------------------------------------------------------------------------------


def parse_param(field: str, spec) -> dict:
    """One swept field: `{"field", "kind": uniform|loguniform|int|choice, "low", "high"}` or
    `{"field", "kind": "choice", "choices": [...]}`.

    Raises:
      ConfigError: a bad distribution, an empty or inverted range, an empty choice list.
    """
    where = f"--space {field}={_show(spec)}"
    if isinstance(spec, list | tuple):
        choices = list(spec)
    elif isinstance(spec, str) and spec.strip().startswith("["):
        try:
            choices = ast.literal_eval(re.sub(r"\b(true|false)\b", _capital, spec.strip()))
        except (ValueError, SyntaxError):
            raise ConfigError(
                f"{where}: not a list of numbers, quoted strings or booleans"
            ) from None
    elif isinstance(spec, str) and (match := _DISTRIBUTION.match(spec)):
        kind, inside = match.groups()
        try:
            bounds = ast.literal_eval(f"({inside},)")
        except (ValueError, SyntaxError):
            bounds = ()
        if len(bounds) != 2 or not all(_is_number(b) for b in bounds):
            raise ConfigError(f"{where}: {kind}(LO,HI) takes two numbers")
        low, high = bounds
        if kind == "int" and not all(isinstance(b, int) for b in bounds):
            raise ConfigError(f"{where}: int(LO,HI) takes two integers")
        if not low < high:
            raise ConfigError(f"{where}: empty range (LO must be below HI)")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"{where}: loguniform needs LO > 0")
        return {"field": field, "kind": kind, "low": low, "high": high}
    else:
        raise ConfigError(
            f"{where}: not a distribution; use uniform(LO,HI), loguniform(LO,HI), "
            "int(LO,HI) or [A,B,...]"
        )
    if not isinstance(choices, list) or not choices:
        raise ConfigError(f"{where}: an empty list of choices")
    if not all(c is None or isinstance(c, bool | int | float | str) for c in choices):
        raise ConfigError(f"{where}: choices are numbers, strings or booleans")
    if len({json.dumps(c) for c in choices}) != len(choices):
        raise ConfigError(f"{where}: a choice is listed twice")
    return {"field": field, "kind": "choice", "choices": choices}


def _capital(match):
    return match.group(1).capitalize()


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _show(spec) -> str:
    return spec if isinstance(spec, str) else json.dumps(spec)


def read_space(items: list[str]) -> tuple[list[dict], dict | None]:
    """The swept fields of `--space` flags (files or FIELD=SPEC), and a space file's pruner.

    Returns:
      (the params, in the order given; the pruner `{"name": ..., **kwargs}` or None).

    Raises:
      ConfigError: a file that is missing or does not parse, a field given twice, a bad spec.
    """
    params, pruner = [], None
    for item in items:
        if os.path.isfile(item):
            mapping, file_pruner = _read_space_file(item)
            pruner = file_pruner if file_pruner is not None else pruner
            entries = list(mapping.items())
        elif "=" in item and not item.startswith("="):
            entries = [tuple(s.strip() for s in item.split("=", 1))]
        else:
            raise ConfigError(f"--space={item!r}: no such file, and not FIELD=SPEC")
        for field, spec in entries:
            if any(p["field"] == field for p in params):
                raise ConfigError(f"--space: field {field!r} is given twice")
            params.append(parse_param(field, spec))
    if not params:
        raise ConfigError("--space=FIELD=SPEC or --space=FILE is required")
    return params, pruner


def _read_space_file(path: str) -> tuple[dict, dict | None]:
    try:
        if path.endswith(".py"):
            namespace = {"__file__": path}
            with open(path, encoding="utf-8") as f:
                exec(compile(f.read(), path, "exec"), namespace)
            if not callable(namespace.get("get_space")):
                raise ConfigError(f"space file {path!r} has no get_space() function")
            data = namespace["get_space"]()
        else:
            import yaml  # optuna requires PyYAML; JSON is YAML too

            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
    except ConfigError:
        raise
    except Exception as e:  # the user's file: its error, in a line
        raise ConfigError(f"space file {path!r} does not load: {type(e).__name__}: {e}") from e
    if isinstance(data, dict) and isinstance(data.get("space"), dict):
        unknown = set(data) - {"space", "pruner"}
        if unknown:
            raise ConfigError(f"space file {path!r}: unknown keys {sorted(unknown)}")
        pruner = data.get("pruner")
        if isinstance(pruner, str):
            pruner = {"name": pruner}
        if pruner is not None and not (isinstance(pruner, dict) and "name" in pruner):
            raise ConfigError(f"space file {path!r}: pruner is NAME or {{name: NAME, ...}}")
        return data["space"], pruner
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"space file {path!r}: not a mapping of FIELD: SPEC")
    return data, None


def check_space(params: list[dict], config, fixed: list[str]) -> None:
    """Checks that each swept field is a leaf of `config` whose type fits its distribution,
    and that every choice and each range's ends pass the run's config checks.

    Raises:
      ConfigError: an unknown field, a group, a type that does not fit, a value refused.
    """
    from jaxtrain.config import validate

    leaves = dict(_leaves(config))
    fixed_fields = {f[len("--config.") :].split("=", 1)[0] for f in fixed}
    for param in params:
        field = param["field"]
        if field not in leaves:
            groups = [k for k in _all_keys(config) if k not in leaves]
            what = "a group of fields" if field in groups else "not a config field"
            hint = "" if field in groups else did_you_mean(field, leaves)
            raise ConfigError(f"--space: unknown field {field!r} ({what}){hint}")
        if field in fixed_fields:
            raise ConfigError(f"--space: {field!r} is both swept and fixed by --config.{field}")
        current = leaves[field]
        if param["kind"] in ("uniform", "loguniform") and not isinstance(current, float):
            raise ConfigError(
                f"--space {field}: a {param['kind']} range does not fit the field, a "
                f"{type(current).__name__} ({current!r}); give int(LO,HI) or a list"
            )
        values = param["choices"] if param["kind"] == "choice" else [param["low"], param["high"]]
        for value in values:
            if not _fits(current, value):
                raise ConfigError(
                    f"--space {field}: {value!r} does not fit the field, a "
                    f"{type(current).__name__} ({current!r})"
                )
            trial_config = config.copy_and_resolve_references()
            _set(trial_config, field, value)
            try:
                validate(trial_config)
            except ConfigError as e:
                raise ConfigError(f"--space {field}={value!r}: {e}") from None


def _leaves(config, prefix=""):
    for key, value in config.items():
        if hasattr(value, "items"):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _all_keys(config, prefix=""):
    for key, value in config.items():
        yield f"{prefix}{key}"
        if hasattr(value, "items"):
            yield from _all_keys(value, f"{prefix}{key}.")


def _fits(current, value) -> bool:
    if isinstance(current, bool) or isinstance(value, bool):
        return isinstance(current, bool) and isinstance(value, bool)
    if isinstance(current, int):
        return isinstance(value, int)
    if isinstance(current, float):
        return _is_number(value)
    if isinstance(current, str):
        return isinstance(value, str)
    return False  # tuples, None: not sweepable as a flag value


def _set(config, field: str, value) -> None:
    *parents, leaf = field.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    node[leaf] = value


def grid_points(params: list[dict]) -> list[dict]:
    """Every combination of a grid space, the first field varying slowest.

    Raises:
      ConfigError: a continuous range (uniform, loguniform) has no grid.
    """
    axes = []
    for p in params:
        if p["kind"] in ("uniform", "loguniform"):
            raise ConfigError(f"--sampler=grid: {p['field']} is a {p['kind']} range; give a list")
        axes.append(p["choices"] if p["kind"] == "choice" else range(p["low"], p["high"] + 1))
    return [
        dict(zip([p["field"] for p in params], c, strict=True)) for c in itertools.product(*axes)
    ]


def _suggest(trial, param):
    field, kind = param["field"], param["kind"]
    if kind == "choice":
        return trial.suggest_categorical(field, param["choices"])
    if kind == "int":
        return trial.suggest_int(field, param["low"], param["high"])
    return trial.suggest_float(field, param["low"], param["high"], log=kind == "loguniform")


# --- The sweep -------------------------------------------------------------------------------


def make_pruner(spec: dict | None):
    """An optuna pruner from `{"name": none|median|hyperband, **its arguments}`."""
    import optuna

    spec = dict(spec or {"name": "none"})
    name = spec.pop("name")
    classes = {
        "none": optuna.pruners.NopPruner,
        "median": optuna.pruners.MedianPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
    }
    if name not in classes:
        raise ConfigError(f"pruner {name!r} is not one of {', '.join(PRUNERS)}")
    try:
        return classes[name](**spec)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"pruner {name!r}: {e}") from None


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A checked sweep: what `run_worker` runs. Build it with `make_sweep` (checks all)."""

    config_spec: str  # --config, passed to each trial's `jaxtrain train`
    fixed: list[str]  # the fixed --config.X=VALUE flags, passed on as given
    params: list[dict]  # the swept fields (`parse_param`), in order
    grid: list[dict] | None  # sampler grid: every point, in the order they run
    trials: int  # N: trials that end, all workers together
    sampler: str
    pruner: dict  # {"name": ..., **the pruner's arguments}
    storage: str | None  # a database URL; None: DIR/study.journal
    metric: str
    mode: str
    workdir: str
    identity: dict  # what the study records, to refuse another sweep's DIR


def make_sweep(
    config,
    config_spec: str,
    fixed: list[str],
    space: list[str],
    workdir: str,
    trials: int | None = None,
    sampler: str = "tpe",
    pruner: str | None = None,
    storage: str | None = None,
    metric: str = "loss",
    mode: str = "min",
) -> Sweep:
    """Checks a sweep's every input before anything is written.

    Args:
      config: the run config after the fixed `--config.X=...` overrides.
      config_spec: the `--config` value, passed to each trial's `jaxtrain train`.
      fixed: the fixed `--config.X=VALUE` flags, passed to each trial as given.
      space: the `--space` values (FIELD=SPEC or files).
      workdir: DIR.
      trials: N, trials that end; None: the grid's size (grid only).
      sampler, pruner, storage, metric, mode: as the command's flags.

    Raises:
      ConfigError: naming the first bad input; DIR is left as it was.
    """
    from jaxtrain.config import validate

    validate(config)
    params, file_pruner = read_space(space)
    check_space(params, config, fixed)
    if sampler not in SAMPLERS:
        raise ConfigError(f"--sampler={sampler!r} is not one of {', '.join(SAMPLERS)}")
    if mode not in ("min", "max"):
        raise ConfigError(f"--mode={mode!r} is not min or max")
    if not metric:
        raise ConfigError("--metric is empty")
    grid = grid_points(params) if sampler == "grid" else None
    if trials is None and grid is None:
        raise ConfigError("--trials=N is required (except for --sampler=grid)")
    trials = len(grid) if trials is None else trials
    if trials < 1:
        raise ConfigError(f"--trials={trials}: not a positive number")
    if grid is not None and trials > len(grid):
        raise ConfigError(f"--trials={trials}: the grid has only {len(grid)} points")
    pruner_spec = {"name": pruner} if pruner is not None else (file_pruner or {"name": "none"})
    make_pruner(pruner_spec)  # checks its name and arguments
    identity = {
        "config": json.loads(config.to_json_best_effort()),
        "space": params,
        "sampler": sampler,
        "pruner": pruner_spec,
        "metric": metric,
        "mode": mode,
    }
    sweep = Sweep(
        config_spec=config_spec,
        fixed=list(fixed),
        params=params,
        grid=grid,
        trials=trials,
        sampler=sampler,
        pruner=pruner_spec,
        storage=storage,
        metric=metric,
        mode=mode,
        workdir=workdir,
        identity=identity,
    )
    _check_workdir(sweep)
    return sweep


def _check_workdir(sweep: Sweep) -> None:
    workdir = sweep.workdir
    if os.path.lexists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir={workdir!r} is not a directory")
    if os.path.exists(os.path.join(workdir, "config.json")):
        raise ConfigError(f"--workdir={workdir!r} is a run directory, not a sweep's")
    journal = os.path.join(workdir, JOURNAL)
    if sweep.storage is None and not os.path.exists(journal):
        return  # a new study: nothing to compare (opening a database URL would write)
    claim_lock = os.path.join(workdir, ".sweep.lock")
    # Under the lock the first worker makes the study with (an instant there is a study
    # without its description); it exists already wherever a study does: no file is made.
    with _flock(claim_lock) if os.path.exists(claim_lock) else contextlib.nullcontext():
        study = _load_study(sweep, _storage(sweep))
        if study is not None:
            _check_same_study(sweep, study)


def _check_same_study(sweep: Sweep, study) -> None:
    from jaxtrain.workdir import config_changes

    saved = study.user_attrs.get(_ATTR)
    where = f"--workdir={sweep.workdir!r} holds a sweep"
    if saved is None:
        raise ConfigError(
            f"--workdir={sweep.workdir!r} holds an optuna study {STUDY_NAME!r} that "
            "jaxtrain sweep did not make; use another --workdir"
        )
    changes = [
        change
        for change in config_changes(saved["config"], sweep.identity["config"])
        if not change[0].startswith(_WHERE)
    ]
    if changes:
        key, old, new = changes[0]
        raise ConfigError(
            f"{where} of another config ({key}: {old!r} there, {new!r} here); use another --workdir"
        )
    for key in ("space", "sampler", "pruner", "metric", "mode"):
        if json.dumps(saved[key], sort_keys=True) != json.dumps(
            sweep.identity[key], sort_keys=True
        ):
            raise ConfigError(
                f"{where} of another {key} ({_describe(key, saved[key])}); use another --workdir"
            )


def _describe(key, value) -> str:
    """What the study in DIR has, as the flags that made it."""
    if key != "space":
        return f"{json.dumps(value)} there"
    specs = [
        f"{p['field']}={json.dumps(p['choices'])}"
        if p["kind"] == "choice"
        else f"{p['field']}={p['kind']}({p['low']},{p['high']})"
        for p in value
    ]
    return f"{' '.join(specs)} there"


def _storage(sweep: Sweep):
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    if sweep.storage is not None:
        try:
            return optuna.storages.RDBStorage(sweep.storage)
        except Exception as e:
            raise ConfigError(f"--storage={sweep.storage!r}: {type(e).__name__}: {e}") from None
    path = os.path.join(sweep.workdir, JOURNAL)
    # A lock file made with O_EXCL: atomic on NFS (v3 and later) and on file systems
    # without symbolic links; optuna's default, a symlink lock, needs those.
    return optuna.storages.JournalStorage(JournalFileBackend(path, JournalFileOpenLock(path)))


def _load_study(sweep: Sweep, storage):
    import optuna

    try:
        return optuna.load_study(
            study_name=STUDY_NAME,
            storage=storage,
            sampler=_sampler(sweep),
            pruner=make_pruner(sweep.pruner),
        )
    except KeyError:
        return None


def _sampler(sweep: Sweep):
    import optuna

    # Grid points are enqueued one by one in their order (`_claim`); the sampler never
    # sees them, since enqueued params are fixed.
    if sweep.sampler == "tpe":
        # constant_liar: trials running elsewhere count as bad results, so concurrent
        # workers are not all sent to the same corner of the space (optuna's advice for
        # distributed TPE).
        return optuna.samplers.TPESampler(constant_liar=True)
    return optuna.samplers.RandomSampler()


@contextlib.contextmanager
def _flock(path: str, blocking: bool = True):
    """An exclusive flock on `path` (created), or None when it is held and not `blocking`."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield None
            return
        yield fd
    finally:
        os.close(fd)


def _is_free(path: str) -> bool:
    if not os.path.exists(path):
        return True
    with _flock(path, blocking=False) as fd:
        return fd is not None


def trial_dir_number(trial) -> int:
    """The trial whose directory a trial runs in: its own, or the one it retries."""
    first = trial.system_attrs.get("retry_history") or [trial.number]
    return first[0]


def _claim(sweep: Sweep, study):
    """Under DIR/.sweep.lock: retries trials whose worker died, then asks the next trial.

    Returns:
      (the optuna Trial, its directory, the open trial lock), or None when N have ended
      or are running.
    """
    import optuna
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    for t in trials:
        if t.state == TrialState.RUNNING:
            directory = os.path.join(sweep.workdir, "trials", str(trial_dir_number(t)))
            lock, run_lock = (os.path.join(directory, n) for n in (".sweep.lock", ".jaxtrain.lock"))
            if _is_free(lock) and _is_free(run_lock):  # its worker and its run are gone
                study.tell(t.number, state=TrialState.FAIL)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    # A copy: the callback appends to the trial's retry history in place.
                    optuna.storages.RetryHeartbeatStaleTrialCallback()(study, copy.deepcopy(t))
                print(f"jaxtrain sweep: trial {t.number}'s worker is gone: retrying it", flush=True)
    trials = study.get_trials(deepcopy=False)
    live = _live(trials)
    if not any(t.state == TrialState.WAITING for t in live):
        if len(live) >= sweep.trials:
            return None
        if sweep.grid is not None:
            index = len(
                {t.user_attrs["grid_index"] for t in trials if "grid_index" in t.user_attrs}
            )
            if index >= len(sweep.grid):
                return None
            study.enqueue_trial(sweep.grid[index], user_attrs={"grid_index": index})
    trial = study.ask()
    number = trial_dir_number(study.get_trials(deepcopy=False)[trial.number])
    directory = os.path.join(sweep.workdir, "trials", str(number))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise files.storage_error("create", directory, e) from e
    lock = _flock(os.path.join(directory, ".sweep.lock"))
    lock.__enter__()
    return trial, directory, lock


def _live(trials):
    """The trials that count: all but those a retry replaced."""
    replaced = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return [t for t in trials if t.number not in replaced]


def _die_with_parent():  # in the child, between fork and exec
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM when we die
    except (OSError, AttributeError):  # not Linux: a killed worker's run goes on alone
        pass


def _flag_value(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


class _Follower:
    """The records a growing `metrics.jsonl` gains, read from where the last call stopped
    (a long run's log is not read whole twice a second, on a shared file system too)."""

    def __init__(self, path: str):
        self.path, self.inode, self.offset, self.partial = path, None, 0, b""

    def new_records(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                inode = os.fstat(f.fileno()).st_ino
                if inode != self.inode:  # a run's start rewrites it in one rename: anew
                    self.inode, self.offset, self.partial = inode, 0, b""
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        records = []
        for line in lines:
            try:
                record = metrics_jsonl.decode_record(json.loads(line))
            except ValueError:  # damaged: the run sets it aside when it starts
                continue
            if record is not None:
                records.append(record)
        return records


def _evals(directory: str, metric: str) -> list[dict]:
    path = os.path.join(directory, "metrics.jsonl")
    try:
        records = metrics_jsonl.read_records(path)
    except FileNotFoundError:
        return []
    return [r for r in records if r["split"] == "eval" and metric in r]


class _Forward:
    """SIGTERM/SIGINT while a trial runs: passed to its run (which checkpoints), then the
    worker stops with the run's status, leaving the trial for a rerun to resume."""

    def __init__(self):
        self.proc, self.signal_name = None, None

    def __call__(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)
        elif self.proc is None:
            raise preemption.Preempted(None, self.signal_name, what="jaxtrain sweep")


def _run_trial(sweep: Sweep, trial, directory: str, forward: _Forward):
    """Runs trial's `jaxtrain train`, reporting each evaluation; returns (state, value)."""
    from optuna.trial import TrialState

    params = {p["field"]: _suggest(trial, p) for p in sweep.params}
    command = [
        sys.executable,
        "-m",
        "jaxtrain",
        "train",
        f"--config={sweep.config_spec}",
        f"--workdir={directory}",
        *sweep.fixed,
        *(f"--config.{k}={_flag_value(v)}" for k, v in params.items()),
    ]
    shown = " ".join(f"{k}={v}" for k, v in params.items())
    print(f"jaxtrain sweep: trial {trial.number} ({shown}) in {directory}", flush=True)
    log_path = os.path.join(directory, "train.log")
    try:
        log = open(log_path, "ab")
    except OSError as e:
        raise files.storage_error("open", log_path, e) from e
    with log:
        forward.proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
        )
        proc, reported, pruned = forward.proc, set(), False
        follower = _Follower(os.path.join(directory, "metrics.jsonl"))
        while True:
            done = proc.poll() is not None
            for record in follower.new_records():
                if record["split"] != "eval" or sweep.metric not in record:
                    continue
                if record["step"] in reported:
                    continue
                reported.add(record["step"])
                trial.report(record[sweep.metric], record["step"])
                if not pruned and trial.should_prune():
                    proc.send_signal(signal.SIGTERM)  # it checkpoints and exits 75
                    pruned = True
            if done:
                break
            time.sleep(POLL_S)
        forward.proc = None
    status = proc.returncode
    if pruned and status in (0, EXIT_PREEMPTED):
        return TrialState.PRUNED, None
    if forward.signal_name is not None or status in (EXIT_IO, EXIT_PREEMPTED, EXIT_INTERRUPTED):
        # Left RUNNING: the next claim retries it, and its run resumes from its checkpoint.
        if forward.signal_name is not None:  # the run had it too: stop as it would have
            status = EXIT_INTERRUPTED if forward.signal_name == "SIGINT" else EXIT_PREEMPTED
        raise _Stop(status, f"trial {trial.number}'s run exited {status} (see {log_path})")
    evals = _evals(directory, sweep.metric)
    if status != 0 or not evals:
        why = f"exited {status}" if status != 0 else f"logged no eval {sweep.metric!r}"
        print(f"jaxtrain sweep: trial {trial.number} failed: its run {why} (see {log_path})")
        trial.set_user_attr("exit_status", status)
        return TrialState.FAIL, None
    return TrialState.COMPLETE, evals[-1][sweep.metric]


class _Stop(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def open_study(sweep: Sweep):
    """The sweep's optuna study in its storage, made (with DIR) on the first worker's start.

    Raises:
      ConfigError: the storage holds a study of another sweep.
      StorageError: DIR cannot be made.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        os.makedirs(os.path.join(sweep.workdir, "trials"), exist_ok=True)
    except OSError as e:
        raise files.storage_error("create", sweep.workdir, e) from e
    with _flock(os.path.join(sweep.workdir, ".sweep.lock")):  # one worker makes it
        storage = _storage(sweep)
        study = _load_study(sweep, storage)
        if study is None:
            study = optuna.create_study(
                storage=storage,
                study_name=STUDY_NAME,
                sampler=_sampler(sweep),
                pruner=make_pruner(sweep.pruner),
                direction="minimize" if sweep.mode == "min" else "maximize",
            )
            study.set_user_attr(_ATTR, sweep.identity)
        else:
            _check_same_study(sweep, study)
    return study


def run_worker(sweep: Sweep) -> int:
    """Runs trials until N have ended or are running elsewhere, then writes the report.

    Returns:
      The exit status: 0, or the run's 74/75/130 that stopped this worker.
    """
    study = open_study(sweep)
    claim_lock = os.path.join(sweep.workdir, ".sweep.lock")
    forward = _Forward()
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            with _flock(claim_lock):
                claimed = _claim(sweep, study)
            if claimed is None:
                break
            trial, directory, lock = claimed
            try:
                state, value = _run_trial(sweep, trial, directory, forward)
                study.tell(trial, value, state=state)
            except _Stop as stop:
                sys.stderr.write(f"jaxtrain: {stop}; rerun the sweep to resume it\n")
                return stop.status
            finally:
                lock.__exit__(None, None, None)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    with _flock(claim_lock):  # one worker at a time writes the report's files
        rows = report(sweep, study)
    print(format_table(sweep, rows), flush=True)
    return 0


# --- The report ------------------------------------------------------------------------------


def report(sweep: Sweep, study) -> list[dict]:
    """Writes DIR/sweep.csv and DIR/sweep.png; returns the table's rows (one per live trial)."""
    rows = []
    for t in _live(study.get_trials()):
        directory = os.path.join(sweep.workdir, "trials", str(trial_dir_number(t)))
        value = t.value
        if value is None and t.intermediate_values:  # pruned: its last evaluation
            value = t.intermediate_values[max(t.intermediate_values)]
        try:
            steps = [r["step"] for r in metrics_jsonl.read_records(f"{directory}/metrics.jsonl")]
        except OSError:
            steps = []
        row = {"trial": t.number, "state": t.state.name}
        row.update({p["field"]: t.params.get(p["field"], "") for p in sweep.params})
        row.update({sweep.metric: "" if value is None else value, "step": max(steps, default="")})
        row["workdir"] = directory
        rows.append(row)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=_columns(sweep), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    for name, contents in (("sweep.csv", out.getvalue()), ("sweep.png", plot(sweep, rows))):
        path = os.path.join(sweep.workdir, name)
        try:
            files.write_atomically(path, contents)  # a reader never sees half a table
        except OSError as e:
            raise files.storage_error("write", path, e) from e
    return rows


def _columns(sweep: Sweep) -> list[str]:
    return ["trial", "state", *(p["field"] for p in sweep.params), sweep.metric, "step", "workdir"]


def format_table(sweep: Sweep, rows: list[dict]) -> str:
    """The rows as a text table, best first."""
    columns = _columns(sweep)
    done = [r for r in rows if r["state"] == "COMPLETE"]
    done.sort(key=lambda r: r[sweep.metric], reverse=sweep.mode == "max")
    ordered = done + [r for r in rows if r["state"] != "COMPLETE"]
    cells = [columns] + [[_cell(r[c]) for c in columns] for r in ordered]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _cell(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def plot(sweep: Sweep, rows: list[dict]) -> bytes:
    """The metric against each swept field, one panel each (matplotlib, Agg canvas): a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.0 * len(sweep.params), 3.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(sweep.params), squeeze=False)[0]
    for ax, param in zip(axes, sweep.params, strict=True):
        field = param["field"]
        for state, marker in (("COMPLETE", "o"), ("PRUNED", "x")):
            points = [r for r in rows if r["state"] == state and r[sweep.metric] != ""]
            if param["kind"] == "choice":
                labels = [json.dumps(c) for c in param["choices"]]
                xs = [labels.index(json.dumps(r[field])) for r in points]
                ax.set_xticks(range(len(labels)), labels)
            else:
                xs = [r[field] for r in points]
            ax.scatter(xs, [r[sweep.metric] for r in points], marker=marker, label=state.lower())
        if param["kind"] == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(field)
        ax.set_ylabel(sweep.metric)
        ax.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png")
    return png.getvalue()
