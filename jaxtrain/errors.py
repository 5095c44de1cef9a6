"""What can stop a run, and the exit status the command gives for each.

0   done
2   bad input (ConfigError): a config, flag, workdir or data set the run refuses, one
    line naming it; nothing in the workdir changed
3   a non-finite loss, gradient or update stopped the run (jaxtrain.nonfinite)
74  the environment failed (StorageError): disk full, permission denied, an I/O
    error; the last whole checkpoint is intact, rerun once the cause is fixed
75  preempted (SIGTERM): a checkpoint of the last step has committed; rerun
130 interrupted (Ctrl-C): as 75, but a person asked, so retry wrappers should not
"""

import difflib

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
EXIT_IO = 74  # EX_IOERR (sysexits.h)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "temporary failure, try again"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention


class ConfigError(ValueError):
    """A problem with what the user asked for, reported as one line, exit status 2.

    Raised before anything is written to the workdir, so a failing run never damages
    an existing run directory.
    """


class StorageError(RuntimeError):
    """The environment failed under the run (disk full, permission, I/O): exit status 74.

    The message names the path and the cause; the newest whole checkpoint is intact.
    """


def did_you_mean(name: str, choices) -> str:
    """` (did you mean 'x'?)` for the closest of `choices` to a mistyped `name`, or ""."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
