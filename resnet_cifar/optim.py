"""The optimizers of `--optimizer`, by name, and the piecewise-constant rate by epoch.

`OPTIMIZERS` is the one list of optimizers: `TrainConfig` accepts its names and takes
their default rates from it, the `--optimizer` and `--learning_rate` help is generated
from it, and the trainer asks it whether weight decay leaves the loss. A new optimizer
is one entry here.

Keras is imported inside the functions: `config` imports this module, and a run's flags
and data are checked before TensorFlow starts (tests/test_train_cli.py checks that the
entry point imports neither).
"""

import dataclasses
import math
from typing import Callable

from resnet_cifar import fidelity


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """One choice of `--optimizer`.

    build(learning_rate, weight_decay, no_decay) returns the Keras optimizer on the
    rate (or schedule) given; weight_decay and no_decay (variables out of the L2 set,
    e.g. conv kernels under --noconv_l2) matter only to one that decays the weights.
    default_learning_rate: the base rate at batch 128, scaled by batch/128 like the
    post's 0.1. decoupled_decay: the optimizer applies weight decay itself, so the
    trainer leaves the L2 term out of the loss; otherwise weight_decay is the loss's L2
    coefficient, as in the post. description: one line for --help.
    """
    build: Callable
    default_learning_rate: float
    decoupled_decay: bool
    description: str


def _tf1_momentum(learning_rate, weight_decay, no_decay):
    """`TF1Momentum` (the post); L2 is in the loss."""
    from resnet_cifar.tf1_momentum import TF1Momentum

    return TF1Momentum(learning_rate, momentum=fidelity.MOMENTUM)


def _adam(learning_rate, weight_decay, no_decay):
    """`keras.optimizers.Adam` (beta_1 0.9, beta_2 0.999, epsilon 1e-7 outside the bias
    correction: w -= lr·sqrt(1-b2^t)/(1-b1^t) · m/(sqrt(v)+eps)); the L2 term stays in
    the loss as in the post, so Adam normalizes it with the rest of the gradient."""
    import keras

    return keras.optimizers.Adam(learning_rate)


def _adamw(learning_rate, weight_decay, no_decay):
    """`keras.optimizers.AdamW`, decoupled decay (Loshchilov & Hutter, ICLR 2019,
    arXiv:1711.05101) applied before the Adam step: w -= lr·weight_decay·w.

    Keras multiplies by the *scheduled* rate lr = alpha·eta_t, so in their notation
    (w -= eta_t·(alpha·adam + lambda·w)) lambda = alpha·weight_decay: the decay follows
    the schedule, as their eta_t does. Variables in `no_decay` are not decayed.
    """
    import keras

    optimizer = keras.optimizers.AdamW(learning_rate, weight_decay=float(weight_decay))
    optimizer.exclude_from_weight_decay(var_list=list(no_decay))
    return optimizer


# Default rates: momentum the post's; adam / adamw Kingma & Ba's and Keras' default 1e-3.
OPTIMIZERS = {
    "momentum": OptimizerSpec(_tf1_momentum, fidelity.BASE_LEARNING_RATE, decoupled_decay=False,
                              description="TF1 momentum 0.9 (the post)"),
    "adam": OptimizerSpec(_adam, 1e-3, decoupled_decay=False,
                          description="Adam with the L2 term in the loss"),
    "adamw": OptimizerSpec(_adamw, 1e-3, decoupled_decay=True,
                           description="Adam with decoupled weight decay w -= lr*weight_decay*w "
                                       "(no L2 in the loss)"),
}


def make_optimizer(name, learning_rate, weight_decay=0.0, no_decay=()):
    """The optimizer `name` of `OPTIMIZERS`, on the learning rate (or schedule) given."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name].build(learning_rate, weight_decay, no_decay)


def piecewise_by_epoch(base_rate, boundary_epochs, decay_rates, steps_per_epoch):
    """base_rate * decay_rates[i], where i counts the boundaries at or below the epoch.

    The epoch is fractional, step / steps_per_epoch, so the rate drops exactly at the
    first step of epoch `boundary` (0-based step ceil(boundary * steps_per_epoch)). The
    original (`learning_rate_with_decay`) did the same with `tf.train.piecewise_constant`
    on the global step. Keras' PiecewiseConstantDecay keeps values[i] while
    step <= boundaries[i], hence the - 1.
    """
    import keras

    if not boundary_epochs:          # --boundary_epochs= : one constant rate
        return float(base_rate) * float(decay_rates[0])
    boundaries = [math.ceil(float(b) * steps_per_epoch) - 1 for b in boundary_epochs]
    return keras.optimizers.schedules.PiecewiseConstantDecay(
        boundaries, [float(base_rate) * float(r) for r in decay_rates])
