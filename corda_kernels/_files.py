"""Crash-safe file writes and file digests, shared by calibration checkpoints and the decomposition cache."""

from __future__ import annotations

import hashlib
import os
import tempfile

BLOCK = 1 << 20
TEMP_PREFIX = ".tmp-"


def write_atomic(path: str, write) -> None:
    """``write(temporary path)`` in ``path``'s directory, fsync it, then rename it to ``path``
    (atomic on POSIX: readers see the old file or the whole new one); the temporary is removed on
    failure."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=TEMP_PREFIX, suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def remove_stale_temporaries(directory: str, is_ours) -> list[str]:
    """Delete the temporaries :func:`write_atomic` left in ``directory`` when its process was
    killed mid-write (``kill -9``, power loss: no ``except`` ran) for the files ``is_ours(name)``
    accepts; returns the names removed. Call it only where no other process writes those files."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in os.listdir(directory):
        if not name.startswith(TEMP_PREFIX):
            continue
        # mkstemp's name: prefix, 8 random characters, then the final file's name
        final = name[len(TEMP_PREFIX) + 8 :]
        if is_ours(final):
            try:
                os.remove(os.path.join(directory, name))
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed


def file_digest(path: str, algorithm: str = "blake2b") -> str:
    """Hex digest of a file's bytes: ``"blake2b"`` (20 bytes) or any :func:`hashlib.new` name."""
    digest = hashlib.blake2b(digest_size=20) if algorithm == "blake2b" else hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()
