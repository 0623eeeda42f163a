"""Theory overlay (beyond the post): the equilibrium relative step of conv kernels.

A conv kernel w followed by batch norm is *scale-invariant*: L(c·w) = L(w) for c > 0.
Trained by SGD with L2, its norm settles where the gradient noise that inflates it
balances the weight decay that shrinks it, and there the relative update
||dw||/||w|| depends on lr, wd and momentum only (not on the gradient's size):

    ||dw|| / ||w||  ->  sqrt(2·lr·wd / (1 + m))

This module computes that level per learning-rate phase of a run, measures the
logged `conv_relative_step` late in each phase, and writes the comparison as
theory.md, theory.csv and theory_per_layer.csv. See `equilibrium_relative_step`
for the derivation and `equilibrium_time_constant` for how long reaching it takes
(longer than most of the runs' phases: the table says so per phase).

Runs without conv decay have no level to settle at: for them theory.md has a second
table (and theory_growth.csv), their conv_sqsum's gain against the momentum growth
law ||w||² += (1+m)/(1-m)·||dw||² per step (`growth_per_step`).

What each optimizer's runs are predicted from is one entry of `THEORIES` (momentum,
AdamW; Adam, with L2 in the loss, has none): adding an optimizer's theory is adding
its entry. An optimizer without one gets no level and no τ, and the table and the
figures' legends say "no theory for optimizer X".

References
    A. Kosson, B. Messmer, M. Jaggi, "Rotational Equilibrium: How Weight Decay
      Balances Learning Across Neural Networks", ICML 2024, arXiv:2305.17212
      (the expected angular update of SGDM, sqrt(2·lr·wd/(1+m)), and its
      equilibrium dynamics).
    R. Wan, Z. Zhu, X. Zhang, J. Sun, "Spherical Motion Dynamics: Learning
      Dynamics of Normalized Neural Network using SGD and Weight Decay",
      NeurIPS 2021, arXiv:2006.08419 (the same angular-update equilibrium for
      SGD with momentum, and how fast it is approached).
    T. van Laarhoven, "L2 Regularization versus Batch and Weight Normalization",
      2017, arXiv:1706.05350 (L2 with normalisation acts as an effective learning
      rate ∝ lr/||w||²).
"""

import csv
import dataclasses
import math
import os
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from analysis.figures import BASELINE, LEVEL_LABEL, label_of, note, ordered_names
from analysis.summary import mean_std
from resnet_cifar import config as config_lib
from resnet_cifar import events, fidelity, tags
from resnet_cifar.atomic import atomic_open

LATE_FRACTION = 0.2     # late phase = its last 20% of epochs (at least one)


# --- the formula ------------------------------------------------------------------------

