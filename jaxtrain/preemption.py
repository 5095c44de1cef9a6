"""Preemption: SIGTERM (a spot or preemptible VM's notice) stops the run at a step boundary.

The loop asks `watcher.reached(step)` after every step. When it says yes, the loop saves a
checkpoint of that step, waits for it to commit, and raises `Preempted`; the command exits
with EXIT_PREEMPTED. Rerunning the same command resumes from that checkpoint.
"""

import signal
import threading

import jax
from jax.experimental import multihost_utils

# EX_TEMPFAIL from sysexits.h: "temporary failure, try again" -- the run saved its state
# and should be started again with the same command.
EXIT_PREEMPTED = 75


class Preempted(Exception):
    """The run stopped for preemption after saving a checkpoint of `step`."""

    def __init__(self, step: int):
        super().__init__(
            f"preempted at step {step}: checkpoint saved; rerun the same command to continue"
        )
        self.step = step


class PreemptionWatcher:
    """Tells the loop when to stop for preemption.

    With one process, a SIGTERM handler sets a flag. With several, JAX's preemption sync
    manager (started by `jax.distributed.initialize`, listening for SIGTERM itself) makes
    every process agree on the same step to stop at, even when only one was signalled;
    stopping at different steps would leave the others waiting in a collective.
    """

    def __init__(self):
        self._multi_process = jax.process_count() > 1
        self._signalled = threading.Event()
        self._previous = None
        if not self._multi_process and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        self._signalled.set()

    def reached(self, step: int) -> bool:
        """True when the run should save and stop after `step` (same answer on every process)."""
        if self._multi_process:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._signalled.is_set()

    def close(self) -> None:
        """Restores the SIGTERM handler that was there before."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
