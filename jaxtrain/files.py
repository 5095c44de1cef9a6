"""Writes that leave a file whole: `write_atomically` (old contents or new) and
`append_line` (a line added whole, on a line of its own, or not at all).

The standard library has no atomic write, and the packages that offered one
(`atomicwrites`) are unmaintained; this is the usual recipe: write a temporary file in
the same directory (`PATH.tmp`, so one writer at a time: the workdir lock sees to that), flush
it to disk, rename it over the target.

`storage_error` turns the OSError of a failed write into the one-line `StorageError`
(exit 74) the commands report.
"""

import os

from jaxtrain.errors import StorageError


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


def open_for_appending(path: str) -> int:
    """A descriptor of `path` (created if missing) for `append_line`.

    Raises:
      OSError: it cannot be opened or created.
    """
    return os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)


def append_line(fd: int, line: bytes) -> None:
    """Appends `line` (ending in a newline) to the file open at `fd` (`open_for_appending`).

    A file whose last line has no newline (a writer killed mid-line, an editor) gets one
    first, so the new line never glues onto it. Otherwise as `append_frame`.

    Raises:
      OSError: the write failed; nothing of `line` is left in the file.
    """
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b"\n":
        line = b"\n" + line
    _append(fd, line, size)


def append_frame(fd: int, data: bytes) -> None:
    """Appends `data` to the file open at `fd` whole, or not at all: a write that fails part
    way (a full disk, the size limit of `ulimit -f`) is cut back off.

    Raises:
      OSError: the write failed; nothing of `data` is left in the file.
    """
    _append(fd, data, os.fstat(fd).st_size)


def _append(fd: int, data: bytes, size: int) -> None:
    try:
        view = memoryview(data)
        while view:  # os.write may write less than asked (EFBIG's partial write does)
            view = view[os.write(fd, view) :]
    except BaseException:
        try:
            os.ftruncate(fd, size)
        except OSError:
            pass  # a file that cannot even be cut back: the error raised says why
        raise


def storage_error(what: str, path: str, error: OSError) -> StorageError:
    """`cannot <what> '<path>': <cause>`, the one line a failed write is reported as."""
    return StorageError(f"cannot {what} {path!r}: {error.strerror or error}")
