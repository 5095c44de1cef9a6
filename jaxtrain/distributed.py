"""Multi-process runs: `jax.distributed` from explicit flags or a detected cluster launcher.

Call `initialize()` first thing, before anything touches a jax device (`jax.devices()`,
`jax.process_index()`, creating an array, ...): jax sizes its backend to the whole job
when the backend starts, and raises a RuntimeError if `jax.distributed.initialize` comes
later.

    initialize()                                  # TPU VM pod, SLURM, Open MPI: detected
    initialize("10.0.0.1:8476", num_processes=4, process_id=2)   # any other cluster

A run in one process (a laptop, one GPU box, a single-host TPU VM, a one-task SLURM job)
detects no multi-process launcher and skips `jax.distributed` altogether.

How a job ends when a process dies, so that no survivor hangs:

- A survivor waiting for the dead process in a collective usually sees it fail at once
  (gloo, NCCL lose the connection) and raises a JaxRuntimeError, handled as below.
- Otherwise jax's health check ends it. Every process sends heartbeats to the
  coordination service that process 0 hosts; one silent for `heartbeat_timeout_s` counts
  as dead and the service makes every other process abort (SIGABRT), printing
  "Terminating process because the JAX distributed service detected fatal errors. This
  most likely indicates that another task died", with the silent processes listed. When
  process 0 dies, the others lose the service and abort at once.
- A process with an uncaught exception (its own failure, or the collective above) prints
  the traceback and one line, `jaxtrain: error: process I of N failed (...)`, and exits
  with status 1 at once. It skips jax's exit barrier, which would wait
  `shutdown_timeout_s` for peers that are themselves waiting for it in a collective.

So every survivor exits non-zero within about `heartbeat_timeout_s` of a peer's death.
"""

import logging
import os
import sys
import traceback

import jax

from jaxtrain.errors import ConfigError

