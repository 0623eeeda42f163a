"""Conv weight growth without decay (beyond the post): runs without conv decay have no
equilibrium to settle at, and their conv_sqsum's gain is compared with the momentum
growth law ||w||² += (1+m)/(1-m)·||dw||² per step (`growth_per_step`), phase by phase:
theory.md's second table and theory_growth.csv (written by analysis/theory.py).
"""

import csv
import dataclasses
import math
from typing import List, Mapping, Sequence, Tuple

import numpy as np

from analysis.equilibrium import optimizer_of
from analysis.figures import label_of, ordered_names
from analysis.output import csv_number, epoch_span, scientific, seeds_label
from analysis.predictions import phase_epochs, phases, steps_per_epoch
from analysis.summary import mean_std
from resnet_cifar import events, fidelity, tags
from resnet_cifar.checkpoints import atomic_open


def growth_per_step(momentum: float = fidelity.MOMENTUM) -> float:
    """||w||² gained per step on average, in units of the steps' ||dw||², by a
    scale-invariant weight without decay under TF1 momentum: (1+m)/(1-m), 19 at m = 0.9,
    1 for plain SGD.

    With g ⊥ w (scale invariance) and no decay, accum_t = m·accum_{t-1} + g_t and
    w_{t+1} = w_t - lr·accum_t give

        ||w_{t+1}||² - ||w_t||² = -2·lr·(w_t·accum_t) + ||dw_t||².

    w_t·accum_t = m·(w_t·accum_{t-1}) since g_t ⊥ w_t, and w_t = w_{t-1} - lr·accum_{t-1},
    so a_t = w_t·accum_t follows a_t = m·(a_{t-1} - lr·||accum_{t-1}||²): the part of
    the accumulator left from earlier steps points along the displacement those steps
    made. From accum = 0 at a constant lr this sums exactly to

        ||w_{t+1}||² - ||w_t||² = ||dw_t||² + 2·Σ_{k≥1} m^k·||dw_{t-k}||²,

    and over a window much longer than 1/(1-m) steps to (1 + 2m/(1-m))·Σ||dw||² =
    (1+m)/(1-m)·Σ||dw||², however the gradients of different steps correlate and
    however their size varies. What it does assume: the applied gradient is exactly
    orthogonal to w (every conv of ResNet v1 feeds a batch norm, and a conv gradient
    factor multiplies g before the accumulator); a constant lr (after a rate change
    the steps still in the accumulator were made at the old rate, a transient of about
    1/(1-m) steps); and a window past the first 1/(1-m) steps of training, which gain
    less. It tests batch norm's scale invariance and the momentum update together,
    not why the steps are as large as they are.
    """
    return (1.0 + momentum) / (1.0 - momentum)


def predicted_growth(sqsum_before: Mapping[str, float], relative_step: Mapping[str, float],
                     steps: int, momentum: float = fidelity.MOMENTUM) -> float:
    """Predicted gain of the summed squared norm over `steps` steps, from each layer's
    ||w||² before them and its mean relative step r over them:
    Σ_layers ||w||²·(exp((1+m)/(1-m)·steps·r²) - 1).

    Per step ||w||² is multiplied by 1 + (1+m)/(1-m)·r² on average (`growth_per_step`).
    The law needs the mean of r², and r is the logged per-step mean, whose square is
    smaller by r's variance within the epoch: the prediction runs low by about the
    squared coefficient of variation of r (a little in a steady epoch, much in the
    first epoch of training, where r falls fast), and it misses the transients of
    `growth_per_step` after a rate change.
    """
    c = growth_per_step(momentum) * steps
    return float(sum(sqsum_before[layer] * math.expm1(c * relative_step[layer] ** 2)
                     for layer in sqsum_before))


def grows_freely(config: Mapping) -> bool:
    """Conv kernels without decay under momentum: NoConvL2, ConvLRScale and its variants."""
    no_decay = not bool(config.get("conv_l2", True)) or \
        float(config.get("weight_decay", fidelity.WEIGHT_DECAY)) <= 0
    return no_decay and optimizer_of(config) == "momentum"


@dataclasses.dataclass
class GrowthRow:
    """One run without conv decay in one phase: conv_sqsum's gain over the phase's logged
    epochs, measured and predicted (`predicted_growth` per epoch, summed); per seed."""

    name: str
    label: str
    phase: int
    start: float
    end: float
    lr: float
    first_epoch: int         # epochs first..last: the phase's logged epochs so far
    last_epoch: int
    before: List[float]      # conv_sqsum before the first epoch
    measured: List[float]
    predicted: List[float]

    @property
    def ratios(self) -> List[float]:
        return [m / p if p > 0 else math.nan for m, p in zip(self.measured, self.predicted)]


def _growth_in(run: events.Run, first: int, last: int, steps: int,
               momentum: float) -> Tuple[float, float, float]:
    """(conv_sqsum before epoch `first`, measured gain, predicted gain) over epochs
    first..last of one run; NaN where a logged value is missing."""
    train = run.scalars.get(tags.TRAIN_DIR, {})
    sqsum = {layer: dict(zip(*s)) for layer, s in tags.per_layer_series(train, tags.CONV_SQSUM).items()}
    rel = {layer: dict(zip(*s)) for layer, s in tags.per_layer_series(train, tags.CONV_RELATIVE_STEP).items()}
    if not sqsum or set(sqsum) != set(rel):
        return math.nan, math.nan, math.nan
    try:
        predicted = sum(predicted_growth({n: float(s[e - 1]) for n, s in sqsum.items()},
                                         {n: float(r[e]) for n, r in rel.items()}, steps, momentum)
                        for e in range(first, last + 1))
        before = sum(float(s[first - 1]) for s in sqsum.values())
        after = sum(float(s[last]) for s in sqsum.values())
    except KeyError:
        return math.nan, math.nan, math.nan
    return before, after - before, predicted


