"""CIFAR-10 as uint8 arrays, from the sources in `SOURCES` (`--data_source`).

`SOURCES` is the one list of data sources: `load_arrays` calls its loaders,
`TrainConfig` accepts its names and the `--data_source` help is generated from it.
A new source is one loader and one entry here.

NumPy only (TFDS is imported when used), so bad data is reported before
TensorFlow starts, and `config` can import this module. Anything that is not
CIFAR-10 raises `DataError` with a one-line message naming the file.

## The input pipeline

CIFAR-10 input pipeline: the original preprocessing, in a resumable order.

The three sources (`resnet_cifar.cifar_data`) are decoded once into uint8 arrays
held in memory (CIFAR-10 is 180 MB), then served by tf.data. The training stream
is a pure function of (seed, sample index): pass p over the data uses a permutation seeded by (seed, p), and each
image's crop and flip are seeded by its position in the stream. A run resumed at
epoch k therefore sees exactly the batches an uninterrupted run would have.

Preprocessing follows `cifar10_main.preprocess_image`: train pads to 40x40 with
zeros, takes a random 32x32 crop and a random horizontal flip; both then apply
`per_image_standardization`.

TensorFlow is imported inside the pipeline's functions: the sources are read and checked
before TensorFlow starts.
"""

import dataclasses
import os
from typing import Callable

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

def _load_tfds(data_dir, seed):
    """`tfds.load("cifar10")`, TFDS's own download and cache (seed unused: the data is
    fixed); a failure becomes one line that says whose fault it is."""
    if data_dir and os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise DataError(f"--data_dir={data_dir} is a file: TFDS keeps CIFAR-10 in a folder (for the "
                        f"{fidelity.ARCHIVE_NAME} archive itself use --data_source=binary)")
    try:
        import tensorflow_datasets as tfds  # here: binary and synthetic runs need not pay for it

        builder = tfds.builder("cifar10", data_dir=data_dir)
        if not _quietly(builder.is_prepared) and not _download_cached(builder.data_dir_root):
            _check_tfds_imports()
            _check_network(fidelity.ARCHIVE_URL)
        splits = tfds.load("cifar10", split=["train", "test"], data_dir=data_dir,
                           as_supervised=True, batch_size=-1)
        (train_x, train_y), (test_x, test_y) = tfds.as_numpy(splits)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - TFDS raises many types; each gets one line
        raise DataError(describe_tfds_error(e)) from None
    return Arrays(train_x.astype(np.uint8), train_y.astype(np.int32),
                  test_x.astype(np.uint8), test_y.astype(np.int32))


_OFFLINE_ADVICE = (f"download {fidelity.ARCHIVE_NAME} from {fidelity.CIFAR_PAGE} elsewhere and "
                   f"use --data_source=binary --data_dir=PATH/{fidelity.ARCHIVE_NAME} "
                   "(or --data_source=synthetic for a smoke run)")
# Inside the image (its entrypoint and prepare-cifar10 set RESNET_CIFAR_CONTAINER_RUNS) PATH is
# a path of the container: the archive's folder must be mounted there.
_CONTAINER_ADVICE = (f"; in the container, mount the archive's folder: -v $PWD:/data/cifar and "
                     f"--data_dir=/data/cifar/{fidelity.ARCHIVE_NAME}")


def offline_advice():
    """What to do without a network, for the place this process runs in."""
    return _OFFLINE_ADVICE + (_CONTAINER_ADVICE if os.environ.get("RESNET_CIFAR_CONTAINER_RUNS") else "")


def _quietly(fn):
    """fn() without absl warnings: `is_prepared` warns about the folder it is asked about."""
    from absl import logging

    level = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        return fn()
    finally:
        logging.set_verbosity(level)


def _download_cached(data_dir_root):
    """True if TFDS already holds the downloaded archive (then it needs no network)."""
    import glob

    pattern = os.path.join(str(data_dir_root), "downloads", "**", "*cifar-10-binary*")
    return any(os.path.isfile(p) and not p.endswith(".INFO") and ".tmp." not in p
               for p in glob.glob(pattern, recursive=True))