def equilibrium_relative_step(lr: float, weight_decay: float,
                              momentum: float = fidelity.MOMENTUM) -> float:
    """Expected per-step ||dw||/||w|| of a scale-invariant weight at norm equilibrium.

    = sqrt(2·lr·wd / (1 + m)) for TF1 heavy-ball momentum with an L2 term
    wd·||w||²/2 (tf.nn.l2_loss), i.e. gradient g + wd·w:

        accum_t = m·accum_{t-1} + g_t + wd·w_t,      w_{t+1} = w_t - lr·accum_t.

    Scale invariance (conv followed by batch norm) gives two facts: the gradient
    is orthogonal to w (differentiate L(c·w) = L(w) in c at c = 1), and it scales
    inversely with the norm, ∇L(c·w) = ∇L(w)/c.

    No momentum (m = 0). dw = -lr·(g + wd·w) with g ⊥ w, so

        ||w_{t+1}||² = (1 - lr·wd)²·||w_t||² + lr²·||g_t||²:

    the gradient grows ||w||² by lr²||g||² per step, the decay shrinks it by
    (2·lr·wd - lr²wd²)·||w||² ≈ 2·lr·wd·||w||². At equilibrium (in expectation)
    lr²||g||²/||w||² = 2·lr·wd - lr²wd², and the update's squared norm is
    ||dw||² = lr²||g||² + lr²wd²||w||², so ||dw||²/||w||² = 2·lr·wd exactly.

    With momentum. Each gradient g_s enters the updates at steps s, s+1, ... as
    lr·g_s, lr·m·g_s, lr·m²·g_s, ..., in total lr/(1-m)·g_s; the decay term does
    the same with w, which moves slowly, so the weight shrinks by lr·wd/(1-m)·w per
    step. Momentum multiplies the effective rate of both by 1/(1-m).
    - Norm balance. Taking gradients of different steps as uncorrelated, the
      successive momentum steps of one gradient add coherently (the cross terms
      between them are what makes the total lr/(1-m)·g_s count, not the single
      steps), so ||w||² grows by lr²||g||²/(1-m)² per step and shrinks by
      2·lr·wd/(1-m)·||w||². Balance: lr²||g||²/||w||² = 2·lr·wd·(1-m).
    - The update of one step is dw_t = -lr·Σ_k m^k·g_{t-k} (plus the small radial
      decay part), a sum of uncorrelated vectors, so E||dw||² = lr²||g||²·Σ_k m^{2k}
      = lr²||g||²/(1-m²): only the 1/(1-m²) factor, not 1/(1-m)².
    Together: ||dw||²/||w||² = 2·lr·wd·(1-m)/(1-m²) = 2·lr·wd/(1+m), up to terms
    of relative order lr·wd/(1-m) (e.g. the decay part's own (lr·wd/(1-m))²).
    The toy simulation in tests/test_theory.py agrees to well within 1%.

    The level does not depend on ||g||: a larger gradient only raises the
    equilibrium norm (||w||⁴ = lr·||∇L(w/||w||)||²/(2·wd·(1-m))), not the
    relative step. Caveats for the measured tag: it is the *mean* of ||dw||/||w||
    over steps while this is its root mean square (equal when ||g|| fluctuates
    little); consecutive minibatch gradients of a real network are not exactly
    uncorrelated, which changes the 1/(1+m) factor somewhat; and the level holds
    only once the norm has equilibrated, see `equilibrium_time_constant`.
    """
    return math.sqrt(2.0 * lr * weight_decay / (1.0 + momentum))


def equilibrium_time_constant(lr: float, weight_decay: float,
                              momentum: float = fidelity.MOMENTUM) -> float:
    """Steps over which ||w||² relaxes towards equilibrium: τ = (1-m)/(2·lr·wd).

    With a = lr·wd/(1-m) the effective decay per step and the gradient growth
    c/||w||² (c constant, since ||g|| ∝ 1/||w||), x = ||w||² follows
    dx/dt = -2a·x + c/x (in expectation, continuous time), so x² relaxes as
    exp(-4a·t) towards its equilibrium c/(2a): far above equilibrium
    ||w||² decays as exp(-t/τ) with τ = 1/(2a), near it the deviation decays with
    τ/2. This is 1/(2·lr·wd) for plain SGD; TF1 momentum makes the effective rate
    lr/(1-m), so τ is (1-m) times that: at wd 2e-4, m 0.9 and 390 steps/epoch,
    2,500 steps (6.4 epochs) at lr 0.1, 25,000 (64 epochs) at lr 0.01 and 250,000
    (640 epochs) at lr 0.001. The relative step follows 1/||w||², so it lags by as
    much: the post's 50-epoch phases reach equilibrium at lr 0.1 only, and short
    (quick-preset) runs at no rate. Just after a rate drop the relative step falls
    by the drop factor at once (same norm, smaller steps), then climbs towards the
    new level, sqrt(drop) lower than the old, as the norm shrinks.
    """
    if lr <= 0 or weight_decay <= 0:
        return math.inf
    return (1.0 - momentum) / (2.0 * lr * weight_decay)


ADAM_BETA_1 = 0.9      # Keras' (and Kingma & Ba's) default, what --optimizer=adam/adamw use


