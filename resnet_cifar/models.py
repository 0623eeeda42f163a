"""The model: ResNet v1 for CIFAR-10 as the original built it, and the post's train step.

## The network

ResNet-20 version 1 for CIFAR-10, as `official/resnet/resnet_model.py` built it.

Layers are named in the order TF1 created them (`conv2d`, `conv2d_1`, ...,
`batch_normalization_21`, `dense`), so variable paths such as `conv2d_3/kernel`
mean the same layer as in the original graph, whatever else the Keras session
has built before.

## The train step (`ReproductionModel`)

The custom Keras `train_step` that does what the post's TF1 code did.

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

from resnet_cifar import fidelity, optim, tags


class _Namer:
    """Hands out TF1-style names: `base`, `base_1`, `base_2`, ... per base."""

    def __init__(self):
        self._counts = {}

    def __call__(self, base):
        n = self._counts.get(base, 0)
        self._counts[base] = n + 1
        return base if n == 0 else f"{base}_{n}"


def fixed_padding(kernel_size):
    """Padding of `resnet_model.fixed_padding`: total k-1, begin (k-1)//2.

    Used before strided convs so that the padding does not depend on the input
    size, unlike "SAME" (which pads (0, 1) for a 3x3 stride-2 conv on 32x32).
    """
    pad_total = kernel_size - 1
    pad_beg = pad_total // 2
    return pad_beg, pad_total - pad_beg


def _conv(x, filters, kernel_size, strides, name):
    """`conv2d_fixed_padding`: explicit padding + VALID when strided, SAME otherwise."""
    if strides > 1:
        beg, end = fixed_padding(kernel_size)
        if beg or end:
            x = keras.layers.ZeroPadding2D(((beg, end), (beg, end)), name=f"{name}_pad")(x)
    return keras.layers.Conv2D(
        filters, kernel_size, strides=strides,
        padding="same" if strides == 1 else "valid",
        use_bias=False,
        # tf.variance_scaling_initializer(): scale 1, fan_in, truncated normal.
        kernel_initializer=keras.initializers.VarianceScaling(1.0, "fan_in", "truncated_normal"),
        name=name,
    )(x)


def _bn(x, bn_decay, name):
    # Keras' `momentum` is TF1's `decay`: moving = momentum * moving + (1 - momentum) * batch.
    return keras.layers.BatchNormalization(
        axis=-1, momentum=bn_decay, epsilon=fidelity.BATCH_NORM_EPSILON,
        center=True, scale=True, name=name,
    )(x)


def _block_v1(x, filters, strides, projection, bn_decay, names):
    """`building_block_v1`: conv-BN-ReLU-conv-BN, add the shortcut, ReLU."""
    shortcut = x
    if projection:
        shortcut = _conv(x, filters, 1, strides, names("conv2d"))
        shortcut = _bn(shortcut, bn_decay, names("batch_normalization"))
    x = _conv(x, filters, 3, strides, names("conv2d"))
    x = _bn(x, bn_decay, names("batch_normalization"))
    x = keras.layers.ReLU(name=names("re_lu"))(x)
    x = _conv(x, filters, 3, 1, names("conv2d"))
    x = _bn(x, bn_decay, names("batch_normalization"))
    x = keras.layers.Add(name=names("add"))([x, shortcut])
    return keras.layers.ReLU(name=names("re_lu"))(x)


def build_resnet20(bn_decay=fidelity.BATCH_NORM_DECAY, model_cls=keras.Model, name="resnet20_v1"):
    """The CIFAR-10 ResNet-20 v1 of the original code; returns logits. `model_cls`: the trainer
    builds the same graph as its `ReproductionModel` (with the post's train step)."""
    return build_resnet(fidelity.RESNET_SIZE, bn_decay, model_cls, name)


def blocks_per_stage(resnet_size):
    """n = (size - 2) / 6 basic blocks per stage, as the original `cifar10_main.Cifar10Model`.

    Raises ValueError unless resnet_size is 6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...).
    """
    if resnet_size < 8 or resnet_size % 6 != 2:
        raise ValueError(f"resnet_size must be 6n+2 (20, 32, 44, 56, 110, ...), got {resnet_size}")
    return (resnet_size - 2) // 6


def build_resnet(resnet_size=fidelity.RESNET_SIZE, bn_decay=fidelity.BATCH_NORM_DECAY,
                 model_cls=keras.Model, name=None):
    """ResNet-(6n+2) v1 for CIFAR-10: the original's `--resnet_size`; 20 is the post's model.

    Same stem, stages and head as ResNet-20, with n = (size-2)/6 blocks per stage.
    """
    n_blocks = blocks_per_stage(resnet_size)
    name = name or f"resnet{resnet_size}_v1"
    names = _Namer()
    inputs = keras.Input((fidelity.HEIGHT, fidelity.WIDTH, fidelity.NUM_CHANNELS), name="images")
    x = _conv(inputs, fidelity.INITIAL_FILTERS, fidelity.INITIAL_KERNEL_SIZE, 1, names("conv2d"))
    x = _bn(x, bn_decay, names("batch_normalization"))     # version 1 only
    x = keras.layers.ReLU(name=names("re_lu"))(x)
    for filters, strides in zip(fidelity.STAGE_FILTERS, fidelity.STAGE_STRIDES):
        for block in range(n_blocks):
            # The original gives the FIRST block of EVERY stage a projection
            # shortcut, the first stage (stride 1, 16 -> 16) included.
            x = _block_v1(x, filters, strides if block == 0 else 1, block == 0, bn_decay, names)
    x = keras.layers.GlobalAveragePooling2D(name="global_average_pooling2d")(x)
    logits = keras.layers.Dense(fidelity.NUM_CLASSES, name="dense", dtype="float32")(x)
    return model_cls(inputs, logits, name=name)


def conv_layers(model):
    """The Conv2D layers in TF1 creation order: conv2d, conv2d_1, ..., conv2d_21 (ResNet-20).

    (`model.layers` is in graph order, where a block's projection conv comes after
    its main-path convs; per-layer logs and replays use the creation order.)
    """
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    return sorted(convs, key=lambda layer: creation_index(layer.name))


def creation_index(name):
    """`conv2d` -> 0, `conv2d_7` -> 7: the index of a TF1-style layer name."""
    base, _, suffix = name.rpartition("_")
    return int(suffix) if base and suffix.isdigit() else 0


def conv_kernels(model):
    """The conv kernels: the variables the post selects by the name `conv2d`.

    The single definition used by the L2 filter, the gradient scaling and the
    diagnostics. Selected by layer type, not by name, so a renamed layer can
    not silently drop out; a test checks it equals the name-based selection.
    """
    return [layer.kernel for layer in conv_layers(model)]


def batch_norm_layers(model):
    return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


def expected_initial_conv_sqsum(model):
    """E[sum w^2] of the conv kernels at initialization: the sum of their output channels.

    VarianceScaling(1, fan_in) draws each weight with variance 1/fan_in, and a
    kernel [kh, kw, cin, cout] has fan_in = kh*kw*cin, so its expected sum of
    squares is kh*kw*cin*cout / fan_in = cout. For ResNet-20 this is 800, the
    post's `initial_conv2d_sqsum`; it is the normalizer of the piecewise factor.
    """
    return float(sum(int(k.shape[-1]) for k in conv_kernels(model)))


# ----------------------------------------------------------------------------- the train step

@dataclasses.dataclass(frozen=True)
class StepStats:
    """What one step gives the diagnostics: per conv layer (L,) float32, and global values."""

    sqsum_before: tf.Tensor       # ||w_l||^2 before the update
    step_sqsum: tf.Tensor         # ||w_l' - w_l||^2
    unit_diff_sqsum: tf.Tensor    # ||w_l'/||w_l'|| - w_l/||w_l||||^2
    factor: tf.Tensor             # the conv gradient factor (per-layer mean for per-channel)
    sqsum_after: tf.Tensor = None     # ||w_l'||^2 after the update
    learning_rate: tf.Tensor = None   # the optimizer's rate of this step, ()
    grads: tuple = None               # the gradients applied, as `trainable_variables` (None at step 0)


@dataclasses.dataclass(frozen=True)
class Diagnostic:
    """One quantity the step logs, on the device, read once per epoch.

    key: its name in `Diagnostics.means()`; tag: its TensorBoard tag; title: its
    custom-scalars chart; fn: its value from a step's `StepStats`, per conv layer (L,) or
    global (). layers: for a per-layer value, how `tag` reduces the layers, "mean" or "sum"
    (each layer is also logged, as `per_layer/<tag>/<layer>`); None for a global value.
    epoch: "mean" over the epoch's steps, or "last", the value after its last step.
    initial: also logged at step 0 from the weights before any update (a StepStats of no
    step: no change, no gradients). An entry here is all a new one takes: the step
    accumulates it, `callbacks.EpochLog` writes and charts it and puts it in `logs`.
    """

    key: str
    tag: str
    title: str
    fn: Callable[[StepStats], tf.Tensor]
    layers: str = "mean"
    epoch: str = "mean"
    initial: bool = False


def relative_step(s):
    return tf.sqrt(s.step_sqsum) / tf.sqrt(s.sqsum_before)


def angular_update(s):
    """The angle between w and w' as 2 asin(||u - v|| / 2) of the unit vectors, accurate for
    tiny angles (acos of the cosine loses everything below ~3e-4 rad in float32)."""
    return 2.0 * tf.asin(tf.minimum(tf.sqrt(s.unit_diff_sqsum) / 2.0, 1.0))


DIAGNOSTICS = (
    Diagnostic("conv_sqsum", tags.CONV_SQSUM, "conv_sqsum: sum of squared conv weights",
               lambda s: s.sqsum_after, layers="sum", epoch="last", initial=True),
    Diagnostic("relative_step", tags.CONV_RELATIVE_STEP, "conv_relative_step: mean ||step|| / ||w||",
               relative_step),
    Diagnostic("lr_factor", tags.CONV_LR_FACTOR, "conv_lr_factor: factor on conv gradients",
               lambda s: s.factor, initial=True),
    Diagnostic("angular_update", tags.CONV_ANGULAR_UPDATE,
               "conv_angular_update: angle (rad) between w before and after a step", angular_update),
    Diagnostic("learning_rate", tags.LEARNING_RATE, "learning_rate (epoch mean)",
               lambda s: s.learning_rate, layers=None, initial=True),
)


class Diagnostics:
    """The diagnostics' epoch values kept on the device: plain tf.Variables, not model weights.

    They stay out of `model.weights` (so parameter counts and checkpoints of the
    model are unaffected) and out of Keras' metrics (which `evaluate` resets
    before the epoch-end callbacks run).
    """

    def __init__(self, num_conv):
        self.values = {d.key: tf.Variable(tf.zeros([num_conv] if d.layers else []), trainable=False)
                       for d in DIAGNOSTICS}
        self.steps = tf.Variable(0.0, trainable=False)

    def add(self, stats, first_of_epoch):
        """Adds one step; the first step of an epoch starts the sums afresh, so the epoch's
        values never depend on a callback having reset them."""
        keep = 1.0 - tf.cast(first_of_epoch, tf.float32)
        for d in DIAGNOSTICS:
            value, var = tf.cast(d.fn(stats), tf.float32), self.values[d.key]
            var.assign(value if d.epoch == "last" else keep * var + value)
        self.steps.assign(keep * self.steps + 1.0)

    def means(self):
        """The epoch's values as NumPy (one host read per epoch): key -> (L,) or (), plus steps."""
        n = max(float(self.steps.numpy()), 1.0)
        out = {d.key: self.values[d.key].numpy() / (n if d.epoch == "mean" else 1.0) for d in DIAGNOSTICS}
        return dict(out, steps=int(self.steps.numpy()))


class ReproductionModel(keras.Model):
    """ResNet-20 with the post's objective, gradient scaling and diagnostics.

    Build with `build_resnet(model_cls=ReproductionModel)`, then call
    `configure` once before `compile`.
    """

    def configure(self, *, weight_decay, conv_l2, steps_per_epoch, conv_lr_factor=None, baseline=None):
        """weight_decay: L2 coefficient (of tf.nn.l2_loss = sum(v^2)/2, not Keras' L2).
        conv_l2: keep the conv kernels in the L2 sum.
        steps_per_epoch: steps in one epoch, for the fractional epoch.
        conv_lr_factor: the mode of the conv LR factor (None: no scaling), `optim.ConvLRFactor`;
        baseline: for the replay modes, the baseline's `optim.BaselineTrajectory`.
        """
        layers = conv_layers(self)
        conv_lr_factor = optim.for_layers(conv_lr_factor, baseline, [layer.name for layer in layers],
                                          [int(layer.kernel.shape[-1]) for layer in layers],
                                          expected_initial_conv_sqsum(self))
        conv = conv_kernels(self)
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
        conv = {id(v) for v in conv_kernels(self)}
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
            conv = {id(v) for v in conv_kernels(self)}
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
            self.epoch_fraction(), sqsum, conv_kernels(self))
        return tf.ones_like(sqsum) if factor is None else factor[1]

    def initial_stats(self):
        """A `StepStats` of no step, from the weights now: what step 0 logs."""
        sqsum = self.layer_sums(tf.square(self.flat_conv()))
        zeros = tf.zeros_like(sqsum)
        return StepStats(sqsum_before=sqsum, step_sqsum=zeros, unit_diff_sqsum=zeros, factor=self.conv_factor(),
                         sqsum_after=sqsum, learning_rate=tf.cast(self.optimizer.learning_rate, tf.float32))

    def flat_conv(self):
        """The conv kernels as one float32 vector, layer after layer (ids in `layer_ids`)."""
        return tf.concat([tf.reshape(tf.cast(k, tf.float32), [-1]) for k in conv_kernels(self)], 0)

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
        conv = conv_kernels(self)
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
                                       factor=factor, sqsum_after=sqsum_after, learning_rate=learning_rate,
                                       grads=tuple(grads)), first_of_epoch)

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