def _check_tfds_imports():
    """TFDS's builder imports its own dependencies lazily (`etils.epy.lazy_imports`), so a
    missing one (importlib_resources for TFDS 4.9.10) surfaces only when preparing. Name it
    before the network check. The optional ones (apache_beam, ...) come from TFDS's
    `lazy_imports_utils` and are left out."""
    import importlib.util

    from tensorflow_datasets.core import dataset_builder
    from tensorflow_datasets.core.utils import lazy_imports_utils

    optional = {id(v) for v in vars(lazy_imports_utils).values()}
    lazy = [v for v in vars(dataset_builder).values()
            if type(v).__name__ == "LazyModule" and id(v) not in optional]
    for name in sorted({getattr(v, "module_name", "").split(".")[0] for v in lazy} - {""}):
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def _check_network(url, timeout=15):
    """One quick request before TFDS's download, which retries for minutes when offline."""
    import requests  # a dependency of TFDS

    try:
        requests.head(url, timeout=timeout, allow_redirects=True)
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
        raise DataError(f"cannot download CIFAR-10: no network connection to {url} "
                        f"({_root_cause(e)}); {offline_advice()}") from None


def _chain(e):
    seen = []
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def _root_cause(e):
    last = _chain(e)[-1]
    text = (str(last).strip().splitlines() or [""])[0][:160]
    return f"{type(last).__name__}: {text}" if text else type(last).__name__


def _is_network_error(e):
    import socket
    import urllib.error

    network = (ConnectionError, TimeoutError, socket.gaierror, socket.timeout, urllib.error.URLError)
    try:
        import requests
        network += (requests.exceptions.ConnectionError, requests.exceptions.Timeout)
    except ImportError:
        pass
    return any(isinstance(c, network) for c in _chain(e))


def describe_tfds_error(e):
    """The one-line message for an exception out of TFDS: broken install, no network, or other."""
    missing = next((c for c in _chain(e) if isinstance(c, ImportError)), None)
    if missing is not None:
        name = (getattr(missing, "name", None) or "").split(".")[0]
        fix = f"`pip install {name}`, or " if name else ""
        return (f"TensorFlow Datasets is not installed correctly ({type(missing).__name__}: "
                f"{missing}); {fix}`pip install -r requirements.txt` in this environment")
    if _is_network_error(e):
        return (f"cannot download CIFAR-10: no network connection ({_root_cause(e)}); "
                f"{offline_advice()}")
    first_line = (str(e).strip().splitlines() or [""])[0][:200]
    what = f"{type(e).__name__}: {first_line}" if first_line else type(e).__name__
    return f"TFDS could not prepare CIFAR-10 ({what}); or {offline_advice()}"


def missing_data_dir(data_source, data_dir):
    """Why `data_source` cannot do without --data_dir, or None; reads no file (a config check)."""
    if data_source == "binary" and not data_dir:
        return ("--data_source=binary needs --data_dir (the cifar-10-batches-bin folder, "
                f"its parent, or the {fidelity.ARCHIVE_NAME} archive)")
    return None


def find_binary_folder(data_dir):
    """`--data_dir` may name the `cifar-10-batches-bin` folder itself or its parent."""
    if not data_dir:
        raise DataError(missing_data_dir("binary", data_dir))
    if not os.path.exists(data_dir):
        raise DataError(f"--data_dir={data_dir} does not exist (give the cifar-10-batches-bin folder, "
                        f"its parent, or the {fidelity.ARCHIVE_NAME} archive)")
    for folder in (data_dir, os.path.join(data_dir, fidelity.BINARY_FOLDER)):
        if os.path.isfile(os.path.join(folder, fidelity.TEST_FILES[0])):
            return folder
    raise DataError(f"no CIFAR-10 binary files in {data_dir}: expected {fidelity.TEST_FILES[0]} "
                    f"there or in {os.path.join(data_dir, fidelity.BINARY_FOLDER)}")


