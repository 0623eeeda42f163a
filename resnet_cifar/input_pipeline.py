"""CIFAR-10 input pipeline: three sources, the original preprocessing, resumable order.

Sources (`--data_source`):
- `tfds`: `tfds.load("cifar10")`, TFDS's own download and cache.
- `binary`: the official `cifar-10-batches-bin` files the original code read.
- `synthetic`: random images of the right shapes (the original `--use_synthetic_data`).

All three are decoded once into uint8 arrays held in memory (CIFAR-10 is 180 MB),
then served by tf.data. The training stream is a pure function of (seed, sample
index): pass p over the data uses a permutation seeded by (seed, p), and each
image's crop and flip are seeded by its position in the stream. A run resumed at
epoch k therefore sees exactly the batches an uninterrupted run would have.

Preprocessing follows `cifar10_main.preprocess_image`: train pads to 40x40 with
zeros, takes a random 32x32 crop and a random horizontal flip; both then apply
`per_image_standardization`.
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf

from resnet_cifar import fidelity

AUTOTUNE = tf.data.AUTOTUNE
SHAPE = (fidelity.HEIGHT, fidelity.WIDTH, fidelity.NUM_CHANNELS)


class DataError(ValueError):
    """Data that cannot be used as CIFAR-10; the message is one line for the user."""


@dataclasses.dataclass(frozen=True)
class Arrays:
    """Decoded uint8 images (N, 32, 32, 3) and int32 labels (N,) of both splits."""
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


# ----------------------------------------------------------------------------- sources

def load_arrays(data_source, data_dir=None, seed=0):
    if data_source == "tfds":
        return _load_tfds(data_dir)
    if data_source == "binary":
        return _load_binary(data_dir)
    if data_source == "synthetic":
        return synthetic_arrays(fidelity.NUM_TRAIN_IMAGES, fidelity.NUM_TEST_IMAGES, seed)
    raise DataError(f"unknown data source {data_source!r}: use tfds, binary or synthetic")


def _load_tfds(data_dir):
    import tensorflow_datasets as tfds  # imported here: binary and synthetic runs need not pay for it

    try:
        splits = tfds.load("cifar10", split=["train", "test"], data_dir=data_dir,
                           as_supervised=True, batch_size=-1)
    except Exception as e:  # noqa: BLE001 - any download/prepare failure gets the same advice
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DataError(
            f"could not load CIFAR-10 through TFDS ({type(e).__name__}: {first_line}); "
            "offline, use --data_source=binary --data_dir=DIR (the official cifar-10-batches-bin "
            "files) or --data_source=synthetic") from None
    (train_x, train_y), (test_x, test_y) = tfds.as_numpy(splits)
    return Arrays(train_x.astype(np.uint8), train_y.astype(np.int32),
                  test_x.astype(np.uint8), test_y.astype(np.int32))


def find_binary_folder(data_dir):
    """`--data_dir` may name the `cifar-10-batches-bin` folder itself or its parent."""
    if not data_dir:
        raise DataError("--data_source=binary needs --data_dir (the cifar-10-batches-bin folder "
                        "or its parent)")
    for folder in (data_dir, os.path.join(data_dir, fidelity.BINARY_FOLDER)):
        if os.path.isfile(os.path.join(folder, fidelity.TEST_FILES[0])):
            return folder
    raise DataError(f"no CIFAR-10 binary files in {data_dir}: expected {fidelity.TEST_FILES[0]} "
                    f"there or in {os.path.join(data_dir, fidelity.BINARY_FOLDER)}")


def read_binary_file(path):
    """One official binary file -> (images uint8 (N,32,32,3), labels int32 (N,)).

    Each record is 1 label byte then 3072 bytes: the R, G and B planes of 32x32.
    """
    if not os.path.isfile(path):
        raise DataError(f"missing CIFAR-10 file {path}")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % fidelity.RECORD_BYTES:
        raise DataError(f"{path}: {raw.size} bytes is not a whole number of "
                        f"{fidelity.RECORD_BYTES}-byte CIFAR-10 records")
    records = raw.reshape(-1, fidelity.RECORD_BYTES)
    labels = records[:, 0].astype(np.int32)
    bad = np.flatnonzero(labels >= fidelity.NUM_CLASSES)
    if bad.size:
        raise DataError(f"{path}: record {bad[0]} has label {labels[bad[0]]}, "
                        f"outside 0..{fidelity.NUM_CLASSES - 1}")
    planes = records[:, fidelity.LABEL_BYTES:].reshape(-1, fidelity.NUM_CHANNELS,
                                                       fidelity.HEIGHT, fidelity.WIDTH)
    return np.ascontiguousarray(planes.transpose(0, 2, 3, 1)), labels


def _load_binary(data_dir):
    folder = find_binary_folder(data_dir)

    def read(names):
        parts = [read_binary_file(os.path.join(folder, n)) for n in names]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    train_x, train_y = read(fidelity.TRAIN_FILES)
    test_x, test_y = read(fidelity.TEST_FILES)
    return Arrays(train_x, train_y, test_x, test_y)


def synthetic_arrays(num_train, num_test, seed=0):
    """Uniform random pixels and labels: the shapes and dtypes of CIFAR-10, nothing more."""
    rng = np.random.default_rng(seed)
    return Arrays(
        rng.integers(0, 256, (num_train,) + SHAPE, dtype=np.uint8),
        rng.integers(0, fidelity.NUM_CLASSES, num_train, dtype=np.int32),
        rng.integers(0, 256, (num_test,) + SHAPE, dtype=np.uint8),
        rng.integers(0, fidelity.NUM_CLASSES, num_test, dtype=np.int32),
    )


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
