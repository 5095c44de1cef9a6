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

An evaluation checks between its batches too (`StopWatcher.abandon_eval`): a signal
during a whole-split evaluation abandons it, and the step is saved without its eval.

The `jaxtrain` command installs `stop_at_once_on_signals` as its first line, before jax,
flax or orbax are imported (seconds), so this module imports nothing heavy at its top.
"""

import os
import signal
import threading

from jaxtrain.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED


class Preempted(Exception):
    """The run stopped on a signal; `step` is the step whose checkpoint committed, or None
    when it stopped before its first step (nothing new to save)."""

    def __init__(self, step: int | None, signal_name: str = "SIGTERM", what: str | None = None):
        if what is not None:  # a command that is not a run (`what`: which)
            message = f"stopped by {signal_name} before {what} finished; rerun it"
        elif step is None:
            what = f"stopped by {signal_name} before the first step: nothing new to save"
            message = f"{what}; rerun the same command to continue"
        else:
            what = f"preempted at step {step} ({signal_name}): checkpoint saved"
            message = f"{what}; rerun the same command to continue"
        super().__init__(message)
        self.step = step
        self.signal_name = signal_name
        self.exit_status = EXIT_INTERRUPTED if signal_name == "SIGINT" else EXIT_PREEMPTED


class EvalAbandoned(Exception):
    """An evaluation stopped between two batches on a stop request; it has no result."""

    def __init__(self, done: int, total: int, signal_name: str):
        super().__init__(f"abandoned after {done} of {total} batches ({signal_name})")
        self.done, self.total, self.signal_name = done, total, signal_name


class StopWatcher:
    """Tells the loop when to stop; a context manager that owns SIGTERM and SIGINT."""

    def __init__(self):
        import jax

        self._multi_process = jax.process_count() > 1
        self._signal: str | None = None  # the first signal's name, once one came
        self._in_loop = False
        self._at_once = True  # raise from the handler: nothing is half-done yet
        self._said_ignored = False
        self._previous: dict[int, object] = {}
        self._calls = 0  # how often every process has asked: the preemption sync counter

    def __enter__(self):
        # Several processes: jax owns SIGTERM, and Ctrl-C keeps Python's default.
        if not self._multi_process and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._on_signal)
        # A signal the command's start-up handler raised on, which something in between
        # caught (a library's `except Exception` around an optional import): act on it now.
        pending = next(
            (h.signal for h in self._previous.values() if isinstance(h, _StopAtOnce) and h.signal),
            None,
        )
        if pending is not None:
            self.__exit__(None, None, None)
            raise Preempted(None, pending)
        return self

    def _on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        if self._signal is None:
            self._signal = name
            if self._at_once:  # nothing to save yet: stop now (see _StopAtOnce for how)
                for handler in self._previous.values():
                    if isinstance(handler, _StopAtOnce) and handler.exit_at_once:
                        handler(signum, frame)
                raise Preempted(None, name)
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
        return self._agreed()

    def abandon_eval(self) -> str | None:
        """Asked between evaluation batches: the signal's name when the evaluation should be
        abandoned (the same answer at the same batch on every process), else None."""
        return self.signal_name if self._agreed() else None

    def _agreed(self) -> bool:
        if not self._multi_process:
            return self._signal is not None
        from jax.experimental import multihost_utils

        # jax's sync point is "the fastest process's next call": every process must make
        # the same sequence of calls, so steps and eval batches share one counter (each
        # process runs the same steps and the same number of eval batches). A call is a
        # local check under a lock (no message unless a notice came), cheap per eval batch.
        self._calls += 1
        return multihost_utils.reached_preemption_sync_point(self._calls)

    @property
    def signal_name(self) -> str:
        """The signal that stops the run (SIGTERM where jax's sync manager got it)."""
        return self._signal or "SIGTERM"

    def stop(self, step: int) -> Preempted:
        """The exception to raise once `step`'s checkpoint is saved."""
        return Preempted(step, self.signal_name)

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
    """A command's handler before a run starts (nothing to save: stop) and after it has
    ended (ignore: a late signal must not change the exit status while the interpreter
    and jax shut down).

    In the `jaxtrain` process itself (`exit_at_once`) it writes its one line and ends the
    process there and then: an exception raised into an import can land inside a C
    extension's initialisation, which jaxlib turns into an ImportError or a segfault
    (seen: `from jaxlib import _jax` interrupted ~65 ms into `jaxtrain train`). Nothing is
    being written yet: a run's `StopWatcher` takes over before its first write, and the
    read-only commands write their output last, each in one write or atomically. Called
    from Python, it raises `Preempted` instead, and remembers the signal in case what it
    raised is caught on its way out (see `StopWatcher.__enter__` and `check_signals`).
    """

    def __init__(self, exit_at_once: bool = False):
        self.armed = True
        self.exit_at_once = exit_at_once
        self.signal: str | None = None
        self.what: str | None = None  # the command, when it is not `train` (for the line)

    def __call__(self, signum, frame):
        if self.armed:
            name = signal.Signals(signum).name
            self.signal = self.signal or name
            stopped = Preempted(None, name, what=self.what)
            if self.exit_at_once:
                _say(f"jaxtrain: {stopped}")
                os._exit(stopped.exit_status)
            raise stopped


def name_command(command: str) -> None:
    """Tells the start-up handler which command runs (its line names it)."""
    handler = signal.getsignal(signal.SIGTERM)
    if isinstance(handler, _StopAtOnce) and command != "train":
        handler.what = f"jaxtrain {command}"


def stop_at_once_on_signals(exit_at_once: bool = False) -> dict:
    """SIGTERM and SIGINT stop the command at once (exit 75 / 130 with one line where
    `exit_at_once`, else raise `Preempted`), until a run's `StopWatcher` has taken over
    and ended; after that they are ignored.

    For a command's start-up: the `jaxtrain` command calls it first (`jaxtrain.cli.run`),
    `jaxtrain.cli.main` again for `train` when called from Python; where it is already in
    place it is kept (and nothing is replaced).

    Returns:
      The handlers it replaced, for `restore_signal_handlers`.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}
    current = signal.getsignal(signal.SIGTERM)
    if isinstance(current, _StopAtOnce) and current.armed:
        return {}
    stop = _StopAtOnce(exit_at_once)
    return {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}


def check_signals() -> None:
    """Raises `Preempted` if the start-up handler saw a signal whose exception something
    caught (see `_StopAtOnce`); for the command to call once its imports are done.

    Raises:
      Preempted: such a signal came.
    """
    signal_name = signal_seen()
    if signal_name is not None:
        raise Preempted(None, signal_name)


def signal_seen() -> str | None:
    """The signal the command's start-up handler (still in place) has seen, if any."""
    handler = signal.getsignal(signal.SIGTERM)
    return handler.signal if isinstance(handler, _StopAtOnce) else None


def disarm() -> None:
    """From now on the start-up handler ignores signals (the command is done or is saying
    why it stopped): no `Preempted` comes after this."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        handler = signal.getsignal(signum)
        if isinstance(handler, _StopAtOnce):
            handler.armed = False


def ignore_signals_from_now_on() -> None:
    """For the command's own process once it is done: a late SIGTERM or SIGINT is ignored.

    Python resets its own handlers to the default (terminate) while the interpreter shuts
    down: only SIG_IGN keeps a late signal from turning the exit status into 143.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    disarm()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


def restore_signal_handlers(previous: dict) -> None:
    """Puts back the handlers `stop_at_once_on_signals` replaced."""
    for signum, handler in previous.items():
        signal.signal(signum, handler)