def decode_records(raw, name):
    """Bytes of one official binary file -> (images uint8 (N,32,32,3), labels int32 (N,)).

    Each record is 1 label byte then 3072 bytes: the R, G and B planes of 32x32.
    `name` (the file) is only for messages.
    """
    raw = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, bytes) else raw
    if raw.size == 0 or raw.size % fidelity.RECORD_BYTES:
        raise DataError(f"{name}: {raw.size} bytes is not a whole number of "
                        f"{fidelity.RECORD_BYTES}-byte CIFAR-10 records")
    records = raw.reshape(-1, fidelity.RECORD_BYTES)
    labels = records[:, 0].astype(np.int32)
    bad = np.flatnonzero(labels >= fidelity.NUM_CLASSES)
    if bad.size:
        raise DataError(f"{name} is damaged or not a CIFAR-10 binary file: record {bad[0]} has "
                        f"label {labels[bad[0]]}, outside 0..{fidelity.NUM_CLASSES - 1}")
    planes = records[:, fidelity.LABEL_BYTES:].reshape(-1, fidelity.NUM_CHANNELS,
                                                       fidelity.HEIGHT, fidelity.WIDTH)
    return np.ascontiguousarray(planes.transpose(0, 2, 3, 1)), labels


def read_binary_file(path):
    """One official binary file -> (images uint8 (N,32,32,3), labels int32 (N,))."""
    if not os.path.isfile(path):
        raise DataError(f"missing CIFAR-10 file {path}")
    return decode_records(np.fromfile(path, dtype=np.uint8), path)


def read_binary_archive(path):
    """The official `cifar-10-binary.tar.gz`, read in memory: {file name: (images, labels)}."""
    import tarfile
    import zlib

    wanted = {f"{fidelity.BINARY_FOLDER}/{n}": n for n in fidelity.TRAIN_FILES + fidelity.TEST_FILES}
    found = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                name = wanted.get(member.name.removeprefix("./"))
                if name and member.isfile():
                    found[name] = decode_records(tar.extractfile(member).read(), f"{path}:{member.name}")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"{path} is not a readable {fidelity.ARCHIVE_NAME} archive, damaged or "
                        f"cut short ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    missing = [m for m, n in wanted.items() if n not in found]
    if missing:
        raise DataError(f"{path}: the archive lacks {missing[0]} (expected the official "
                        f"{fidelity.ARCHIVE_NAME} layout)")
    return found


def _load_binary(data_dir, seed):
    """The official binary release the original code read: the `cifar-10-batches-bin`
    folder, its parent, or the `cifar-10-binary.tar.gz` archive itself (seed unused)."""
    if data_dir and os.path.isfile(data_dir):
        parts = read_binary_archive(data_dir)
    else:
        folder = find_binary_folder(data_dir)
        parts = {n: read_binary_file(os.path.join(folder, n))
                 for n in fidelity.TRAIN_FILES + fidelity.TEST_FILES}

    def join(names):
        return (np.concatenate([parts[n][0] for n in names]),
                np.concatenate([parts[n][1] for n in names]))

    train_x, train_y = join(fidelity.TRAIN_FILES)
    test_x, test_y = join(fidelity.TEST_FILES)
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


def _load_synthetic(data_dir, seed):
    """Random images of CIFAR-10's sizes (the original `--use_synthetic_data`); no data_dir."""
    return synthetic_arrays(fidelity.NUM_TRAIN_IMAGES, fidelity.NUM_TEST_IMAGES, seed)


@dataclasses.dataclass(frozen=True)
class DataSource:
    """One choice of `--data_source`: load(data_dir, seed) -> `Arrays` of both splits,
    raising `DataError` for unusable data; description: one line for --help."""
    load: Callable
    description: str


SOURCES = {
    "tfds": DataSource(_load_tfds, "TFDS downloads and prepares CIFAR-10 once"),
    "binary": DataSource(_load_binary, "the official binary release"),
    "synthetic": DataSource(_load_synthetic, "random images, for smoke runs and benchmarks"),
}


# ----------------------------------------------------------------------------- what the data is

