"""`resnet_cifar/fidelity.py` against the values users read in `docs/fidelity.md`."""

import os
import re

import pytest

from resnet_cifar import fidelity
from tests.helpers import ROOT

DOC = os.path.join(ROOT, "docs", "fidelity.md")


def doc_text():
    with open(DOC, encoding="utf-8") as f:
        return f.read()


def doc_constants():
    """name -> value text from the `| `NAME` | value | source |` rows of the Constants table."""
    return dict(re.findall(r"^\| `([A-Z_]+)` \| ([^|]+?) \|", doc_text(), flags=re.M))


def parse(text):
    values = tuple(float(v) for v in text.split(","))
    return values if len(values) > 1 else values[0]


def test_the_table_lists_the_constants():
    names = set(doc_constants())
    assert len(names) >= 25
    assert {"WEIGHT_DECAY", "MOMENTUM", "BATCH_NORM_DECAY", "INITIAL_CONV_SQSUM"} <= names


@pytest.mark.parametrize("name", sorted(doc_constants()))
def test_constant_matches_the_doc(name):
    code = getattr(fidelity, name)
    want = parse(doc_constants()[name])
    if isinstance(want, tuple):
        assert tuple(float(c) for c in code) == want, name
    else:
        assert float(code) == want, name


def test_piecewise_factor_matches_the_doc():
    """The formula block: `a − b·(e − s)   (... e < ...)` per piece -> (start, a, ±b)."""
    pieces = []
    for a, sign, b, start in re.findall(r"^\s+(?:piecewise\(e\) = )?([\d.]+) ([−+]) ([\d.]+)·\(?e(?: − (\d+))?\)?",
                                        doc_text(), flags=re.M):
        slope = float(b) if sign == "+" else -float(b)
        pieces.append((float(start or 0), float(a), slope))
    assert pieces == [tuple(float(x) for x in p) for p in fidelity.PIECEWISE_FACTOR]


def test_the_doc_names_the_archive_and_the_post():
    text = doc_text()
    assert fidelity.ARCHIVE_NAME in text and fidelity.CIFAR_PAGE in text
    assert "https://blog.janestreet.com/l2-regularization-and-batch-norm/" in text
