"""docs/config_reference.md: every config field has a comment, and the page is current."""

import ast
import importlib.util
import os

import pytest
from conftest import CONFIGS, REPO

from jaxtrain.config import load_config

_spec = importlib.util.spec_from_file_location(
    "config_reference", os.path.join(REPO, "scripts", "config_reference.py")
)
config_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(config_reference)


def _flatten(config, prefix="") -> dict:
    flat = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            flat[f"{prefix}{key}"] = None  # a group
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def test_every_field_of_every_config_has_a_comment():
    assert config_reference.missing_comments(config_reference.read_configs()) == []


def test_a_field_without_a_comment_is_named():
    source = """
def get_config(arg=None):
    c = base.get_config()
    c.data.update(
        name="mine",  # the data set
        seq_len=64,
    )
    c.model = dict(width=2, depth=3)  # the group; its two fields are not
    c.seed = 1  # changes a base field: a comment is optional
    if arg == "smoke":
        c.model.width = 1
    return c
"""
    base = config_reference.parse("def get_config():\n    c.seed = 0  # seed\n", "base.py")
    mine = config_reference.parse(source, "configs/mine.py")
    assert mine.variants == {"smoke": {"model.width": mine.variants["smoke"]["model.width"]}}
    missing = config_reference.missing_comments({"base.py": base, "mine.py": mine})
    assert missing == [
        "configs/mine.py:6 data.seq_len",
        "configs/mine.py:8 model.width",
        "configs/mine.py:8 model.depth",
    ]


def test_a_statement_the_reader_does_not_understand_is_an_error():
    source = "def get_config():\n    c = base.get_config()\n    setattr(c, 'seed', 1)\n"
    with pytest.raises(ValueError, match="mine.py:3: cannot read"):
        config_reference.parse(source, "configs/mine.py")


@pytest.mark.parametrize("name", config_reference.CONFIG_FILES)
def test_the_reader_finds_exactly_the_fields_and_values_the_config_has(name):
    """What the source reading found is what loading the file gives, smoke variant too."""
    configs = config_reference.read_configs()
    path = os.path.join(CONFIGS, name)
    for variant in [None, *configs[name].variants]:
        loaded = _flatten(load_config(path + (f":{variant}" if variant else "")))
        found = {} if name == "base.py" else dict(configs["base.py"].fields)
        if configs[name].fields.get("model", None) is not None:  # a new model group
            found = {k: f for k, f in found.items() if not k.startswith("model.")}
        found.update(configs[name].fields)
        found.update(configs[name].variants.get(variant, {}))
        assert set(found) == set(loaded), (variant, set(found) ^ set(loaded))
        for field_name, field in found.items():
            if not field.group:
                value = ast.literal_eval(field.value)
                assert loaded[field_name] == value, (variant, field_name)


def test_the_committed_reference_is_up_to_date():
    with open(config_reference.OUTPUT, encoding="utf-8") as f:
        committed = f.read()
    assert committed == config_reference.render(config_reference.read_configs()), (
        "docs/config_reference.md is out of date: run python scripts/config_reference.py"
    )
