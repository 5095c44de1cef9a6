"""jaxtrain.files.write_atomically: the old contents or the new, never half, nothing left over."""

import errno
import os

import pytest

from jaxtrain import files


def test_writes_text_and_bytes_and_replaces(tmp_path):
    path = str(tmp_path / "config.json")
    files.write_atomically(path, "first ü\n")
    assert open(path, encoding="utf-8").read() == "first ü\n"
    files.write_atomically(path, bytearray(b"\x00second"))
    assert open(path, "rb").read() == b"\x00second"
    assert os.listdir(tmp_path) == ["config.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = str(tmp_path / "metrics.jsonl")
    files.write_atomically(path, "old\n")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        files.write_atomically(path, "new, cut short\n")
    assert open(path, encoding="utf-8").read() == "old\n"
    assert os.listdir(tmp_path) == ["metrics.jsonl"]


def test_an_unwritable_directory_raises_oserror(tmp_path):
    with pytest.raises(OSError):
        files.write_atomically(str(tmp_path / "missing" / "config.json"), "x")
