"""A run's workdir: one run at a time, and files replaced without following planted links.

* ``WorkdirLock``: an exclusive ``flock`` on ``WORKDIR/.lock``, held for the life of the run
  (multi-process runs: process 0 only). The kernel releases it when the process ends, however it
  ends, so a lock can never outlive its run; the file keeps the holder's pid and host, so a second
  run names the first. A run that ends removes the file (while holding it; a run that opened the
  old file checks that it locked the file now at the path); one that finds a file left by a
  killed run says that it took it over.
* ``write_atomic``: a file's new content goes to a fresh temporary file in the same directory,
  created exclusively under a random name (no fixed ``*.tmp`` name for anyone to plant a link
  at), then renamed over the destination. A rename replaces a symbolic link itself, never the
  file it points to; readers see the old file or the new one, never a mix.
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import socket
import tempfile
import time
from typing import Optional

from absl import logging

LOCK_NAME = ".lock"
#: Every command that trained in the workdir, one line each (the model card of an export quotes
#: them).
COMMANDS_NAME = "commands.txt"


def record_command(workdir: str | pathlib.Path, argv: list[str]) -> None:
    """Appends ``python -m vard_jax.main ARGS`` (``argv[1:]`` quoted for a shell) to
    ``WORKDIR/commands.txt``."""
    import shlex

    with open_append(pathlib.Path(workdir) / COMMANDS_NAME) as f:
        f.write(shlex.join(["python", "-m", "vard_jax.main", *argv[1:]]) + "\n")


class WorkdirError(RuntimeError):
    """The workdir cannot be used now; the message is one line for the user."""


class SaveError(RuntimeError):
    """A checkpoint could not be written (disk full, I/O error); one line for the user. The
    checkpoints written before it are complete."""


def write_atomic(path: str | pathlib.Path, data: str | bytes) -> None:
    """Replaces ``path``'s content with ``data`` (str: UTF-8) in one rename, link-safe."""
    path = pathlib.Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial",
                                             dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def open_append(path: str | pathlib.Path):
    """``path`` opened for appending text; refuses (OSError) to follow a symbolic link."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.fdopen(os.open(path, flags, 0o644), "a", encoding="utf-8")


class WorkdirLock:
    """``with WorkdirLock(workdir):`` or ``acquire()``/``release()``; raises WorkdirError."""

    def __init__(self, workdir: str | pathlib.Path):
        self.path = pathlib.Path(workdir) / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> "WorkdirLock":
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe(_read(fd))
                os.close(fd)
                raise WorkdirError(f"workdir {self.path.parent} is in use by another run "
                                   f"({holder}); wait for it to end, or use another --workdir"
                                   ) from None
            except OSError as error:  # a file system without flock (some network mounts)
                logging.warning("cannot lock %s (%s): nothing stops a second run on this "
                                "workdir", self.path, error.strerror or error)
                break
            try:  # still the file at that path? (a releasing run may have just removed it)
                if os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        previous = _read(fd)
        if previous:
            logging.warning("workdir %s: took over the lock of a run that ended without "
                            "releasing it (%s)", self.path.parent, _describe(previous))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(self.path, flags, 0o644)
        except OSError:
            if os.path.islink(self.path):
                raise WorkdirError(f"{self.path} is a symbolic link, not this program's lock "
                                   "file; remove it or use another --workdir") from None
            raise

    def release(self) -> None:
        """Removes the file while still holding it (a clean end leaves nothing), then unlocks."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _describe(content: str) -> str:
    try:
        owner = json.loads(content)
        return f"pid {owner['pid']} on {owner['host']}, since {owner['since']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