def adamw_angular_update(lr: float, weight_decay: float, beta_1: float = ADAM_BETA_1) -> float:
    """Expected per-step rotation of a scale-invariant weight under AdamW at equilibrium:
    sqrt(2·lr·wd·(1-b1)/(1+b1)), Kosson, Messmer & Jaggi 2024 (Table 1, AdamW), for
    decoupled decay w -= lr·wd·w (Keras' convention).

    Derivation, as for momentum: Adam's direction u = m̂/sqrt(v̂) has E[u_i²] ≈
    (1-b1)/(1+b1) per element for uncorrelated gradients (m is an EMA of them:
    Σ(1-b1)²b1^2k = (1-b1)/(1+b1), in units of v), so E||u||² = C·(1-b1)/(1+b1) for C
    elements; one gradient's total contribution over the steps is g/sqrt(v) (the EMA
    weights sum to 1), whose squared norm is C. Unlike SGD the step does not scale with
    1/||w||, so ||w||² obeys d||w||²/dt = -2·lr·wd·||w||² + lr²·C: equilibrium ||w||² =
    lr·C/(2·wd), reached with time constant 1/(2·lr·wd) steps (`adamw_time_constant`).
    There the rotation per step is lr·||u||/||w|| = sqrt(lr²·C·(1-b1)/(1+b1) / (lr·C/(2·wd)))
    = sqrt(2·lr·wd·(1-b1)/(1+b1)). (Without momentum, b1 = 0, this is sqrt(2·lr·wd).) The
    simulation in tests/test_theory_optimizers.py agrees within 2%.
    """
    return math.sqrt(2.0 * lr * weight_decay * (1.0 - beta_1) / (1.0 + beta_1))


def adamw_time_constant(lr: float, weight_decay: float) -> float:
    """Steps over which ||w||² relaxes to the AdamW equilibrium: 1/(2·lr·wd) (see above)."""
    if lr <= 0 or weight_decay <= 0:
        return math.inf
    return 1.0 / (2.0 * lr * weight_decay)


# --- the theory of each optimizer ----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class OptimizerTheory:
    """What the overlay knows about one optimizer: one entry of `THEORIES`.

    level(lr, wd, m) is the expected per-step angular update of a decayed scale-invariant
    weight at equilibrium, time_constant(lr, wd, m) the steps over which its norm relaxes
    there; m is the momentum optimizer's coefficient, which the others ignore. Both None:
    the optimizer is known to have no equilibrium in lr and wd alone, `basis` says why.
    """

    basis: str                 # the table's basis column for a run it predicts ("none: why" if none)
    formula: str = ""          # the figures' legend entry for its dashed levels
    level: Optional[Callable[[float, float, float], float]] = None
    time_constant: Optional[Callable[[float, float, float], float]] = None
    replays_baseline: bool = False   # gradient-scaled runs without conv L2 get the baseline's level
    note: Optional[Callable[[float], str]] = None   # theory.md paragraph on its runs, given m


def _momentum_note(m: float) -> str:
    return (f"**Equilibrium needs time:** the weight norm relaxes with τ ≈ 1/(2·lr_eff·wd) = "
            f"(1−m)/(2·lr·wd) steps (lr_eff = lr/(1−m); 1/(2·lr·wd) for plain SGD), e.g. "
            f"{equilibrium_time_constant(0.1, fidelity.WEIGHT_DECAY, m):,.0f} steps at lr 0.1, "
            f"{equilibrium_time_constant(0.01, fidelity.WEIGHT_DECAY, m):,.0f} at lr 0.01, "
            f"wd {fidelity.WEIGHT_DECAY:g}, m {m:g}; a phase with phase/τ below ~2 has not reached "
            f"it, so its measured/predicted ratio is no test of the formula (after a rate drop "
            f"the relative step starts below the new level and climbs towards it).\n\n"
            f"Predicted: sqrt(2·lr·wd/(1+m)), m = {m:g}, for conv L2 runs; gradient-scaled runs "
            f"(no conv L2, factor replaying the baseline) get the baseline's level; runs without "
            f"conv L2 or scaling have no equilibrium (—).")


