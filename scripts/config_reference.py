"""Writes docs/config_reference.md from the comments beside each field of the config files.

    python scripts/config_reference.py           # rewrite docs/config_reference.md
    python scripts/config_reference.py --check   # exit 1 if it is stale or a field lacks a comment

The config files are read as source, not run: each `get_config` is a list of statements
that set fields (`c.x = ...`, `c.group = dict(k=v, ...)`, `c.group.update(k=v, ...)`,
and the same under `if arg == "smoke":`). A field's description is the comment on its
line, after the value, and the comment lines right above it. Every field a file adds must
have one; a field it only changes (a value of base.py's) may.
"""

import argparse
import ast
import dataclasses
import io
import os
import sys
import tokenize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = ("base.py", "gpt_pysource.py", "digits_cnn.py")
OUTPUT = os.path.join(REPO, "docs", "config_reference.md")
# A value longer than this is listed below its table, as source, instead of in a cell.
MAX_CELL = 48


@dataclasses.dataclass
class Field:
    """One field as a config file sets it."""

    name: str  # dotted: "optim.lr"
    value: str  # its source text
    comment: str  # "" when it has none
    line: int
    group: bool = False  # set to a dict of fields


@dataclasses.dataclass
class ConfigSource:
    """What one config file sets: its own fields and overrides, and each variant's."""

    path: str
    doc: str  # get_config's module docstring, first paragraph
    fields: dict[str, Field]  # in the order the file sets them
    variants: dict[str, dict[str, Field]]  # "smoke" -> the fields it sets


