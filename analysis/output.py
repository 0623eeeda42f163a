"""Writing what the analysis makes: figures as PNG and SVG, tables as Markdown and CSV,
and the cells the theory tables write numbers, epochs and runs in."""

import csv
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from resnet_cifar.checkpoints import atomic_open

FORMATS = ("png", "svg")


def save_figure(fig, out_dir: str, name: str) -> List[str]:
    """NAME.png and NAME.svg; no date in the SVG, so the same data gives the same file."""
    paths = []
    for fmt in FORMATS:
        path = os.path.join(out_dir, f"{name}.{fmt}")
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
        paths.append(path)
    return paths


def write_table(out_dir: str, name: str, markdown: str, rows: Sequence[Dict],
                fields: Optional[Sequence[str]] = None) -> List[str]:
    """NAME.md (the Markdown as given) and NAME.csv (the rows, one column per key; `fields`,
    if given, are the columns, so that a table without rows still has its header)."""
    md_path, csv_path = os.path.join(out_dir, f"{name}.md"), os.path.join(out_dir, f"{name}.csv")
    with atomic_open(md_path) as f:
        f.write(markdown)
    with atomic_open(csv_path) as f:
        writer = csv.DictWriter(f, fieldnames=list(fields or rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return [md_path, csv_path]



def csv_number(x: Optional[float]) -> str:
    """A CSV field: the number unrounded (repr), empty for None, NaN and infinity."""
    return "" if x is None or not np.isfinite(x) else repr(float(x))


def scientific(x: Optional[float]) -> str:
    """A Markdown cell: the number to 4 significant digits (1.234e-03), "—" for None, NaN and infinity."""
    return "—" if x is None or not np.isfinite(x) else f"{x:.3e}"


def percent(x: Optional[float]) -> str:
    """A Markdown cell: an accuracy in [0, 1] as a percentage to 2 decimals, "n/a" for None."""
    return "n/a" if x is None else f"{100 * x:.2f}%"


def epoch_span(a: float, b: float) -> str:
    """Epochs a to b as a Markdown cell: "a–b", or "a" when they are one."""
    return f"{a:g}" if a == b else f"{a:g}–{b:g}"


def seeds_label(label: str, measured: Sequence[float]) -> str:
    """A table's run cell: its label, and how many seeds measured it when more than one."""
    seeds = sum(np.isfinite(m) for m in measured)
    return label + (f" ({seeds} seeds)" if seeds > 1 else "")
