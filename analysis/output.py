"""Writing what the analysis makes: figures as PNG and SVG, tables as Markdown and CSV."""

import contextlib
import csv
import os
from typing import Dict, List, Sequence

FORMATS = ("png", "svg")


def save_figure(fig, out_dir: str, name: str) -> List[str]:
    """NAME.png and NAME.svg; no date in the SVG, so the same data gives the same file."""
    paths = []
    for fmt in FORMATS:
        path = os.path.join(out_dir, f"{name}.{fmt}")
        with atomic(path, "wb") as f:
            fig.savefig(f, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
        paths.append(path)
    return paths


def write_table(out_dir: str, name: str, markdown: str, rows: Sequence[Dict]) -> List[str]:
    """NAME.md (the Markdown as given) and NAME.csv (the rows, one column per key)."""
    md_path, csv_path = os.path.join(out_dir, f"{name}.md"), os.path.join(out_dir, f"{name}.csv")
    with atomic(md_path) as f:
        f.write(markdown)
    with atomic(csv_path) as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return [md_path, csv_path]


@contextlib.contextmanager
def atomic(path: str, mode: str = "w"):
    """A file opened for writing that appears at `path` whole, or not at all (a full disk)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"newline": ""})) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp) and not os.path.isdir(tmp):
            os.remove(tmp)
