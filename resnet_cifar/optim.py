"""How the weights move: the post's optimizer, its learning-rate schedule, and the
conv-gradient factor of the ConvLRScale runs.

- `TF1Momentum`: `tf.compat.v1.train.MomentumOptimizer` in Keras 3 (the post), and the
  other choices of `--optimizer` (`BUILD`; their default rates and whether they decay
  the weights themselves are listed with the setting, `config.OPTIMIZERS`);
- `piecewise_by_epoch`: the post's 0.1 / 0.01 / 0.001 schedule by fractional epoch;
- the conv LR factor (`ConvLRFactor`, below).

The conv LR factor of the "ConvLRScale" runs.

With batch norm after a conv, the conv's effective learning rate is lr / ||w||^2.
Taking the conv kernels out of L2 lets ||w|| grow; multiplying their gradients by
a factor proportional to ||w||^2 undoes that growth, and a second factor
reproduces the baseline's own ||w||^2 trajectory. Three ways to get it:

- `piecewise` (the post): piecewise(epoch) * conv_sqsum / 800, the post's hand fit
  of 800 / baseline conv_sqsum(epoch), valid for the 150-epoch schedule.
- `replay`: conv_sqsum / baseline_conv_sqsum(epoch), the baseline run's own logged
  trajectory, linearly interpolated in epoch; works for any schedule.
- `per_layer`: each layer's ||w_l||^2 / baseline ||w_l||^2(epoch); each conv
  followed by BN is scale-invariant on its own.
- `per_channel`: each output channel c of each layer gets ||w_c||^2 / baseline
  ||w_c||^2(epoch): a conv output channel followed by BN is scale-invariant on its
  own (Hoffer, Banner, Golan, Soudry, "Norm matters: efficient and accurate
  normalization schemes in deep networks", NeurIPS 2018, arXiv:1803.01814, mimic
  weight decay by a per-channel learning-rate correction ∝ ||w_c||^2). The
  baseline's per-channel trajectory comes from its `conv_channel_sqsum.npz`.

Every factor is computed inside the train step from the current weights and the
fractional epoch (step / steps_per_epoch). `for_layers` makes one for a model's layers;
`ConvLRFactor.multipliers` gives, for
every mode, one multiplier per conv kernel (a scalar, or a (cout,) vector that
broadcasts over the kernel's last axis), so the step multiplies conv gradient l by
multipliers[l] whatever the mode; a new mode touches this file only.
"""

import math

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from resnet_cifar import config as config_lib
from resnet_cifar import fidelity, tags


# ----------------------------------------------------------------------------- optimizers

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


def _tf1_momentum(learning_rate, weight_decay, no_decay):
    """`TF1Momentum` (the post); L2 is in the loss."""
    return TF1Momentum(learning_rate, momentum=fidelity.MOMENTUM)


def _adam(learning_rate, weight_decay, no_decay):
    """`keras.optimizers.Adam` (beta_1 0.9, beta_2 0.999, epsilon 1e-7 outside the bias
    correction: w -= lr·sqrt(1-b2^t)/(1-b1^t) · m/(sqrt(v)+eps)); the L2 term stays in
    the loss as in the post, so Adam normalizes it with the rest of the gradient."""
    return keras.optimizers.Adam(learning_rate)


def _adamw(learning_rate, weight_decay, no_decay):
    """`keras.optimizers.AdamW`, decoupled decay (Loshchilov & Hutter, ICLR 2019,
    arXiv:1711.05101) applied before the Adam step: w -= lr·weight_decay·w.

    Keras multiplies by the *scheduled* rate lr = alpha·eta_t, so in their notation
    (w -= eta_t·(alpha·adam + lambda·w)) lambda = alpha·weight_decay: the decay follows
    the schedule, as their eta_t does. Variables in `no_decay` are not decayed.
    """
    optimizer = keras.optimizers.AdamW(learning_rate, weight_decay=float(weight_decay))
    optimizer.exclude_from_weight_decay(var_list=list(no_decay))
    return optimizer


# --optimizer NAME -> build(learning_rate, weight_decay, no_decay): the Keras optimizer on the rate
# (or schedule) given; weight_decay and no_decay (variables out of the L2 set, e.g. conv kernels
# under --noconv_l2) matter only to one that decays the weights itself (config.OPTIMIZERS).
BUILD = {"momentum": _tf1_momentum, "adam": _adam, "adamw": _adamw}


