"""Variable paths, and rules that select variables by a regex over their paths.

A variable's path is its key path from the model's root, its names joined by `/`:
`conv1/kernel`, `blocks/0/attn/query/kernel`, `norm/mean` (`path_str`). A config selects
weights by rules over these paths, each a pair `(regex, value)`: the first rule whose
regex matches the whole path (`re.fullmatch`) gives the variable its value. Every use of
weights selected by path (logical axes for an unmodified model's sharding,
`config.param_axes`; freezing, adapters, pruning alike) goes through `PathRules`, so they
share one syntax and one error for a rule that selects nothing:

    rules = PathRules(((r".*linear.*/kernel", ("embed", "mlp")),), "config.param_axes")
    rules.assign(["linear1/kernel", "linear1/bias"])  # {"linear1/kernel": 0}
    rules.values[0]                                    # ("embed", "mlp")
"""

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from jaxtrain.errors import ConfigError


def path_str(path) -> str:
    """`('blocks', 0, 'attn', 'kernel')`-style key path as `blocks/0/attn/kernel`."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


class PathRules:
    """Rules `(regex over variable paths, value)`, checked once; the first match wins.

    Args:
      rules: pairs `(pattern, value)` (tuples or lists: a config read back from JSON has
        lists), or another PathRules.
      field: what the rules are called in messages, e.g. "config.param_axes".
      value: checks and normalises one value, raising ConfigError with its message
        (given the pair's name, e.g. "config.param_axes[0]"); None: values as given.

    Raises:
      ConfigError: a rule that is not a pair, a pattern that is not a string or not a
        regular expression, or a value `value` refuses.
    """

    def __init__(
        self,
        rules: "Sequence | PathRules" = (),
        field: str = "rules",
        value: Callable[[Any, str], Any] | None = None,
    ):
        if isinstance(rules, PathRules):
            self.field, self.patterns, self.values = rules.field, rules.patterns, rules.values
            self._compiled = rules._compiled
            return
        self.field = field
        if isinstance(rules, str) or not isinstance(rules, Sequence):
            raise ConfigError(f"{field} must be a sequence of (regex, value) pairs, got {rules!r}")
        self.patterns: tuple[str, ...] = ()
        self.values: tuple = ()
        self._compiled: tuple[re.Pattern, ...] = ()
        for i, rule in enumerate(rules):
            name = f"{field}[{i}]"
            if isinstance(rule, str) or not isinstance(rule, Sequence) or len(rule) != 2:
                raise ConfigError(
                    f"{name} must be a pair (regex over variable paths, value), got {rule!r}"
                )
            pattern, rule_value = rule
            if not isinstance(pattern, str):
                raise ConfigError(f"{name} pattern must be a string, got {pattern!r}")
            try:
                compiled = re.compile(pattern)
            except re.error as e:
                raise ConfigError(
                    f"{name} pattern {pattern!r} is not a regular expression: {e}"
                ) from None
            self.patterns += (pattern,)
            self.values += (rule_value if value is None else value(rule_value, name),)
            self._compiled += (compiled,)

    def __len__(self) -> int:
        return len(self.patterns)

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def first(self, path: str) -> int | None:
        """The index of the first rule whose pattern matches all of `path`, or None."""
        for i, compiled in enumerate(self._compiled):
            if compiled.fullmatch(path):
                return i
        return None

    def assign(self, paths: Iterable[str]) -> dict[str, int]:
        """Each path's first matching rule, checking that every rule is some path's.

        Args:
          paths: every variable path the rules select from (the whole model's).

        Returns:
          `{path: rule index}` for the paths some rule matches.

        Raises:
          ConfigError: a rule that is no path's first match: one line naming it, and
            either paths that are there to match or the earlier rule that takes them.
        """
        paths = list(paths)
        chosen = {}
        for path in paths:
            i = self.first(path)
            if i is not None:
                chosen[path] = i
        used = set(chosen.values())
        for i, pattern in enumerate(self.patterns):
            if i in used:
                continue
            shadowed = [p for p in paths if self._compiled[i].fullmatch(p)]
            if shadowed:
                earlier = self.patterns[chosen[shadowed[0]]]
                raise ConfigError(
                    f"{self.field} pattern {pattern!r} selects nothing: an earlier pattern, "
                    f"{earlier!r}, takes every path it matches (first match wins), "
                    f"e.g. {shadowed[0]}"
                )
            raise ConfigError(
                f"{self.field} pattern {pattern!r} matches no variable path (a pattern "
                f"matches a whole path); paths look like {_sample(paths)}"
            )
        return chosen

    def __eq__(self, other) -> bool:
        return isinstance(other, PathRules) and (self.patterns, self.values) == (
            other.patterns,
            other.values,
        )

    def __repr__(self) -> str:
        return f"PathRules({tuple(zip(self.patterns, self.values, strict=True))})"


def _sample(paths: list[str], n: int = 6) -> str:
    if not paths:
        return "(none: the model has no variables)"
    shown = ", ".join(paths[:n])
    return shown + (f", ... ({len(paths)} in all)" if len(paths) > n else "")
