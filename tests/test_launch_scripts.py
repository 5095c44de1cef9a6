"""The TPU pod and SLURM launch scripts, run with stubs for gcloud, uv, srun and jaxtrain.

No TPU or cluster here: each stub records the arguments it was given, and the TPU
script's remote command is run locally, as one worker would run it, in a fake home.
"""

import os
import shlex
import stat
import subprocess

from conftest import REPO

# Flags as a user would pass them, one with a space and one with a quote in it.
TRAIN_FLAGS = [
    "--config=configs/gpt_pysource.py",
    "--workdir=/mnt/shared/runs/my run",
    "--config.data.data_dir=/mnt/shared/tfds",
    "--config.logging.wandb_name=it's mine",
]

RECORD = 'for a in "$@"; do printf "%s\\0" "$a"; done >> "$RECORDS/$(basename "$0")"; '


def _stub(directory, name: str, body: str = "") -> None:
    """An executable `name` in `directory` that records its arguments, then runs `body`."""
    path = directory / name
    path.write_text(f"#!/bin/bash\n{RECORD}printf '\\n\\0' >> \"$RECORDS/{name}\"\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _calls(records, name: str) -> list[list[str]]:
    """The argument lists of every call of stub `name`."""
    path = records / name
    if not path.exists():
        return []
    calls, current = [], []
    for item in path.read_text().split("\0")[:-1]:
        if item == "\n":
            calls.append(current)
            current = []
        else:
            current.append(item)
    return calls


def test_tpu_pod_script_copies_the_tree_and_runs_the_same_command_on_every_worker(tmp_path):
    home, bin_dir, records = tmp_path / "home", tmp_path / "bin", tmp_path / "records"
    for d in (home, bin_dir, records):
        d.mkdir()
    # gcloud: scp lands the archive in the worker's home; ssh runs the command there.
    _stub(
        bin_dir,
        "gcloud",
        'if [[ "$4" == scp ]]; then cp "$5" "$HOME/jaxtrain.tar.gz"; fi\n'
        'for a in "$@"; do\n'
        '  if [[ "$a" == --command=* ]]; then bash -c "${a#--command=}" || exit; fi\n'
        "done",
    )
    (home / ".local" / "bin").mkdir(parents=True)
    # uv: `uv venv DIR` makes a venv whose jaxtrain is a recording stub.
    _stub(
        home / ".local" / "bin",
        "uv",
        'if [[ "$1" == venv ]]; then\n'
        '  mkdir -p "${@: -1}/bin" && cp "$STUBS/jaxtrain" "${@: -1}/bin/"\n'
        "fi",
    )
    _stub(bin_dir, "jaxtrain", 'echo "cwd $PWD"')
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(home),
        "RECORDS": str(records),
        "STUBS": str(bin_dir),
    }
    proc = subprocess.run(
        ["bash", "scripts/launch_tpu_pod.sh", "my-v5p-32", "us-east5-a", *TRAIN_FLAGS],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    scp, ssh = _calls(records, "gcloud")
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"]
    assert scp[5:] == ["my-v5p-32:jaxtrain.tar.gz", "--zone=us-east5-a", "--worker=all"]
    assert ssh[:6] == ["compute", "tpus", "tpu-vm", "ssh", "my-v5p-32", "--zone=us-east5-a"]
    assert "--worker=all" in ssh
    # The worker unpacked the committed tree, made a Python 3.12 venv with uv, installed
    # jaxtrain[tpu] into it, and ran `jaxtrain train` with the flags exactly as given.
    assert (home / "jaxtrain" / "setup.py").is_file()
    venv, install = _calls(records, "uv")
    assert venv[:4] == ["venv", "-q", "--allow-existing", "--python"] and venv[4] == "3.12"
    assert install[-1] == f"{home}/jaxtrain[tpu]" and "-e" in install
    assert _calls(records, "jaxtrain") == [["train", *TRAIN_FLAGS]]
    assert f"cwd {home}/jaxtrain" in proc.stdout


def test_tpu_pod_script_without_arguments_prints_its_usage():
    proc = subprocess.run(
        ["bash", "scripts/launch_tpu_pod.sh"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "Usage, from the repository root" in proc.stdout


def test_slurm_script_runs_one_srun_with_the_flags(tmp_path):
    bin_dir, records, submit = tmp_path / "bin", tmp_path / "records", tmp_path / "submit"
    for d in (bin_dir, records, submit / ".venv" / "bin"):
        d.mkdir(parents=True)
    _stub(bin_dir, "srun")
    (submit / ".venv" / "bin" / "activate").write_text(f"export PATH={bin_dir}:$PATH\n")
    env = {
        "PATH": "/usr/bin:/bin",
        "RECORDS": str(records),
        "SLURM_SUBMIT_DIR": str(submit),
    }
    script = os.path.join(REPO, "scripts", "launch_slurm.sbatch")
    proc = subprocess.run(
        ["bash", script, *TRAIN_FLAGS], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert _calls(records, "srun") == [["--kill-on-bad-exit=1", "jaxtrain", "train", *TRAIN_FLAGS]]
    with open(script, encoding="utf-8") as f:
        directives = [shlex.split(line)[1] for line in f if line.startswith("#SBATCH")]
    assert {"--ntasks-per-node=8", "--gpus-per-node=8"} <= set(directives)
