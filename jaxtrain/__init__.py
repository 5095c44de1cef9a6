"""jaxtrain: sharded, resumable JAX training for your own Flax NNX models.

Train a model, loss and data of your own through the same sharded, checkpointed loop as
the bundled tasks:

    import jaxtrain

    config = jaxtrain.load_config("gpt_pysource.py:smoke")  # a bundled config, or a path
    task = jaxtrain.Task(model=lambda rngs: MyNet(rngs=rngs), loss=my_loss, data=arrays)
    state, metrics = jaxtrain.train_and_evaluate(config, "runs/mine", task=task)

Or write your own loop from the pieces it is made of:

    mesh = jaxtrain.make_mesh({"fsdp": 4, "tensor": 2})
    layout = jaxtrain.make_state_layout(model_fn, optax.adamw(1e-3), mesh, rules)
    state = jaxtrain.create_state(layout, seed=0)                  # already sharded
    step = jaxtrain.compile_train_step(jaxtrain.make_train_step(my_loss, layout), layout, batch)
    checkpointer = jaxtrain.Checkpointer(workdir, config.checkpoint)

Read a finished (or running) run back, without writing to it:

    config, task, layout, state = jaxtrain.load_run("runs/mine")   # latest checkpoint
    model = jaxtrain.load_run("runs/gpt", step=200).model()         # the NNX model, eval mode

The input pipeline is `jaxtrain.data` (any examples -> checkpointable, per-process
batches); the command line is `jaxtrain train|plan|sample|eval|plot|export` (see
`jaxtrain.cli`), each command a thin layer over a module (`jaxtrain.sample`,
`jaxtrain.runs`, `jaxtrain.plot`, `jaxtrain.export`).
"""

import importlib

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (type checkers know it)

__version__ = "0.1.0"

__all__ = [
    "Checkpointer",
    "ConfigError",
    "Rules",
    "StateLayout",
    "Task",
    "TrainState",
    "compile_train_step",
    "create_state",
    "evaluate",
    "jit_eval_step",
    "latest_compatible_step",
    "load_config",
    "load_run",
    "make_eval_step",
    "make_mesh",
    "make_state_layout",
    "make_train_step",
    "per_example",
    "train_and_evaluate",
]

# Each public name is imported from its module on first use (PEP 562), not here: importing
# jax, flax and orbax takes seconds, and the `jaxtrain` command must install its signal
# handlers before that (a preemption notice in the first seconds is exit 75, not 143).
# Twenty lines, so no lazy-loading dependency (lazy_loader) for them.
_MODULE_OF = {
    "Checkpointer": "checkpoint",
    "latest_compatible_step": "checkpoint",
    "load_config": "config",
    "ConfigError": "errors",
    "load_run": "runs",
    "Rules": "sharding",
    "make_mesh": "sharding",
    "StateLayout": "state",
    "TrainState": "state",
    "create_state": "state",
    "make_state_layout": "state",
    "compile_train_step": "steps",
    "jit_eval_step": "steps",
    "make_eval_step": "steps",
    "make_train_step": "steps",
    "Task": "tasks",
    "per_example": "tasks",
    "evaluate": "train",
    "train_and_evaluate": "train",
}


def __getattr__(name: str):
    """A public name, or a submodule (`jaxtrain.data`), imported on first use."""
    if name in _MODULE_OF:
        value = getattr(importlib.import_module(f"jaxtrain.{_MODULE_OF[name]}"), name)
        globals()[name] = value  # later lookups do not come here again
        return value
    from importlib.util import find_spec

    if not name.startswith("_") and find_spec(f"jaxtrain.{name}") is not None:
        return importlib.import_module(f"jaxtrain.{name}")  # as `import jaxtrain` used to
    raise AttributeError(f"module 'jaxtrain' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs, which do not run __getattr__
    from jaxtrain.checkpoint import Checkpointer, latest_compatible_step
    from jaxtrain.config import load_config
    from jaxtrain.errors import ConfigError
    from jaxtrain.runs import load_run
    from jaxtrain.sharding import Rules, make_mesh
    from jaxtrain.state import StateLayout, TrainState, create_state, make_state_layout
    from jaxtrain.steps import compile_train_step, jit_eval_step, make_eval_step, make_train_step
    from jaxtrain.tasks import Task, per_example
    from jaxtrain.train import evaluate, train_and_evaluate
