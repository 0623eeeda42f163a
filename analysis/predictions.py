"""The phases of a run's learning-rate schedule and the conv relative step predicted in
each: the levels the theory table compares with (analysis/theory.py) and the
relative-step figures draw as dashed segments.

Each phase's level is its optimizer's equilibrium (`equilibrium.THEORIES`) at the
phase's rate and the run's weight decay, or none, for a reason `prediction_basis`
gives (no decay, no theory for the optimizer, ...).
"""

import math
from typing import List, Mapping, NamedTuple, Optional, Sequence, Tuple

from analysis.equilibrium import THEORIES, equilibrium_angular_update, no_theory, optimizer_of
from analysis.figures import BASELINE, label_of, note
from resnet_cifar import config as config_lib
from resnet_cifar import events, fidelity


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
