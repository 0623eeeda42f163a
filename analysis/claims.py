"""The post's claims, measured: one line per claim with the numbers and a verdict.

    python -m analysis.claims results/post
    python -m analysis.claims results/post --markdown     # the same as a table

The claims and the post's numbers are data (`fidelity.POST_CLAIMS` and the
`POST_*` constants beside it); this module only measures them on a results folder
holding the post's four runs (`<run>/seed_<k>/` or `<run>/`, as `experiments.run_all`
writes them) and compares. Every verdict is one of:

- holds: the measured effect has the post's direction (or, for "the same as", the
  difference is within noise) and is larger than the noise;
- within noise: the measured difference is smaller than the noise, so this run cannot
  tell;
- does not hold: the measured effect is beyond the noise in the other direction, or a
  threshold stated below is missed;
- not measured: a run it needs has not reached the epochs it needs, or trains another
  schedule than the post's (150 epochs, lr drops after 50 and 100: the quick preset, a
  smoke run), against which the post's numbers and epoch windows mean nothing. Nothing
  is claimed before it is measured.

The noise, and why:
- Final test accuracy of one run varies between seeds by about 0.2 points (std) for
  CIFAR-10 ResNets of this size (He et al. 2016, Table 6, report ±0.16 for ResNet-110
  over 5 runs); on top of that, the last epochs' values fluctuate from epoch to epoch,
  measured here as std(diff)/sqrt(2) over the last 10 epochs. A run's final value has
  s = sqrt(0.2^2 + s_epoch^2); a difference of two runs is "within noise" when smaller
  than 2 sqrt(s_a^2 + s_b^2).
- Final losses: only the epoch-to-epoch fluctuation is measured (one seed per run); the
  noise is therefore a lower bound, and a "holds" on a loss difference close to it is weak.
- Means over epochs 1-50: s = sqrt(0.2^2 + s_epoch^2 / n) per run, epochs taken as
  independent (their autocorrelation makes this an underestimate).
- Ratios of conv_sqsum and of the relative step are far above noise; they are judged
  against the thresholds named below (FASTER, FAR_LARGER, REPLICATES).

With two or more seeds of a run the noise is measured instead (`spread`, the one rule):
- a run's final value is the mean over its seeds, with noise std(seeds) / sqrt(n);
- a difference between runs is taken seed by seed over the seeds both have (paired), its
  noise std(differences) / sqrt(n): what the two runs share within a seed cancels;
- two to four seeds estimate a std poorly (two seeds: within a factor 3 of the truth only
  about 90% of the time), so below MIN_TRUSTED_SEEDS seeds a measured std smaller than the
  assumed one above is not trusted: the assumed std is used, and the line says so;
- every line then gives each seed's value after the mean, and which noise it used.

Test accuracy here is the logged one (BN moving averages), as the post plotted it.
"""

import dataclasses
import math
import sys
from typing import Dict, List, Optional

import numpy as np

from analysis import figures
from resnet_cifar import events, fidelity, tags
from resnet_cifar import command_line
from resnet_cifar.command_line import ArgumentParser

SEED_STD_ACCURACY = 0.2    # points: seed-to-seed std of a run's final test accuracy (see above)
LAST_EPOCHS = 10           # epochs whose fluctuation measures a final value's epoch noise
FASTER = 2.0               # "grow much faster": final conv_sqsum at least this many times the baseline's
FAR_LARGER = 10.0          # "far larger": final conv_sqsum at least this many times the baseline's
REPLICATES = 0.15          # "replicates" / "approximates": median |ratio - 1| over epochs at most this
MIN_TRUSTED_SEEDS = 5      # fewer seeds: a measured std below the assumed one is not trusted (see above)

BASELINE, NOCONV, SCALE, BN098 = figures.POST_RUNS
HOLDS, NOISE, FAILS, MISSING = "holds", "within noise", "does not hold", "not measured"


