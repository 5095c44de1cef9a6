"""What can stop a run, and the exit status the command gives for each.

0   done
2   bad input (ConfigError): a config, flag, workdir or data set the run refuses, one
    line naming it; nothing in the workdir changed
3   a non-finite loss, gradient or update stopped the run (jaxtrain.nonfinite)
65  a data set's files are damaged (DataError): one line naming the data set, the file
    and what rebuilds it; a bundled data set is rebuilt when the next run starts
74  the environment failed (StorageError): disk full, permission denied, an I/O
    error; the last whole checkpoint is intact, rerun once the cause is fixed
75  preempted (SIGTERM): a checkpoint of the last step has committed; rerun
130 interrupted (Ctrl-C): as 75, but a person asked, so retry wrappers should not
"""

import difflib

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
EXIT_DATA = 65  # EX_DATAERR (sysexits.h): the input data was incorrect
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


class DataError(StorageError):
    """A data set's files are damaged: a shard fails its checksum, is cut short or gone,
    or its metadata does not load. Exit status 65.

    Neither bad input (the request was fine) nor a failing disk (rerunning will not help
    until the files are rebuilt): the message names the data set, the file and what
    rebuilds it. A StorageError, so a caller catching those catches this too. A bundled
    data set (digits, pysource) found damaged when a run starts is set aside and rebuilt
    instead; this is raised for damage found mid-run (the run stops, its last whole
    checkpoint intact; the next run rebuilds) and for data sets jaxtrain cannot rebuild.
    """


def did_you_mean(name: str, choices) -> str:
    """` (did you mean 'x'?)` for the closest of `choices` to a mistyped `name`, or ""."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
