"""ResNet-20 version 1 for CIFAR-10, as `official/resnet/resnet_model.py` built it.

Layers are named in the order TF1 created them (`conv2d`, `conv2d_1`, ...,
`batch_normalization_21`, `dense`), so variable paths such as `conv2d_3/kernel`
mean the same layer as in the original graph, whatever else the Keras session
has built before.
"""

import keras
import tensorflow as tf

from resnet_cifar import fidelity


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
    """The CIFAR-10 ResNet-20 v1 of the original code; returns logits.

    `model_cls` lets the trainer build the same graph as its own `keras.Model`
    subclass (with the custom `train_step`).
    """
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


def save_weights(model, path):
    """The model's weights alone (layers' variables, BN statistics included) to a Keras
    `.weights.h5` file, written atomically. Keras' own `save_weights` also stores a compiled
    model's optimizer slots (twice the size); a plain Model over the same layers has none,
    and its file loads into any model built by `build_resnet` of the same depth."""
    from resnet_cifar import atomic

    with atomic.atomic_path(path) as tmp:
        keras.Model(model.inputs, model.outputs).save_weights(tmp)


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


def channel_sum_of_squares(kernel):
    """sum(w^2) per output channel of a conv kernel [kh, kw, cin, cout], float32: (cout,)."""
    return tf.reduce_sum(tf.square(tf.cast(kernel, tf.float32)), axis=[0, 1, 2])
