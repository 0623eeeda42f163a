"""CIFAR-10 as uint8 arrays, from one of three sources (`--data_source`).

- `tfds`: `tfds.load("cifar10")`, TFDS's own download and cache.
- `binary`: the official `cifar-10-batches-bin` files the original code read.
- `synthetic`: random images of the right shapes (the original `--use_synthetic_data`).

NumPy only (TFDS is imported when used), so bad data is reported before
TensorFlow starts. Anything that is not CIFAR-10 raises `DataError` with a
one-line message naming the file.
"""

import dataclasses
import os

import numpy as np

from resnet_cifar import fidelity

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
