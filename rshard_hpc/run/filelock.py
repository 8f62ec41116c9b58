"""One job at a time on a results file: an exclusive lock held for the whole job, on `OUT.lock` beside it.

The lock is the kernel's (fcntl.lockf: a POSIX record lock, which NFS and Lustre clients honour), so it is
released whenever the holder ends, however it ends; the file only says who holds it for the refusal message.
"""
from __future__ import annotations

import fcntl
import getpass
import os
import socket
import time
from pathlib import Path

from rshard_hpc.errors import InputError


class ResultsLock:
    """Take the lock (or raise an InputError naming its holder); `release()` at the end of the job."""

    def __init__(self, results_path):
        self.path = Path(f"{results_path}.lock")
        self.fd = None
        while self.fd is None:  # a lock taken on a file the last holder had just removed is retaken
            fd = self._open(results_path)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read(self.path) or "another process"
                os.close(fd)
                raise InputError(f"results file {results_path} is in use by another job ({holder}); wait for it "
                                 f"to end or choose another --out") from exc
            if _same_file(fd, self.path):
                self.fd = fd
            else:
                os.close(fd)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()} on {socket.gethostname()} (user {_user()}), since "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode())

    def _open(self, results_path) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)  # --out's folder, as the results file needs it
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise InputError(f"cannot create the lock file {self.path} for --out {results_path}: {exc}") from exc

    def release(self) -> None:
        """Remove the lock file and drop the lock (the next job may start)."""
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)  # closing drops the lock
        self.fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in this container: the uid will do
        return str(os.getuid())
