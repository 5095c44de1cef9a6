"""`python -m jaxtrain ...` is the same as the `jaxtrain` command."""

from jaxtrain.cli import run

run()
