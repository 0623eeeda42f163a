"""Fixtures shared by test modules (helper functions are in tests/helpers.py)."""

import pytest

from tests.helpers import train_small


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished ResNet-8 baseline: 2 epochs, checkpoints ckpt-1 and ckpt-2."""
    path = str(tmp_path_factory.mktemp("faults") / "baseline")
    r = train_small(path)
    assert r.returncode == 0, r.stderr[-3000:]
    return path
