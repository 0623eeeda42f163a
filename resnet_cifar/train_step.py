"""The custom Keras `train_step` that does what the post's TF1 code did.

One step, traced once into a `tf.function` (XLA-compiled where that pays):
1. gradients of the mean cross entropy;
2. plus the gradient of the L2 term, weight_decay * v for every variable in the L2
   set (all trainable variables, or all but the conv kernels): the gradient of the
   original's weight_decay * sum(tf.nn.l2_loss(v)), added directly instead of
   differentiating 68 separate l2_loss ops;
3. conv-kernel gradients (only those) multiplied by the conv LR factor, computed
   from the current weights and the fractional epoch (runs without scaling skip it);
4. the optimizer's update (TF1 momentum for the post);
5. the per-layer diagnostics of `DIAGNOSTICS`, from the conv kernels before and after
   the update, added into one accumulator that a callback reads and resets once per
   epoch, so no value crosses to the host during the epoch.

The conv kernels are handled as one flat float32 vector with a layer id per element:
every per-layer sum (of squares, of squared steps) is one `unsorted_segment_sum` over all 22
layers, not 22 separate chains of small ops.
"""

import dataclasses
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from resnet_cifar import models, tags


@dataclasses.dataclass(frozen=True)
class StepStats:
    """Per-layer quantities of one step, each (L,) float32, for the diagnostics."""

    sqsum_before: tf.Tensor       # ||w_l||^2 before the update
    step_sqsum: tf.Tensor         # ||w_l' - w_l||^2
    unit_diff_sqsum: tf.Tensor    # ||w_l'/||w_l'|| - w_l/||w_l||||^2
    factor: tf.Tensor             # the conv gradient factor (per-layer mean for per-channel)


@dataclasses.dataclass(frozen=True)
class Diagnostic:
    """A per-conv-layer quantity of every step, logged as its epoch mean.

    `tag` is its TensorBoard tag (the mean over layers; per layer under
    `per_layer/<tag>/<layer>`), `title` its custom-scalars chart, `fn` computes it
    from a step's `StepStats`. Adding one here is all it takes: the step accumulates
    it, the callback writes, charts and puts it in `logs`.
    """

    key: str
    tag: str
    title: str
    fn: Callable[[StepStats], tf.Tensor]


def relative_step(s):
    return tf.sqrt(s.step_sqsum) / tf.sqrt(s.sqsum_before)


def angular_update(s):
    """The angle between w and w' as 2 asin(||u - v|| / 2) of the unit vectors, accurate for
    tiny angles (acos of the cosine loses everything below ~3e-4 rad in float32)."""
    return 2.0 * tf.asin(tf.minimum(tf.sqrt(s.unit_diff_sqsum) / 2.0, 1.0))


DIAGNOSTICS = (
    Diagnostic("relative_step", tags.CONV_RELATIVE_STEP, "conv_relative_step: mean ||step|| / ||w||",
               relative_step),
    Diagnostic("lr_factor", tags.CONV_LR_FACTOR, "conv_lr_factor: factor on conv gradients",
               lambda s: s.factor),
    Diagnostic("angular_update", tags.CONV_ANGULAR_UPDATE,
               "conv_angular_update: angle (rad) between w before and after a step", angular_update),
)


class Diagnostics:
    """Per-epoch sums kept on the device: plain tf.Variables, not model weights.

    They stay out of `model.weights` (so parameter counts and checkpoints of the
    model are unaffected) and out of Keras' metrics (which `evaluate` resets
    before the epoch-end callbacks run).
    """

    def __init__(self, num_conv):
        self.sums = tf.Variable(tf.zeros([len(DIAGNOSTICS), num_conv]), trainable=False)
        self.learning_rate = tf.Variable(0.0, trainable=False)   # sum over steps of the rate
        self.steps = tf.Variable(0.0, trainable=False)

    def add(self, stats, learning_rate, first_of_epoch):
        """Adds one step; the first step of an epoch starts the sums afresh, so the epoch's
        means never depend on a callback having reset them."""
        keep = 1.0 - tf.cast(first_of_epoch, tf.float32)
        self.sums.assign(keep * self.sums + tf.stack([d.fn(stats) for d in DIAGNOSTICS]))
        self.learning_rate.assign(keep * self.learning_rate + learning_rate)
        self.steps.assign(keep * self.steps + 1.0)

    def means(self):
        """Epoch means as NumPy (one host read per epoch): key -> (L,), plus learning_rate, steps."""
        n = max(float(self.steps.numpy()), 1.0)
        sums = self.sums.numpy() / n
        return dict({d.key: sums[i] for i, d in enumerate(DIAGNOSTICS)},
                    learning_rate=float(self.learning_rate.numpy()) / n, steps=int(self.steps.numpy()))


