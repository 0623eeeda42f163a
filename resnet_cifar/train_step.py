"""The custom Keras `train_step` that does what the post's TF1 code did.

One step, traced once into a `tf.function` (XLA-compiled where that pays):
1. objective = mean cross entropy + weight_decay * sum(l2_loss(v)) over the
   L2 variables (all trainable variables, or all but the conv kernels);
2. gradients of the objective;
3. conv-kernel gradients (only those) multiplied by the conv LR factor, computed
   here from the current weights and the fractional epoch;
4. the TF1 momentum update;
5. diagnostics of the actual update (||dw|| / ||w|| and the angle between w
   before and after, per conv layer), added into
   accumulators that a callback reads and resets once per epoch, so no value
   crosses to the host during the epoch.
"""

import keras
import tensorflow as tf

from resnet_cifar import models


class Diagnostics:
    """Per-epoch sums kept on the device: plain tf.Variables, not model weights.

    They stay out of `model.weights` (so parameter counts and checkpoints of the
    model are unaffected) and out of Keras' metrics (which `evaluate` resets
    before the epoch-end callbacks run).
    """

    def __init__(self, num_conv):
        zeros = lambda shape: tf.Variable(tf.zeros(shape), trainable=False)  # noqa: E731
        self.relative_step = zeros([num_conv])   # sum over steps of ||dw_l|| / ||w_l||
        self.lr_factor = zeros([num_conv])       # sum over steps of the factor per layer
        self.learning_rate = zeros([])           # sum over steps of the learning rate
        self.steps = zeros([])
        self.angular_update = zeros([num_conv])  # sum over steps of angle(w_before, w_after)

    def reset(self):
        for v in (self.relative_step, self.lr_factor, self.learning_rate, self.steps,
                  self.angular_update):
            v.assign(tf.zeros_like(v))

    def means(self):
        """Epoch means as NumPy (one host read per epoch)."""
        n = max(float(self.steps.numpy()), 1.0)
        return dict(relative_step=self.relative_step.numpy() / n,
                    lr_factor=self.lr_factor.numpy() / n,
                    learning_rate=float(self.learning_rate.numpy()) / n,
                    steps=int(self.steps.numpy()),
                    angular_update=self.angular_update.numpy() / n)


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
        # object.__setattr__: plain Python settings, nothing for Keras to track.
        object.__setattr__(self, "_settings", dict(
            weight_decay=float(weight_decay), conv_l2=bool(conv_l2),
            conv_lr_factor=conv_lr_factor, steps_per_epoch=int(steps_per_epoch)))
        object.__setattr__(self, "diagnostics", Diagnostics(len(models.conv_kernels(self))))
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

    def l2_penalty(self):
        """weight_decay * sum(tf.nn.l2_loss(v)): the original's term, half of Keras' L2."""
        wd = self._settings["weight_decay"]
        variables = self.l2_variables()
        if wd == 0 or not variables:
            return tf.constant(0.0)
        return wd * tf.add_n([tf.nn.l2_loss(tf.cast(v, tf.float32)) for v in variables])

    def epoch_fraction(self):
        return tf.cast(self.optimizer.iterations, tf.float32) / self._settings["steps_per_epoch"]

    def conv_factor(self, layer_sqsum):
        """The per-layer conv gradient factor at the current step."""
        return self._settings["conv_lr_factor"](self.epoch_fraction(), layer_sqsum)

    def channel_factors(self, kernels):
        """--conv_lr_factor=per_channel: one (cout,) factor per conv kernel, else None."""
        factor = self._settings["conv_lr_factor"]
        if getattr(factor, "mode", None) != "per_channel":
            return None
        return factor.channel_factors(self.epoch_fraction(),
                                      [models.channel_sum_of_squares(w) for w in kernels])

    # -- the step -------------------------------------------------------------------

    def train_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        conv = models.conv_kernels(self)
        conv_index = {id(v): i for i, v in enumerate(conv)}
        variables = self.trainable_variables

        with tf.GradientTape() as tape:
            logits = self(x, training=True)
            data_loss = self.compute_loss(x=x, y=y, y_pred=logits)
            l2 = self.l2_penalty()
            loss = data_loss + l2
            scaled_loss = self.optimizer.scale_loss(loss)   # identity unless mixed float16
        grads = tape.gradient(scaled_loss, variables)

        # Weights before the update: for the factor (conv_sqsum "now") and for dw.
        before = [tf.identity(v) for v in conv]
        layer_sqsum = tf.stack([tf.reduce_sum(tf.square(tf.cast(w, tf.float32))) for w in before])
        factor = self.conv_factor(layer_sqsum)
        multipliers = [factor[i] for i in range(len(conv))]   # per layer: scalar or (cout,)
        channel = self.channel_factors(before)
        if channel is not None:
            multipliers = channel
            factor = tf.stack([tf.reduce_mean(f) for f in channel])   # logged: per-layer mean
        grads = [g * tf.cast(multipliers[conv_index[id(v)]], g.dtype) if id(v) in conv_index else g
                 for g, v in zip(grads, variables)]

        learning_rate = tf.cast(self.optimizer.learning_rate, tf.float32)  # rate of this step
        self.optimizer.apply(grads, variables)

        rel = tf.stack([tf.norm(tf.cast(v, tf.float32) - w) / tf.norm(w)
                        for v, w in zip(conv, before)])
        d = self.diagnostics
        d.relative_step.assign_add(rel)
        d.lr_factor.assign_add(factor)
        d.learning_rate.assign_add(learning_rate)
        d.steps.assign_add(1.0)
        d.angular_update.assign_add(tf.stack([angle_between(w, tf.cast(v, tf.float32))
                                              for v, w in zip(conv, before)]))

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


def angle_between(a, b):
    """The angle (radians) between two tensors seen as vectors, accurate for tiny angles.

    acos(<a,b>/(|a||b|)) loses everything below ~3e-4 rad in float32 (the cosine
    rounds to 1); 2·asin(|u - v|/2) of the unit vectors u, v has relative error
    ~eps32/angle instead.
    """
    a = tf.reshape(a, [-1])
    b = tf.reshape(b, [-1])
    u = a / tf.norm(a)
    v = b / tf.norm(b)
    return 2.0 * tf.asin(tf.minimum(tf.norm(u - v) / 2.0, 1.0))


def layer_sqsum(model):
    """Per-conv-layer sum of squares, NumPy, in layer order (host side, per epoch)."""
    return [float(tf.reduce_sum(tf.square(tf.cast(k, tf.float32))).numpy())
            for k in models.conv_kernels(model)]

