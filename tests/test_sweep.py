"""`jaxtrain sweep`: its space and every bad input (in this process), then real studies of
`jaxtrain sweep` processes: two workers sharing one journal, a worker killed with kill -9
and the rerun that resumes its trial, a bad trial pruned."""

import csv
import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import CONFIGS, read_metrics
from test_launch_scripts import _calls, _stub

from jaxtrain import cli, sweep

DIGITS = os.path.join(CONFIGS, "digits_cnn.py") + ":smoke"
JAXTRAIN = os.path.join(os.path.dirname(sys.executable), "jaxtrain")
optuna = pytest.importorskip("optuna")


# --- The space ------------------------------------------------------------------------------


def test_each_kind_of_distribution_parses():
    assert sweep.parse_param("optim.lr", "loguniform(1e-4, 1e-2)") == {
        "field": "optim.lr",
        "kind": "loguniform",
        "low": 1e-4,
        "high": 1e-2,
    }
    assert sweep.parse_param("a", "uniform(0,1)")["kind"] == "uniform"
    assert sweep.parse_param("a", "int(2,6)") == {"field": "a", "kind": "int", "low": 2, "high": 6}
    assert sweep.parse_param("a", "[0, 0.01, true, 'x']")["choices"] == [0, 0.01, True, "x"]
    assert sweep.parse_param("a", [1, 2])["choices"] == [1, 2]  # a list in a YAML/JSON file


def test_space_files_and_flags_read_in_order(tmp_path):
    (tmp_path / "space.yaml").write_text(
        "space:\n  optim.lr: loguniform(1e-4,1e-2)\n  optim.weight_decay: [0, 0.01]\n"
        "pruner: {name: median, n_startup_trials: 1}\n"
    )
    (tmp_path / "space.json").write_text(json.dumps({"model.hidden_dim": "int(32,64)"}))
    (tmp_path / "space.py").write_text("def get_space():\n    return {'seed': [0, 1]}\n")
    params, pruner = sweep.read_space(
        [str(tmp_path / "space.yaml"), str(tmp_path / "space.json"), str(tmp_path / "space.py")]
        + ["optim.b1=[0.9,0.95]"]
    )
    fields = ["optim.lr", "optim.weight_decay", "model.hidden_dim", "seed", "optim.b1"]
    assert [p["field"] for p in params] == fields
    assert pruner == {"name": "median", "n_startup_trials": 1}
    grid = sweep.grid_points(
        [sweep.parse_param("a", "[1,2]"), sweep.parse_param("b", "int(0,2)")]
    )  # the first field varies slowest
    assert grid == [{"a": a, "b": b} for a in (1, 2) for b in (0, 1, 2)]


def test_the_follower_reads_whole_new_lines_and_a_rewritten_log_anew(tmp_path):
    path = tmp_path / "metrics.jsonl"
    follower = sweep._Follower(str(path))
    assert follower.new_records() == []  # no log yet
    path.write_text('{"step": 2, "split": "eval", "loss": 1.5}\n{"step": 4, "spl')
    assert follower.new_records() == [{"step": 2, "split": "eval", "loss": 1.5}]
    with open(path, "a") as f:
        f.write('it": "eval", "loss": "NaN"}\nnot json\n')
    [record] = follower.new_records()  # the line cut short, now whole; damage skipped
    assert record["step"] == 4 and record["loss"] != record["loss"]
    assert follower.new_records() == []
    # A resumed run's start rewrites the log in one rename (metrics_jsonl.resume_log).
    (tmp_path / "new").write_text('{"step": 2, "split": "eval", "loss": 1.5}\n')
    os.replace(tmp_path / "new", path)
    assert follower.new_records() == [{"step": 2, "split": "eval", "loss": 1.5}]


