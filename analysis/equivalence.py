"""The equivalence study: does replaying the baseline's weight norms reproduce it, at
which granularity (global / per layer / per channel), at each weight decay?

Input: a results folder of the weight-decay grid (the runner's
`--grid=weight_decay=1e-4,2e-4,5e-4`), laid out as

    RESULTS/weight_decay=<wd>/<run>/seed_<k>/

with the runs of `experiments/equivalence/`: `baseline` and the replays
`conv_lr_scale` (global), `conv_lr_scale_per_layer`, `conv_lr_scale_per_channel`.

For each weight decay and replay, each seed is compared with the baseline of the same
seed (the run it replayed):
  - accuracy gap: |final test accuracy - the baseline's|;
  - mean step:    max over epochs of |conv_relative_step / baseline's - 1|;
  - layers:       median over layers of (max over epochs of |ratio_l - 1|), ratio_l the
                  same for conv_relative_step/<layer>;
averaged over seeds. The noise floor is the same comparison between two baselines of
consecutive seeds: what two runs differ by that should agree in expectation. A replay
at or below the floor is as close to the baseline as the baseline is to itself.

    python -m analysis.equivalence RESULTS [--out=RESULTS/figures]

writes equivalence.png/.svg (one panel per measure, weight decay on the x axis)
and equivalence.md/.csv.
"""

import math
import os
import re
import sys
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from analysis import figures, loading, output, precise_bn, replay_match
from resnet_cifar import events, tags
from resnet_cifar import command_line
from resnet_cifar.command_line import ArgumentParser, not_a_folder
from resnet_cifar.runs import REPLAY_GRANULARITY

GRID_FLAG = "weight_decay"
GRID_DIR = re.compile(rf"^{GRID_FLAG}=(.+)$")
BASELINE = figures.BASELINE
REPLAYS = REPLAY_GRANULARITY     # run name (flagfile) -> granularity
NOISE_FLOOR = "noise floor"
MEASURES = (("acc_gap", "final test accuracy"),
            ("step_dev", "relative step, mean over conv layers"),
            ("layer_dev", "relative step of each conv layer"))
YLABELS = {"acc_gap": "|replay − baseline| (percentage points)",
           "precise_gap": "|replay − baseline| (percentage points)",
           "step_dev": "max over epochs of |replay / baseline − 1|",
           "layer_dev": "median over layers of max |ratio − 1|"}
COLORS = {"global": "tab:green", "per layer": "tab:purple", "per channel": "tab:orange",
          NOISE_FLOOR: "gray"}


def decay_label(wd: float) -> str:
    """2e-4, as the grid's folders and flags write a weight decay (not 0.0002)."""
    mantissa, exponent = f"{wd:.6e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def load_grid(results_dir: str) -> Dict[float, Dict[str, List[events.Run]]]:
    """weight decay -> run name -> runs (seed order), from RESULTS/weight_decay=<wd>/."""
    if not os.path.isdir(results_dir):
        raise events.EventsError(not_a_folder(results_dir))
    grid = {}
    for entry in sorted(os.listdir(results_dir)):
        match = GRID_DIR.match(entry)
        if not match or not os.path.isdir(os.path.join(results_dir, entry)):
            continue
        try:
            wd = float(match.group(1))
        except ValueError:
            continue
        runs = events.find_runs(os.path.join(results_dir, entry))
        if wd in grid:                                 # weight_decay=2e-4 and =0.0002: one point
            figures.note(f"equivalence: {entry} is the weight decay {decay_label(wd)} of another folder: "
                         "their runs are one point")
        grid.setdefault(wd, {})
        for name, run in loading.read_runs(runs):     # one bad run does not stop the study
            grid[wd].setdefault(name, []).append(run)
    if not grid:
        raise events.EventsError(f"{results_dir}: no {GRID_FLAG}=<value>/ folders (run the grid first)")
    return grid


def _final_accuracy(run: events.Run, subdir: str = tags.VALIDATION_DIR) -> float:
    value = run.last(tags.EPOCH_ACCURACY, subdir)
    return math.nan if value is None else value


def _precise_accuracy(run: events.Run) -> float:
    """Test accuracy with recomputed BN statistics (analysis.precise_bn) at the run's last
    epoch, NaN if not evaluated there."""
    return precise_bn.accuracy_at(run.run_dir, int(run.config.get("train_epochs", 0)))


