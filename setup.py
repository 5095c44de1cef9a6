"""jaxtrain: a sharded JAX training framework (Flax NNX, Optax, Orbax, TFDS, grain)."""

import setuptools

setuptools.setup(
    name="jaxtrain",
    version="0.1.0",
    description="Sharded JAX training: Flax NNX models, jax.jit over a device mesh, Orbax, TFDS.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    # The bundled configs live at the top of the checkout (configs/) and install as the
    # package jaxtrain.configs, so `--config=gpt_pysource.py` works from any install.
    packages=[*setuptools.find_packages(include=["jaxtrain", "jaxtrain.*"]), "jaxtrain.configs"],
    package_dir={"jaxtrain.configs": "configs"},
    install_requires=[
        # jax 0.10.2 is the newest release for Python 3.11; 0.11+ need Python 3.12.
        "jax>=0.10.2",
        # nnx.view sets train and eval mode (Flax's documented way) from 0.12.4.
        "flax>=0.12.4",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        # Orbax's array store; checkpoint.py reads its index to vet a step before restoring.
        "tensorstore>=0.1.70",
        "etils[epath]>=1.7",
        "tensorflow-datasets>=4.9.10",
        "grain>=0.2.18",
        "ml-collections>=1.1.0",
        "absl-py>=2.1",
        "numpy>=1.26",
        # tfds needs these at run time without TensorFlow: pillow decodes images,
        # importlib_resources backs its resource lookups on Python 3.11.
        "pillow>=10.0",
        "importlib_resources>=6.0",
        # Ships the 8x8 handwritten digits used by the bundled `digits` data set.
        "scikit-learn>=1.3",
        # TensorBoard event files without TensorFlow.
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        # `jaxtrain plot`: curves drawn on an Agg canvas (no display needed).
        "matplotlib>=3.8",
        # jax.export's serialization (`jaxtrain export`); jax does not require it itself.
        "flatbuffers>=24.3",
        # The energy estimate (DIR/energy.json): measures CPU, RAM and NVIDIA GPU power
        # offline; jaxtrain/energy.py.
        "codecarbon>=3.0",
        # jax's compilation cache needs it to evict old entries (config.compilation_cache).
        "filelock>=3.12",
    ],
    extras_require={
        "test": [
            "pytest>=8.0",
            "portpicker>=1.6",
            "ruff>=0.6",
            # libtpu: `jaxtrain plan` compiles with the real TPU compiler on this CPU host
            # (tests/test_tpu_plan.py). A 213 MB wheel, x86-64 Linux only; JAX_PLATFORMS=cpu
            # keeps every other test on the CPU.
            "jax[tpu]>=0.10.2; sys_platform == 'linux' and platform_machine == 'x86_64'",
            # The notebooks run in a real Jupyter kernel (tests/test_notebook.py).
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            # W&B logging is tested offline; `wandb leet inspect` reads its run log (0.31).
            "wandb>=0.31",
            # `jaxtrain sweep` is tested (tests/test_sweep.py).
            "optuna>=5.0",
        ],
        # `jaxtrain sweep` (jaxtrain/sweep.py): the study, its samplers and pruners, and a
        # journal storage several machines share; imported only by that command.
        "sweep": ["optuna>=5.0"],
        # Weights & Biases logging (config.logging.wandb), imported only when enabled.
        "wandb": ["wandb>=0.19"],
        "gpu": ["jax[cuda13]>=0.10.2"],
        "tpu": ["jax[tpu]>=0.10.2"],
    },
    entry_points={"console_scripts": ["jaxtrain=jaxtrain.cli:run"]},
)