@dataclasses.dataclass
class Verdict:
    key: str
    claim: str
    verdict: str
    post: str         # the post's number, as it says it
    measured: str     # ours, with the noise or threshold it was judged against


@dataclasses.dataclass
class RunData:
    """One run name, seeds averaged epoch by epoch: tag -> (epochs, values)."""

    name: str
    epochs: int              # epochs every seed has completed
    train_epochs: int        # epochs asked for
    boundary_epochs: tuple   # where the learning rate drops
    train: Dict[str, events.Series]
    test: Dict[str, events.Series]
    seeds: Dict[int, "RunData"] = dataclasses.field(default_factory=dict)   # each seed alone, if several
    data: str = ""           # what the runs recorded of their data (cifar_data.fingerprint's name)

    def series(self, tag, subdir=tags.TRAIN_DIR):
        return (self.train if subdir == tags.TRAIN_DIR else self.test).get(tag)

    def final(self, tag, subdir=tags.TRAIN_DIR):
        steps, values = self.series(tag, subdir)
        return float(values[steps == self.epochs][0])

    def epoch_noise(self, tag, subdir=tags.TRAIN_DIR):
        """std of one epoch's value around the trend, from the last epochs' differences."""
        steps, values = self.series(tag, subdir)
        window = values[(steps > self.epochs - LAST_EPOCHS) & (steps <= self.epochs)]
        return float(np.std(np.diff(window), ddof=1) / math.sqrt(2)) if len(window) > 2 else 0.0

    def window_mean(self, tag, first, last, subdir=tags.VALIDATION_DIR):
        """(mean, std of the mean) of epochs first..last; std from epoch-to-epoch differences."""
        steps, values = self.series(tag, subdir)
        window = values[(steps >= first) & (steps <= last)]
        s_epoch = float(np.std(np.diff(window), ddof=1) / math.sqrt(2)) if len(window) > 2 else 0.0
        return float(np.mean(window)), s_epoch / math.sqrt(len(window))


def _average_seeds(runs: List[events.Run], subdir: str) -> Dict[str, events.Series]:
    out = {}
    for tag in set().union(*(r.scalars.get(subdir, {}) for r in runs)):
        series = [r.scalars[subdir][tag] for r in runs if tag in r.scalars.get(subdir, {})]
        if len(series) == len(runs):
            steps, mean, _, _ = figures.aggregate_seeds(series)
            out[tag] = (steps, mean)
    return out


def load(results_dir: str) -> Dict[str, RunData]:
    """The post's runs found in `results_dir`, seeds averaged; runs with unreadable files are left out."""
    found = events.find_runs(results_dir)
    out = {}
    for name in figures.POST_RUNS:
        runs = []
        for run_dir in found.get(name, []):
            try:
                runs.append(events.load_run(run_dir))
            except events.EventsError as e:
                figures.note(f"left out {run_dir}: {e}")
        if not runs:
            continue
        epochs = []
        for run in runs:
            steps = run.scalars.get(tags.VALIDATION_DIR, {}).get(tags.EPOCH_ACCURACY, (np.empty(0),))[0]
            train_steps = run.scalars.get(tags.TRAIN_DIR, {}).get(tags.EPOCH_LOSS, (np.empty(0),))[0]
            epochs.append(int(min(steps.max(initial=0), train_steps.max(initial=0))))
        config = runs[0].config

        def run_data(group):
            return RunData(name=name, epochs=min(epochs),
                           train_epochs=int(config.get("train_epochs") or fidelity.TRAIN_EPOCHS),
                           boundary_epochs=tuple(config.get("boundary_epochs") or fidelity.BOUNDARY_EPOCHS),
                           train=_average_seeds(group, tags.TRAIN_DIR),
                           test=_average_seeds(group, tags.VALIDATION_DIR))
        out[name] = run_data(runs)
        out[name].data = " / ".join(dict.fromkeys(
            (events.recorded_data(r.run_dir) or {}).get("name") or "data not recorded" for r in runs))
        if len(runs) > 1:
            out[name].seeds = {int(r.config.get("seed", i)): run_data([r]) for i, r in enumerate(runs)}
    return out