def pair_metrics(run: events.Run, base: events.Run) -> Optional[dict]:
    """The three measures of one run against one baseline; None without relative steps."""
    m = replay_match.match(run, base)
    if m is None:
        return None
    layer_devs = [float(np.max(np.abs(v - 1))) for v in m["layers"].values()]
    diff = _final_accuracy(run) - _final_accuracy(base)
    precise = _precise_accuracy(run) - _precise_accuracy(base)
    return dict(acc_gap=abs(diff), acc_diff=diff, precise_gap=abs(precise), precise_diff=precise,
                train_acc_diff=_final_accuracy(run, tags.TRAIN_DIR) - _final_accuracy(base, tags.TRAIN_DIR),
                step_dev=float(np.max(np.abs(m["mean"] - 1))),
                layer_dev=float(np.median(layer_devs)) if layer_devs else math.nan)


def _pairs(runs: Mapping[str, List[events.Run]], name: str):
    bases = runs.get(BASELINE, [])
    if name == NOISE_FLOOR:
        return list(zip(bases[1:], bases[:-1]))          # seed k+1 against seed k
    return list(zip(runs.get(name, []), bases))           # seed k against its own baseline


def unfinished(grid: Mapping[float, Mapping[str, List[events.Run]]]) -> List[str]:
    """Run folders of the grid that have not finished (or whose event files are damaged)."""
    return sorted(run.run_dir for runs in grid.values() for seeds in runs.values()
                  for run in seeds if not run.complete)


def study_rows(grid: Mapping[float, Mapping[str, List[events.Run]]]) -> List[dict]:
    """One row per (weight decay, granularity or noise floor) with pairs to compare.

    Only finished runs are compared: an unfinished run's last accuracy is not its final
    one, and a sweep still running must not pass for a result (`unfinished` names them).
    """
    out = []
    for wd in sorted(grid):
        for name, granularity in list(REPLAYS.items()) + [(NOISE_FLOOR, NOISE_FLOOR)]:
            pairs = [(r, b) for r, b in _pairs(grid[wd], name) if r.complete and b.complete]
            found = [p for p in (pair_metrics(r, b) for r, b in pairs) if p]
            if not found:
                continue
            row = dict(weight_decay=wd, run=name, granularity=granularity, pairs=len(found))
            for key in [k for k, _ in MEASURES] + ["acc_diff", "precise_gap", "precise_diff",
                                                   "train_acc_diff"]:
                values = [p[key] for p in found if np.isfinite(p[key])]
                row[key] = float(np.mean(values)) if values else math.nan
            out.append(row)
    return out


def equivalence_figure(rows: Sequence[dict], subtitle: str = "") -> Optional[Figure]:
    """Three panels (accuracy gap, mean-step and per-layer deviation) against weight decay:
    a line per granularity, the noise floor dashed gray; every axis from 0, so the
    panels show how far, not only which is closer."""
    if not rows:
        figures.note("equivalence: nothing to compare (no baseline with a replay or a second seed)")
        return None
    fig = Figure(figsize=(13, 4.4), dpi=figures.DPI)
    axes = fig.subplots(1, len(MEASURES))
    decays = sorted({r["weight_decay"] for r in rows})
    precise = all(np.isfinite(r["precise_gap"]) for r in rows)
    for ax, (key, title) in zip(axes, MEASURES):
        if key == "acc_gap":
            # Recomputed BN statistics where every run has them: the moving averages' lag
            # on short runs differs between runs with and without conv L2 (see precise_bn).
            key, title = ("precise_gap", f"{title} (BN statistics recomputed)") if precise else \
                (key, f"{title} (BN moving averages)")
        scale = 100.0 if key in ("acc_gap", "precise_gap") else 1.0   # accuracy in points
        for granularity in list(REPLAYS.values()) + [NOISE_FLOOR]:
            sel = sorted((r for r in rows if r["granularity"] == granularity and np.isfinite(r[key])),
                         key=lambda r: r["weight_decay"])
            if not sel:
                continue
            style = dict(linestyle="--", marker="x") if granularity == NOISE_FLOOR else dict(marker="o")
            ax.plot([r["weight_decay"] for r in sel], [scale * r[key] for r in sel], label=granularity,
                    color=COLORS[granularity], linewidth=1.2, **style)
        ax.set_xscale("log")
        ax.set_xticks(decays, [decay_label(wd) for wd in decays])
        ax.minorticks_off()
        ax.set_xlabel("weight decay")
        ax.set_ylabel(YLABELS[key])
        if scale == 1.0:
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_ylim(bottom=0)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Replaying the baseline's weight norms: distance to the baseline (mean over seed pairs)"
                 + (f"\n{subtitle}" if subtitle else ""), fontsize=11)
    fig.tight_layout()
    return fig