def _adamw_note(m: float) -> str:
    return (f"AdamW runs (decoupled decay): predicted sqrt(2·lr·wd·(1−β1)/(1+β1)), β1 = "
            f"{ADAM_BETA_1:g}, with τ = 1/(2·lr·wd) steps (no momentum factor; see "
            f"`adamw_angular_update`).")


def _adam_note(m: float) -> str:
    return ("Adam runs (L2 in the loss): no prediction and no τ (—). The L2 gradient wd·w enters "
            "Adam's second moment with the data gradient and is normalised with it, so the "
            "shrinking per step depends on wd·||w|| against the gradient's scale, which changes "
            "with ||w||: no equilibrium in lr and wd alone (Loshchilov & Hutter 2019 make this "
            "point for why L2 and decay differ under Adam).")


# Optimizer name (run_config.json's --optimizer) -> its theory. An optimizer without an
# entry gets no predicted level and no τ, and the outputs say "no theory for optimizer X".
THEORIES: Dict[str, OptimizerTheory] = {
    "momentum": OptimizerTheory(
        basis="conv L2 equilibrium", formula=LEVEL_LABEL,
        level=equilibrium_relative_step, time_constant=equilibrium_time_constant,
        replays_baseline=True, note=_momentum_note),
    "adamw": OptimizerTheory(   # β1 fixed at Keras' default; m is SGD's and does not enter
        basis="AdamW decoupled-decay equilibrium",
        formula="AdamW equilibrium sqrt(2·lr·wd·(1−β1)/(1+β1))",
        level=lambda lr, wd, m: adamw_angular_update(lr, wd),
        time_constant=lambda lr, wd, m: adamw_time_constant(lr, wd),
        note=_adamw_note),
    "adam": OptimizerTheory(
        basis="none: Adam with L2 in the loss, no simple equilibrium", note=_adam_note),
}


def optimizer_of(config: Mapping) -> str:
    """The run's --optimizer; runs from before that flag trained with momentum."""
    return config.get("optimizer") or "momentum"


def no_theory(optimizer: str) -> str:
    return f"no theory for optimizer {optimizer!r}"


def equilibrium_angular_update(optimizer: str, lr: float, weight_decay: float,
                               momentum: float = fidelity.MOMENTUM) -> Optional[float]:
    """Expected per-step rotation (radians) of a scale-invariant weight at equilibrium, by
    the optimizer's entry in `THEORIES`; None where it has none (Adam with L2 in the loss,
    an optimizer without an entry), or without decay or rate.

    For momentum this is the relative step `equilibrium_relative_step` (at equilibrium
    the update is almost all tangential, its radial part lr·wd/(1-m) is second order);
    for AdamW `adamw_angular_update`.
    """
    theory = THEORIES.get(optimizer)
    if theory is None or theory.level is None or weight_decay <= 0 or lr <= 0:
        return None
    return theory.level(lr, weight_decay, momentum)


def time_constant(optimizer: str, lr: float, weight_decay: float,
                  momentum: float = fidelity.MOMENTUM) -> float:
    """Steps over which the weight norm relaxes to the optimizer's equilibrium; NaN when
    `THEORIES` gives it none."""
    theory = THEORIES.get(optimizer)
    if theory is None or theory.time_constant is None:
        return math.nan
    return theory.time_constant(lr, weight_decay, momentum)


# --- phases and predictions of a run config ---------------------------------------------

class Phase(NamedTuple):
    start: float    # epochs, fractional as the schedule's boundaries
    end: float
    lr: float


class Level(NamedTuple):
    start: float
    end: float
    lr: float
    predicted: Optional[float]   # None: no equilibrium to predict


def base_learning_rate(config: Mapping) -> float:
    """The run's base rate (at the first phase) by training's own formula, from its flags;
    keys missing from `config` take the training defaults."""
    return config_lib.base_learning_rate(optimizer_of(config),
                                         config.get("learning_rate"),
                                         int(config.get("batch_size") or fidelity.BATCH_SIZE))