@dataclasses.dataclass
class Estimate:
    """A measured quantity: its value (the mean over seeds), its noise (std of that value),
    each seed's value (empty with one seed) and how the noise was found."""

    value: float
    noise: float
    seeds: tuple = ()
    how: str = ""

    def seeds_text(self, fmt, scale=1.0) -> str:
        if not self.seeds:
            return ""
        return "; seeds " + ", ".join(format(scale * v, fmt) for v in self.seeds) + f"; {self.how}"


def spread(values, assumed: float) -> tuple:
    """(noise of the mean of `values`, one per seed, how it was found): the rule of the module
    docstring. `assumed`: one seed's std as assumed without seeds (what one seed gets)."""
    n = len(values)
    if n < 2:
        return assumed, ""
    measured = float(np.std(values, ddof=1))
    if n < MIN_TRUSTED_SEEDS and measured < assumed:
        return (assumed / math.sqrt(n),
                f"seed std {measured:.3g} over {n} seeds is below the assumed {assumed:.3g} and "
                f"fewer than {MIN_TRUSTED_SEEDS} seeds: the assumed used")
    return measured / math.sqrt(n), f"seed std {measured:.3g} measured over {n} seeds"


def estimate(run: "RunData", quantity, assumed_noise) -> Estimate:
    """`quantity(run)` as a value, with the noise of `spread` over the run's seeds (or
    `assumed_noise(run)` with one seed)."""
    if len(run.seeds) < 2:
        return Estimate(quantity(run), assumed_noise(run))
    values = [quantity(r) for _, r in sorted(run.seeds.items())]
    noise, how = spread(values, assumed_noise(run))
    return Estimate(float(np.mean(values)), noise, tuple(values), how)


def difference(a: "RunData", b: "RunData", quantity, assumed_noise) -> Estimate:
    """quantity(a) - quantity(b): paired by seed over the seeds both runs have (two or more),
    else of the runs' values with their assumed noises combined."""
    shared = sorted(set(a.seeds) & set(b.seeds))
    assumed = math.hypot(assumed_noise(a), assumed_noise(b))
    if len(shared) < 2:
        return Estimate(quantity(a) - quantity(b), assumed)
    values = [quantity(a.seeds[k]) - quantity(b.seeds[k]) for k in shared]
    noise, how = spread(values, assumed)
    return Estimate(float(np.mean(values)), noise, tuple(values), how + " (paired by seed)")


def _schedule(train_epochs, boundary_epochs) -> str:
    return f"{train_epochs:g} epochs, lr drops after {', '.join(f'{b:g}' for b in boundary_epochs)}"


def _needs(runs: Dict[str, RunData], names, epoch=None) -> Optional[str]:
    """Why a claim cannot be measured (yet), or None. `epoch` None: the post's last epoch.
    A run on another schedule never can be: the post's numbers and windows are its schedule's."""
    missing = []
    for name in names:
        run = runs.get(name)
        if run and (run.train_epochs != fidelity.TRAIN_EPOCHS
                    or list(map(float, run.boundary_epochs)) != list(map(float, fidelity.BOUNDARY_EPOCHS))):
            missing.append(f"{name} on the post's schedule ({_schedule(fidelity.TRAIN_EPOCHS, fidelity.BOUNDARY_EPOCHS)}; "
                           f"it has {_schedule(run.train_epochs, run.boundary_epochs)})")
            continue
        want = epoch if epoch is not None else fidelity.TRAIN_EPOCHS
        have = run.epochs if run else 0
        if have < want:
            missing.append(f"{name} at epoch {want} (now {have})")
    return "needs " + ", ".join(missing) if missing else None


