#!/usr/bin/env bash
# Trains with jaxtrain on every host of a Cloud TPU VM pod slice (v4-32, v5p-64, v6e-32, ...).
#
# Usage, from the repository root on a workstation where gcloud is set up:
#
#   scripts/launch_tpu_pod.sh TPU_NAME ZONE --config=configs/gpt_pysource.py \
#       --workdir=/mnt/shared/runs/gpt --config.data.data_dir=/mnt/shared/tfds
#
# Everything after ZONE goes to `jaxtrain train` unchanged. The script
#   1. copies the committed tree of this checkout (`git archive HEAD`) to ~/jaxtrain on
#      every worker;
#   2. runs one command on all workers at once (`--worker=all`): a Python 3.12 virtual
#      environment made with uv (the TPU VM images ship Python 3.10; jaxtrain needs 3.11+),
#      `pip install -e ".[tpu]"`, then `jaxtrain train "$@"`.
# No process flags are needed: jax reads the worker list, this worker's index and the
# coordinator (worker 0) from the TPU VM metadata server, and jaxtrain starts
# jax.distributed when that list has more than one worker.
#
# --workdir and --config.data.data_dir must name storage that every worker mounts at the
# same path (Filestore over NFS, or a GCS bucket through gcsfuse): each process writes its
# shards of every checkpoint there, and process 0 writes the metrics and builds a bundled
# data set on first use for all processes to read.
#
# The command ends when training ends on every worker; a worker that fails makes the
# others exit within a minute (see jaxtrain/distributed.py), so nothing is left running.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 2
fi
TPU_NAME=$1
ZONE=$2
shift 2
TRAIN_FLAGS=$(printf '%q ' "$@")  # quoted once more for the remote shell

ARCHIVE=$(mktemp -t jaxtrain.XXXXXX.tar.gz)
trap 'rm -f "$ARCHIVE"' EXIT
git archive --format=tar.gz -o "$ARCHIVE" HEAD
gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME":jaxtrain.tar.gz \
  --zone="$ZONE" --worker=all

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
set -euo pipefail
rm -rf ~/jaxtrain && mkdir ~/jaxtrain && tar -xzf ~/jaxtrain.tar.gz -C ~/jaxtrain
export PATH=\$HOME/.local/bin:\$PATH
command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
uv venv -q --allow-existing --python 3.12 ~/jaxtrain-venv
uv pip install -q --python ~/jaxtrain-venv/bin/python -e \"\$HOME/jaxtrain[tpu]\"
cd ~/jaxtrain && ~/jaxtrain-venv/bin/jaxtrain train $TRAIN_FLAGS
"