def steps_per_epoch(config: Mapping, run_dir: Optional[str] = None) -> Optional[int]:
    """The run's steps per epoch, or None when nothing recorded says (a run written by
    older code): then the theory table leaves phase / τ out rather than guess.

    In order: the steps per epoch run_config.json records the run ran (right for any
    data); its --steps_per_epoch; the training-set size run_config.json records over
    the batch size, as training computes it. No size is assumed: 50,000 images is
    CIFAR-10's, not every run's.
    """
    ran = events.steps_per_epoch(run_dir) if run_dir else None
    if ran:
        return ran
    if config.get("steps_per_epoch"):
        return int(config["steps_per_epoch"])
    images = events.num_train_images(run_dir) if run_dir else None
    if images:
        return images // int(config.get("batch_size") or fidelity.BATCH_SIZE)
    return None


def phases(config: Mapping) -> List[Phase]:
    """(start_epoch, end_epoch, lr) per learning-rate phase of the run's schedule.

    Keys missing from `config` take the training defaults (the post's schedule);
    phases are cut at train_epochs and those starting after it are left out.
    """
    boundaries = [float(b) for b in config.get("boundary_epochs", fidelity.BOUNDARY_EPOCHS)]
    rates = [float(r) for r in config.get("decay_rates", fidelity.DECAY_RATES)]
    if len(rates) != len(boundaries) + 1:
        raise ValueError(f"decay_rates {rates} needs one value more than boundary_epochs {boundaries}")
    total = float(config.get("train_epochs", fidelity.TRAIN_EPOCHS))
    base = base_learning_rate(config)
    edges = [0.0] + boundaries + [math.inf]
    out = []
    for start, end, rate in zip(edges, edges[1:], rates):
        if start >= total:
            break
        out.append(Phase(start, min(end, total), base * rate))
    return out


def prediction_basis(config: Mapping) -> str:
    """Why a run gets the prediction it gets (a table column); "none: <why>" for none.

    - an optimizer without an entry in `THEORIES`: none, "no theory for optimizer X";
      one whose entry has no level (Adam with L2 in the loss): none, its entry says why.
    - weight_decay 0: none, nothing balances the gradient's growth of the norm.
    - conv L2 (decay), no gradient scaling (Baseline): the optimizer's equilibrium at
      the run's lr, wd.
    - no conv L2, no scaling (NoConvL2): none. Nothing shrinks the kernels, ||w||²
      grows without bound (∝ sqrt(steps) at a fixed rate) and the relative step
      keeps falling.
    - no conv L2 with gradient scaling (ConvLRScale, its BN 0.98 and per-layer
      variants), for an optimizer whose entry `replays_baseline` (momentum): their
      factor replays the baseline's conv_sqsum trajectory (or the post's fit of it),
      i.e. the baseline's effective rate, so they are predicted at the baseline's
      level, with wd = the run's --weight_decay (the baseline's in every run of the
      post). Not for AdamW, whose normalised step undoes a gradient factor.
    - conv L2 *and* gradient scaling (no run of the post): the factor multiplies
      the L2 part of the gradient too, so the effective rate is lr·factor, which
      changes along training: not predicted.
    """
    optimizer = optimizer_of(config)
    theory = THEORIES.get(optimizer)
    if theory is None:
        return f"none: {no_theory(optimizer)}"
    if theory.level is None:
        return theory.basis
    conv_l2 = bool(config.get("conv_l2", True))
    scaled = bool(config.get("conv_grad_scale", False))
    if float(config.get("weight_decay", fidelity.WEIGHT_DECAY)) <= 0:
        return "none: weight_decay 0, no equilibrium"
    if conv_l2 and not scaled:
        return theory.basis
    if scaled and not conv_l2:
        if theory.replays_baseline:
            return "gradient scaling: the baseline's level"
        return f"none: gradient scaling under {optimizer}, not predicted"
    if not conv_l2:
        return "none: no conv L2, the norm grows without bound"
    return "none: conv L2 with gradient scaling"


