"""The post's figures, one function each, built from already loaded curves.

Every function takes `curves`: run name -> one (epochs, values) series per seed, for
the one tag the figure shows, and returns a matplotlib Figure (or None when none of
its runs is there). Nothing here reads files or writes them, so tests can build a
figure from made-up arrays and look at `fig.axes[0].lines` (the runs) and
`fig.axes[0].collections` (seed bands; levels and rate boundaries, drawn by
Axes.hlines and Axes.vlines). Figures are built with `matplotlib.figure.Figure`
directly (rendered by Agg), never through pyplot, so no global figure state piles
up and no display is needed.

Several seeds of a run are drawn as their mean with a min-max band; one seed as a line.
Each figure is about one run (its `subject`, e.g. BN 0.98 for `bn098_accuracy`): without
it the figure is not drawn. Another run that is missing is named in the title ("no
NoConvL2 run"), with a note on stderr: partial results still plot, and say so.

`configs` (run name -> the run_config.json "config" of each seed) gives each figure a
subtitle (data, schedule, seeds) and its learning-rate boundaries, drawn as vertical
dotted lines. Accuracy is drawn in percent, as in the summary table.

The relative-step figures can also show the theory's prediction (analysis/predictions.py):
`levels`, one (start_epoch, end_epoch, value) per learning-rate phase, drawn as
dashed black segments after the runs' lines, labelled once in the legend by
`level_label`. When levels are given but none has a value (the theory predicts
none), `level_label` is the theory's reason and titles the legend, so a figure
without levels says why.
"""

import sys
from typing import List, Mapping, Optional, Sequence, Tuple

import numpy as np
from matplotlib.figure import Figure