def make_optimizer(name, learning_rate, weight_decay=0.0, no_decay=()):
    """The optimizer `name` of `BUILD`, on the learning rate (or schedule) given."""
    if name not in BUILD:
        raise ValueError(f"unknown optimizer {name!r}: choose one of {', '.join(BUILD)}")
    return BUILD[name](learning_rate, weight_decay, no_decay)


def for_training(name, base_rate, boundary_epochs, decay_rates, steps_per_epoch, weight_decay, variables,
                 no_decay=()):
    """The optimizer `name` on the post's piecewise schedule, its slots built for `variables`."""
    schedule = piecewise_by_epoch(base_rate, boundary_epochs, decay_rates, steps_per_epoch)
    optimizer = make_optimizer(name, schedule, weight_decay=weight_decay, no_decay=no_decay)
    optimizer.build(variables)
    return optimizer


def piecewise_by_epoch(base_rate, boundary_epochs, decay_rates, steps_per_epoch):
    """base_rate * decay_rates[i], where i counts the boundaries at or below the epoch.

    The epoch is fractional, step / steps_per_epoch, so the rate drops exactly at the
    first step of epoch `boundary` (0-based step ceil(boundary * steps_per_epoch)). The
    original (`learning_rate_with_decay`) did the same with `tf.train.piecewise_constant`
    on the global step. Keras' PiecewiseConstantDecay keeps values[i] while
    step <= boundaries[i], hence the - 1.
    """
    if not boundary_epochs:          # --boundary_epochs= : one constant rate
        return float(base_rate) * float(decay_rates[0])
    boundaries = [math.ceil(float(b) * steps_per_epoch) - 1 for b in boundary_epochs]
    return keras.optimizers.schedules.PiecewiseConstantDecay(
        boundaries, [float(base_rate) * float(r) for r in decay_rates])


# ----------------------------------------------------------------------------- the conv LR factor

def piecewise(epoch):
    """The post's `tf.where` chain (fidelity.piecewise) in float32."""
    return fidelity.piecewise(tf.convert_to_tensor(epoch, tf.float32), tf.where)


def interpolate(epoch, epochs, values):
    """Linear interpolation of `values` (n,) or (n, L) at `epoch`, clamped at both ends."""
    epochs = tf.constant(np.asarray(epochs, np.float32))
    values = tf.constant(np.asarray(values, np.float32))
    n = int(epochs.shape[0])
    if n == 1:
        return values[0]
    epoch = tf.clip_by_value(tf.cast(epoch, tf.float32), epochs[0], epochs[-1])
    i = tf.clip_by_value(tf.searchsorted(epochs, epoch[None], side="right")[0] - 1, 0, n - 2)
    t = (epoch - epochs[i]) / (epochs[i + 1] - epochs[i])
    return values[i] + t * (values[i + 1] - values[i])


def for_layers(mode, baseline, names, channels, initial_conv_sqsum):
    """The `ConvLRFactor` of `mode` (None: no scaling) for a model's conv layers (`names`, their
    output `channels`, in layer order): the baseline's per-layer or per-channel trajectory put
    in that order (a one-line ConfigError if it does not fit), and the piecewise normalizer of
    the model's depth (its expected initial conv sum of squares)."""
    if mode == "per_channel":
        try:
            baseline = baseline.aligned_channels(names, channels)
        except (AttributeError, TypeError, KeyError, ValueError):
            raise config_lib.ConfigError(
                "--conv_lr_factor=per_channel: the baseline run's "
                f"{tags.CHANNEL_SQSUM_FILE} does not match this model's {len(names)} conv layers "
                "(same --resnet_size?)") from None
    if mode == "per_layer":
        try:
            baseline = baseline.aligned(names)
        except (AttributeError, TypeError, ValueError):
            raise config_lib.ConfigError(
                "--conv_lr_factor=per_layer: the baseline run lacks per-layer "
                f"{tags.per_layer(tags.CONV_SQSUM, '<layer>')} curves for the {len(names)} conv layers") from None
    return ConvLRFactor(mode, baseline, initial_conv_sqsum)


def channel_sum_of_squares(kernel):
    """sum(w^2) per output channel of a conv kernel [kh, kw, cin, cout], float32: (cout,)."""
    return tf.reduce_sum(tf.square(tf.cast(kernel, tf.float32)), axis=[0, 1, 2])