def _last_logged(run: events.Run) -> int:
    """The last epoch for which every conv layer's sum of squares and relative step are
    logged (0: none)."""
    train = run.scalars.get(tags.TRAIN_DIR, {})
    per_layer = [*tags.per_layer_series(train, tags.CONV_SQSUM).values(),
                 *tags.per_layer_series(train, tags.CONV_RELATIVE_STEP).values()]
    return min((int(steps.max(initial=0)) for steps, _ in per_layer), default=0)


def growth_rows(loaded: Mapping[str, Sequence[events.Run]],
                momentum: float = fidelity.MOMENTUM) -> List[GrowthRow]:
    """Rows per run name without conv decay (`grows_freely`) × phase it has logged (up to
    the last epoch every seed has logged), from the per-layer conv_sqsum and relative
    step tags; none for a run without them or whose steps per epoch are not recorded."""
    rows = []
    for name in ordered_names(loaded):
        seeds = list(loaded[name])
        if not seeds or not grows_freely(seeds[0].config):
            continue
        steps = steps_per_epoch(seeds[0].config, seeds[0].run_dir)
        if steps is None:
            continue
        logged = min(_last_logged(run) for run in seeds)
        for i, phase in enumerate(phases(seeds[0].config)):
            first, last = phase_epochs(phase)
            last = min(last, logged)
            if last < first:
                break
            found = [_growth_in(run, first, last, steps, momentum) for run in seeds]
            rows.append(GrowthRow(name=name, label=label_of(name), phase=i, start=phase.start,
                                  end=phase.end, lr=phase.lr, first_epoch=first, last_epoch=last,
                                  before=[f[0] for f in found], measured=[f[1] for f in found],
                                  predicted=[f[2] for f in found]))
    return rows


def growth_markdown(rows: Sequence[GrowthRow], momentum: float = fidelity.MOMENTUM) -> str:
    """theory.md's second table: conv_sqsum's gain against `predicted_growth`."""
    lines = [
        "## Conv weight growth without conv L2",
        "",
        "| run | phase (epochs) | lr | epochs | conv_sqsum before | gain: measured | predicted "
        "| measured / predicted |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        label = seeds_label(r.label, r.measured)
        ratio = mean_std(r.ratios)
        ratio_text = "n/a" if math.isnan(ratio[0]) else (
            f"{ratio[0]:.3f}" if math.isnan(ratio[1]) else f"{ratio[0]:.3f} ± {ratio[1]:.3f}")
        lines.append(f"| {label} | {epoch_span(r.start, r.end)} | {r.lr:g} | "
                     f"{epoch_span(r.first_epoch, r.last_epoch)} | {scientific(mean_std(r.before)[0])} | "
                     f"{scientific(mean_std(r.measured)[0])} | {scientific(mean_std(r.predicted)[0])} | "
                     f"{ratio_text} |")
    lines += [
        "",
        f"Without decay nothing balances the gradient's growth of the conv kernels: under "
        f"momentum m the steps add on average (1+m)/(1−m)·||dw||² each to ||w||² "
        f"({growth_per_step(momentum):g}× at m = {momentum:g}; see `growth_per_step`), so a run "
        f"that keeps its relative step r up (ConvLRScale) grows geometrically, by about "
        f"exp({growth_per_step(momentum):g}·r²) per step, and one that does not (NoConvL2) slows "
        f"down as r falls. Predicted per epoch and layer from the layer's conv_sqsum at the "
        f"epoch's start and its logged relative step, summed. The law needs the mean of r² and "
        f"the log holds the mean of r, so the prediction runs low where r varies within an "
        f"epoch (most in the first epoch) and misses the transient after a rate change (see "
        f"`predicted_growth`). A check of batch norm's scale invariance and of the momentum "
        f"update, not an explanation of why the steps are as large as they are. "
        f"Measured / predicted is mean ± std over seeds.",
    ]
    if any(not np.isfinite(r) for row in rows for r in row.ratios):
        lines += ["", "n/a: a layer's conv_sqsum or relative step is missing for an epoch of the "
                      "phase (a damaged event file, or a run logged by older code)."]
    return "\n".join(lines) + "\n"


GROWTH_FIELDS = ("name", "label", "seed_index", "phase", "start_epoch", "end_epoch", "lr",
                 "first_epoch", "last_epoch", "sqsum_before", "measured_gain", "predicted_gain", "ratio")


def write_growth_csv(rows: Sequence[GrowthRow], path: str) -> None:
    with atomic_open(path) as f:
        writer = csv.writer(f)
        writer.writerow(GROWTH_FIELDS)
        for r in rows:
            for k, (before, measured, predicted, ratio) in enumerate(
                    zip(r.before, r.measured, r.predicted, r.ratios)):
                writer.writerow([r.name, r.label, k, r.phase, csv_number(r.start), csv_number(r.end),
                                 csv_number(r.lr), r.first_epoch, r.last_epoch, csv_number(before),
                                 csv_number(measured), csv_number(predicted), csv_number(ratio)])
