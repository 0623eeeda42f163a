"""The run-folder lock, with real processes: a holder in a child process, killed for real."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from resnet_cifar import process
from tests.helpers import ROOT

HOLD = """
import sys, time
from resnet_cifar import process
lock = process.lock(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


def start_holder(model_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(model_dir)], stdout=subprocess.PIPE,
                            text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_process_refused_naming_holder_then_free_after_sigkill(tmp_path):
    d = tmp_path / "run"
    proc = start_holder(d)
    try:
        with pytest.raises(process.RunLocked) as err:
            process.lock(str(d))
        message = str(err.value)
        assert f"pid {proc.pid} on host {socket.gethostname()}" in message
        assert "\n" not in message
        assert process.lock_holder(str(d)).startswith(f"pid {proc.pid} ")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # The kernel dropped the dead holder's lock: no stale lock outlives its process.
    assert process.lock_holder(str(d)) is None
    with process.lock(str(d)):
        assert process.lock_holder(str(d)).startswith(f"pid {os.getpid()} ")
    assert process.lock_holder(str(d)) is None


def test_acquire_waits_for_holder_to_exit(tmp_path):
    d = tmp_path / "run"
    proc = start_holder(d)
    killer = subprocess.Popen([sys.executable, "-c",
                               f"import os, time; time.sleep(1.0); os.kill({proc.pid}, 9)"])
    start = time.monotonic()
    lock = process.lock(str(d), wait=30, poll=0.1)
    waited = time.monotonic() - start
    lock.release()
    killer.wait()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert 0.5 < waited < 30


def test_holder_of_unlocked_or_missing_folder_is_none_and_creates_nothing(tmp_path):
    assert process.lock_holder(str(tmp_path / "absent")) is None
    assert not (tmp_path / "absent").exists()


def test_a_holder_probe_is_not_taken_for_a_run(tmp_path):
    """holder() holds a shared lock for an instant; an acquire meeting it must not refuse."""
    import fcntl
    import threading
    d = tmp_path / "run"
    d.mkdir()
    probe = os.open(str(d / process.LOCK_FILE), os.O_RDONLY | os.O_CREAT)
    fcntl.flock(probe, fcntl.LOCK_SH)                 # a probe caught in the act ...
    threading.Timer(0.3, os.close, [probe]).start()   # ... that ends 0.3 s later
    start = time.monotonic()
    with process.lock(str(d)):
        assert time.monotonic() - start >= 0.25       # it did meet the probe, and waited
