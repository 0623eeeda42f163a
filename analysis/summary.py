"""The table of final numbers per run: what the post quotes beside its plots.

The post compares final test accuracy (~91% baseline, ~89.5% NoConvL2) and, for
NoConvL2, a train-test loss gap about 0.024 larger and a train loss about 0.025
worse. This module computes those per run name from loaded runs (`events.Run`),
averaging seeds as mean ± sample std, and writes them as summary.md and summary.csv.
Unfinished runs, and runs with a damaged event file, are summarised from what
they logged and marked incomplete.
"""

import dataclasses
import math
import os
from typing import List, Mapping, Optional, Sequence

import numpy as np

from analysis import output, precise_bn
from analysis.figures import label_of, ordered_names
from resnet_cifar import events, fidelity, tags
from resnet_cifar import runs as run_registry
from resnet_cifar.checkpoints import atomic_open


@dataclasses.dataclass
class Row:
    """One run name; per-seed lists keep the seeds' order."""

    name: str
    label: str
    seeds: int
    complete_seeds: int
    epochs: List[int]                  # epochs completed, per seed
    train_epochs: Optional[int]        # epochs asked for (run_config.json)
    test_accuracy: List[float]         # last validation epoch_accuracy
    train_loss: List[float]            # last train epoch_loss
    loss_gap: List[float]              # last validation epoch_loss - last train epoch_loss
    damaged_seeds: int = 0             # seeds with a damaged event file (never complete)
    precise_accuracy: List[float] = dataclasses.field(default_factory=list)
    # test accuracy with recomputed BN statistics (analysis.precise_bn), NaN where not evaluated
    conv_sqsum: List[float] = dataclasses.field(default_factory=list)   # last logged, per seed

    @property
    def complete(self) -> bool:
        return self.complete_seeds == self.seeds


def _nan(x: Optional[float]) -> float:
    return math.nan if x is None else x


def run_metrics(run: events.Run) -> dict:
    """Final numbers of one run; NaN where a tag was never logged (a run just started)."""
    test_acc = _nan(run.last(tags.EPOCH_ACCURACY, tags.VALIDATION_DIR))
    train_loss = _nan(run.last(tags.EPOCH_LOSS, tags.TRAIN_DIR))
    test_loss = _nan(run.last(tags.EPOCH_LOSS, tags.VALIDATION_DIR))
    # Epochs completed = last epoch with a train loss (step = epoch number); a run
    # whose train events are unreadable or absent falls back to its test loss.
    epochs = 0
    for subdir in (tags.TRAIN_DIR, tags.VALIDATION_DIR):
        steps = run.scalars.get(subdir, {}).get(tags.EPOCH_LOSS, (np.empty(0),))[0]
        if len(steps):
            epochs = int(steps.max())
            break
    return {"test_accuracy": test_acc, "train_loss": train_loss,
            "loss_gap": test_loss - train_loss, "epochs": epochs,
            "conv_sqsum": _nan(run.last(tags.CONV_SQSUM, tags.TRAIN_DIR)),
            # only a result for the epoch summarised here
            "precise_accuracy": precise_bn.accuracy_at(run.run_dir, epochs)}


def mean_std(values: Sequence[float]):
    """(mean, sample std) over the finite values; std is NaN with fewer than two."""
    finite = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
    if not len(finite):
        return math.nan, math.nan
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan
    return float(np.mean(finite)), std


def summarize(runs: Mapping[str, Sequence[events.Run]]) -> List[Row]:
    """One row per run name (the post's runs first), from its seeds' final numbers."""
    rows = []
    for name in ordered_names(runs):
        seeds = list(runs[name])
        if not seeds:
            continue
        metrics = [run_metrics(r) for r in seeds]
        train_epochs = seeds[0].config.get("train_epochs")
        rows.append(Row(
            name=name,
            label=label_of(name),
            seeds=len(seeds),
            complete_seeds=sum(r.complete for r in seeds),
            epochs=[m["epochs"] for m in metrics],
            train_epochs=int(train_epochs) if train_epochs is not None else None,
            test_accuracy=[m["test_accuracy"] for m in metrics],
            train_loss=[m["train_loss"] for m in metrics],
            loss_gap=[m["loss_gap"] for m in metrics],
            damaged_seeds=sum(bool(r.damaged) for r in seeds),
            precise_accuracy=[m["precise_accuracy"] for m in metrics],
            conv_sqsum=[m["conv_sqsum"] for m in metrics],
        ))
    return rows


def _fmt(values: Sequence[float], scale: float = 1.0, digits: int = 4) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "n/a"
    text = f"{mean * scale:.{digits}f}"
    return text if math.isnan(std) else f"{text} ± {std * scale:.{digits}f}"


def _fmt_epochs(row: Row) -> str:
    lo, hi = min(row.epochs), max(row.epochs)
    done = str(hi) if lo == hi else f"{lo}–{hi}"
    return done if row.train_epochs is None else f"{done}/{row.train_epochs}"


def _fmt_complete(row: Row) -> str:
    if row.complete:
        return "yes"
    text = "no" if row.seeds == 1 else f"no ({row.complete_seeds}/{row.seeds})"
    return text + (", damaged events" if row.damaged_seeds else "")


