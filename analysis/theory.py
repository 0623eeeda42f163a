"""Theory overlay (beyond the post): the conv relative step measured late in each
learning-rate phase against its predicted equilibrium, as theory.md, theory.csv,
theory_per_layer.csv and theory_growth.csv.

The predicted levels are analysis/predictions.py's (from the formulas and optimizer
theories of analysis/equilibrium.py); theory.md's second table and theory_growth.csv
are the runs without conv decay, against the growth law of analysis/growth.py.
"""

import csv
import dataclasses
import math
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from analysis.equilibrium import THEORIES, optimizer_of, time_constant
from analysis.figures import label_of, ordered_names
from analysis.growth import growth_markdown, growth_rows, write_growth_csv
from analysis.output import csv_number, epoch_span, scientific, seeds_label, write_table
from analysis.predictions import (Phase, phase_epochs, phases, predicted_levels, prediction_basis,
                                  steps_per_epoch)
from analysis.summary import mean_std
from resnet_cifar import events, fidelity, tags
from resnet_cifar.checkpoints import atomic_open

LATE_FRACTION = 0.2     # late phase = its last 20% of epochs (at least one)


# --- measurement ----------------------------------------------------------------------

def late_window(phase: Phase, fraction: float = LATE_FRACTION) -> Tuple[int, int]:
    """(first, last) epoch of the phase's last `fraction` of epochs, at least one."""
    first, last = phase_epochs(phase)
    n = max(1, int(round(fraction * (last - first + 1))))
    return last - n + 1, last


def layer_names(run: events.Run) -> List[str]:
    """Conv layers with a per-layer relative step tag, in the order the tags sort."""
    return list(tags.per_layer_tags(run.scalars.get(tags.TRAIN_DIR, {}), tags.CONV_RELATIVE_STEP))


def _window_mean(series, first: int, last: int) -> float:
    if series is None:
        return math.nan
    steps, values = series
    keep = (steps >= first) & (steps <= last)
    return float(np.mean(values[keep])) if keep.any() else math.nan


@dataclasses.dataclass
class PhaseMeasurement:
    """One run's late-phase conv relative step in one phase; NaN where nothing was logged."""

    phase: int                    # 0-based
    start: float
    end: float
    lr: float
    first_epoch: int              # the late window, logged epoch numbers
    last_epoch: int
    mean: float                   # conv_relative_step (mean over layers), window mean
    layers: Dict[str, float]      # per_layer/conv_relative_step/<layer>, window mean
    layer_min: float
    layer_max: float


def late_phase_measurements(run: events.Run, fraction: float = LATE_FRACTION
                            ) -> List[PhaseMeasurement]:
    """Per phase of the run's schedule, the mean conv relative step over its last
    `fraction` of epochs (at least one), overall and per layer with min and max.

    Epochs of the window that the run has not logged yet are left out; a window
    with none logged is NaN (an unfinished run's later phases).
    """
    train = run.scalars.get(tags.TRAIN_DIR, {})
    per_layer = tags.per_layer_series(train, tags.CONV_RELATIVE_STEP)
    out = []
    for i, phase in enumerate(phases(run.config)):
        first, last = late_window(phase, fraction)
        layers = {name: _window_mean(series, first, last) for name, series in per_layer.items()}
        finite = [v for v in layers.values() if np.isfinite(v)]
        out.append(PhaseMeasurement(
            phase=i, start=phase.start, end=phase.end, lr=phase.lr,
            first_epoch=first, last_epoch=last,
            mean=_window_mean(train.get(tags.CONV_RELATIVE_STEP), first, last),
            layers=layers,
            layer_min=min(finite) if finite else math.nan,
            layer_max=max(finite) if finite else math.nan))
    return out


# --- the table ---------------------------------------------------------------------------

