"""The original optimizer: TF1 momentum and a piecewise-constant rate by epoch."""

import math

import keras
from keras import ops

from resnet_cifar import fidelity


class TF1Momentum(keras.optimizers.Optimizer):
    """`tf.compat.v1.train.MomentumOptimizer` semantics in Keras 3.

        accum = momentum * accum + grad
        var  -= lr * accum

    Keras' SGD folds the rate into its velocity (v = m*v - lr*g), so after a
    learning-rate drop it keeps moving with the old rate's momentum for a while;
    TF1 multiplies the whole accumulator by the current rate, so a drop takes
    effect at once. The post's runs used TF1's rule, so this does too.
    """

    def __init__(self, learning_rate, momentum=fidelity.MOMENTUM, name="tf1_momentum", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum = float(momentum)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.accumulators = self.add_optimizer_variables(variables, "accumulator")

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        accum = self.accumulators[self._get_variable_index(variable)]
        self.assign(accum, ops.add(ops.multiply(accum, ops.cast(self.momentum, variable.dtype)), gradient))
        self.assign_sub(variable, ops.multiply(accum, lr))

    def get_config(self):
        config = super().get_config()
        config.update({"momentum": self.momentum})
        return config


def piecewise_by_epoch(base_rate, boundary_epochs, decay_rates, steps_per_epoch):
    """base_rate * decay_rates[i], where i counts the boundaries at or below the epoch.

    The epoch is fractional, step / steps_per_epoch, so the rate drops exactly at the
    first step of epoch `boundary` (0-based step ceil(boundary * steps_per_epoch)). The
    original (`learning_rate_with_decay`) did the same with `tf.train.piecewise_constant`
    on the global step. Keras' PiecewiseConstantDecay keeps values[i] while
    step <= boundaries[i], hence the - 1.
    """
    boundaries = [math.ceil(float(b) * steps_per_epoch) - 1 for b in boundary_epochs]
    return keras.optimizers.schedules.PiecewiseConstantDecay(
        boundaries, [float(base_rate) * float(r) for r in decay_rates])


def make_optimizer(name, learning_rate, weight_decay=0.0, no_decay=()):
    """The optimizer of `--optimizer`, on the learning rate (or schedule) given.

    - momentum: `TF1Momentum` (the post); L2 is in the loss.
    - adam: `keras.optimizers.Adam` (beta_1 0.9, beta_2 0.999, epsilon 1e-7 outside
      the bias correction: w -= lr·sqrt(1-b2^t)/(1-b1^t) · m/(sqrt(v)+eps)); the L2
      term stays in the loss as in the post, so Adam normalizes it with the rest
      of the gradient.
    - adamw: `keras.optimizers.AdamW`, decoupled decay (Loshchilov & Hutter, ICLR
      2019, arXiv:1711.05101) applied before the Adam step: w -= lr·weight_decay·w.
      Keras multiplies by the *scheduled* rate lr = alpha·eta_t, so in their
      notation (w -= eta_t·(alpha·adam + lambda·w)) lambda = alpha·weight_decay:
      the decay follows the schedule, as their eta_t does. Variables in `no_decay`
      (those out of the L2 set, e.g. conv kernels under --noconv_l2) are not decayed.
    """
    if name == "momentum":
        return TF1Momentum(learning_rate, momentum=fidelity.MOMENTUM)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate)
    if name == "adamw":
        optimizer = keras.optimizers.AdamW(learning_rate, weight_decay=float(weight_decay))
        optimizer.exclude_from_weight_decay(var_list=list(no_decay))
        return optimizer
    raise ValueError(f"unknown optimizer {name!r}")
