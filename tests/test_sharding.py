"""Mesh construction and logical-axis rules."""

import jax
import pytest
from conftest import load_config
from jax.sharding import PartitionSpec as P

from jaxtrain import data, sharding
from jaxtrain.errors import ConfigError

RULES = sharding.Rules(
    (
        ("activation_batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("norm", None),
    )
)


def test_mesh_fills_remaining_devices():
    mesh = sharding.make_mesh({"data": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "sequence": 1, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize(
    "mesh, message",
    [
        ({"data": 3}, "needs 3 devices but 8 are available"),
        ({"data": -1, "tensor": 3}, "not divisible by 3"),
        ({"data": -1, "fsdp": -1}, "at most one -1"),
        ({"dat": 8}, "unknown axis 'dat'"),
    ],
)
def test_bad_mesh_names_the_problem(mesh, message):
    with pytest.raises(ConfigError, match=message):
        sharding.make_mesh(mesh)


def test_rules_map_logical_axes_to_mesh_axes():
    assert RULES.spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert RULES.spec(("norm",)) == P(None)
    assert RULES.spec(("activation_batch", None)) == P(("data", "fsdp"), None)
    # A mesh axis is used once per spec: the second dimension that maps to it is replicated.
    assert RULES.spec(("activation_batch", "embed")) == P(("data", "fsdp"), None)
    assert sharding.Rules(RULES).table == RULES.table


def test_missing_rule_names_the_axis_and_parameter():
    with pytest.raises(ConfigError, match="'heads' \\(used by blocks/0/query\\) has no entry"):
        RULES.spec(("embed", "heads"), where="blocks/0/query")


def test_rule_to_unknown_mesh_axis_is_rejected_when_the_rules_are_read():
    with pytest.raises(ConfigError, match="unknown mesh axis 'model'"):
        sharding.Rules((("embed", "model"),))


def test_batch_split_follows_rules():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert sharding.data_parallel_size(mesh, RULES) == 4
    example = {"x": jax.ShapeDtypeStruct((3, 5), "float32"), "y": jax.ShapeDtypeStruct((), "int32")}
    shardings = data.batch_shardings(example, mesh, RULES)
    assert shardings["x"].spec == P(("data", "fsdp"), None, None)
    assert shardings["y"].spec == P(("data", "fsdp"))
    # A task may name a batch array's other axes too: here, tokens split over `tensor`.
    rules = sharding.Rules((*RULES.table.items(), ("activation_length", "tensor")))
    named = data.batch_shardings(
        example, mesh, rules, {"x": ("activation_batch", "activation_length", None)}
    )
    assert named["x"].spec == P(("data", "fsdp"), "tensor", None)


def test_rules_carry_the_config_param_axes():
    config = load_config("gpt_pysource", "smoke")
    config.param_axes = [[r".*/kernel", ["embed", None]]]  # as config.json holds them
    _, rules = sharding.mesh_and_rules(config)
    assert rules.param_axes.patterns == (".*/kernel",)
    assert rules.param_axes.values == (("embed", None),)
    # A copy keeps them, unless it is given its own.
    assert sharding.Rules(rules).param_axes == rules.param_axes
    assert not sharding.Rules(rules, param_axes=()).param_axes
    with pytest.raises(ConfigError, match=r"config.param_axes\[0\] names logical axis 'heads'"):
        sharding.Rules(RULES, param_axes=((".*", ("heads",)),))