def test_pruners_by_name_with_their_arguments():
    assert isinstance(sweep.make_pruner(None), optuna.pruners.NopPruner)
    median = sweep.make_pruner({"name": "median", "n_startup_trials": 2})
    assert isinstance(median, optuna.pruners.MedianPruner) and median._n_startup_trials == 2
    hyperband = sweep.make_pruner({"name": "hyperband", "min_resource": 4})
    assert isinstance(hyperband, optuna.pruners.HyperbandPruner)


# --- Bad input: one line, exit 2, nothing written --------------------------------------------


def _sweep_cli(workdir, *flags):
    return cli.main(["jaxtrain", "sweep", f"--config={DIGITS}", f"--workdir={workdir}", *flags])


BAD = [
    (["--space=optim.lrr=loguniform(1e-4,1e-2)", "--trials=2"], "unknown field 'optim.lrr'"),
    (["--space=optim.lrr=[1]", "--trials=2"], "did you mean 'optim.lr'"),
    (["--space=optim=[1]", "--trials=2"], "'optim' (a group of fields)"),
    (["--space=optim.lr=uniform(0.1,0.1)", "--trials=2"], "empty range"),
    (["--space=optim.lr=uniform(0.2,0.1)", "--trials=2"], "empty range"),
    (["--space=optim.lr=loguniform(0,1)", "--trials=2"], "loguniform needs LO > 0"),
    (["--space=optim.lr=logunif(1,2)", "--trials=2"], "not a distribution"),
    (["--space=optim.lr=uniform(1)", "--trials=2"], "takes two numbers"),
    (["--space=optim.lr=[]", "--trials=2"], "an empty list of choices"),
    (["--space=optim.lr=[0.1,0.1]", "--trials=2"], "listed twice"),
    (
        ["--space=optim.warmup_steps=uniform(0,5)", "--trials=2"],
        "range does not fit the field, a int",
    ),
    (["--space=optim.warmup_steps=[1.5]", "--trials=2"], "1.5 does not fit the field"),
    (["--space=optim.warmup_steps=int(-5,5)", "--trials=2"], "optim.warmup_steps=-5"),
    (["--space=optim.lr=[0.1,-1]", "--trials=2"], "optim.lr=-1"),
    (["--space=optim.lr=uniform(0.1,0.2)", "--sampler=grid"], "give a list"),
    (["--space=optim.lr=uniform(0.1,0.2)"], "--trials=N is required"),
    (["--space=optim.lr=[0.1,0.2]", "--sampler=grid", "--trials=3"], "only 2 points"),
    (["--space=optim.lr=[0.1]", "--trials=0"], "not a positive number"),
    (["--space=optim.lr=[0.1]", "--trials=1", "--sampler=bayes"], "--sampler='bayes'"),
    (["--space=optim.lr=[0.1]", "--trials=1", "--pruner=early"], "pruner 'early'"),
    (["--space=optim.lr=[0.1]", "--trials=1", "--mode=lowest"], "--mode='lowest'"),
    (["--space=optim.lr=[0.1]", "--trials=1", "--config.optim.lr=0.2"], "both swept and fixed"),
    (["--space=optim.lr=[0.1]", "--trials=1", "--config.optim.lrr=0.2"], "unknown config key"),
    (["--space=nosuchfile.yaml", "--trials=1"], "no such file"),
    (["--trials=1"], "--space=FIELD=SPEC or --space=FILE is required"),
]


