"""The error type for bad user input (config, workdir, data set names)."""


class ConfigError(ValueError):
    """A problem with what the user asked for, reported as one line, exit status 2.

    Raised before anything is written to the workdir, so a failing run never damages
    an existing run directory.
    """