def figure_subtitle(grid: Mapping[float, Mapping[str, List[events.Run]]], rows: Sequence[dict]) -> str:
    """'<data> · <schedule> · seed pairs per point' of the baselines compared."""
    configs = [run.config for runs in grid.values() for run in runs.get(BASELINE, [])]
    pairs = sorted({r["pairs"] for r in rows})
    seeds = ""
    if pairs:
        count = str(pairs[0]) if len(pairs) == 1 else f"{pairs[0]}–{pairs[-1]}"
        seeds = f"{count} seed pair{'' if pairs == [1] else 's'} per point"
    return " · ".join(figures.data_and_schedule(configs) + ([seeds] if seeds else []))


def to_markdown(rows: Sequence[dict]) -> str:
    """The table. Test accuracy twice: with BN's moving averages (as logged) and with
    recomputed BN statistics (`analysis.precise_bn`, n/a before it has run); the signed
    columns say which way the accuracy moved, the train column (the last epoch's
    running mean) whether the weights fit the data differently."""
    lines = ["| weight decay | replay | seed pairs | test accuracy gap | test accuracy, replay − baseline "
             "| same, BN statistics recomputed | train accuracy, replay − baseline "
             "| mean step: max abs(ratio−1) | layers: median of max abs(ratio−1) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]

    def points(x, signed=False):
        return "n/a" if not np.isfinite(x) else f"{100 * x:{'+' if signed else ''}.2f} pts"

    for r in rows:
        layer = "n/a" if not np.isfinite(r["layer_dev"]) else f"{r['layer_dev']:.1%}"
        lines.append(f"| {decay_label(r['weight_decay'])} | {r['granularity']} | {r['pairs']} | "
                     f"{points(r['acc_gap'])} | {points(r['acc_diff'], True)} | "
                     f"{points(r['precise_diff'], True)} | {points(r['train_acc_diff'], True)} | "
                     f"{r['step_dev']:.1%} | {layer} |")
    return "\n".join(lines) + "\n"


def write(results_dir: str, out_dir: str) -> List[str]:
    grid = load_grid(results_dir)
    runs = [run for by_name in grid.values() for seeds in by_name.values() for run in seeds]
    damaged = {run.run_dir for run in runs if run.damaged}
    left_out = [d for d in unfinished(grid) if d not in damaged]
    if left_out:
        figures.note(f"equivalence: {len(left_out)} run(s) not finished, left out of the comparison: "
                     + ", ".join(os.path.relpath(d, results_dir) for d in left_out)
                     + f" (no {tags.DONE_FILE}, or event files that stop before the epoch it names)")
    for run in runs:
        if run.damaged:
            figures.note(f"equivalence: {os.path.relpath(run.run_dir, results_dir)} left out of the "
                         f"comparison: damaged event file {run.damaged[0]}")
    rows = study_rows(grid)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    fig = equivalence_figure(rows, figure_subtitle(grid, rows))
    if fig is not None:
        paths += output.save_figure(fig, out_dir, "equivalence")
    if rows:
        paths += output.write_table(out_dir, "equivalence", to_markdown(rows), rows)
    return paths


def main(argv=None) -> int:
    parser = ArgumentParser(
        prog="python -m analysis.equivalence",
        description="The equivalence study's figure and table: how closely each replay granularity "
                    "matches the baseline at each weight decay, against the seed-to-seed noise floor.")
    parser.add_argument("results_dir", metavar="RESULTS_DIR",
                        help="the runner's weight-decay grid: RESULTS_DIR/weight_decay=<wd>/<run>/seed_<k>/")
    parser.add_argument("--out", "--out_dir", dest="out_dir", metavar="DIR", default=None,
                        help="output folder (default: RESULTS_DIR/figures)")
    args = parser.parse_args(argv)
    out_dir = args.out_dir or os.path.join(args.results_dir, "figures")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        print(f"error: --out={out_dir} is a file, not a folder", file=sys.stderr)
        return 2
    try:
        paths = write(args.results_dir, out_dir)
    except events.EventsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write to {out_dir}: {e.strerror or e}", file=sys.stderr)
        return 1
    if not paths:        # every pair unreadable, unfinished or missing: a study with no result
        print(f"error: {args.results_dir}: nothing to compare: no finished baseline with a finished replay "
              "or a second seed (the notes above say which runs were left out)", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    command_line.run(main)