# Long enough for every host of a large job to boot and import; jax's own default.
INITIALIZATION_TIMEOUT_S = 300
# How long a silent process counts as alive: the bound on how long survivors wait for a
# peer that hung, or died without breaking a collective's connection. Heartbeats come from
# a C++ thread, so long compiles, checkpoint writes or a Python thread holding the GIL do
# not delay them (checked: a 20 s pure-Python loop under a 4 s timeout); jax's default of
# 100 s would only make survivors wait longer.
HEARTBEAT_TIMEOUT_S = 60
# How long a finished process waits at exit for the others to finish too. A training run's
# processes end within seconds of each other (the last checkpoint synchronises them); work
# that one process alone does after the others have exited must fit in this, or jax
# aborts it. It also bounds how long the others wait for a process that exits early.
SHUTDOWN_TIMEOUT_S = 60


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: list[int] | None = None,
    initialization_timeout_s: int = INITIALIZATION_TIMEOUT_S,
    heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
    shutdown_timeout_s: int = SHUTDOWN_TIMEOUT_S,
) -> bool:
    """Joins this process to a multi-process job, if it is part of one.

    With `coordinator_address`, `num_processes` and `process_id` (all three), joins that
    job. Without them, joins the job a cluster launcher started (a Cloud TPU VM pod, SLURM
    `srun`, Open MPI `mpirun`, detected by jax's own cluster detection) when it has more
    than one process, and otherwise does nothing. Must run before anything touches a jax
    device. Calling it again once joined does nothing.

    After a successful join, an uncaught exception in this process prints its traceback
    and exits with status 1 at once, skipping jax's exit barrier, so the other processes
    see this one die and stop too (see the module docstring).

    Args:
      coordinator_address: `host:port` of process 0, reachable from every process; process
        0 listens on that port.
      num_processes: how many processes the job has.
      process_id: this process's index, 0 to `num_processes - 1`; 0 hosts the coordinator.
      local_device_ids: the local accelerators this process uses; by default all of them,
        except under SLURM or Open MPI, where jax gives each process the one GPU matching
        its local rank.
      initialization_timeout_s: how long to wait for all processes to connect.
      heartbeat_timeout_s: how long a process may stay silent before it counts as dead and
        every other process aborts; bounds how long survivors outlive a dead peer.
      shutdown_timeout_s: how long a process that finished waits at exit for the others.

    Returns:
      True if this process is now one of several; False for a single-process run.

    Raises:
      ConfigError: some but not all of the three explicit arguments, or values that do
        not form a job (a process id out of range, an address without a port).
      RuntimeError: jax's backend already started (something touched a device first).
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    explicit = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    given = [name for name, value in explicit.items() if value is not None]
    if given:
        missing = [name for name in explicit if name not in given]
        if missing:
            raise ConfigError(
                f"--{', --'.join(missing)} missing: --coordinator_address, --num_processes "
                "and --process_id go together (or leave all three out on a TPU pod or SLURM)"
            )
        _check_explicit(coordinator_address, num_processes, process_id)
    else:
        launcher = detect_launcher()
        if launcher is None or launcher[1] <= 1:
            return False
    jax.distributed.initialize(
        coordinator_address,
        num_processes,
        process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=initialization_timeout_s,
        heartbeat_timeout_seconds=heartbeat_timeout_s,
        shutdown_timeout_seconds=shutdown_timeout_s,
    )
    _exit_at_once_on_uncaught_error()
    return True


def _check_explicit(coordinator_address: str, num_processes: int, process_id: int) -> None:
    host, _, port = str(coordinator_address).rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(
            f"--coordinator_address={coordinator_address!r} must be HOST:PORT, "
            "e.g. 10.0.0.1:8476 (the address of process 0)"
        )
    if not isinstance(num_processes, int) or num_processes < 1:
        raise ConfigError(f"--num_processes={num_processes!r} must be a positive integer")
    if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ConfigError(
            f"--process_id={process_id!r} must be an integer from 0 to {num_processes - 1} "
            f"for --num_processes={num_processes}"
        )


def detect_launcher() -> tuple[str, int] | None:
    """The cluster launcher that started this process and its process count, if any.

    Asks the same detectors `jax.distributed.initialize()` uses to fill in its arguments
    (so the two never disagree): SLURM (`SLURM_NTASKS`, ...), Open MPI, Cloud TPU VMs (the
    metadata server, queried only on a machine with TPU chips) and GKE TPU pods. They are
    a private jax module; if it moves, this detects nothing and says so, and explicit
    arguments still work.

    Returns:
      (detector name, process count), or None outside any known launcher.
    """
    try:
        from jax._src import clusters

        detectors = [c for c in clusters.ClusterEnv._cluster_types if not c.opt_in_only_method]
    except (ImportError, AttributeError) as e:
        logging.warning("jaxtrain: cannot auto-detect a multi-process cluster (%s)", e)
        return None
    for detector in detectors:
        try:
            if detector.is_env_present():
                return detector.__name__, int(detector.get_process_count())
        except Exception as e:  # a half-configured environment; say so, keep looking
            logging.warning("jaxtrain: %s detection failed: %s", detector.__name__, e)
    return None


def _exit_at_once_on_uncaught_error() -> None:
    # Normal exit runs jax's atexit shutdown, a barrier that waits `shutdown_timeout_s`
    # for every process, while the others are blocked in a collective waiting for this
    # one: both sides would sit out the timeout. os._exit skips the barrier, so the peers
    # see this process die and abort within the heartbeat timeout.
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        try:
            previous(exc_type, exc, tb)
        except Exception:
            traceback.print_exception(exc_type, exc, tb)
        print(failure_message(exc), file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)

    sys.excepthook = hook


def failure_message(exc: BaseException) -> str:
    """The one line a failing process of a multi-process job prints last."""
    summary = " ".join(f"{type(exc).__name__}: {exc}".split())
    if len(summary) > 300:
        summary = summary[:297] + "..."
    # A collective (gloo, NCCL, ICI) fails in the survivors as soon as a peer's connection
    # drops, often before the heartbeat check has named the dead process.
    hint = ""
    if isinstance(exc, jax.errors.JaxRuntimeError):
        hint = "; if a collective lost its connection, another process died first (see its log)"
    return (
        f"jaxtrain: error: process {jax.process_index()} of {jax.process_count()} "
        f"failed ({summary}){hint}; exiting now, without waiting for the other processes"
    )


def process_layout() -> dict[str, int]:
    """This process's place in the job: process index and count, local and global devices."""
    return {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_device_count": jax.local_device_count(),
        "device_count": jax.device_count(),
    }


def describe() -> str:
    """One line for the log, e.g. `process 0 of 2 | 4 of 8 cpu devices local`."""
    layout = process_layout()
    return (
        f"process {layout['process_index']} of {layout['process_count']} | "
        f"{layout['local_device_count']} of {layout['device_count']} "
        f"{jax.devices()[0].platform} devices local"
    )
