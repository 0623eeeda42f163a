"""Grid sweeps: final test accuracy against each grid flag's value.

`python -m experiments.run_all --grid=FLAG=V1,V2 ...` writes each grid point to
`RESULTS/<flag>=<value>[,<flag>=<value>...]/<run>/seed_<k>/`. This module finds
those point folders, and draws one figure per grid flag: every run's final test
accuracy (the last logged `epoch_accuracy` of `validation/`), mean over seeds
with a min-max band, against the flag's value, with a table of the same numbers
(grid.md, grid.csv). `analysis/make_figures` also draws the usual figures and
tables of each point into `figures/<point>/`.
"""

import os
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np
from matplotlib.figure import Figure

from analysis import figures, loading, output
from resnet_cifar import events, tags
from resnet_cifar import command_line
from resnet_cifar.command_line import ArgumentParser, not_a_folder

Point = Tuple[Tuple[str, str], ...]    # ((flag, value), ...) in folder-name order


def parse_point(name: str):
    """`weight_decay=1e-4,bn_decay=0.9` -> (('weight_decay', '1e-4'), ('bn_decay', '0.9')); else None."""
    pairs = []
    for part in name.split(","):
        flag, sep, value = part.partition("=")
        if not sep or not flag or not value:
            return None
        pairs.append((flag, value))
    return tuple(pairs)


def find_points(results_dir: str) -> Dict[str, Point]:
    """Grid-point folders of a results folder that hold runs: folder name -> point."""
    points = {}
    for name in sorted(os.listdir(results_dir)) if os.path.isdir(results_dir) else []:
        point = parse_point(name)
        if point and os.path.isdir(os.path.join(results_dir, name)) and \
                events.find_runs(os.path.join(results_dir, name)):
            points[name] = point
    return points


def final_accuracy(runs: Sequence[events.Run]) -> List[float]:
    """Each seed's last logged test accuracy (runs that never evaluated are left out)."""
    values = [run.last(tags.EPOCH_ACCURACY, tags.VALIDATION_DIR) for run in runs]
    return [v for v in values if v is not None]


def table(loaded: Mapping[Point, Mapping[str, Sequence[events.Run]]]) -> List[dict]:
    """One row per (grid point, run name): seeds, mean, std, min, max of final test accuracy."""
    rows = []
    for point, by_name in loaded.items():
        for name in figures.ordered_names(by_name):
            acc = np.array(final_accuracy(by_name[name]), dtype=np.float64)
            if not len(acc):
                continue
            rows.append(dict(point=point, run=name, seeds=len(acc), mean=float(acc.mean()),
                             std=float(acc.std(ddof=1)) if len(acc) > 1 else float("nan"),
                             min=float(acc.min()), max=float(acc.max()),
                             complete=all(r.complete for r in by_name[name])))
    return rows


