"""Mesh construction and logical-axis rules."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from jaxtrain import sharding
from jaxtrain.errors import ConfigError

RULES = (
    ("activation_batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
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


def test_logical_to_mesh_spec():
    assert sharding.logical_to_mesh_spec(("embed", "mlp"), RULES) == P("fsdp", "tensor")
    assert sharding.logical_to_mesh_spec(("norm",), RULES) == P(None)
    assert sharding.logical_to_mesh_spec(("activation_batch", None), RULES) == P(
        ("data", "fsdp"), None
    )
    # A mesh axis is used once per spec: the second dimension that maps to it is replicated.
    assert sharding.logical_to_mesh_spec(("activation_batch", "embed"), RULES) == P(
        ("data", "fsdp"), None
    )


def test_missing_rule_names_the_axis_and_parameter():
    with pytest.raises(ConfigError, match="'heads' \\(used by blocks/0/query\\) has no entry"):
        sharding.logical_to_mesh_spec(("embed", "heads"), RULES, where="blocks/0/query")


def test_rule_to_unknown_mesh_axis_is_rejected():
    with pytest.raises(ConfigError, match="unknown mesh axis 'model'"):
        sharding.logical_to_mesh_spec(("embed",), (("embed", "model"),))


def test_batch_split_follows_rules():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert sharding.data_parallel_size(mesh, RULES) == 4
    assert sharding.batch_sharding(mesh, RULES).spec == P(("data", "fsdp"))