@pytest.mark.parametrize("flags,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_line_and_writes_nothing(flags, message, tmp_path, capsys):
    workdir = tmp_path / "sweep"
    assert _sweep_cli(workdir, *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxtrain: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not workdir.exists()


def test_bad_pruner_arguments_in_a_space_file(tmp_path, capsys):
    (tmp_path / "space.yaml").write_text(
        "space: {optim.lr: [0.1]}\npruner: {name: median, n_startup_trial: 1}\n"
    )
    assert _sweep_cli(tmp_path / "sweep", f"--space={tmp_path / 'space.yaml'}", "--trials=1") == 2
    err = capsys.readouterr().err
    assert "pruner 'median'" in err and "n_startup_trial" in err and err.count("\n") == 1
    assert not (tmp_path / "sweep").exists()


def _listing(directory):
    return {
        path: open(os.path.join(root, path), "rb").read()
        for root, _, names in os.walk(directory)
        for path in names
    }


def test_a_study_of_another_config_or_space_is_refused_untouched(tmp_path, capsys):
    from conftest import load_config

    workdir = tmp_path / "sweep"
    config = load_config("digits_cnn", "smoke")
    made = sweep.make_sweep(config, DIGITS, [], ["optim.lr=[0.1,0.2]"], str(workdir), trials=2)
    sweep.open_study(made)
    before = _listing(workdir)
    assert (workdir / "study.journal").exists()

    assert _sweep_cli(workdir, "--space=optim.lr=[0.1,0.2]", "--trials=2", "--config.seed=1") == 2
    err = capsys.readouterr().err
    assert "holds a sweep of another config (seed: 0 there, 1 here)" in err, err
    assert _sweep_cli(workdir, "--space=optim.lr=[0.1,0.3]", "--trials=2") == 2
    err = capsys.readouterr().err
    assert "holds a sweep of another space (optim.lr=[0.1, 0.2] there)" in err, err
    assert err.count("\n") == 1
    assert _sweep_cli(workdir, "--space=optim.lr=[0.1,0.2]", "--trials=2", "--mode=max") == 2
    assert 'holds a sweep of another mode ("min" there)' in capsys.readouterr().err
    assert _listing(workdir) == before
    # The same sweep is accepted (the rerun a worker makes), N may grow, and a worker
    # elsewhere may read its data from another directory, on another mesh.
    assert sweep.make_sweep(config, DIGITS, [], ["optim.lr=[0.1,0.2]"], str(workdir), trials=3)
    config.data.data_dir, config.mesh.data = "/elsewhere/tfds", 4
    assert sweep.make_sweep(config, DIGITS, [], ["optim.lr=[0.1,0.2]"], str(workdir), trials=2)
    assert _listing(workdir) == before


def test_a_run_directory_is_not_a_sweep(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert _sweep_cli(tmp_path, "--space=optim.lr=[0.1]", "--trials=1") == 2
    assert "is a run directory, not a sweep's" in capsys.readouterr().err


def test_without_optuna_one_line_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError
    assert _sweep_cli(tmp_path / "s", "--space=optim.lr=[0.1]", "--trials=1") == 2
    err = capsys.readouterr().err
    assert err == 'jaxtrain: error: jaxtrain sweep needs optuna: pip install "jaxtrain[sweep]"\n'
    assert not (tmp_path / "s").exists()


# --- Real studies -----------------------------------------------------------------------------


def _command(workdir, data_dir, *flags):
    return [
        JAXTRAIN,
        "sweep",
        f"--config={DIGITS}",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        "--sampler=grid",
        *flags,
    ]


def _trials(workdir):
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(workdir / "study.journal"))
    )
    return optuna.load_study(study_name=sweep.STUDY_NAME, storage=storage).get_trials()


def _table(workdir):
    with open(workdir / "sweep.csv", newline="") as f:
        return list(csv.DictReader(f))


def _runs_started(trial_dir):
    """How many `jaxtrain train` runs started in a trial directory, by its log."""
    with open(trial_dir / "train.log", encoding="utf-8") as f:
        return sum(" | steps " in line for line in f)


@pytest.mark.slow
def test_two_workers_share_one_study_each_trial_run_once(data_dir, tmp_path):
    workdir = tmp_path / "sweep"
    lrs = [0.001, 0.002, 0.003, 0.004]
    command = _command(workdir, data_dir, f"--space=optim.lr={lrs}", "--trials=4")
    workers = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [w.communicate(timeout=600) for w in workers]
    for worker, (out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err[-3000:]
        assert "jaxtrain sweep: trial" in out  # each worker ran at least one trial
    trials = _trials(workdir)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert sorted(t.params["optim.lr"] for t in trials) == lrs
    for t in trials:
        assert _runs_started(workdir / "trials" / str(t.number)) == 1
        assert max(read_metrics(workdir / "trials" / str(t.number))) == 4
    rows = _table(workdir)
    assert len(rows) == 4 and sorted(float(r["optim.lr"]) for r in rows) == lrs
    assert {r["state"] for r in rows} == {"COMPLETE"} and {r["step"] for r in rows} == {"4"}
    assert all(float(r["loss"]) == t.value for r, t in zip(rows, trials, strict=True))
    assert (workdir / "sweep.png").stat().st_size > 10_000
    assert "trial  state     optim.lr  loss" in outputs[0][0] + outputs[1][0]
    # A rerun keeps the finished trials: nothing runs again, the same table.
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "jaxtrain sweep: trial" not in rerun.stdout
    assert len(_trials(workdir)) == 4 and _table(workdir) == rows
    assert all(_runs_started(workdir / "trials" / str(t.number)) == 1 for t in trials)


def _is_locked(path):
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["kill -9", "SIGTERM"])
def test_a_stopped_workers_trial_is_retried_with_its_params_and_resumes(signum, data_dir, tmp_path):
    """kill -9: its run gets SIGTERM as its parent dies; SIGTERM (a preempted SLURM task):
    the worker passes it on, waits for the run's checkpoint and exits 75. Either way the
    trial is left RUNNING, and the rerun retries it."""
    workdir = tmp_path / "sweep"
    command = _command(
        workdir,
        data_dir,
        "--space=optim.lr=[0.003,0.001]",
        "--config.num_train_steps=400",
        "--config.checkpoint_every_steps=20",
        "--config.log_every_steps=5",
        "--config.eval_every_steps=200",
    )
    worker = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = workdir / "trials" / "0"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and worker.poll() is None:
            try:
                if max(read_metrics(first), default=0) >= 25:
                    break
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.01)
        worker.send_signal(signum)
        _, stderr = worker.communicate(timeout=120)
    finally:
        worker.kill()
    if signum == signal.SIGKILL:
        assert worker.returncode == -signal.SIGKILL
    else:
        assert worker.returncode == 75, stderr[-3000:]
        assert stderr.endswith("rerun the sweep to resume it\n") and "Traceback" not in stderr
        assert "jaxtrain: trial 0's run exited 75" in stderr
    # Its run checkpoints on SIGTERM and lets go of the workdir.
    deadline = time.monotonic() + 120
    while _is_locked(first / ".jaxtrain.lock") and time.monotonic() < deadline:
        time.sleep(0.1)
    [killed] = _trials(workdir)
    assert killed.state.name == "RUNNING"
    stopped_at = max(read_metrics(first))
    assert stopped_at < 400

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "trial 0's worker is gone: retrying it" in rerun.stdout
    original, retry, second = _trials(workdir)
    assert original.state.name == "FAIL" and retry.state.name == second.state.name == "COMPLETE"
    assert retry.params == original.params == {"optim.lr": 0.003}
    assert retry.system_attrs["retry_history"] == [0]
    assert second.params == {"optim.lr": 0.001}
    # The retry resumed the killed run in its directory, from its checkpoint: two runs,
    # the second from the step the first saved at SIGTERM, each step logged once.
    log = (first / "train.log").read_text()
    assert "preempted at step" in log and "(resumed at " in log
    preempted_at = int(log.split("preempted at step ")[1].split(" ")[0])
    assert log.count("(resumed at ") == 1 and f"(resumed at {preempted_at})" in log
    assert stopped_at <= preempted_at < 400
    assert _runs_started(first) == 2
    steps = sorted(read_metrics(first))  # read_metrics: no step logged twice
    assert set(range(5, 401, 5)) <= set(steps) and steps[-1] == 400
    assert not (workdir / "trials" / "1").exists()  # the retry has no directory of its own
    assert _runs_started(workdir / "trials" / "2") == 1
    rows = _table(workdir)
    assert [(r["trial"], r["state"], r["step"]) for r in rows] == [
        ("1", "COMPLETE", "400"),
        ("2", "COMPLETE", "400"),
    ]
    assert rows[0]["workdir"] == str(first)


