"""Writing what the analysis makes: figures as PNG and SVG, tables as Markdown and CSV."""

import csv
import os
from typing import Dict, List, Sequence

from resnet_cifar.atomic import atomic_open

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


def write_table(out_dir: str, name: str, markdown: str, rows: Sequence[Dict]) -> List[str]:
    """NAME.md (the Markdown as given) and NAME.csv (the rows, one column per key)."""
    md_path, csv_path = os.path.join(out_dir, f"{name}.md"), os.path.join(out_dir, f"{name}.csv")
    with atomic_open(md_path) as f:
        f.write(markdown)
    with atomic_open(csv_path) as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return [md_path, csv_path]