def to_markdown(rows: Sequence[Row]) -> str:
    """A Markdown table; seeds averaged as mean ± std, accuracy in percent."""
    precise = any(np.isfinite(v) for r in rows for v in r.precise_accuracy)
    lines = [
        "| run | seeds | complete | epochs | test accuracy (%) | "
        + ("test accuracy, BN statistics recomputed (%) | " if precise else "")
        + "train loss | test − train loss |",
        "|---|---:|---|---:|---:|" + ("---:|" if precise else "") + "---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r.label} | {r.seeds} | {_fmt_complete(r)} | {_fmt_epochs(r)} | "
                     f"{_fmt(r.test_accuracy, 100, 2)} | "
                     + (f"{_fmt(r.precise_accuracy, 100, 2)} | " if precise else "")
                     + f"{_fmt(r.train_loss)} | {_fmt(r.loss_gap)} |")
    if precise:
        lines += ["", "BN statistics recomputed: `python -m analysis.precise_bn` (the mean of training "
                      "batches' statistics in place of the moving averages; n/a: not evaluated)."]
    if any(not r.complete for r in rows):
        lines += ["", "Incomplete runs (no done.json, or a damaged event file) are summarised "
                      "at their last logged epoch."]
    return "\n".join(lines) + "\n"


def post_column(name: str) -> dict:
    """What the post says of one of its runs' final numbers, in its words (fidelity.POST_*):
    test accuracy, train loss and test - train loss gap; "" where it gives none."""
    gap = fidelity.POST_NOCONV_LOSS_GAP_EXCESS
    return {
        run_registry.BASELINE: {
            "test_accuracy": f"~{fidelity.POST_FINAL_TEST_ACCURACY['baseline']:g}",
            # NoConvL2's gap is "0.024 logit or 7% larger": the baseline's is about 0.024 / 0.07
            "loss_gap": f"~{gap / fidelity.POST_NOCONV_LOSS_GAP_EXCESS_RELATIVE:.2f} (derived)"},
        run_registry.NOCONV_L2: {
            "test_accuracy": f"~{fidelity.POST_FINAL_TEST_ACCURACY['noconv_l2']:g}",
            "train_loss": f"baseline + {fidelity.POST_NOCONV_TRAIN_LOSS_EXCESS:g}",
            "loss_gap": f"baseline + {gap:g}"},
        run_registry.CONV_LR_SCALE: {"test_accuracy": "baseline's"},
    }.get(name, {})


def to_post_markdown(rows: Sequence[Row]) -> str:
    """The post's four runs, the post's numbers beside this project's: final test accuracy
    (logged, and with BN statistics recomputed), train loss, test - train loss, conv_sqsum."""
    lines = ["| run | epochs | test accuracy (%): post | ours | ours, BN recomputed | train loss: post | ours "
             "| test − train loss: post | ours | final conv_sqsum |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.name not in run_registry.POST_RUNS:
            continue
        post = post_column(r.name)
        lines.append(f"| {r.label} | {_fmt_epochs(r)} | {post.get('test_accuracy', '')} | "
                     f"{_fmt(r.test_accuracy, 100, 2)} | {_fmt(r.precise_accuracy, 100, 2)} | "
                     f"{post.get('train_loss', '')} | {_fmt(r.train_loss, digits=3)} | "
                     f"{post.get('loss_gap', '')} | {_fmt(r.loss_gap, digits=3)} | {_fmt(r.conv_sqsum, digits=0)} |")
    lines += ["", "Post: its own words (\"~91%\", \"0.025 logits worse\"); empty where it gives no number. "
                  "Ours: the last logged epoch (BN moving averages), and with BN statistics recomputed "
                  "(`python -m analysis.precise_bn`; n/a: not evaluated). Losses in logits, without the L2 term."]
    if any(not r.complete for r in rows if r.name in run_registry.POST_RUNS):
        lines += ["", "A run still training is shown at its last logged epoch (epochs: done/asked)."]
    return "\n".join(lines) + "\n"


def is_post_schedule(rows: Sequence[Row]) -> bool:
    """True when the results hold the post's runs on its 150-epoch schedule: only then is a
    side-by-side table with the post's numbers meaningful (not for the quick preset)."""
    return any(r.name in run_registry.POST_RUNS and r.train_epochs == fidelity.TRAIN_EPOCHS for r in rows)


CSV_FIELDS = ("name", "label", "seeds", "complete_seeds", "complete", "damaged_seeds", "epochs_min",
              "epochs_max", "train_epochs", "test_accuracy_mean", "test_accuracy_std",
              "train_loss_mean", "train_loss_std", "loss_gap_mean", "loss_gap_std",
              "precise_accuracy_mean", "precise_accuracy_std", "conv_sqsum_mean", "conv_sqsum_std")


def _csv_number(x: float) -> str:
    return "" if math.isnan(x) else repr(x)


def csv_rows(rows: Sequence[Row]) -> List[dict]:
    """summary.csv's rows (CSV_FIELDS): unrounded numbers, one row per run name; empty cells
    where there is no value."""
    out = []
    for r in rows:
        cells = [r.name, r.label, r.seeds, r.complete_seeds, "yes" if r.complete else "no",
                 r.damaged_seeds,
                 min(r.epochs), max(r.epochs), "" if r.train_epochs is None else r.train_epochs]
        for values in (r.test_accuracy, r.train_loss, r.loss_gap, r.precise_accuracy, r.conv_sqsum):
            cells += [_csv_number(x) for x in mean_std(values)]
        out.append(dict(zip(CSV_FIELDS, cells)))
    return out


def write_summary(rows: Sequence[Row], out_dir: str) -> List[str]:
    """summary.md and summary.csv in `out_dir`, and post.md (the post beside these runs) when
    they are the post's 150-epoch runs; returns their paths."""
    paths = output.write_table(out_dir, "summary", to_markdown(rows), csv_rows(rows), CSV_FIELDS)
    if is_post_schedule(rows):
        paths.append(os.path.join(out_dir, "post.md"))
        with atomic_open(paths[-1]) as f:
            f.write(to_post_markdown(rows))
    return paths
