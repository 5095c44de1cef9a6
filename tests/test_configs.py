"""Every config file loads, and its smoke variant trains."""

import glob
import os

import jax
import jax.numpy as jnp
import pytest
from conftest import CONFIGS, load_config
from flax import nnx

from jaxtrain.config import load_config as load_config_file
from jaxtrain.models import make_model
from jaxtrain.train import train_and_evaluate

CONFIG_NAMES = sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(CONFIGS, "*.py"))
    if not os.path.basename(p).startswith(("_", "base"))
)


def test_configs_exist():
    assert {"digits_cnn", "gpt_pysource", "gpt_1b", "gpt_8b"} <= set(CONFIG_NAMES)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_loads_and_smoke_variant_trains_two_steps(name, data_dir, tmp_path, capsys):
    full = load_config_file(os.path.join(CONFIGS, f"{name}.py"))
    assert full.num_train_steps > 0 and full.task
    config = load_config(name, "smoke", data_dir=data_dir, num_train_steps=2)
    state, result = train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 2
    # Before step 1: the step's FLOPs, XLA's count and (for LMs) the model's, labelled.
    [flops] = [line for line in capsys.readouterr().out.splitlines() if "FLOPs" in line]
    assert flops.startswith("train step FLOPs per device: ")
    assert "XLA (compiled step, every loop trip counted" in flops
    assert ("model (MFU's numerator)" in flops) == (config.task == "lm")
    assert jnp.isfinite(result["loss"]) and jnp.isfinite(result["train_loss"])
    assert (tmp_path / "checkpoints" / "2").is_dir()


def test_bfloat16_compute_keeps_float32_params_and_loss(data_dir, tmp_path):
    config = load_config(
        "gpt_pysource",
        "smoke",
        data_dir=data_dir,
        num_train_steps=2,
        precision__compute_dtype="bfloat16",
    )
    with nnx.use_eager_sharding(False):
        model = make_model(config.model, dtype=jnp.bfloat16, param_dtype=jnp.float32)(nnx.Rngs(0))
    tokens = jnp.zeros((2, 8), jnp.int32)
    assert model.embed(tokens).dtype == jnp.bfloat16  # activations in bf16
    assert model.blocks[0].mlp.up(model.embed(tokens)).dtype == jnp.bfloat16
    assert model(tokens).dtype == jnp.float32  # logits and loss in fp32

    state, result = train_and_evaluate(config, str(tmp_path))
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(state.opt_state)} <= {
        jnp.dtype("float32"),
        jnp.dtype("int32"),
    }
    assert jnp.isfinite(result["loss"])


def test_a_tasks_own_field_checks_read_as_jaxtrains():
    # What a user's make_task calls for its own config fields (docs/concepts.md, "config").
    from jaxtrain import config
    from jaxtrain.checks import is_int, is_number, require
    from jaxtrain.errors import ConfigError

    # Tasks written against the older home of these checks still find them there.
    assert (config.require, config.is_int, config.is_number) == (require, is_int, is_number)

    assert is_int(3) and not is_int(True) and not is_int(3.0)
    assert is_number(0.5) and is_number(2) and not is_number(False)
    assert not is_number(float("inf")) and not is_number(float("nan"))
    require(is_int(4) and 4 > 0, "model.num_experts", 4, "a positive integer")  # passes
    with pytest.raises(ConfigError) as error:
        require(is_int(0) and 0 > 0, "model.num_experts", 0, "a positive integer")
    assert str(error.value) == "config.model.num_experts must be a positive integer, got 0"


def test_jaxtrains_modules_stand_in_layers():
    # No import cycle between modules (a package's own modules, e.g. jaxtrain.tasks and
    # its lm, count as one): config.py runs every module's check_config, so none of them
    # may import config.py back; the checks they share live in jaxtrain.checks.
    import ast
    import pathlib

    import jaxtrain

    root = pathlib.Path(jaxtrain.__file__).parent
    unit = {}  # module -> its unit: the module, or its subpackage
    for path in root.rglob("*.py"):
        parts = ("jaxtrain",) + path.relative_to(root).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        unit[".".join(parts)] = ".".join(parts[:2])
    edges = {u: set() for u in unit.values()}
    for name, path_unit in unit.items():
        path = root.joinpath(*name.split(".")[1:])
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from jaxtrain import data` imports the module data, not jaxtrain's
                # __init__; `from jaxtrain.checks import require`, the module checks.
                dotted = (f"{node.module}.{a.name}" for a in node.names)
                targets = [t if t in unit else node.module for t in dotted]
            for target in targets:
                if target in unit and unit[target] != path_unit:
                    edges[path_unit].add(unit[target])
    assert "jaxtrain.config" in edges["jaxtrain.train"]  # the graph is read (not empty)

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in edges[node]:
                if nxt == start:
                    return trail + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))
        return None

    cycles = [c for c in map(cycle_from, sorted(edges)) if c]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
