#!/usr/bin/env bash
# The wheels the GPU machine lacks for benchmarks/accelerator.py, into .whl/ (git-ignored),
# for its Python 3.12 on x86-64 Linux; then their total size (the machine takes at most
# 64 MiB with the working tree).
#
#   bash benchmarks/accelerator_wheels.sh
#
# The GPU machine (the `device` tool: one H100 or H200, no network) has jax 0.11.2 with
# CUDA 13, flax, optax, orbax-checkpoint, tensorstore, numpy, absl-py, etils, protobuf,
# pyarrow, psutil, requests, tqdm, wrapt, pyyaml, six, attrs... but none of what is below:
# jaxtrain imports grain and tensorflow-datasets (jaxtrain/data/pipeline.py),
# ml-collections (configs) and tensorboardX (the run's event file), and these need the rest.
# codecarbon is left out: every run of the benchmark sets energy.device_watts.
#
# The one command, run there from the checkout (the tool's `run` with carry=[".whl"]):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site && PYTHONUNBUFFERED=1 python3 benchmarks/accelerator.py --out $OUT --trace
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

# Compiled: one wheel per package for CPython 3.12, whichever manylinux tag each ships.
binary=(grain==0.2.18 array-record==0.8.6 dm-tree==0.1.10)
# Pure Python. The versions are those the CPU test environment runs jaxtrain with.
pure=(
  tensorflow-datasets==4.9.10 # and its needs the machine lacks:
  tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0 immutabledict==4.3.1
  simple-parsing==0.1.9 docstring-parser==0.18.0 termcolor==3.3.0 toml==0.10.2
  importlib-resources==7.1.0 # tfds imports it lazily for some resource paths
  portpicker==1.6.0          # grain's
  ml-collections==1.1.0
  tensorboardX==2.6.5
)
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1 manylinux_2_24 \
  manylinux_2_31 manylinux_2_34 manylinux_2_35; do
  platforms+=(--platform "${tag}_x86_64")
done

rm -rf .whl && mkdir .whl
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl "${binary[@]}"
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
  "${pure[@]}"
# Published as a source archive only (pure Python): built into a wheel here.
"$python" -m pip wheel -q --no-deps --no-binary=promise -w .whl promise==2.3
# jaxtrain itself, built from this checkout: a bare source tree has no jaxtrain.configs
# (setup.py installs configs/ as that package), so the machine runs the installed wheel;
# the benchmark records whether its sources match the checkout's.
"$python" -m pip wheel -q --no-deps -w .whl .

ls -1 .whl
echo "total: $(du -cb .whl/*.whl | tail -1 | cut -f1) bytes in $(ls .whl/*.whl | wc -l) wheels"