class ConvLRFactor:
    """The factor on conv gradients at a fractional epoch, from the current weights."""

    def __init__(self, mode, baseline=None, initial_conv_sqsum=fidelity.INITIAL_CONV_SQSUM):
        """mode: None (no scaling), 'piecewise', 'replay', 'per_layer' or 'per_channel'.

        baseline: for replay / per_layer / per_channel, a `BaselineTrajectory`.
        initial_conv_sqsum: the piecewise factor's normalizer, the model's expected
        initial conv sum of squares (`models.expected_initial_conv_sqsum`; 800 for ResNet-20).
        """
        if mode in config_lib.REPLAY_FACTORS and baseline is None:
            raise ValueError(f"conv_lr_factor={mode} needs a baseline trajectory")
        self.mode = mode
        self.baseline = baseline
        self.initial_conv_sqsum = float(initial_conv_sqsum)

    def channel_factors(self, epoch, channel_sqsums):
        """per_channel mode: per layer, ||w_c||^2 / baseline ||w_c||^2(epoch), shape (cout,).

        channel_sqsums: one (cout,) tensor per conv layer, in the baseline's layer order.
        """
        base = self.baseline.per_channel
        return [sq / interpolate(epoch, self.baseline.channel_epochs, b)
                for sq, b in zip(channel_sqsums, base)]

    def multipliers(self, epoch, layer_sqsum, kernels):
        """(one multiplier per conv kernel, the per-layer factor (L,) to log), or None without scaling.

        layer_sqsum: (L,) sums of squares of `kernels`, the conv kernels in layer order.
        """
        if self.mode is None:
            return None
        if self.mode == "per_channel":
            factors = self.channel_factors(epoch, [channel_sum_of_squares(k) for k in kernels])
            return factors, tf.stack([tf.reduce_mean(f) for f in factors])
        if self.mode == "per_layer":
            factor = layer_sqsum / interpolate(epoch, self.baseline.epochs, self.baseline.per_layer)
            return tf.unstack(factor), factor
        total = tf.reduce_sum(layer_sqsum)     # one factor for all layers
        if self.mode == "piecewise":
            total = piecewise(epoch) * total / self.initial_conv_sqsum
        elif self.mode == "replay":
            total = total / interpolate(epoch, self.baseline.epochs, self.baseline.total)
        else:
            raise ValueError(f"unknown conv_lr_factor mode {self.mode!r}")
        return [total] * len(kernels), total * tf.ones_like(layer_sqsum)


class BaselineTrajectory:
    """A baseline run's logged conv sums of squares by epoch (total and per layer).

    per_layer: (epochs, layers) with columns named by `layer_names`.
    """

    def __init__(self, epochs, total, per_layer=None, layer_names=None,
                 channel_epochs=None, per_channel=None):
        self.epochs = np.asarray(epochs, np.float64)
        self.total = np.asarray(total, np.float64)
        self.per_layer = None if per_layer is None else np.asarray(per_layer, np.float64)
        self.layer_names = list(layer_names or [])
        # per_channel: {layer name: (epochs, cout) array} at `channel_epochs`, or None;
        # after `aligned_channels`, a list in the model's layer order.
        self.channel_epochs = None if channel_epochs is None else np.asarray(channel_epochs, np.float64)
        self.per_channel = per_channel

    def aligned_channels(self, names, channels):
        """The per-channel trajectory as a list in the order of `names`.

        channels: the model's output channels per layer. KeyError if a layer is
        missing, ValueError if its channel count differs (another architecture).
        """
        arrays = []
        for name, cout in zip(names, channels):
            a = np.asarray(self.per_channel[name], np.float64)
            if a.ndim != 2 or a.shape[1] != cout:
                raise ValueError(f"layer {name}: baseline has {a.shape[-1]} channels, model {cout}")
            arrays.append(a)
        return BaselineTrajectory(self.epochs, self.total, self.per_layer, self.layer_names,
                                  self.channel_epochs, arrays)

    def aligned(self, names):
        """The same trajectory with per-layer columns in the order of `names` (KeyError if one is missing)."""
        index = [self.layer_names.index(n) for n in names]
        return BaselineTrajectory(self.epochs, self.total, self.per_layer[:, index], names)