def _difference_verdict(diff: float, band: float, sign: int) -> str:
    """A claimed difference of sign `sign` (+1 above, -1 below); `band` is the noise."""
    if abs(diff) <= band:
        return NOISE
    return HOLDS if diff * sign > 0 else FAILS


def _final_accuracy(run: RunData):
    """(final test accuracy in %, its noise in points)."""
    value = 100 * run.final(tags.EPOCH_ACCURACY, tags.VALIDATION_DIR)
    s_epoch = 100 * run.epoch_noise(tags.EPOCH_ACCURACY, tags.VALIDATION_DIR)
    return value, math.hypot(SEED_STD_ACCURACY, s_epoch)


def _ratio_deviation(a: events.Series, b: events.Series, first=1):
    """median and max over common epochs >= first of |a/b - 1|."""
    common = np.intersect1d(a[0][a[0] >= first], b[0])
    ratio = a[1][np.searchsorted(a[0], common)] / b[1][np.searchsorted(b[0], common)]
    dev = np.abs(ratio - 1)
    return float(np.median(dev)), float(np.max(dev))


def measure(runs: Dict[str, RunData]) -> List[Verdict]:
    """One Verdict per claim of fidelity.POST_CLAIMS, in that order."""
    post_acc = fidelity.POST_FINAL_TEST_ACCURACY
    phase1 = fidelity.POST_PHASE1_END_EPOCH
    out = []

    def add(key, verdict, post, measured):
        out.append(Verdict(key, dict(fidelity.POST_CLAIMS)[key], verdict, post, measured))

    def absolute(key, name):
        why = _needs(runs, [name])
        if why:
            return add(key, MISSING, f"~{post_acc[name]:g}%", why)
        e = estimate(runs[name], lambda r: _final_accuracy(r)[0], lambda r: _final_accuracy(r)[1])
        band = 0.5 + 2 * e.noise      # the post rounds to 0.5 points, plus 2 std of the run
        diff = e.value - post_acc[name]
        add(key, HOLDS if abs(diff) <= band else FAILS, f"~{post_acc[name]:g}%",
            f"{e.value:.2f}% ({diff:+.2f} pts; tolerance ±{band:.2f}: the post's rounding 0.5 + 2 std"
            f"{e.seeds_text('.2f')}) on {runs[name].data}")

    def acc_difference(key, a, b, sign, post):
        why = _needs(runs, [a, b])
        if why:
            return add(key, MISSING, post, why)
        va, vb = (estimate(runs[n], lambda r: _final_accuracy(r)[0], lambda r: 0.0).value for n in (a, b))
        e = difference(runs[a], runs[b], lambda r: _final_accuracy(r)[0], lambda r: _final_accuracy(r)[1])
        band = 2 * e.noise
        diff = e.value
        verdict = (HOLDS if abs(diff) <= band else FAILS) if sign == 0 else _difference_verdict(diff, band, sign)
        add(key, verdict, post, f"{diff:+.2f} pts ({va:.2f}% vs {vb:.2f}%; noise ±{band:.2f}{e.seeds_text('+.2f')})")

    def loss_difference(key, tag_values, post_value):
        why = _needs(runs, [NOCONV, BASELINE])
        if why:
            return add(key, MISSING, f"+{post_value:g}", why)
        va, vb = (estimate(runs[n], lambda r: tag_values(r)[0], lambda r: 0.0).value for n in (NOCONV, BASELINE))
        e = difference(runs[NOCONV], runs[BASELINE], lambda r: tag_values(r)[0], lambda r: tag_values(r)[1])
        band = 2 * e.noise
        how = e.seeds_text("+.4f") if e.seeds else ", epoch-to-epoch only"
        add(key, _difference_verdict(e.value, band, +1), f"+{post_value:g}",
            f"{e.value:+.4f} ({va:.4f} vs {vb:.4f}; noise ±{band:.4f}{how})")

    def train_loss(run):
        return run.final(tags.EPOCH_LOSS), run.epoch_noise(tags.EPOCH_LOSS)

    def loss_gap(run):
        gap = run.final(tags.EPOCH_LOSS, tags.VALIDATION_DIR) - run.final(tags.EPOCH_LOSS)
        return gap, math.hypot(run.epoch_noise(tags.EPOCH_LOSS, tags.VALIDATION_DIR),
                               run.epoch_noise(tags.EPOCH_LOSS))

    def sqsum_ratio(key, name, threshold, post):
        why = _needs(runs, [name, BASELINE])
        if why:
            return add(key, MISSING, post, why)
        ratio = runs[name].final(tags.CONV_SQSUM) / runs[BASELINE].final(tags.CONV_SQSUM)
        shared = sorted(set(runs[name].seeds) & set(runs[BASELINE].seeds))
        seeds = ("; seeds " + ", ".join(
            f"{runs[name].seeds[k].final(tags.CONV_SQSUM) / runs[BASELINE].seeds[k].final(tags.CONV_SQSUM):.3g}x"
            for k in shared)) if len(shared) > 1 else ""
        add(key, HOLDS if ratio >= threshold else FAILS, post,
            f"final conv_sqsum {ratio:.3g}x the baseline's (holds from {threshold:g}x{seeds})")

    def phase1_mean(key, a, b, sign, post):
        why = _needs(runs, [a, b], epoch=phase1)
        if why:
            return add(key, MISSING, post, why)
        def mean(r):
            return r.window_mean(tags.EPOCH_ACCURACY, 1, phase1)[0]

        def noise(r):
            return math.hypot(SEED_STD_ACCURACY / 100, r.window_mean(tags.EPOCH_ACCURACY, 1, phase1)[1])
        ma, mb = (estimate(runs[n], mean, noise).value for n in (a, b))
        e = difference(runs[a], runs[b], mean, noise)
        band = 2 * e.noise
        add(key, _difference_verdict(e.value, band, sign), post,
            f"mean {100 * e.value:+.2f} pts ({100 * ma:.2f}% vs {100 * mb:.2f}%; noise ±{100 * band:.2f}"
            f"{e.seeds_text('+.2f', 100)})")

    absolute("baseline_final", BASELINE)
    absolute("noconv_final", NOCONV)
    acc_difference("noconv_below_baseline", NOCONV, BASELINE, -1,
                   f"{post_acc[NOCONV] - post_acc[BASELINE]:+.1f} pts")
    loss_difference("noconv_train_loss", train_loss, fidelity.POST_NOCONV_TRAIN_LOSS_EXCESS)
    loss_difference("noconv_loss_gap", loss_gap, fidelity.POST_NOCONV_LOSS_GAP_EXCESS)
    sqsum_ratio("noconv_sqsum", NOCONV, FASTER, "much faster")

    why = _needs(runs, [NOCONV, BASELINE])
    if why:
        add("noconv_relative_step", MISSING, "decays", why)
    else:
        steps, a = runs[NOCONV].series(tags.CONV_RELATIVE_STEP)
        last_phase = steps > fidelity.BOUNDARY_EPOCHS[-1]
        b_steps, b = runs[BASELINE].series(tags.CONV_RELATIVE_STEP)
        ratio = float(np.mean(a[last_phase]) / np.mean(b[b_steps > fidelity.BOUNDARY_EPOCHS[-1]]))
        add("noconv_relative_step", HOLDS if ratio < 1 / FASTER else FAILS, "decays",
            f"mean relative step after epoch {fidelity.BOUNDARY_EPOCHS[-1]}: {ratio:.3g}x the baseline's "
            f"(holds below {1 / FASTER:g}x)")

    why = _needs(runs, [BASELINE])
    if why:
        add("piecewise_fit", MISSING, "hand fit", why)
    else:
        steps, sqsum = runs[BASELINE].series(tags.CONV_SQSUM)
        target = fidelity.INITIAL_CONV_SQSUM / sqsum
        dev = np.abs(figures.piecewise_np(steps) / target - 1)
        add("piecewise_fit", HOLDS if np.median(dev) <= REPLICATES else FAILS, "hand fit",
            f"piecewise / (800 / conv_sqsum): median |ratio-1| {100 * np.median(dev):.1f}%, "
            f"max {100 * np.max(dev):.1f}% (holds while the median is at most {100 * REPLICATES:g}%)")

    acc_difference("scale_final", SCALE, BASELINE, 0, "same")
    phase1_mean("scale_phase1", SCALE, BASELINE, -1, "a lot worse")

    why = _needs(runs, [SCALE, BASELINE])
    if why:
        add("scale_relative_step", MISSING, "replicated", why)
    else:
        median, largest = _ratio_deviation(runs[SCALE].series(tags.CONV_RELATIVE_STEP),
                                           runs[BASELINE].series(tags.CONV_RELATIVE_STEP))
        add("scale_relative_step", HOLDS if median <= REPLICATES else FAILS, "replicated",
            f"relative step / baseline's: median |ratio-1| {100 * median:.1f}%, max {100 * largest:.1f}% "
            f"(holds while the median is at most {100 * REPLICATES:g}%)")

    sqsum_ratio("scale_sqsum", SCALE, FAR_LARGER, "far larger")

    why = _needs(runs, [BN098, SCALE])
    if why:
        add("bn098_training", MISSING, "no effect", why)
    else:
        va, vb = (estimate(runs[n], lambda r: train_loss(r)[0], lambda r: 0.0).value for n in (BN098, SCALE))
        e = difference(runs[BN098], runs[SCALE], lambda r: train_loss(r)[0], lambda r: train_loss(r)[1])
        band = 2 * e.noise
        add("bn098_training", HOLDS if abs(e.value) <= band else FAILS, "no effect",
            f"final train loss {e.value:+.4f} ({va:.4f} vs {vb:.4f}; noise ±{band:.4f}{e.seeds_text('+.4f')})")

    phase1_mean("bn098_phase1_fix", BN098, SCALE, +1, "better")
    phase1_mean("bn098_phase1_baseline", BN098, BASELINE, +1, "a little above")
    return out