@pytest.mark.slow
def test_a_bad_trial_is_pruned_and_its_run_stopped_early(data_dir, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(
        "space:\n  optim.lr: [0.003, 3.0]\n"
        "pruner: {name: median, n_startup_trials: 1, n_warmup_steps: 0}\n"
    )
    workdir = tmp_path / "sweep"
    command = _command(
        workdir,
        data_dir,
        f"--space={space}",
        "--config.num_train_steps=300",
        "--config.eval_every_steps=4",
        "--config.log_every_steps=4",
        "--config.checkpoint_every_steps=1000",
        "--config.optim.warmup_steps=0",
    )
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    good, bad = _trials(workdir)
    assert good.state.name == "COMPLETE" and bad.state.name == "PRUNED"
    assert max(read_metrics(workdir / "trials" / "0")) == 300
    assert max(read_metrics(workdir / "trials" / "1")) < 300  # stopped early, by SIGTERM
    assert "preempted at step" in (workdir / "trials" / "1" / "train.log").read_text()
    assert bad.intermediate_values[4] > good.intermediate_values[4]
    assert [r["state"] for r in _table(workdir)] == ["COMPLETE", "PRUNED"]


@pytest.mark.slow
def test_a_database_storage_holds_the_study(data_dir, tmp_path):
    workdir, url = tmp_path / "sweep", f"sqlite:///{tmp_path / 'study.db'}"
    command = _command(workdir, data_dir, "--space=optim.lr=[0.003]", f"--storage={url}")
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [trial] = optuna.load_study(study_name=sweep.STUDY_NAME, storage=url).get_trials()
    assert trial.state.name == "COMPLETE" and trial.params == {"optim.lr": 0.003}
    assert not (workdir / "study.journal").exists()
    assert [r["state"] for r in _table(workdir)] == ["COMPLETE"]
    before = _listing(tmp_path)
    command[command.index("--space=optim.lr=[0.003]")] = "--space=optim.lr=[0.001]"
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "holds a sweep of another space" in proc.stderr
    assert _listing(tmp_path) == before


# --- SLURM -----------------------------------------------------------------------------------


def test_slurm_array_script_runs_the_same_sweep_in_every_task(tmp_path):
    import shlex

    from conftest import REPO

    bin_dir, records, submit = tmp_path / "bin", tmp_path / "records", tmp_path / "submit"
    for d in (bin_dir, records, submit / ".venv" / "bin"):
        d.mkdir(parents=True)
    _stub(bin_dir, "srun", 'echo "task $SLURM_ARRAY_TASK_ID"')
    (submit / ".venv" / "bin" / "activate").write_text(f"export PATH={bin_dir}:$PATH\n")
    flags = ["--config=digits_cnn.py", "--space=optim.lr=loguniform(1e-4,1e-2)", "--trials=32"]
    flags += ["--workdir=/shared/sweeps/my sweep"]
    script = os.path.join(REPO, "scripts", "sweep_slurm.sbatch")
    for task in ("0", "1"):  # two tasks of the array: the same command
        env = {"PATH": "/usr/bin:/bin", "RECORDS": str(records), "SLURM_SUBMIT_DIR": str(submit)}
        proc = subprocess.run(
            ["bash", script, *flags],
            cwd=tmp_path,
            env={**env, "SLURM_ARRAY_TASK_ID": task},
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        assert f"task {task}" in proc.stdout
    assert _calls(records, "srun") == [["jaxtrain", "sweep", *flags]] * 2
    with open(script, encoding="utf-8") as f:
        directives = [shlex.split(line)[1] for line in f if line.startswith("#SBATCH")]
    assert any(d.startswith("--array=") for d in directives)
    assert {"--ntasks=1", "--gpus-per-task=1"} <= set(directives)
