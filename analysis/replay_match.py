"""How closely a gradient-scaled run reproduces the baseline's step sizes, layer by layer.

The post's claim: scaling conv gradients by (its ||w||^2) / (baseline ||w||^2)
reproduces the baseline's training, because each conv followed by BN only feels
its relative step ||dw||/||w||. The global factor (`replay`, `piecewise`) matches
the mean over layers by construction; whether each *layer* matches is the sharper
test, and the per-layer factor (`per_layer`) is the variant built to pass it.

For each scaled run and seed, against the baseline of the same seed:
  ratio(e)    = conv_relative_step(e) / baseline conv_relative_step(e)
  ratio_l(e)  = per_layer/conv_relative_step/<l>(e) / the baseline's, same layer
The figure shows ratio (line) and the min-max of ratio_l over layers (band); the
table gives the worst deviations and the final conv_sqsum relative to the baseline.
"""

from typing import Dict, List, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from analysis import figures, output
from resnet_cifar import events, tags

TOLERANCE = 0.15      # the bar for "reproduces the baseline's relative step"


def _layer_steps(run: events.Run) -> Dict[str, events.Series]:
    """layer -> its relative step series (new or pre-prefix tag names)."""
    return tags.per_layer_series(run.scalars.get(tags.TRAIN_DIR, {}), tags.CONV_RELATIVE_STEP)


def _ratio(run: events.Run, base: events.Run, tag: str):
    """(epochs, run/base) over the epochs both logged; None if either lacks the tag."""
    return _series_ratio(run.scalars.get(tags.TRAIN_DIR, {}).get(tag),
                         base.scalars.get(tags.TRAIN_DIR, {}).get(tag))


def _series_ratio(a, b):
    if a is None or b is None:
        return None
    common, ia, ib = np.intersect1d(a[0], b[0], return_indices=True)
    keep = common >= 1                                   # epoch 0: no step yet
    return common[keep], a[1][ia][keep] / b[1][ib][keep]


def pair_with_baseline(loaded: Dict[str, List[events.Run]], name: str):
    """[(run, its seed's baseline)]: seeds are paired by position (seed_0 with seed_0)."""
    bases = loaded.get(figures.BASELINE, [])
    return list(zip(loaded.get(name, []), bases))


def match(run: events.Run, base: events.Run) -> Optional[dict]:
    """Epochs, the mean-step ratio, and per-layer ratios (layers x epochs) of one pair."""
    mean = _ratio(run, base, tags.CONV_RELATIVE_STEP)
    if mean is None or len(mean[0]) == 0:
        return None
    epochs = mean[0]
    layers = {}
    base_layers = _layer_steps(base)
    for layer, series in _layer_steps(run).items():
        r = _series_ratio(series, base_layers.get(layer))
        if r is not None and np.array_equal(r[0], epochs):
            layers[layer] = r[1]
    sq = _ratio(run, base, tags.CONV_SQSUM)
    return dict(epochs=epochs, mean=mean[1], layers=layers,
                sqsum_ratio=float(sq[1][-1]) if sq is not None and len(sq[0]) else float("nan"))


def scaled_runs(loaded) -> List[str]:
    """Runs that scale conv gradients (by their run_config), in the figures' order."""
    return [n for n in figures.ordered_names(loaded)
            if n != figures.BASELINE and any(r.config.get("conv_grad_scale") for r in loaded[n])]


def replay_match_figure(loaded, labels=None) -> Optional[Figure]:
    names = [n for n in scaled_runs(loaded) if pair_with_baseline(loaded, n)]
    if not names:
        figures.note("replay_match: no gradient-scaled run with a baseline, skipped")
        return None
    configs = {name: [run.config for run in seeds] for name, seeds in loaded.items()}
    seeds = {name: [None] * len(pair_with_baseline(loaded, name)) for name in names}
    fig, ax = figures.new_figure("Relative step / the baseline's (line: mean; band: layers)",
                                 "relative step / baseline's, same epoch",
                                 figures.subtitle(names, seeds, configs))
    for name in names:
        results = [m for m in (match(r, b) for r, b in pair_with_baseline(loaded, name)) if m]
        if not results:
            continue
        color = figures.color_of(name)
        epochs = results[0]["epochs"]
        results = [m for m in results if np.array_equal(m["epochs"], epochs)]
        mean = np.mean([m["mean"] for m in results], axis=0)
        per_layer = np.array([v for m in results for v in m["layers"].values()])
        if per_layer.size:
            ax.fill_between(epochs, per_layer.min(axis=0), per_layer.max(axis=0), color=color,
                            alpha=0.2, linewidth=0)
        ax.plot(epochs, mean, color=color, label=figures.label_of(name, labels), linewidth=1.2)
    for y in (1 - TOLERANCE, 1.0, 1 + TOLERANCE):
        ax.axhline(y, color="black", linewidth=0.8, linestyle="-" if y == 1.0 else ":")
    figures.draw_boundaries(ax, figures.boundaries(names, configs), upto=ax.dataLim.x1)
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


NOISE_FLOOR = "baseline seed_1 vs seed_0"


def rows(loaded) -> List[dict]:
    """One row per scaled run (pooled over seeds), plus the noise floor when the
    baseline has two seeds: the same comparison between two baselines, i.e. how much
    two runs differ that should match exactly in expectation."""
    out = []
    pairs = {name: pair_with_baseline(loaded, name) for name in scaled_runs(loaded)}
    bases = loaded.get(figures.BASELINE, [])
    if len(bases) >= 2:
        pairs[NOISE_FLOOR] = [(bases[1], bases[0])]
    for name, pair_list in pairs.items():
        results = [m for m in (match(r, b) for r, b in pair_list) if m]
        if not results:
            continue
        mean_dev = max(float(np.max(np.abs(m["mean"] - 1))) for m in results)
        layer_devs = [float(np.max(np.abs(v - 1))) for m in results for v in m["layers"].values()]
        out.append(dict(
            run=name, seeds=len(results), epochs=int(results[0]["epochs"][-1]),
            mean_step_max_dev=mean_dev,
            within_tolerance=mean_dev <= TOLERANCE,
            layer_max_dev=max(layer_devs) if layer_devs else float("nan"),
            layer_median_dev=float(np.median(layer_devs)) if layer_devs else float("nan"),
            final_sqsum_ratio=float(np.mean([m["sqsum_ratio"] for m in results])),
        ))
    return out


def to_markdown(table: Sequence[dict]) -> str:
    lines = [
        "| run | seeds | epochs | mean step: max abs(ratio-1) | within 15% | worst layer: max abs(ratio-1) "
        "| median layer: max abs(ratio-1) | final conv_sqsum / baseline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(f"| {figures.label_of(r['run'])} | {r['seeds']} | {r['epochs']} | "
                     f"{r['mean_step_max_dev']:.1%} | {'yes' if r['within_tolerance'] else 'no'} | "
                     f"{r['layer_max_dev']:.1%} | {r['layer_median_dev']:.1%} | {r['final_sqsum_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def write(loaded, out_dir) -> List[str]:
    table = rows(loaded)
    if not table:
        return []
    return output.write_table(out_dir, "replay_match", to_markdown(table), table)