@dataclasses.dataclass
class Row:
    """One run name in one phase; per-seed lists keep the seeds' order."""

    name: str
    label: str
    phase: int
    start: float
    end: float
    lr: float
    weight_decay: float
    momentum: float
    basis: str
    predicted: Optional[float]
    measured: List[float]          # late-phase mean per seed
    layer_values: List[float]      # every (seed, layer) late-phase mean
    first_epoch: int
    last_epoch: int
    steps_per_epoch: Optional[int]   # None: not recorded (see `steps_per_epoch`)
    optimizer: str = "momentum"

    @property
    def ratio(self) -> float:
        mean = mean_std(self.measured)[0]
        return mean / self.predicted if self.predicted and np.isfinite(mean) else math.nan

    @property
    def tau_steps(self) -> float:
        return time_constant(self.optimizer, self.lr, self.weight_decay, self.momentum)

    @property
    def phase_steps(self) -> float:
        if self.steps_per_epoch is None:
            return math.nan
        return (self.end - self.start) * self.steps_per_epoch

    @property
    def phase_over_tau(self) -> float:
        return self.phase_steps / self.tau_steps


def theory_rows(loaded: Mapping[str, Sequence[events.Run]], fraction: float = LATE_FRACTION,
                momentum: float = fidelity.MOMENTUM) -> List[Row]:
    """Rows per run name (the post's order) × phase of its first seed's schedule."""
    rows = []
    for name in ordered_names(loaded):
        seeds = list(loaded[name])
        if not seeds:
            continue
        config = seeds[0].config
        per_seed = [late_phase_measurements(run, fraction) for run in seeds]
        wd = float(config.get("weight_decay", fidelity.WEIGHT_DECAY))
        for i, level in enumerate(predicted_levels(config, momentum)):
            found = [m[i] for m in per_seed if i < len(m)]
            first, last = late_window(Phase(level.start, level.end, level.lr), fraction)
            rows.append(Row(
                name=name, label=label_of(name), phase=i, start=level.start, end=level.end,
                lr=level.lr, weight_decay=wd, momentum=momentum,
                basis=prediction_basis(config), predicted=level.predicted,
                measured=[m.mean for m in found],
                layer_values=[v for m in found for v in m.layers.values()],
                first_epoch=first, last_epoch=last, steps_per_epoch=steps_per_epoch(config, seeds[0].run_dir),
                optimizer=optimizer_of(config)))
    return rows


def _fmt_measured(values: Sequence[float]) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "n/a"
    return scientific(mean) if math.isnan(std) else f"{scientific(mean)} ± {std:.1e}"


def _fmt_range(values: Sequence[float]) -> str:
    finite = [v for v in values if np.isfinite(v)]
    return f"{scientific(min(finite))}–{scientific(max(finite))}" if finite else "n/a"