class ReproductionModel(keras.Model):
    """ResNet-20 with the post's objective, gradient scaling and diagnostics.

    Build with `models.build_resnet20(model_cls=ReproductionModel)`, then call
    `configure` once before `compile`.
    """

    def configure(self, *, weight_decay, conv_l2, conv_lr_factor, steps_per_epoch):
        """weight_decay: L2 coefficient (of tf.nn.l2_loss = sum(v^2)/2, not Keras' L2).
        conv_l2: keep the conv kernels in the L2 sum.
        conv_lr_factor: a `conv_scaling.ConvLRFactor` (mode None for no scaling).
        steps_per_epoch: steps in one epoch, for the fractional epoch.
        """
        conv = models.conv_kernels(self)
        sizes = [int(np.prod(k.shape)) for k in conv]
        # object.__setattr__: plain Python settings, nothing for Keras to track.
        object.__setattr__(self, "_settings", dict(
            weight_decay=float(weight_decay), conv_l2=bool(conv_l2),
            conv_lr_factor=conv_lr_factor, steps_per_epoch=int(steps_per_epoch),
            layer_ids=np.repeat(np.arange(len(conv), dtype=np.int32), sizes), num_layers=len(conv)))
        object.__setattr__(self, "diagnostics", Diagnostics(len(conv)))
        self.l2_tracker = keras.metrics.Mean(name="l2_loss")

    # -- pieces of the step, public so that tests can check each one -------------

    def l2_variables(self):
        """The variables in the L2 sum: all trainable ones, minus conv kernels if NoConvL2.

        The original CIFAR filter kept everything ("we include all vars when
        regularizing"): batch-norm gamma/beta and the dense layer too.
        """
        if self._settings["conv_l2"]:
            return list(self.trainable_variables)
        conv = {id(v) for v in models.conv_kernels(self)}
        return [v for v in self.trainable_variables if id(v) not in conv]

    def l2_penalty(self, conv_sqsum=None):
        """weight_decay * sum(tf.nn.l2_loss(v)): the original's term, half of Keras' L2.

        conv_sqsum: the conv kernels' sum of squares, if the caller has it (the step does).
        """
        wd = self._settings["weight_decay"]
        variables = self.l2_variables()
        if wd == 0 or not variables:
            return tf.constant(0.0)
        if conv_sqsum is not None and self._settings["conv_l2"]:
            conv = {id(v) for v in models.conv_kernels(self)}
            variables = [v for v in variables if id(v) not in conv]
        else:
            conv_sqsum = 0.0       # NoConvL2: none in `variables`; else: all summed below
        flat = tf.concat([tf.reshape(tf.cast(v, tf.float32), [-1]) for v in variables], 0)
        return wd * 0.5 * (tf.reduce_sum(tf.square(flat)) + conv_sqsum)

    def epoch_fraction(self):
        return tf.cast(self.optimizer.iterations, tf.float32) / self._settings["steps_per_epoch"]

    def conv_factor(self):
        """The per-layer conv gradient factor (L,) the next step would use, from the weights
        now (ones without scaling; per channel: each layer's mean), as the step logs it."""
        sqsum = self.layer_sums(tf.square(self.flat_conv()))
        factor = self._settings["conv_lr_factor"].multipliers(
            self.epoch_fraction(), sqsum, models.conv_kernels(self))
        return tf.ones_like(sqsum) if factor is None else factor[1]

    def flat_conv(self):
        """The conv kernels as one float32 vector, layer after layer (ids in `layer_ids`)."""
        return tf.concat([tf.reshape(tf.cast(k, tf.float32), [-1]) for k in models.conv_kernels(self)], 0)

    def layer_sums(self, flat_values):
        """Per-layer sums (L,) of a flat per-element vector, in one op.

        `unsorted_segment_sum`, not `segment_sum`: XLA (on by default on GPUs) has a kernel
        for the first only. The ids are sorted anyway, so both give the same sums.
        """
        return tf.math.unsorted_segment_sum(flat_values, self._settings["layer_ids"],
                                            self._settings["num_layers"])

    # -- the step -------------------------------------------------------------------

    def train_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        variables = self.trainable_variables
        conv = models.conv_kernels(self)
        position = {id(v): i for i, v in enumerate(conv)}

        with tf.GradientTape() as tape:
            logits = self(x, training=True)
            data_loss = self.compute_loss(x=x, y=y, y_pred=logits)
            scaled_loss = self.optimizer.scale_loss(data_loss)   # identity unless mixed float16
        grads = tape.gradient(scaled_loss, variables)

        # The conv kernels before the update: for the factor (conv_sqsum "now") and for dw.
        before = self.flat_conv()
        sqsum_before = self.layer_sums(tf.square(before))
        l2 = self.l2_penalty(tf.reduce_sum(sqsum_before))

        # Gradient of the L2 term: weight_decay * v, scaled like the loss (mixed float16).
        wd = self._settings["weight_decay"]
        if wd:
            wd_scaled = self.optimizer.scale_loss(tf.constant(wd))
            in_l2 = {id(v) for v in self.l2_variables()}
            grads = [g + tf.cast(wd_scaled, g.dtype) * tf.cast(v, g.dtype) if id(v) in in_l2 else g
                     for g, v in zip(grads, variables)]

        # Conv gradients x the factor: one multiplier per kernel, a scalar or a (cout,) vector.
        factor = self._settings["conv_lr_factor"].multipliers(self.epoch_fraction(), sqsum_before, conv)
        if factor is not None:
            multipliers, factor = factor
            grads = [g * tf.cast(multipliers[position[id(v)]], g.dtype) if id(v) in position else g
                     for g, v in zip(grads, variables)]
        else:
            factor = tf.ones_like(sqsum_before)

        learning_rate = tf.cast(self.optimizer.learning_rate, tf.float32)  # rate of this step
        first_of_epoch = tf.equal(self.optimizer.iterations % self._settings["steps_per_epoch"], 0)
        self.optimizer.apply(grads, variables)

        after = self.flat_conv()
        sqsum_after = self.layer_sums(tf.square(after))
        ids = self._settings["layer_ids"]
        unit_diff = (after * tf.gather(tf.math.rsqrt(sqsum_after), ids)
                     - before * tf.gather(tf.math.rsqrt(sqsum_before), ids))
        self.diagnostics.add(StepStats(sqsum_before=sqsum_before,
                                       step_sqsum=self.layer_sums(tf.square(after - before)),
                                       unit_diff_sqsum=self.layer_sums(tf.square(unit_diff)),
                                       factor=factor), learning_rate, first_of_epoch)

        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(data_loss)
            elif metric is self.l2_tracker:
                metric.update_state(l2)
            else:
                metric.update_state(y, logits)
        return self.get_metrics_result()

    def test_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        logits = self(x, training=False)
        loss = self.compute_loss(x=x, y=y, y_pred=logits, training=False)
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
            elif metric is not self.l2_tracker:
                metric.update_state(y, logits)
        logs = self.get_metrics_result()
        logs.pop(self.l2_tracker.name, None)   # the L2 term is a training quantity
        return logs


def layer_sqsum(model):
    """Per-conv-layer sum of squares, NumPy, in layer order (host side, per epoch)."""
    return [float(tf.reduce_sum(tf.square(tf.cast(k, tf.float32))).numpy())
            for k in models.conv_kernels(model)]

