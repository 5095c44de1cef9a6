"""jax's persistent compilation cache, on by default (`config.compilation_cache`).

Compiling the train step is most of a run's start-up on a small model (seconds on CPU,
minutes for a large model on TPU). jax can keep compiled programs on disk, keyed by the
program, its shardings, the jax and XLA versions and flags; the next process that compiles
the same program loads it instead. The directory is read once, at a process's first
compilation, so `enable` must run before anything is jitted.
"""

import os

import jax
from absl import logging

from jaxtrain.checks import is_number, require


def default_dir() -> str:
    """`$JAX_COMPILATION_CACHE_DIR`, else `$XDG_CACHE_HOME/jaxtrain/xla` (~/.cache/...)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_home, "jaxtrain", "xla")


def check_config(cache_config) -> None:
    """Rejects a bad `config.compilation_cache`.

    Raises:
      ConfigError: naming the field and why.
    """
    c = cache_config
    require(isinstance(c.dir, str), "compilation_cache.dir", c.dir, "a path, 'auto' or ''")
    for key in ("min_compile_time_s", "max_size_gb"):
        value = c[key]
        require(is_number(value) and value >= 0, f"compilation_cache.{key}", value, "a number >= 0")


def enable(cache_config) -> str | None:
    """Points jax's persistent compilation cache at the configured directory.

    Call before the process's first compilation. A directory set already (by an earlier
    run in this process, or by the user through jax.config) is kept: jax reads it only
    once per process.

    Args:
      cache_config: `config.compilation_cache` (dir, min_compile_time_s, max_size_gb).

    Returns:
      The directory in use, or None when the cache is off.
    """
    check_config(cache_config)
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    if cache_config.dir == "":
        return None
    directory = default_dir() if cache_config.dir == "auto" else cache_config.dir
    directory = os.path.abspath(os.path.expanduser(directory))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:  # a cache is an optimisation: never a reason to stop the run
        logging.warning("compilation cache off: cannot create %s (%s)", directory, e.strerror)
        return None
    jax.config.update("jax_persistent_cache_min_compile_time_secs", cache_config.min_compile_time_s)
    if cache_config.max_size_gb:
        jax.config.update("jax_compilation_cache_max_size", int(cache_config.max_size_gb * 1e9))
    jax.config.update("jax_compilation_cache_dir", directory)
    return directory
