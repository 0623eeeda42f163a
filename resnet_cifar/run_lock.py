"""One writer per run folder: an exclusive OS lock held for a run's lifetime.

Two trainers on one `--model_dir` would interleave checkpoints, event files and
`done.json` into a curve made of two runs. The trainer therefore holds an
exclusive `flock` on `MODEL_DIR/.lock` from the moment it may write until it
exits; the kernel releases it when the process dies, however it dies (SIGKILL
included), so a stale lock cannot outlive its holder. The file records who holds
it (pid, host, start time) so that a refused second process can say so.

`flock` locks an open file description, so a second `open` + `flock` in the same
process conflicts too; on Linux NFS clients it is emulated with byte-range locks
that the server arbitrates, so runners on several nodes sharing a results folder
see each other's locks.
"""

import fcntl
import json
import os
import socket
import time
from typing import Optional

LOCK_FILE = ".lock"
# `holder()` probes with a shared lock held for microseconds; an exclusive request that
# meets such a probe is retried for this long before it counts as refused.
PROBE_GRACE = 1.0


class RunLocked(RuntimeError):
    """The run folder is held by another process; the message is one line naming it."""

    def __init__(self, model_dir: str, holder: str):
        super().__init__(f"--model_dir={model_dir} is in use by {holder}; "
                         "wait for it to finish or stop it, then run the same command again")
        self.model_dir = model_dir
        self.holder = holder


class RunLock:
    """The held lock of one run folder; `release()` (or process exit) frees it."""

    def __init__(self, model_dir: str, fd: int):
        self.model_dir = model_dir
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)          # closing the description drops the flock
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _path(model_dir: str) -> str:
    return os.path.join(model_dir, LOCK_FILE)


def _describe(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on host {info['host']} (since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its lock file names no holder yet)"


def acquire(model_dir: str, wait: float = 0.0, poll: float = 0.5) -> RunLock:
    """Takes the folder's lock (creating the folder), waiting up to `wait` seconds.

    Raises `RunLocked` naming the holder if it is still held after `wait` (at least
    `PROBE_GRACE`, so that another process's `holder()` probe is never taken for a run).
    """
    os.makedirs(model_dir, exist_ok=True)
    fd = os.open(_path(model_dir), os.O_RDWR | os.O_CREAT, 0o644)
    start = time.monotonic()
    deadline = start + max(wait, PROBE_GRACE)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = _describe(fd)
                os.close(fd)
                raise RunLocked(model_dir, holder) from None
            time.sleep(poll if time.monotonic() - start >= PROBE_GRACE else min(poll, 0.05))
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)
    return RunLock(model_dir, fd)


def holder(model_dir: str) -> Optional[str]:
    """'pid P on host H (since T)' if a live process holds the folder's lock, else None.

    Creates nothing: a folder without a lock file is not held.
    """
    try:
        fd = os.open(_path(model_dir), os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _describe(fd)
    finally:
        os.close(fd)
    return None
