"""Stopping cleanly on a signal: SIGTERM (a spot or preemptible VM's notice) and Ctrl-C.

A `StopWatcher` is installed for the whole run, from before the restore and compilation
until the last checkpoint has committed:

- Before the loop's first step there is nothing new to save: a signal stops the run
  (`Preempted` with no step) at once while the run only reads (config, model, data), and
  once the step in hand is done after it has started on its workdir (restore, compile),
  so that no library is interrupted halfway through writing or reading a checkpoint.
- In the loop, the first signal makes the run save at the next step boundary, wait for the
  save to commit, and raise `Preempted`. Further SIGTERMs are ignored, with one line saying
  so, until then; a second Ctrl-C exits at once (status 130): the person insists, and the
  last committed checkpoint stays (a save in flight is discarded whole).

The command exits 75 after SIGTERM (rerun me) and 130 after Ctrl-C (a person stopped it:
retry wrappers should not rerun). With several processes, jax's preemption sync manager
(started by `jax.distributed.initialize`, listening for SIGTERM itself) makes every process
agree on the step to stop at, even when only one was signalled; Ctrl-C there keeps
Python's default (KeyboardInterrupt at once), since processes stopping at different steps
would leave the others waiting in a collective.
"""

import os
import signal
import threading

import jax
from jax.experimental import multihost_utils

from jaxtrain.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED


class Preempted(Exception):
    """The run stopped on a signal; `step` is the step whose checkpoint committed, or None
    when it stopped before its first step (nothing new to save)."""

    def __init__(self, step: int | None, signal_name: str = "SIGTERM"):
        if step is None:
            what = f"stopped by {signal_name} before the first step: nothing new to save"
        else:
            what = f"preempted at step {step} ({signal_name}): checkpoint saved"
        super().__init__(f"{what}; rerun the same command to continue")
        self.step = step
        self.exit_status = EXIT_INTERRUPTED if signal_name == "SIGINT" else EXIT_PREEMPTED


class StopWatcher:
    """Tells the loop when to stop; a context manager that owns SIGTERM and SIGINT."""

    def __init__(self):
        self._multi_process = jax.process_count() > 1
        self._signal: str | None = None  # the first signal's name, once one came
        self._in_loop = False
        self._at_once = True  # raise from the handler: nothing is half-done yet
        self._said_ignored = False
        self._previous: dict[int, object] = {}

    def __enter__(self):
        # Several processes: jax owns SIGTERM, and Ctrl-C keeps Python's default.
        if not self._multi_process and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def _on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        if self._signal is None:
            self._signal = name
            if self._at_once:
                raise Preempted(None, name)  # nothing to save yet: stop now
            if self._in_loop:
                _say(f"jaxtrain: {name}: saving a checkpoint at the next step boundary, then stop")
        elif signum == signal.SIGINT and self._signal == "SIGINT":
            _say("jaxtrain: second Ctrl-C: exiting now; the last committed checkpoint stays")
            os._exit(EXIT_INTERRUPTED)
        elif not self._said_ignored:  # once: a flood of signals gets one line, not a flood
            self._said_ignored = True
            _say(f"jaxtrain: {name} ignored: a checkpoint is being saved before the run stops")

    def hold(self) -> None:
        """From now on (the run works on its workdir) a signal is acted on at the next
        `start_loop` or step boundary, not in the middle of whatever runs."""
        self._at_once = False

    def start_loop(self) -> None:
        """Marks the start of the loop: from now on a signal means "save, then stop".

        Raises:
          Preempted: a signal came since `hold`: stop before the first step.
        """
        self._at_once = False
        if self._signal is not None:
            raise Preempted(None, self._signal)
        self._in_loop = True

    def reached(self, step: int) -> bool:
        """True when the run should save and stop after `step` (same answer on every process)."""
        if self._multi_process:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._signal is not None

    def stop(self, step: int) -> Preempted:
        """The exception to raise once `step`'s checkpoint is saved."""
        return Preempted(step, self._signal or "SIGTERM")

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            if isinstance(handler, _StopAtOnce):
                handler.armed = False  # the run is over: the command ignores late signals
            signal.signal(signum, handler)
        self._previous = {}
        return False


def _say(line: str) -> None:
    # os.write: a signal may arrive while Python is inside a print to stderr, and print is
    # not reentrant; one unbuffered write is.
    try:
        os.write(2, (line + "\n").encode())
    except OSError:
        pass


class _StopAtOnce:
    """A command's handler before a run starts (raise `Preempted`: nothing to save) and
    after it has ended (ignore: a late signal must not change the exit status while the
    interpreter and jax shut down)."""

    def __init__(self):
        self.armed = True

    def __call__(self, signum, frame):
        if self.armed:
            raise Preempted(None, signal.Signals(signum).name)


def stop_at_once_on_signals() -> dict:
    """SIGTERM and SIGINT raise `Preempted` at once, until a run's `StopWatcher` has
    taken over and ended; after that they are ignored.

    For a command's start-up (`jaxtrain train`).

    Returns:
      The handlers it replaced, for `restore_signal_handlers`.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}
    stop = _StopAtOnce()
    return {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}


def restore_signal_handlers(previous: dict) -> None:
    """Puts back the handlers `stop_at_once_on_signals` replaced."""
    for signum, handler in previous.items():
        signal.signal(signum, handler)
