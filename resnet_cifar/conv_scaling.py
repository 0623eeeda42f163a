"""The conv-gradient factor of the "ConvLRScale" runs.

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
fractional epoch (step / steps_per_epoch). `for_model` makes one for a model;
`ConvLRFactor.multipliers` gives, for
every mode, one multiplier per conv kernel (a scalar, or a (cout,) vector that
broadcasts over the kernel's last axis), so the step multiplies conv gradient l by
multipliers[l] whatever the mode; a new mode touches this file only.
"""

import os

import numpy as np
import tensorflow as tf

from resnet_cifar import config as config_lib
from resnet_cifar import events, fidelity, models, runs, tags


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


def for_model(mode, baseline, model):
    """The `ConvLRFactor` of `mode` (None: no scaling) for `model`: the baseline's per-layer
    or per-channel trajectory put in the model's layer order (a one-line ConfigError if it
    does not fit the model), and the piecewise normalizer of the model's depth."""
    layers = models.conv_layers(model)
    names = [layer.name for layer in layers]
    if mode == "per_channel":
        try:
            baseline = baseline.aligned_channels(names, [int(layer.kernel.shape[-1]) for layer in layers])
        except (AttributeError, TypeError, KeyError, ValueError):
            raise config_lib.ConfigError(
                "--conv_lr_factor=per_channel: the baseline run's "
                f"{tags.CHANNEL_SQSUM_FILE} does not match this model's {len(layers)} conv layers "
                "(same --resnet_size?)") from None
    if mode == "per_layer":
        try:
            baseline = baseline.aligned(names)
        except (AttributeError, TypeError, ValueError):
            raise config_lib.ConfigError(
                "--conv_lr_factor=per_layer: the baseline run lacks per-layer "
                f"{tags.per_layer(tags.CONV_SQSUM, '<layer>')} curves for the {len(names)} conv layers") from None
    return ConvLRFactor(mode, baseline, models.expected_initial_conv_sqsum(model))


class ConvLRFactor:
    """The factor on conv gradients at a fractional epoch, from the current weights."""

    def __init__(self, mode, baseline=None, initial_conv_sqsum=fidelity.INITIAL_CONV_SQSUM):
        """mode: None (no scaling), 'piecewise', 'replay', 'per_layer' or 'per_channel'.

        baseline: for replay / per_layer / per_channel, a `BaselineTrajectory`.
        initial_conv_sqsum: the piecewise factor's normalizer, the model's expected
        initial conv sum of squares (`models.expected_initial_conv_sqsum`; 800 for ResNet-20).
        """
        if mode in runs.REPLAY_FACTORS and baseline is None:
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
            factors = self.channel_factors(epoch, [models.channel_sum_of_squares(k) for k in kernels])
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


# ----------------------------------------------------------------------------- the baseline run

def load_baseline(path, train_epochs, per_channel=False, resnet_size=fidelity.RESNET_SIZE):
    """The logged conv_sqsum trajectory (total and per layer) of a finished baseline run."""
    if not os.path.isdir(path):
        raise config_lib.ConfigError(f"--replay_from={path}: no such run folder")
    try:
        run = events.load_run(path, (tags.TRAIN_DIR,))      # its config and train events, read once
    except events.EventsError as e:
        raise config_lib.ConfigError(f"--replay_from={path}: {e}") from None
    not_baseline = describe_non_baseline(run.config)
    if not_baseline:
        raise config_lib.ConfigError(f"--replay_from={path} is not a baseline run: it is {not_baseline}; "
                                     "replay needs a baseline (conv kernels in L2, no gradient scaling)")
    if run.damaged:
        raise config_lib.ConfigError(f"--replay_from={path}: damaged event file {run.damaged[0]}")
    if not run.complete:
        raise config_lib.ConfigError(f"--replay_from={path}: that run has not finished (no {tags.DONE_FILE}, "
                                     "or its events stop before the epoch it names); let the baseline finish first")
    depth = run.config.get("resnet_size", fidelity.RESNET_SIZE)
    if depth != resnet_size:
        raise config_lib.ConfigError(f"--replay_from={path} is a ResNet-{depth} run: this ResNet-{resnet_size} "
                                     "can only replay a baseline of its own depth (--resnet_size)")
    scalars = run.scalars[tags.TRAIN_DIR]
    if tags.CONV_SQSUM not in scalars or len(scalars[tags.CONV_SQSUM][0]) == 0:
        raise config_lib.ConfigError(f"--replay_from={path}: no {tags.CONV_SQSUM} logged in it")
    epochs, total = scalars[tags.CONV_SQSUM]
    if epochs[-1] < train_epochs:
        raise config_lib.ConfigError(
            f"--replay_from={path}: its {tags.CONV_SQSUM} ends at epoch {int(epochs[-1])}, "
            f"this run needs {train_epochs}")
    layers = tags.per_layer_series(scalars, tags.CONV_SQSUM)   # also the pre-prefix names
    per_layer = None
    if layers:
        per_layer = np.stack([np.interp(epochs, *series) for series in layers.values()], axis=1)
    trajectory = BaselineTrajectory(epochs, total, per_layer, list(layers))
    if per_channel:
        trajectory.channel_epochs, trajectory.per_channel = load_channel_sqsum(path, train_epochs)
    return trajectory


def describe_non_baseline(source_config):
    """'' for a baseline run's config, else what the run is (e.g. 'NoConvL2 (--noconv_l2)')."""
    conv_l2 = source_config.get("conv_l2", True)
    scaled = source_config.get("conv_grad_scale", False)
    if conv_l2 and not scaled:
        return ""
    if scaled:
        factor = source_config.get("conv_lr_factor", "piecewise")
        kind = "ConvLRScale" if not conv_l2 else "a conv-gradient-scaled run with conv L2"
        return f"{kind} (--conv_grad_scale --conv_lr_factor={factor}" + \
            ("" if conv_l2 else " --noconv_l2") + ")"
    return "NoConvL2 (--noconv_l2: conv kernels out of L2)"


def load_channel_sqsum(path, train_epochs):
    """(epochs, {layer: (E, cout)}) of a baseline's conv_channel_sqsum.npz, for per_channel."""
    try:
        epochs, layers = events.read_channel_sqsum(path)
    except events.EventsError as e:
        raise config_lib.ConfigError(f"--replay_from={path}: --conv_lr_factor=per_channel needs its "
                                     f"{tags.CHANNEL_SQSUM_FILE} ({str(e).splitlines()[0]})") from None
    if len(epochs) == 0 or epochs[-1] < train_epochs:
        last = int(epochs[-1]) if len(epochs) else "no epoch"
        raise config_lib.ConfigError(f"--replay_from={path}: its {tags.CHANNEL_SQSUM_FILE} ends at "
                                     f"epoch {last}, this run needs {train_epochs}")
    return epochs, layers
