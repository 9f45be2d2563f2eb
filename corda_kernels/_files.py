"""Crash-safe writes (one file, or a whole folder) and file digests, shared by calibration
checkpoints, the decomposition cache and the CLI's output folders."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager

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


def _remove_stale_folders(parent: str, prefix: str) -> None:
    """Remove the temporary folders :func:`atomic_directory` left when its process was killed
    (``kill -9``): their names carry the pid, and that process is gone."""
    for name in os.listdir(parent):
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            except OSError:
                pass


@contextmanager
def atomic_directory(path: str, label: str = ""):
    """Yield a fresh temporary folder beside ``path``; when the block succeeds it replaces ``path``
    (renames: a reader sees the old folder or the whole new one), on any error or Ctrl-C it is
    removed and ``path`` is left as it was. A full disk becomes one message naming ``label``
    (default: ``path``)."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    prefix = f".{os.path.basename(path)}.partial-"
    _remove_stale_folders(parent, prefix)
    tmp = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
    try:
        yield tmp
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.rmdir(old)
            os.rename(path, old)
        os.rename(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(
                exc.errno, f"the disk is full ({exc.filename or parent}); nothing was written to {label or path}"
            ) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