from resnet_cifar import fidelity, tags
# The runs, their labels and colours live in resnet_cifar/runs.py.
from resnet_cifar.runs import BASELINE, CONV_LR_SCALE, CONV_LR_SCALE_BN098, LABELS, NOCONV_L2, POST_RUNS  # noqa: F401
from resnet_cifar.runs import COLORS as _COLORS
_EXTRA_COLORS = ("tab:red", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan")

FIGSIZE = (6, 4)   # inches; at DPI 100 a PNG stays well under 200 KB
DPI = 100

Series = Tuple[np.ndarray, np.ndarray]
Curves = Mapping[str, Sequence[Series]]   # run name -> one series per seed
Configs = Mapping[str, Sequence[Mapping]]  # run name -> run_config.json "config", per seed
Levels = Sequence[Tuple[float, float, float]]   # (start_epoch, end_epoch, value) per phase

LEVEL_LABEL = "equilibrium with conv L2: sqrt(2·lr·wd/(1+m))"
LEVEL_STYLE = dict(color="black", linestyle="--", linewidth=1.0)
BOUNDARY_LABEL = "learning-rate boundary"
BOUNDARY_STYLE = dict(color="gray", linestyle=":", linewidth=1.0)

# Axis labels.
EPOCH = "epoch"
TEST_ACCURACY = "test accuracy (%)"
CONV_SQSUM = "sum of squared conv weights"
RELATIVE_STEP = "relative step ||Δw|| / ||w|| (mean over conv layers)"
DATA_NAMES = {"binary": "CIFAR-10 (binary files)", "tfds": "CIFAR-10 (TFDS)",
              "synthetic": "synthetic random images"}
# A run config key that names the data in place of DATA_NAMES: make_figures --data_name, else
# what the run recorded of its data (run_config.json "data", cifar_data.fingerprint).
DATA_NAME = "data_name"


def note(message: str) -> None:
    """A remark for the user that must not stop the other figures."""
    print(message, file=sys.stderr)


def ordered_names(names) -> list:
    """The post's runs in the post's order, then any others alphabetically."""
    names = set(names)
    return [n for n in POST_RUNS if n in names] + sorted(names - set(POST_RUNS))


def label_of(name: str, labels: Optional[Mapping[str, str]] = None) -> str:
    if labels and name in labels:
        return labels[name]
    return LABELS.get(name, name)


def color_of(name: str) -> str:
    """The run's colour in every figure: the post's runs' own, a stable one per name for others."""
    if name in _COLORS:
        return _COLORS[name]
    # Stable per name, so one extra run keeps its colour across figures.
    return _EXTRA_COLORS[sum(map(ord, name)) % len(_EXTRA_COLORS)]


def aggregate_seeds(series: Sequence[Series]) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(epochs, mean, min, max) over seeds, per epoch.

    Seeds of an unfinished run may stop at different epochs: each epoch is averaged
    over the seeds that reached it, so the curve runs as far as the longest seed.
    """
    if not series:
        raise ValueError("aggregate_seeds needs at least one series")
    steps = np.unique(np.concatenate([np.asarray(s, dtype=np.int64) for s, _ in series]))
    table = np.full((len(series), len(steps)), np.nan)
    for row, (s, v) in zip(table, series):
        row[np.searchsorted(steps, np.asarray(s, dtype=np.int64))] = v
    return steps, np.nanmean(table, axis=0), np.nanmin(table, axis=0), np.nanmax(table, axis=0)


def piecewise_np(epochs) -> np.ndarray:
    """The post's hand fit piecewise(epoch) of 800 / baseline conv_sqsum, in NumPy: the
    same definition (fidelity.piecewise) that training evaluates with tf.where."""
    return fidelity.piecewise(np.asarray(epochs, dtype=np.float64), np.where)


def new_figure(title: str, ylabel: str, subtitle: str = ""):
    """Title above the axes (fig.suptitle), the subtitle in small grey (the axes' title)."""
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    ax = fig.add_subplot()
    fig.suptitle(title, fontsize=12)
    ax.set_title(subtitle, fontsize=8, color="dimgray")
    ax.set_xlabel(EPOCH)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _schedule(config: Mapping) -> str:
    epochs = config.get("train_epochs", fidelity.TRAIN_EPOCHS)
    steps = config.get("steps_per_epoch")
    batch = config.get("batch_size", fidelity.BATCH_SIZE)
    if steps:
        text = f"{epochs} short epochs of {steps} steps, batch {batch}"
    else:
        text = f"{epochs} full epochs, batch {batch}"
    if epochs == fidelity.TRAIN_EPOCHS and not steps and batch == fidelity.BATCH_SIZE:
        text = f"the post's schedule ({text})"
    return text


def data_and_schedule(configs: Sequence[Mapping]) -> List[str]:
    """['<data>', '<schedule>'] of run configs; values they do not share joined by ' / '."""
    parts = []
    for describe in (lambda c: c.get(DATA_NAME) or DATA_NAMES.get(c.get("data_source"),
                                                                 str(c.get("data_source", "?"))),
                     _schedule):
        values = list(dict.fromkeys(describe(c) for c in configs))
        if values:
            parts.append(" / ".join(values))
    return parts


def subtitle(names: Sequence[str], curves: Curves, configs: Optional[Configs]) -> str:
    """'<data> · <schedule> · <seeds>' of the runs `names`, from their run_config.json.

    Values the runs do not share are listed with ' / '.
    """
    configs = configs or {}
    parts = data_and_schedule([c for n in names for c in configs.get(n, ())])
    seeds = sorted({len(curves[n]) for n in names if curves.get(n)})
    if seeds:
        parts.append(_plural(seeds[0], "seed") if len(seeds) == 1
                     else f"{seeds[0]}–{seeds[-1]} seeds per run")
    return " · ".join(parts)


def boundaries(names: Sequence[str], configs: Optional[Configs]) -> list:
    """Learning-rate boundaries (epochs) of the runs `names`, from their configs, sorted."""
    configs = configs or {}
    found = {float(b) for n in names for c in configs.get(n, ()) for b in c.get("boundary_epochs", ())}
    return sorted(found)


def _last_epoch(curves: Curves, names: Sequence[str]) -> int:
    """The last epoch any of `names` has data for: figures span the runs' own epochs."""
    return max([int(np.max(s)) for n in names for s, _ in curves.get(n) or () if len(s)] or [0])


def draw_boundaries(ax, epochs: Sequence[float], upto: Optional[float] = None) -> None:
    """The learning-rate boundaries up to epoch `upto` (None: all) as vertical lines, one legend entry.

    The lines span the axes' height: y runs from 0 (bottom) to 1 (top) in the x-axis
    transform, so they leave the y limits alone, on log axes too."""
    epochs = [e for e in epochs if upto is None or e <= upto]
    if epochs:
        ax.vlines(epochs, 0, 1, transform=ax.get_xaxis_transform(), label=BOUNDARY_LABEL,
                  **BOUNDARY_STYLE)


def _draw(ax, series: Sequence[Series], label: str, color: str, start_epoch: int = 0,
          scale: float = 1.0):
    """Mean line, plus a min-max band when there are several seeds; values times `scale`."""
    steps, mean, lo, hi = aggregate_seeds(series)
    mean, lo, hi = mean * scale, lo * scale, hi * scale
    keep = steps >= start_epoch
    steps, mean, lo, hi = steps[keep], mean[keep], lo[keep], hi[keep]
    if len(series) > 1:
        label = f"{label} ({len(series)} seeds)"
        ax.fill_between(steps, lo, hi, color=color, alpha=0.25, linewidth=0)
    ax.plot(steps, mean, label=label, color=color, linewidth=1.2)


def _draw_levels(ax, levels: Optional[Levels], label: str = LEVEL_LABEL,
                 upto: Optional[float] = None) -> bool:
    """Each phase's predicted level as a dashed segment over its epochs; one legend entry.
    Returns whether any was drawn.

    An entry is (start, end, value), or any tuple with those first two and the value
    last (e.g. predictions.Level); a value of None (no prediction) is skipped.
    """
    segments = []
    for level in levels or ():
        start, end, value = level[0], level[1], level[-1]
        if upto is not None:
            end = min(end, upto)
        if value is not None and end > start:
            segments.append((value, start, end))
    if not segments:
        return False
    values, starts, ends = zip(*segments)
    ax.hlines(values, starts, ends, label=label, **LEVEL_STYLE)
    return True


def runs_figure(figure: str, curves: Curves, names: Sequence[str], title: str, ylabel: str,
                labels=None, log_y=False, start_epoch=0, levels=None, subject=None,
                configs: Optional[Configs] = None, scale: float = 1.0,
                level_label: Optional[str] = None) -> Optional[Figure]:
    """A figure of one tag: one line (or band) per run of `names` that has data.

    None (not drawn) if the `subject` run, or every run, is missing; other missing
    runs are named in the title. level_label: the legend entry of the levels
    (LEVEL_LABEL if None); when `levels` are given but none has a value, the legend's
    title (the theory's reason for predicting none).
    """
    present = [n for n in names if curves.get(n)]
    missing = [n for n in names if n not in present]
    if subject is not None and subject in missing:
        note(f"{figure}: no {label_of(subject)} ({subject}) data, the run it is about: skipped")
        return None
    if not present:
        note(f"{figure}: none of its runs has data, skipped")
        return None
    for name in missing:
        note(f"{figure}: no {label_of(name)} ({name}) data, drawn without it")
    if missing:
        title += "\n(no " + ", no ".join(f"{label_of(n)} run" for n in missing) + ")"
    fig, ax = new_figure(title, ylabel, subtitle(present, curves, configs))
    for name in present:
        _draw(ax, curves[name], label_of(name, labels), color_of(name), start_epoch, scale)
    last = _last_epoch(curves, present)
    drawn = _draw_levels(ax, levels, level_label or LEVEL_LABEL, upto=last)
    draw_boundaries(ax, boundaries(present, configs), upto=last)
    if log_y:
        ax.set_yscale("log")
    no_levels = levels is not None and not drawn
    ax.legend(fontsize=8, title=level_label if no_levels else None, title_fontsize=8)
    fig.tight_layout()
    return fig


def _post_three_and_extras(curves: Curves) -> list:
    """The post's first three runs, plus runs the post did not have (e.g. per-layer).

    The BN 0.98 run is left out as in the post: it trains exactly like ConvLRScale
    (only test-time moving averages differ), so its line would hide that one.
    """
    extras = [n for n in ordered_names(curves) if n not in POST_RUNS]
    return [BASELINE, NOCONV_L2, CONV_LR_SCALE] + extras


# --- The post's figures, in its order -------------------------------------------------

def test_accuracy(accuracy: Curves, labels=None, configs=None) -> Optional[Figure]:
    """Test accuracy of the baseline and NoConvL2 (the post's first plot)."""
    return runs_figure("test_accuracy", accuracy, [BASELINE, NOCONV_L2],
                       "Test accuracy without conv L2", TEST_ACCURACY, labels,
                       subject=NOCONV_L2, configs=configs, scale=100.0)


def conv_sqsum(sqsum: Curves, labels=None, configs=None) -> Optional[Figure]:
    """Sum of squared conv weights: without conv L2 they grow much faster."""
    return runs_figure("conv_sqsum", sqsum, [BASELINE, NOCONV_L2],
                       "Sum of squared conv weights", CONV_SQSUM, labels,
                       subject=NOCONV_L2, configs=configs)


def relative_step(step: Curves, labels=None, levels: Optional[Levels] = None,
                  log_y: bool = False, configs=None,
                  level_label: Optional[str] = None) -> Optional[Figure]:
    """Mean conv step / weight norm. Starts at epoch 1: epoch 0 is before any step.

    levels: the predicted equilibrium per phase (dashed), named in the legend by
    level_label (its formula, which depends on the optimizer; LEVEL_LABEL if None),
    or, when no level has a value, the reason there is none (the legend's title);
    log_y: a log scale, which make_figures uses since the phases' levels differ by
    about 10x each.
    """
    return runs_figure("relative_step", step, [BASELINE, NOCONV_L2],
                       "Relative step size of conv layers", RELATIVE_STEP,
                       labels, log_y=log_y, start_epoch=1, levels=levels,
                       subject=NOCONV_L2, configs=configs, level_label=level_label)


def conv_lr_scale_accuracy(accuracy: Curves, labels=None, configs=None) -> Optional[Figure]:
    """Test accuracy once conv L2 is replaced by conv gradient scaling."""
    return runs_figure("conv_lr_scale_accuracy", accuracy,
                       [BASELINE, NOCONV_L2, CONV_LR_SCALE],
                       "Test accuracy with conv gradient scaling", TEST_ACCURACY, labels,
                       subject=CONV_LR_SCALE, configs=configs, scale=100.0)


def piecewise_factor(sqsum: Curves, labels=None, configs=None) -> Figure:
    """The post's piecewise fit against what it fits: 800 / the baseline's conv_sqsum.

    The fit is drawn over the baseline's epochs, or over the post's 150 without a
    baseline run, since the formula alone is what ConvLRScale uses; the title then
    says the run is missing.
    """
    baseline = sqsum.get(BASELINE) or []
    title = "Baseline conv weight-scale factor and its piecewise fit"
    if not baseline:
        title += f"\n(no {label_of(BASELINE)} run: the fit alone)"
    fig, ax = new_figure(title, f"{fidelity.INITIAL_CONV_SQSUM:g} / sum of squared conv weights",
                         subtitle([BASELINE], sqsum, configs) if baseline else "")
    last = fidelity.TRAIN_EPOCHS
    if baseline:
        ratios = [(s, fidelity.INITIAL_CONV_SQSUM / v) for s, v in baseline]
        _draw(ax, ratios, f"{fidelity.INITIAL_CONV_SQSUM:g} / {label_of(BASELINE, labels)} conv_sqsum",
              color_of(BASELINE))
        last = _last_epoch(sqsum, [BASELINE])
    else:
        note(f"piecewise_factor: no {label_of(BASELINE)} ({BASELINE}) data, drawing the fit alone")
    epochs = np.arange(0, last + 1)
    ax.plot(epochs, piecewise_np(epochs), label="piecewise(epoch), the post's fit", color="black",
            linestyle="--", linewidth=1.2)
    if baseline:
        draw_boundaries(ax, boundaries([BASELINE], configs), upto=last)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def bn098_accuracy(accuracy: Curves, labels=None, configs=None) -> Optional[Figure]:
    """A faster BN moving average (0.98) lets test-time statistics keep up."""
    return runs_figure("bn098_accuracy", accuracy,
                       [BASELINE, CONV_LR_SCALE, CONV_LR_SCALE_BN098],
                       "Test accuracy with BN decay 0.98", TEST_ACCURACY, labels,
                       subject=CONV_LR_SCALE_BN098, configs=configs, scale=100.0)


def relative_step_all(step: Curves, labels=None, levels: Optional[Levels] = None,
                      log_y: bool = False, configs=None,
                      level_label: Optional[str] = None) -> Optional[Figure]:
    """Gradient scaling reproduces the baseline's relative step size (levels, log_y,
    level_label: as `relative_step`)."""
    return runs_figure("relative_step_all", step, _post_three_and_extras(step),
                       "Relative step size of conv layers, with gradient scaling", RELATIVE_STEP,
                       labels, log_y=log_y, start_epoch=1, levels=levels,
                       subject=CONV_LR_SCALE, configs=configs, level_label=level_label)


def conv_sqsum_log(sqsum: Curves, labels=None, configs=None) -> Optional[Figure]:
    """On a log scale: under gradient scaling the weights grow exponentially."""
    return runs_figure("conv_sqsum_log", sqsum, _post_three_and_extras(sqsum),
                       "Sum of squared conv weights (log scale)", CONV_SQSUM,
                       labels, log_y=True, subject=CONV_LR_SCALE, configs=configs)


def test_accuracy_all(accuracy: Curves, labels=None, configs=None) -> Optional[Figure]:
    """Not in the post: every run's test accuracy, so extra runs are seen too."""
    return runs_figure("test_accuracy_all", accuracy, ordered_names(accuracy),
                       "Test accuracy, all runs", TEST_ACCURACY, labels,
                       configs=configs, scale=100.0)


# File name -> (function, tag it plots, event sub-folder of that tag).
FIGURES = {
    "test_accuracy": (test_accuracy, tags.EPOCH_ACCURACY, tags.VALIDATION_DIR),
    "conv_sqsum": (conv_sqsum, tags.CONV_SQSUM, tags.TRAIN_DIR),
    "relative_step": (relative_step, tags.CONV_RELATIVE_STEP, tags.TRAIN_DIR),
    "conv_lr_scale_accuracy": (conv_lr_scale_accuracy, tags.EPOCH_ACCURACY, tags.VALIDATION_DIR),
    "piecewise_factor": (piecewise_factor, tags.CONV_SQSUM, tags.TRAIN_DIR),
    "bn098_accuracy": (bn098_accuracy, tags.EPOCH_ACCURACY, tags.VALIDATION_DIR),
    "relative_step_all": (relative_step_all, tags.CONV_RELATIVE_STEP, tags.TRAIN_DIR),
    "conv_sqsum_log": (conv_sqsum_log, tags.CONV_SQSUM, tags.TRAIN_DIR),
    "test_accuracy_all": (test_accuracy_all, tags.EPOCH_ACCURACY, tags.VALIDATION_DIR),
}
# Figures that take `levels` and `log_y` (the theory overlay), as make_figures draws them.
LEVEL_FIGURES = ("relative_step", "relative_step_all")
