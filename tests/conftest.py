"""Fixtures shared by test modules (helper functions are in tests/helpers.py)."""

import shutil
import tempfile

import pytest

from tests.helpers import train_small


@pytest.fixture(scope="session", autouse=True)
def private_tmp(tmp_path_factory):
    """The suite's own temporary folder, removed at the end, as TMPDIR of this process and of
    every process it starts: what they leave there (TFDS's scratch folders, TF's autograph
    files of killed trainers, the sessions of the Ray instances the runner starts) is not left
    in the machine's /tmp, and no other Ray's /tmp/ray (its session_latest) is touched. Short,
    in /tmp itself: Ray's socket paths must stay below 108 characters. pytest's own folders
    are placed first, where they always go (tmp_path_retention_policy: kept for failures)."""
    tmp_path_factory.getbasetemp()
    path = tempfile.mkdtemp(prefix="rc")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", path)
        mp.setattr(tempfile, "tempdir", path)
        yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished ResNet-8 baseline: 2 epochs, checkpoints ckpt-1 and ckpt-2."""
    path = str(tmp_path_factory.mktemp("faults") / "baseline")
    r = train_small(path)
    assert r.returncode == 0, r.stderr[-3000:]
    return path