def to_markdown(rows: Sequence[Row], fraction: float = LATE_FRACTION) -> str:
    lines = [
        "# Conv relative step vs its predicted equilibrium",
        "",
        "| run | phase (epochs) | lr | predicted | measured, late phase | layers min–max "
        "| measured / predicted | window (epochs) | phase / τ |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        label = seeds_label(r.label, r.measured)
        ratio = "—" if math.isnan(r.ratio) else f"{r.ratio:.2f}"
        over_tau = "—" if math.isnan(r.phase_over_tau) else f"{r.phase_over_tau:.2f}"
        lines.append(f"| {label} | {epoch_span(r.start, r.end)} | {r.lr:g} | {scientific(r.predicted)} | "
                     f"{_fmt_measured(r.measured)} | {_fmt_range(r.layer_values)} | {ratio} | "
                     f"{epoch_span(r.first_epoch, r.last_epoch)} | {over_tau} |")
    m = rows[0].momentum if rows else fidelity.MOMENTUM
    for optimizer in dict.fromkeys(r.optimizer for r in rows):   # each optimizer's note, once
        theory = THEORIES.get(optimizer)
        if theory is None:
            names = ", ".join(dict.fromkeys(r.label for r in rows if r.optimizer == optimizer))
            lines += ["", f"**No theory for optimizer {optimizer!r}** ({names}): no predicted "
                          f"level and no τ (—); `THEORIES` in analysis/equilibrium.py has no entry "
                          f"for it."]
        elif theory.note:
            lines += ["", theory.note(m)]
    lines += [
        "",
        f"Measured: mean of `{tags.CONV_RELATIVE_STEP}` (mean over conv layers of ||dw||/||w||, "
        f"per-step mean of the epoch) over the last {fraction:.0%} of the phase's epochs (at "
        f"least one); mean ± std over seeds; layers min–max over every layer and seed.",
    ]
    unknown = list(dict.fromkeys(r.label for r in rows if r.steps_per_epoch is None))
    if unknown:
        lines += [
            "",
            f"**Steps per epoch not recorded** for {', '.join(unknown)}: run_config.json has "
            f"neither steps_per_epoch nor num_train_images (written by older code) and no "
            f"--steps_per_epoch was set, so the phases' length in steps and phase / τ are "
            f"not computed (—).",
        ]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ("name", "label", "optimizer", "phase", "start_epoch", "end_epoch", "lr", "weight_decay",
              "momentum", "basis", "predicted", "seeds", "measured_mean", "measured_std",
              "layer_min", "layer_max", "ratio", "window_first_epoch", "window_last_epoch",
              "steps_per_epoch", "tau_steps", "phase_steps", "phase_over_tau")
PER_LAYER_FIELDS = ("run", "seed", "phase", "start_epoch", "end_epoch", "lr", "layer",
                    "measured", "predicted")


def csv_rows(rows: Sequence[Row]) -> List[dict]:
    """theory.csv's rows (CSV_FIELDS): unrounded numbers, empty where there is no value."""
    out = []
    for r in rows:
        finite = [v for v in r.layer_values if np.isfinite(v)]
        mean, std = mean_std(r.measured)
        out.append(dict(zip(CSV_FIELDS, [
            r.name, r.label, r.optimizer, r.phase, csv_number(r.start), csv_number(r.end),
            csv_number(r.lr), csv_number(r.weight_decay), csv_number(r.momentum), r.basis,
            csv_number(r.predicted), len(r.measured), csv_number(mean), csv_number(std),
            csv_number(min(finite) if finite else None),
            csv_number(max(finite) if finite else None), csv_number(r.ratio),
            r.first_epoch, r.last_epoch, r.steps_per_epoch or "",
            csv_number(r.tau_steps), csv_number(r.phase_steps),
            csv_number(r.phase_over_tau)])))
    return out


def write_per_layer_csv(loaded: Mapping[str, Sequence[events.Run]], path: str,
                        fraction: float = LATE_FRACTION,
                        momentum: float = fidelity.MOMENTUM) -> None:
    """One row per run name × seed × phase × layer (seed: the run's --seed)."""
    with atomic_open(path) as f:
        writer = csv.writer(f)
        writer.writerow(PER_LAYER_FIELDS)
        for name in ordered_names(loaded):
            for k, run in enumerate(loaded[name]):
                seed = run.config.get("seed", k)
                levels = predicted_levels(run.config, momentum)
                for m, level in zip(late_phase_measurements(run, fraction), levels):
                    for layer, value in m.layers.items():
                        writer.writerow([name, seed, m.phase, csv_number(m.start), csv_number(m.end),
                                         csv_number(m.lr), layer, csv_number(value),
                                         csv_number(level.predicted)])


# --- the files ------------------------------------------------------------------------------

def write_theory(loaded: Mapping[str, Sequence[events.Run]], out_dir: str,
                 fraction: float = LATE_FRACTION,
                 momentum: float = fidelity.MOMENTUM) -> List[str]:
    """theory.md, theory.csv, theory_per_layer.csv and theory_growth.csv in `out_dir`;
    returns their paths. theory.md's second table, and theory_growth.csv, are the runs
    without conv decay (`growth_rows`).

    Each file is written whole or not at all (atomic_open), as every analysis output.
    """
    rows = theory_rows(loaded, fraction, momentum)
    growth = growth_rows(loaded, momentum)
    markdown = to_markdown(rows, fraction) + ("\n" + growth_markdown(growth, momentum) if growth else "")
    per_layer_path = os.path.join(out_dir, "theory_per_layer.csv")
    growth_path = os.path.join(out_dir, "theory_growth.csv")
    paths = write_table(out_dir, "theory", markdown, csv_rows(rows), CSV_FIELDS)
    write_per_layer_csv(loaded, per_layer_path, fraction, momentum)
    write_growth_csv(growth, growth_path)    # header only when no run grows freely
    return paths + [per_layer_path, growth_path]
