"""Draw the post's figures and the summary table from a results folder.

    python -m analysis.make_figures RESULTS_DIR [--out DIR] [--data_name TEXT]

RESULTS_DIR holds runs as `<name>/` or `<name>/seed_<k>/` (see `events.find_runs`);
figures go to DIR (default RESULTS_DIR/figures) as NAME.png and NAME.svg, with
summary.md and summary.csv beside them, and the theory comparison theory.md,
theory.csv, theory_per_layer.csv and theory_growth.csv (analysis/theory.py), and bn_lag.md/.csv
(analysis/bn_lag.py: test accuracy at each phase end, logged and with recomputed BN statistics,
for runs that analysis.precise_bn evaluated). The relative-step figures
are drawn on a log scale with the predicted equilibrium level of each phase (from
the baseline's config) as dashed segments. Runs still training are drawn from what they
logged so far and marked "(incomplete)" in legends and the table; missing runs are
left out with a note, so the script is useful from the first finished run on.
Subtitles name the data as the runs recorded it ("official CIFAR-10", "CIFAR-10 layout, not
the official files", ...: run_config.json "data"; runs that did not record it by their
--data_source); --data_name names it instead (e.g. which re-encoding a copy is).

A grid sweep (`experiments.run_all --grid`, RESULTS/<flag>=<value>[,...]/<run>/seed_<k>/)
gets all of the above per grid point in DIR/<flag>=<value>[,...]/, and in DIR the final
test accuracy of every run against each grid flag's value (analysis/grid.py).
"""

import os
import sys
from typing import Dict, List

from analysis import (angular, bn_lag, figures, grid, loading, output, predictions, replay_match, summary,
                      theory)
from resnet_cifar import events, tags
from resnet_cifar import command_line
from resnet_cifar.command_line import ArgumentParser

EXIT_NO_RUNS = 2


def curves(loaded: Dict[str, List[events.Run]], tag: str, subdir: str) -> figures.Curves:
    """name -> one (epochs, values) per seed that logged `tag`."""
    out = {}
    for name, seeds in loaded.items():
        series = [run.scalars.get(subdir, {}).get(tag) for run in seeds]
        series = [s for s in series if s is not None]
        if series:
            out[name] = series
    return out


def run_configs(loaded: Dict[str, List[events.Run]]) -> figures.Configs:
    """name -> each seed's run_config.json "config": for subtitles and rate boundaries."""
    return {name: [run.config for run in seeds] for name, seeds in loaded.items()}


def legend_labels(loaded: Dict[str, List[events.Run]]) -> Dict[str, str]:
    """Legend labels, with runs that have not finished marked as such."""
    return {name: figures.label_of(name) + ("" if all(r.complete for r in seeds)
                                             else " (incomplete)")
            for name, seeds in loaded.items()}


def write_all(loaded: Dict[str, List[events.Run]], out_dir: str) -> List[str]:
    """Every figure that has data, in every format, plus the summary, theory and
    replay-match tables; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    labels = legend_labels(loaded)
    levels = predictions.baseline_segments(loaded)
    level_label = predictions.baseline_level_label(loaded)
    configs = run_configs(loaded)
    written = []
    for fig_name, (make, tag, subdir) in figures.FIGURES.items():
        extra = dict(levels=levels, log_y=True, level_label=level_label) if fig_name in figures.LEVEL_FIGURES else {}
        fig = make(curves(loaded, tag, subdir), labels=labels, configs=configs, **extra)
        if fig is not None:
            written += output.save_figure(fig, out_dir, fig_name)
    fig = angular.angular_update(curves(loaded, angular.TAG, tags.TRAIN_DIR), labels, levels,
                                 level_label, configs)
    if fig is not None:
        written += output.save_figure(fig, out_dir, "angular_update")
    fig = replay_match.replay_match_figure(loaded, labels)
    if fig is not None:
        written += output.save_figure(fig, out_dir, "replay_match")
    written += replay_match.write(loaded, out_dir)
    written += summary.write_summary(summary.summarize(loaded), out_dir)
    written += theory.write_theory(loaded, out_dir)
    written += bn_lag.write(loaded, out_dir)
    return written


def main(argv=None) -> int:
    parser = ArgumentParser(
        prog="python -m analysis.make_figures",
        description="Draw the post's figures and a summary table from a results folder.")
    parser.add_argument("results_dir", metavar="RESULTS_DIR",
                        help="folder of runs: <name>/ or <name>/seed_<k>/, each with run_config.json")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="output folder (default: RESULTS_DIR/figures)")
    parser.add_argument("--data_name", metavar="TEXT", default="",
                        help="the data's name in the figures' subtitles, in place of the one the run "
                             "configs give (e.g. 'CIFAR-10, JPEG re-encoding'); for the figures only")
    args = parser.parse_args(argv)

    def fail(message: str, code: int) -> int:
        print(f"error: {message}", file=sys.stderr)
        return code

    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        return fail(f"--out={args.out} is a file, not a folder", 2)      # as the other analysis commands

    try:
        runs = events.find_runs(args.results_dir)
    except events.EventsError as e:
        return fail(str(e), EXIT_NO_RUNS)
    points = grid.find_points(args.results_dir) if not runs else {}
    if points:
        return grid_main(args.results_dir, points, args.out, fail, args.data_name)
    if not runs:
        return fail(f"no runs in {args.results_dir} (no run_config.json in it, "
                    f"its <name>/ or <name>/seed_<k>/ folders)", EXIT_NO_RUNS)
    loaded = loading.load_results(runs, args.data_name)
    if not loaded:
        return fail(f"no readable runs in {args.results_dir}", EXIT_NO_RUNS)

    out_dir = args.out or os.path.join(args.results_dir, "figures")
    try:
        written = write_all(loaded, out_dir)
    except OSError as e:
        return fail(f"cannot write to {out_dir}: {e}", 1)
    for path in written:
        print(f"wrote {path}")
    seeds = sum(len(s) for s in loaded.values())
    print(f"{len(loaded)} run names, {seeds} run folders -> {out_dir}")
    return 0


def grid_main(results_dir: str, points, out, fail, data_name: str = "") -> int:
    """A grid sweep: every point's figures and tables in OUT/<point>/, the grid figure in OUT."""
    out_dir = out or os.path.join(results_dir, "figures")
    loaded_points, written = {}, []
    try:
        for folder, point in points.items():
            loaded = loading.load_results(events.find_runs(os.path.join(results_dir, folder)), data_name)
            if not loaded:
                figures.note(f"skipped grid point {folder}: no readable runs")
                continue
            loaded_points[point] = loaded
            written += write_all(loaded, os.path.join(out_dir, folder))
        if not loaded_points:
            return fail(f"no readable runs in the grid points of {results_dir}", EXIT_NO_RUNS)
        written += grid.write(loaded_points, out_dir, output.save_figure)
    except OSError as e:
        return fail(f"cannot write to {out_dir}: {e}", 1)
    for path in written:
        print(f"wrote {path}")
    folders = sum(len(s) for loaded in loaded_points.values() for s in loaded.values())
    print(f"{len(loaded_points)} grid points, {folders} run folders -> {out_dir}")
    return 0


if __name__ == "__main__":
    command_line.run(main)
