"""SIGINT and SIGTERM end a run at once, cleanly, resumable by the same command.

The handlers raise `Interrupted` (a BaseException, like KeyboardInterrupt, so no
`except Exception` on the way swallows it) in the main thread: at once before training,
and between two train steps during it (training runs inside `deferred`, and the
`callbacks.StopOnSignal` callback raises the pending signal after each step, so the
exception never lands inside TensorFlow's own code). The partial epoch is
dropped: nothing of it was logged or checkpointed, and a resume replays it from
the last checkpoint exactly. A checkpoint being saved is finished first
(`deferred`), so the signal never lands between a checkpoint and its index.
A runner that starts the trainer with PR_SET_PDEATHSIG=SIGTERM thereby stops it
cleanly when the runner dies.
"""

import contextlib
import signal
import threading

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


def check():
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
