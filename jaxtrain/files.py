"""`write_atomically(path, contents)`: a file is either its old contents or its new, never half.

The standard library has no atomic write, and the packages that offered one
(`atomicwrites`) are unmaintained; this is the usual recipe: write a temporary file in
the same directory (`PATH.tmp`, so one writer at a time: the workdir lock sees to that), flush
it to disk, rename it over the target.
"""

import os


def write_atomically(path: str, contents: str | bytes | bytearray) -> None:
    """Replaces `path` with `contents` in one rename; a kill or a full disk leaves the old file.

    Raises:
      OSError: the directory cannot be written (no temporary file is left behind).
    """
    data = contents.encode("utf-8") if isinstance(contents, str) else contents
    temporary = f"{path}.tmp"  # beside the target: a rename within one file system
    try:
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        # A failed write must not leave its temporary file among the run's files.
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