def _numeric(values: Sequence[str]):
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def accuracy_figure(rows: Sequence[dict], flag: str) -> Figure:
    """Final test accuracy against `flag`'s value: a line (mean) and band (min-max over seeds) per
    run, and per combination of the other grid flags' values."""
    values = sorted({dict(r["point"])[flag] for r in rows}, key=lambda v: (_numeric([v]) or [0])[0])
    nums = _numeric(values)
    log_x = bool(nums) and min(nums) > 0 and max(nums) / min(nums) >= 10
    pos = dict(zip(values, nums)) if nums else {v: i for i, v in enumerate(values)}
    fig = Figure(figsize=figures.FIGSIZE, dpi=figures.DPI)
    ax = fig.add_subplot()
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        others = tuple((f, v) for f, v in r["point"] if f != flag)
        groups.setdefault((r["run"], others), []).append(r)
    for (name, others), members in groups.items():
        members.sort(key=lambda r: pos[dict(r["point"])[flag]])
        x = [pos[dict(r["point"])[flag]] for r in members]
        label = figures.label_of(name) + "".join(f", {f}={v}" for f, v in others)
        line, = ax.plot(x, [100 * r["mean"] for r in members], marker="o", label=label)
        if any(r["seeds"] > 1 for r in members):
            ax.fill_between(x, [100 * r["min"] for r in members], [100 * r["max"] for r in members],
                            color=line.get_color(), alpha=0.2, linewidth=0)
    if log_x:
        ax.set_xscale("log")
    if not nums:
        ax.set_xticks(list(pos.values()), list(pos))
    ax.set_xlabel(f"--{flag}")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title(f"Final test accuracy vs {flag} (mean, min-max over seeds)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def _point_name(point: Point) -> str:
    return ",".join(f"{f}={v}" for f, v in point)


def to_markdown(rows: Sequence[dict]) -> str:
    lines = ["| grid point | run | seeds | final test accuracy (%) | min | max |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        std = "" if np.isnan(r["std"]) else f" ± {100 * r['std']:.2f}"
        mark = "" if r["complete"] else " (incomplete)"
        lines.append(f"| {_point_name(r['point'])} | {figures.label_of(r['run'])}{mark} | {r['seeds']} | "
                     f"{100 * r['mean']:.2f}{std} | {100 * r['min']:.2f} | {100 * r['max']:.2f} |")
    return "\n".join(lines) + "\n"


def csv_rows(rows: Sequence[dict], flags: Sequence[str]) -> List[dict]:
    """grid.csv's rows: each grid flag's value (empty where a point has none), then the run
    and its final test accuracy, unrounded."""
    out = []
    for r in rows:
        point = dict(r["point"])
        cells = {flag: point.get(flag, "") for flag in flags}
        cells.update(run=r["run"], seeds=r["seeds"], test_accuracy_mean=repr(r["mean"]),
                     test_accuracy_std=repr(r["std"]), min=repr(r["min"]), max=repr(r["max"]),
                     complete=r["complete"])
        out.append(cells)
    return out


def write(loaded: Mapping[Point, Mapping[str, Sequence[events.Run]]], out_dir: str, save) -> List[str]:
    """grid.md, grid.csv and grid_test_accuracy[_<flag>].png/svg; `save(fig, out_dir, name)`."""
    rows = table(loaded)
    if not rows:
        return []
    os.makedirs(out_dir, exist_ok=True)
    written = []
    flags = list(dict.fromkeys(f for r in rows for f, _ in r["point"]))
    for flag in flags:
        name = "grid_test_accuracy" if len(flags) == 1 else f"grid_test_accuracy_{flag}"
        written += save(accuracy_figure(rows, flag), out_dir, name)
    written += output.write_table(out_dir, "grid", to_markdown(rows), csv_rows(rows, flags))
    return written


def main(argv=None) -> int:
    """`python -m analysis.grid RESULTS [--out DIR]`: the grid figure and table alone
    (`analysis.make_figures` draws them too, with every point's own figures)."""
    import sys

    parser = ArgumentParser(
        prog="python -m analysis.grid",
        description="Final test accuracy against each grid flag's value, from a grid sweep's results "
                    "(RESULTS_DIR/<flag>=<value>[,...]/<run>/seed_<k>/): grid.md, grid.csv and "
                    "grid_test_accuracy figures.")
    parser.add_argument("results_dir", metavar="RESULTS_DIR", help="the runner's --results_dir of a --grid sweep")
    parser.add_argument("--out", "--out_dir", dest="out_dir", metavar="DIR", default=None,
                        help="output folder (default: RESULTS_DIR/figures)")
    args = parser.parse_args(argv)
    out_dir = args.out_dir or os.path.join(args.results_dir, "figures")

    def fail(message, code):
        print(f"error: {message}", file=sys.stderr)
        return code

    if not os.path.isdir(args.results_dir):
        return fail(not_a_folder(args.results_dir), 2)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        return fail(f"--out={out_dir} is a file, not a folder", 2)
    try:
        loaded = {point: loading.load_results(events.find_runs(os.path.join(args.results_dir, folder)))
                  for folder, point in find_points(args.results_dir).items()}
    except events.EventsError as e:
        return fail(str(e), 2)
    loaded = {point: runs for point, runs in loaded.items() if runs}
    if not loaded:
        return fail(f"no grid points with readable runs in {args.results_dir} "
                    "(folders named <flag>=<value>, from experiments.run_all --grid)", 2)
    try:
        written = write(loaded, out_dir, output.save_figure)
    except OSError as e:
        return fail(f"cannot write to {out_dir}: {e.strerror or e}", 1)
    if not written:
        return fail(f"no run in the grid of {args.results_dir} has a test accuracy yet", 1)
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    command_line.run(main)
