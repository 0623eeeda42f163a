"""CIFAR-10 input pipeline: the original preprocessing, in a resumable order.

The three sources (`resnet_cifar.cifar_data`) are decoded once into uint8 arrays
held in memory (CIFAR-10 is 180 MB), then served by tf.data. The training stream
is a pure function of (seed, sample index): pass p over the data uses a permutation seeded by (seed, p), and each
image's crop and flip are seeded by its position in the stream. A run resumed at
epoch k therefore sees exactly the batches an uninterrupted run would have.

Preprocessing follows `cifar10_main.preprocess_image`: train pads to 40x40 with
zeros, takes a random 32x32 crop and a random horizontal flip; both then apply
`per_image_standardization`.
"""

import numpy as np
import tensorflow as tf

from resnet_cifar import fidelity
from resnet_cifar.cifar_data import DataError

AUTOTUNE = tf.data.AUTOTUNE
SHAPE = (fidelity.HEIGHT, fidelity.WIDTH, fidelity.NUM_CHANNELS)


# ----------------------------------------------------------------------------- preprocessing

def preprocess_train(image, seed):
    """Pad 4 zero pixels on each side, random 32x32 crop, random flip, standardize.

    `seed` is a stateless seed (shape [2]); the same seed gives the same crop and flip.
    """
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = tf.image.resize_with_crop_or_pad(image, fidelity.PADDED_SIZE, fidelity.PADDED_SIZE)
    image = tf.image.stateless_random_crop(image, SHAPE, seed=crop_seed)
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    return tf.image.per_image_standardization(image)


def preprocess_test(image):
    return tf.image.per_image_standardization(image)


# ----------------------------------------------------------------------------- datasets

def train_dataset(images, labels, batch_size, seed=0, start_step=0):
    """Endless batches of augmented training images, starting at batch `start_step`.

    Pass p over the data visits the images in the order of a permutation seeded by
    (seed, p); batches are consecutive slices of that stream (drop_remainder keeps
    shapes static for XLA). Starting at `start_step` skips exactly what the earlier
    steps consumed, so resumed runs see the same data as uninterrupted ones.
    """
    num = len(labels)
    if num < batch_size:
        raise DataError(f"{num} training images are fewer than one batch of {batch_size}")
    images = tf.constant(images)
    labels = tf.constant(labels)
    first_pass, skip = divmod(start_step * batch_size, num)
    seed = tf.constant(seed, tf.int64)

    def permutation(p):
        keys = tf.random.stateless_uniform([num], seed=tf.stack([seed, p]))
        return tf.data.Dataset.from_tensor_slices(tf.argsort(keys))

    def load(position, index):
        image = preprocess_train(tf.gather(images, index), tf.stack([seed, position]))
        return image, tf.gather(labels, index)

    ds = tf.data.Dataset.range(first_pass, np.iinfo(np.int64).max).flat_map(permutation)
    ds = ds.skip(skip).enumerate(start=start_step * batch_size)
    ds = ds.map(load, num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE)


def test_dataset(images, labels, batch_size, eval_steps=None):
    """The test set in order, standardized, cached after the first pass."""
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    ds = ds.map(lambda x, y: (preprocess_test(x), y), num_parallel_calls=AUTOTUNE,
                deterministic=True)
    ds = ds.batch(batch_size)
    if eval_steps:
        ds = ds.take(eval_steps)
    return ds.cache().prefetch(AUTOTUNE)
