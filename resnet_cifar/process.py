"""The training process's guards: one writer per run folder, and signals that stop it
between two steps. Neither imports TensorFlow: the command installs both before TF starts.
"""

import contextlib
import fcntl
import json
import os
import signal
import socket
import threading
import time
from typing import Optional


# ----------------------------------------------------------------------------- one writer per folder

# One writer per run folder: an exclusive OS lock held for a run's lifetime.
#
# Two trainers on one `--model_dir` would interleave checkpoints, event files and
# `done.json` into a curve made of two runs. The trainer therefore holds an
# exclusive `flock` on `MODEL_DIR/.lock` from the moment it may write until it
# exits; the kernel releases it when the process dies, however it dies (SIGKILL
# included), so a stale lock cannot outlive its holder. The file records who holds
# it (pid, host, start time) so that a refused second process can say so.
#
# `flock` locks an open file description, so a second `open` + `flock` in the same
# process conflicts too; on Linux NFS clients it is emulated with byte-range locks
# that the server arbitrates, so runners on several nodes sharing a results folder
# see each other's locks.

LOCK_FILE = ".lock"
# `lock_holder()` probes with a shared lock held for microseconds; an exclusive request that
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


def lock(model_dir: str, wait: float = 0.0, poll: float = 0.5) -> RunLock:
    """Takes the folder's lock (creating the folder), waiting up to `wait` seconds.

    Raises `RunLocked` naming the holder if it is still held after `wait` (at least
    `PROBE_GRACE`, so that another process's `lock_holder()` probe is never taken for a run).
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


def lock_holder(model_dir: str) -> Optional[str]:
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


# ----------------------------------------------------------------------------- signals

# SIGINT and SIGTERM end a run at once, cleanly, resumable by the same command.
#
# The handlers raise `Interrupted` (a BaseException, like KeyboardInterrupt, so no
# `except Exception` on the way swallows it) in the main thread: at once before training,
# and between two train steps during it (training runs inside `deferred`, and the
# `callbacks.EpochLog` callback raises the pending signal after each step, so the
# exception never lands inside TensorFlow's own code). The partial epoch is
# dropped: nothing of it was logged or checkpointed, and a resume replays it from
# the last checkpoint exactly. A checkpoint being saved is finished first
# (`deferred`), so the signal never lands between a checkpoint and its index.
# A runner that starts the trainer with PR_SET_PDEATHSIG=SIGTERM thereby stops it
# cleanly when the runner dies.

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.name = signal.Signals(signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum          # 130 for SIGINT, 143 for SIGTERM, as shells report


_deferring = 0
_pending = None
_received = None        # the first signal of this process's handlers, even if something swallowed it


def _handler(signum, frame):
    global _pending, _received
    _received = _received or signum
    if _deferring:
        _pending = _pending or signum
        return
    raise Interrupted(signum)


def check_signal():
    """Raises `Interrupted` if a signal arrived whose exception something on the way
    swallowed (a library's bare `except:` during an import, say): the run still stops."""
    if _received is not None:
        raise Interrupted(_received)


@contextlib.contextmanager
def handlers():
    """Installs the handlers (main thread only; elsewhere a no-op) and restores the old ones."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _received
    if not any(signal.getsignal(s) is _handler for s in SIGNALS):
        _received = None        # a new outermost scope (tests run several in one process)
    old = {s: signal.signal(s, _handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def raise_pending():
    """Raises the signal that arrived inside `deferred`, if any: called where stopping is safe."""
    global _pending
    if _pending is not None:
        signum, _pending = _pending, None
        raise Interrupted(signum)


@contextlib.contextmanager
def deferred():
    """A signal arriving inside the block takes effect when the block has finished."""
    global _deferring, _pending
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _pending is not None:
            signum, _pending = _pending, None
            raise Interrupted(signum)
