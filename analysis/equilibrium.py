"""The equilibrium of conv kernels under weight decay (beyond the post): the formulas,
and each optimizer's theory.

A conv kernel w followed by batch norm is *scale-invariant*: L(c·w) = L(w) for c > 0.
Trained by SGD with L2, its norm settles where the gradient noise that inflates it
balances the weight decay that shrinks it, and there the relative update
||dw||/||w|| depends on lr, wd and momentum only (not on the gradient's size):

    ||dw|| / ||w||  ->  sqrt(2·lr·wd / (1 + m))

See `equilibrium_relative_step` for the derivation and `equilibrium_time_constant`
for how long reaching it takes (longer than most of the runs' phases: the theory
table says so per phase). analysis/predictions.py applies these per learning-rate
phase of a run, analysis/theory.py compares them with the logged relative step.

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

import dataclasses
import math
from typing import Callable, Dict, Mapping, Optional

from analysis.figures import LEVEL_LABEL
from resnet_cifar import fidelity


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