def predicts(config: Mapping) -> bool:
    return not prediction_basis(config).startswith("none")


def predicted_levels(config: Mapping, momentum: float = fidelity.MOMENTUM) -> List[Level]:
    """Per phase the predicted conv relative step, or None (see `prediction_basis`)."""
    wd = float(config.get("weight_decay", fidelity.WEIGHT_DECAY))
    optimizer = optimizer_of(config)
    predict = predicts(config)
    return [Level(p.start, p.end, p.lr,
                  equilibrium_angular_update(optimizer, p.lr, wd, momentum) if predict else None)
            for p in phases(config)]


def level_segments(config: Mapping, momentum: float = fidelity.MOMENTUM
                   ) -> List[Tuple[float, float, float]]:
    """(start_epoch, end_epoch, level) of the phases that have a prediction, for figures."""
    return [(lv.start, lv.end, lv.predicted) for lv in predicted_levels(config, momentum)
            if lv.predicted is not None]


def level_label(config: Mapping) -> str:
    """The legend entry of the run's dashed levels: its optimizer's formula; for a run
    that gets none, why not ("no predicted level: no theory for optimizer 'sgd'"), which
    the figures show in the legend in place of levels."""
    if not predicts(config):
        return "no predicted level: " + prediction_basis(config).split(": ", 1)[-1]
    return THEORIES[optimizer_of(config)].formula


def baseline_level_label(loaded: Mapping[str, Sequence[events.Run]]) -> str:
    """`level_label` of the baseline run whose levels the figures draw."""
    seeds = loaded.get(BASELINE) or []
    if not seeds:
        return f"no predicted level: no {label_of(BASELINE)} run"
    return level_label(seeds[0].config)


def baseline_segments(loaded: Mapping[str, Sequence[events.Run]],
                      momentum: float = fidelity.MOMENTUM) -> List[Tuple[float, float, float]]:
    """The figures' level lines: from the baseline run's config; none without a baseline."""
    seeds = loaded.get(BASELINE) or []
    if not seeds:
        note(f"theory: no {label_of(BASELINE)} ({BASELINE}) run, relative-step figures "
             f"drawn without equilibrium levels")
        return []
    if not predicts(seeds[0].config):
        note(f"theory: {level_label(seeds[0].config)} for the {label_of(BASELINE)} run, "
             f"relative-step figures drawn without equilibrium levels")
    return level_segments(seeds[0].config, momentum)


# --- measurement ----------------------------------------------------------------------

def phase_epochs(phase: Phase) -> Tuple[int, int]:
    """(first, last) logged epoch numbers of a phase.

    The value logged at step e is the mean over training epoch e, the fractional
    interval [e-1, e); a phase [start, end) holds the epochs entirely inside it.
    If none is (a phase shorter than an epoch), the epochs overlapping it.
    """
    first, last = math.ceil(phase.start) + 1, math.floor(phase.end)
    if last < first:
        first, last = math.floor(phase.start) + 1, math.ceil(phase.end)
    return first, last


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


def _sci(x: Optional[float]) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{x:.3e}"


def _fmt_measured(values: Sequence[float]) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "n/a"
    return _sci(mean) if math.isnan(std) else f"{_sci(mean)} ± {std:.1e}"


def _fmt_range(values: Sequence[float]) -> str:
    finite = [v for v in values if np.isfinite(v)]
    return f"{_sci(min(finite))}–{_sci(max(finite))}" if finite else "n/a"


def _fmt_epochs(a: float, b: float) -> str:
    return f"{a:g}" if a == b else f"{a:g}–{b:g}"


def _seeds_label(label: str, measured: Sequence[float]) -> str:
    """A table's run cell: its label, and how many seeds measured it when more than one."""
    seeds = sum(np.isfinite(m) for m in measured)
    return label + (f" ({seeds} seeds)" if seeds > 1 else "")


