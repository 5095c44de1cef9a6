"""docs/troubleshooting.md quotes the messages jaxtrain prints, as the code writes them.

Each `jaxtrain: ...` line in the page's text blocks is a message with `<...>` where the
code puts a value. The text between placeholders must come from the string literals of
the package (a message may join several: an outer f-string around an inner one), so a
message reworded in the code and not in the page fails here (a guard, not a proof: a
change of a word or two can still be made of other messages' pieces).
"""

import ast
import glob
import os
import re

import pytest
from conftest import REPO

PAGE = os.path.join(REPO, "docs", "troubleshooting.md")


def _literals() -> list[str]:
    """Every string literal in jaxtrain/ but docstrings, and the literal parts of every
    f-string."""
    found = []
    for path in glob.glob(os.path.join(REPO, "jaxtrain", "**", "*.py"), recursive=True):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if id(node) not in docstrings:  # prose about the code, not messages
                    found.append(node.value)
    return found


def _messages() -> list[str]:
    with open(PAGE, encoding="utf-8") as f:
        blocks = re.findall(r"```text\n(.*?)```", f.read(), re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith("jaxtrain")]


def _covered(fragment: str, corpus: str, whole: set[str]) -> bool:
    """Whether `fragment` is a sequence of pieces of the literals (`corpus`, joined by NULs).

    A piece with a letter in it is a whole literal (`whole`: "pid " of f"pid {pid} on
    {host}"), or at least 12 characters long (unless the fragment is shorter), so that
    common words taken from anywhere cannot cover a changed message.
    """
    shortest = min(12, len(fragment))
    reachable = [True] + [False] * len(fragment)
    for start in range(len(fragment)):
        if not reachable[start]:
            continue
        end = start + 1
        while end <= len(fragment) and fragment[start:end] in corpus:
            piece = fragment[start:end]
            short_ok = not re.search(r"[A-Za-z]", piece) or piece.strip(" ,;:()'") in whole
            if len(piece) >= shortest or short_ok:
                reachable[end] = True
            end += 1
    return reachable[-1]


def _without_prefix(message: str) -> str:
    """The message after "jaxtrain: error: " (cli.py's), or after "jaxtrain: " (signals)."""
    return message.removeprefix("jaxtrain: error: ").removeprefix("jaxtrain: ")


MESSAGES = _messages()


def test_the_page_quotes_messages():
    assert len(MESSAGES) >= 30


@pytest.mark.parametrize("message", MESSAGES)
def test_each_quoted_message_is_what_the_code_prints(message):
    literals = _literals()
    corpus, whole = "\0".join(literals), {s.strip(" ,;:()'") for s in literals}
    # Between values: `<...>` placeholders, "..." for a part left out, and lists (the
    # choices a message shows are values the code formats).
    for fragment in re.split(r"<[^>]*>|\.\.\.|\[[^\]]*\]", _without_prefix(message)):
        fragment = fragment.strip(" '")
        assert not fragment or _covered(fragment, corpus, whole), fragment