def to_text(verdicts: List[Verdict]) -> str:
    width = max(len(v.verdict) for v in verdicts)
    return "\n".join(f"{v.verdict:<{width}}  {v.claim}: post {v.post}; "
                     f"{'' if v.verdict == MISSING else 'measured '}{v.measured}" for v in verdicts)


def _cell(text) -> str:
    """A Markdown table cell: a bar in the text (|ratio-1|) escaped, not a column."""
    return str(text).replace("|", "\\|")


def to_markdown(verdicts: List[Verdict]) -> str:
    lines = ["| the post's claim | post | measured here | verdict |", "|---|---|---|---|"]
    lines += [f"| {_cell(v.claim)} | {_cell(v.post)} | {_cell(v.measured)} | {v.verdict} |" for v in verdicts]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = ArgumentParser(
        prog="python -m analysis.claims",
        description="Measure the post's claims on a results folder holding its four runs.")
    parser.add_argument("results_dir", metavar="RESULTS_DIR",
                        help="folder with baseline/, noconv_l2/, conv_lr_scale/, conv_lr_scale_bn098/ "
                             "(each a run or seed_<k>/ runs)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    try:
        runs = load(args.results_dir)
    except events.EventsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not runs:
        print(f"error: none of the post's runs ({', '.join(figures.POST_RUNS)}) "
              f"in {args.results_dir}", file=sys.stderr)
        return 2
    verdicts = measure(runs)
    print(to_markdown(verdicts) if args.markdown else to_text(verdicts))
    return 0


if __name__ == "__main__":
    command_line.run(main)