def _comments(source: str) -> tuple[dict[int, str], dict[int, str]]:
    """(trailing comments by line, whole-line comments by line), without the `#`."""
    trailing, whole = {}, {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            text = token.string.lstrip("#").strip()
            before = token.line[: token.start[1]]
            (whole if not before.strip() else trailing)[token.start[0]] = text
    return trailing, whole


def _comment_of(line: int, trailing: dict[int, str], whole: dict[int, str]) -> str:
    """The comment lines right above `line` and the comment at its end, joined."""
    above = []
    previous = line - 1
    while previous in whole:
        above.insert(0, whole[previous])
        previous -= 1
    return " ".join([*above, *([trailing[line]] if line in trailing else [])])


def _path(node) -> str | None:
    """`c.a.b` -> "a.b"; None for anything not rooted at `c`."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.insert(0, node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id == "c" and parts:
        return ".".join(parts)
    return None


def _is_dict_call(node) -> bool:
    return isinstance(node, ast.Call) and getattr(node.func, "id", None) == "dict"


def parse(source: str, path: str) -> ConfigSource:
    """The fields a config file's `get_config` sets, with their comments.

    Raises:
      ValueError: a statement in get_config this reader does not understand (so that no
        field is ever left out of the reference unnoticed).
    """
    trailing, whole = _comments(source)
    tree = ast.parse(source)
    doc = (ast.get_docstring(tree) or "").split("\n\n")[0].replace("\n", " ")
    [get_config] = [
        n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "get_config"
    ]
    fields: dict[str, Field] = {}
    variants: dict[str, dict[str, Field]] = {}

    def text(node) -> str:
        segment = ast.get_source_segment(source, node)
        if "\n" in segment:  # as it is laid out in the file, less its line's indentation
            line = source.splitlines()[node.lineno - 1]
            indent = len(line) - len(line.lstrip())
            first, *rest = segment.split("\n")
            return "\n".join([first, *(r[indent:] if not r[:indent].strip() else r for r in rest)])
        return " ".join(segment.split())

    def add(into, name, value_node, line, group=False, shared=False):
        # A line that sets several fields (`dict(a=1, b=2)`) describes none of them alone.
        comment = "" if shared else _comment_of(line, trailing, whole)
        into[name] = Field(name, text(value_node), comment, line, group)

    def add_keywords(into, group, keywords):
        lines = [k.lineno for k in keywords]
        for k in keywords:
            add(into, f"{group}.{k.arg}", k.value, k.lineno, shared=lines.count(k.lineno) > 1)

    def setter(statement, into):
        if isinstance(statement, ast.Assign):
            for target in statement.targets:
                name = _path(target)
                if name is None:
                    break
                value = statement.value
                add(into, name, value, statement.lineno, group=_is_dict_call(value))
                if _is_dict_call(value):
                    add_keywords(into, name, value.keywords)
            else:
                return True
        call = getattr(statement, "value", None)
        if isinstance(statement, ast.Expr) and isinstance(call, ast.Call):
            group = _path(call.func.value) if isinstance(call.func, ast.Attribute) else None
            if group is not None and call.func.attr == "update" and not call.args:
                add_keywords(into, group, call.keywords)
                return True
        return False

    for statement in get_config.body:
        if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
            continue  # a docstring
        if ast.unparse(statement) in _FRAME:
            continue
        if isinstance(statement, ast.If) and _variant(statement.test):
            variant = variants.setdefault(_variant(statement.test), {})
            for inner in statement.body:
                if not setter(inner, variant):
                    raise ValueError(f"{path}:{inner.lineno}: cannot read {ast.unparse(inner)!r}")
            continue
        if not setter(statement, fields):
            raise ValueError(f"{path}:{statement.lineno}: cannot read {ast.unparse(statement)!r}")
    return ConfigSource(path, doc, fields, variants)


# The statements around the fields: where `c` comes from, and its return.
_FRAME = ("c = ml_collections.ConfigDict()", "c = base.get_config()", "return c")


def _variant(test) -> str | None:
    """`arg == "smoke"` -> "smoke"."""
    if (
        isinstance(test, ast.Compare)
        and getattr(test.left, "id", None) == "arg"
        and isinstance(test.ops[0], ast.Eq)
        and isinstance(test.comparators[0], ast.Constant)
    ):
        return test.comparators[0].value
    return None


def read_configs(directory: str = os.path.join(REPO, "configs")) -> dict[str, ConfigSource]:
    """{file name: ConfigSource} for CONFIG_FILES."""
    found = {}
    for name in CONFIG_FILES:
        with open(os.path.join(directory, name), encoding="utf-8") as f:
            found[name] = parse(f.read(), f"configs/{name}")
    return found


def missing_comments(configs: dict[str, ConfigSource]) -> list[str]:
    """ "file:line field" for every field a file adds without a comment."""
    base = configs["base.py"].fields
    missing = []
    for name, config in configs.items():
        for field in config.fields.values():
            new = name == "base.py" or field.name not in base
            if new and not field.comment:
                missing.append(f"{config.path}:{field.line} {field.name}")
    return missing


def _cell(text: str) -> str:
    """`text` for a Markdown table cell: `|` escaped, and `<`, `>` outside code spans (a
    renderer would take `<step>` for an HTML tag)."""
    parts = text.replace("|", "\\|").split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def _value(field: Field, long_values: list[tuple[str, str]], where: str) -> str:
    if "\n" in field.value or len(field.value) > MAX_CELL:
        long_values.append((f"{where} `{field.name}`", field.value))
        return "(below)"
    return f"`{_cell(field.value)}`"


def _with_variants(config: ConfigSource, name: str, value: str, long_values, where) -> str:
    for variant, fields in config.variants.items():
        if name in fields:
            value += f" ({variant}: {_value(fields[name], long_values, where + ':' + variant)})"
    return value


def _long_values_section(long_values) -> list[str]:
    lines = []
    for title, value in long_values:
        lines += ["", f"{title}:", "", "```python", value, "```"]
    return lines


def render(configs: dict[str, ConfigSource]) -> str:
    """The reference as Markdown."""
    base = configs["base.py"]
    others = {name: c for name, c in configs.items() if name != "base.py"}
    out = [
        "# Config reference",
        "",
        "<!-- Generated by `python scripts/config_reference.py` from the comments in configs/*.py;",
        "     edit the config files, not this page. tests/test_config_reference.py checks it. -->",
        "",
        "Every knob a run uses is a field of its config file. Set one on the command line with",
        "`--config.FIELD=VALUE` (type-checked: `--config.optim.lr=1e-3`), or in Python as an",
        'attribute: `config = jaxtrain.load_config("gpt_pysource.py"); config.optim.lr = 1e-3`.',
        "A config file `get_config(arg)` takes `:arg` after its name; every bundled config has",
        "a `:smoke` variant, a few steps in seconds, whose values are shown in parentheses.",
        "",
        "## Shared fields: `base.py`",
        "",
        _cell(base.doc),
        "",
        "| field | default | " + " | ".join(f"`{n}`" for n in others) + " | meaning |",
        "|---|---|" + "---|" * len(others) + "---|",
    ]
    long_values: list[tuple[str, str]] = []
    for field in base.fields.values():
        default = "" if field.group else _value(field, long_values, "base.py")
        cells = []
        for name, config in others.items():
            own = config.fields.get(field.name)
            shown = "" if own is None or own.group else _value(own, long_values, name)
            cells.append(_with_variants(config, field.name, shown, long_values, name).strip())
        name = f"**`{field.name}`**" if field.group else f"`{field.name}`"
        out.append(f"| {name} | {default} | " + " | ".join(cells) + f" | {_cell(field.comment)} |")
    out += _long_values_section(long_values)
    for name, config in others.items():
        long_values = []
        added = [f for f in config.fields.values() if f.name not in base.fields]
        out += [
            "",
            f"## `{name}`",
            "",
            _cell(config.doc),
            "",
            "Fields it adds to the shared ones (its values of those are in the table above):",
            "",
            "| field | value | meaning |",
            "|---|---|---|",
        ]
        for field in added:
            value = _with_variants(config, field.name, _value(field, long_values, name), [], name)
            out.append(f"| `{field.name}` | {value} | {_cell(field.comment)} |")
        out += _long_values_section(long_values)
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the page is stale")
    args = parser.parse_args(argv)
    configs = read_configs()
    missing = missing_comments(configs)
    if missing:
        print(f"config_reference: fields without a comment: {', '.join(missing)}", file=sys.stderr)
        return 1
    page = render(configs)
    if args.check:
        with open(OUTPUT, encoding="utf-8") as f:
            if f.read() != page:
                print(
                    "config_reference: docs/config_reference.md is out of date: "
                    "run python scripts/config_reference.py",
                    file=sys.stderr,
                )
                return 1
        return 0
    with open(OUTPUT, "w", encoding="utf-8") as f:
        f.write(page)
    print(f"wrote {os.path.relpath(OUTPUT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