OFFICIAL = "official CIFAR-10"
NOT_OFFICIAL = "CIFAR-10 layout, not the official files"
UNVERIFIED = "CIFAR-10 layout, not verified as the official files"
SYNTHETIC = "synthetic random images"


def _sha256_file(path):
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def arrays_sha256(images, labels):
    """SHA-256 of a split as decoded: its labels (as uint8), then its images (uint8 N,32,32,3)."""
    import hashlib

    digest = hashlib.sha256(np.ascontiguousarray(labels, dtype=np.uint8).tobytes())
    digest.update(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    return digest.hexdigest()


def fingerprint(arrays, data_source, data_dir=None):
    """What a run's data is, for run_config.json: per split its size and the digest of its
    decoded arrays; the digests of the files read, where there are files; and whether it is
    the official release, with the name figures and tables give it:
    - tfds: TFDS checked its download of the official archive against ARCHIVE_SHA256: official;
    - binary, the archive: official when its SHA-256 is ARCHIVE_SHA256, else not;
    - binary, extracted files: their official digests are not known here, so "not verified";
    - synthetic: random images."""
    out = {"source": data_source}
    for split, images, labels in (("train", arrays.train_images, arrays.train_labels),
                                  ("test", arrays.test_images, arrays.test_labels)):
        out[split] = {"images": int(len(labels)), "arrays_sha256": arrays_sha256(images, labels)}
    if data_source == "tfds":
        out.update(official=True, name=OFFICIAL)
    elif data_source == "binary" and data_dir and os.path.isfile(data_dir):
        digest = _sha256_file(data_dir)
        out["files_sha256"] = {os.path.basename(data_dir): digest}
        official = digest == fidelity.ARCHIVE_SHA256
        out.update(official=official, name=OFFICIAL if official else NOT_OFFICIAL)
    elif data_source == "binary":
        folder = find_binary_folder(data_dir)
        out["files_sha256"] = {n: _sha256_file(os.path.join(folder, n))
                               for n in fidelity.TRAIN_FILES + fidelity.TEST_FILES}
        out.update(official=None, name=UNVERIFIED)
    else:
        out.update(official=False, name=SYNTHETIC)
    return out


def load_arrays(data_source, data_dir=None, seed=0):
    """The `Arrays` of source `data_source` of `SOURCES`."""
    if data_source not in SOURCES:
        raise DataError(f"unknown data source {data_source!r}: choose one of {', '.join(SOURCES)}")
    return SOURCES[data_source].load(data_dir, seed)


# ----------------------------------------------------------------------------- the pipeline: preprocessing

def preprocess_train(image, seed):
    """Pad 4 zero pixels on each side, random 32x32 crop, random flip, standardize.

    `seed` is a stateless seed (shape [2]); the same seed gives the same crop and flip.
    """
    import tensorflow as tf

    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = tf.image.resize_with_crop_or_pad(image, fidelity.PADDED_SIZE, fidelity.PADDED_SIZE)
    image = tf.image.stateless_random_crop(image, SHAPE, seed=crop_seed)
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    return tf.image.per_image_standardization(image)


def preprocess_test(image):
    import tensorflow as tf

    return tf.image.per_image_standardization(image)


# ----------------------------------------------------------------------------- datasets

def train_dataset(images, labels, batch_size, seed=0, start_step=0):
    """Endless batches of augmented training images, starting at batch `start_step`.

    Pass p over the data visits the images in the order of a permutation seeded by
    (seed, p); batches are consecutive slices of that stream (drop_remainder keeps
    shapes static for XLA). Starting at `start_step` skips exactly what the earlier
    steps consumed, so resumed runs see the same data as uninterrupted ones.
    """
    import tensorflow as tf

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
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def test_dataset(images, labels, batch_size, eval_steps=None):
    """The test set in order, standardized, cached after the first pass."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    ds = ds.map(lambda x, y: (preprocess_test(x), y), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
    ds = ds.batch(batch_size)
    if eval_steps:
        ds = ds.take(eval_steps)
    return ds.cache().prefetch(tf.data.AUTOTUNE)