def to_markdown(rows: Sequence[Row], fraction: float = LATE_FRACTION) -> str:
    lines = [
        "# Conv relative step vs its predicted equilibrium",
        "",
        "| run | phase (epochs) | lr | predicted | measured, late phase | layers min–max "
        "| measured / predicted | window (epochs) | phase / τ |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        label = _seeds_label(r.label, r.measured)
        ratio = "—" if math.isnan(r.ratio) else f"{r.ratio:.2f}"
        over_tau = "—" if math.isnan(r.phase_over_tau) else f"{r.phase_over_tau:.2f}"
        lines.append(f"| {label} | {_fmt_epochs(r.start, r.end)} | {r.lr:g} | {_sci(r.predicted)} | "
                     f"{_fmt_measured(r.measured)} | {_fmt_range(r.layer_values)} | {ratio} | "
                     f"{_fmt_epochs(r.first_epoch, r.last_epoch)} | {over_tau} |")
    m = rows[0].momentum if rows else fidelity.MOMENTUM
    for optimizer in dict.fromkeys(r.optimizer for r in rows):   # each optimizer's note, once
        theory = THEORIES.get(optimizer)
        if theory is None:
            names = ", ".join(dict.fromkeys(r.label for r in rows if r.optimizer == optimizer))
            lines += ["", f"**No theory for optimizer {optimizer!r}** ({names}): no predicted "
                          f"level and no τ (—); `THEORIES` in analysis/theory.py has no entry "
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


def _num(x: Optional[float]) -> str:
    return "" if x is None or not np.isfinite(x) else repr(float(x))


def write_csv(rows: Sequence[Row], path: str) -> None:
    with atomic_open(path) as f:
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        for r in rows:
            finite = [v for v in r.layer_values if np.isfinite(v)]
            mean, std = mean_std(r.measured)
            writer.writerow([r.name, r.label, r.optimizer, r.phase, _num(r.start), _num(r.end), _num(r.lr),
                             _num(r.weight_decay), _num(r.momentum), r.basis, _num(r.predicted),
                             len(r.measured), _num(mean), _num(std),
                             _num(min(finite) if finite else None),
                             _num(max(finite) if finite else None), _num(r.ratio),
                             r.first_epoch, r.last_epoch, r.steps_per_epoch or "",
                             _num(r.tau_steps), _num(r.phase_steps),
                             _num(r.phase_over_tau)])


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
                        writer.writerow([name, seed, m.phase, _num(m.start), _num(m.end),
                                         _num(m.lr), layer, _num(value), _num(level.predicted)])


# --- free growth: runs without conv decay -------------------------------------------------

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
        label = _seeds_label(r.label, r.measured)
        ratio = mean_std(r.ratios)
        ratio_text = "n/a" if math.isnan(ratio[0]) else (
            f"{ratio[0]:.3f}" if math.isnan(ratio[1]) else f"{ratio[0]:.3f} ± {ratio[1]:.3f}")
        lines.append(f"| {label} | {_fmt_epochs(r.start, r.end)} | {r.lr:g} | "
                     f"{_fmt_epochs(r.first_epoch, r.last_epoch)} | {_sci(mean_std(r.before)[0])} | "
                     f"{_sci(mean_std(r.measured)[0])} | {_sci(mean_std(r.predicted)[0])} | {ratio_text} |")
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
                writer.writerow([r.name, r.label, k, r.phase, _num(r.start), _num(r.end), _num(r.lr),
                                 r.first_epoch, r.last_epoch, _num(before), _num(measured),
                                 _num(predicted), _num(ratio)])


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
    names = ("theory.md", "theory.csv", "theory_per_layer.csv", "theory_growth.csv")
    paths = [os.path.join(out_dir, n) for n in names]
    with atomic_open(paths[0]) as f:
        f.write(to_markdown(rows, fraction) + ("\n" + growth_markdown(growth, momentum) if growth else ""))
    write_csv(rows, paths[1])
    write_per_layer_csv(loaded, paths[2], fraction, momentum)
    write_growth_csv(growth, paths[3])    # header only when no run grows freely
    return paths
