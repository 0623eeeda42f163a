"""Tests of the CIFAR-10 input pipeline: the three sources, preprocessing, resumable order.

No network and no real CIFAR-10: binary files are fabricated in the official
layout with a few records each, TFDS is mocked (or made to fail), and the
datasets run on a handful of tiny images. Expectations are recomputed with
NumPy, independently of resnet_cifar/cifar_data.py.
"""

import os

import numpy as np
import pytest
import tensorflow as tf

from resnet_cifar import cifar_data
from resnet_cifar.cifar_data import DataError

TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]   # written out, not read from fidelity
TEST_FILE = "test_batch.bin"
FOLDER = "cifar-10-batches-bin"
N_PIXELS = 32 * 32 * 3


# ----------------------------------------------------------------------------- helpers

def known_image(file_index, record):
    """A (32, 32, 3) uint8 image whose R, G and B planes all differ."""
    h = np.arange(32)[:, None]
    w = np.arange(32)[None, :]
    planes = [(h * 7 + w * 3 + 11 * file_index + 5 * record + 1) % 256,   # R
              (h * 5 + 2 * w + 200 + 13 * file_index + 3 * record) % 256,  # G
              (255 - h - w - 17 * file_index - 7 * record) % 256]          # B
    return np.stack(planes, axis=-1).astype(np.uint8)


def record_bytes(label, image):
    """Official layout: 1 label byte, then the 1024 R, 1024 G, 1024 B bytes (row-major)."""
    out = bytearray([label])
    for c in range(3):
        for row in range(32):
            for col in range(32):
                out.append(int(image[row, col, c]))
    assert len(out) == 3073
    return bytes(out)


def write_cifar_binary(parent, records_per_file=(2, 3, 4, 2, 3), test_records=3):
    """Writes parent/cifar-10-batches-bin/*.bin; returns the expected arrays."""
    folder = os.path.join(parent, FOLDER)
    os.makedirs(folder, exist_ok=True)
    expected = {"train_images": [], "train_labels": [], "test_images": [], "test_labels": []}
    names = TRAIN_FILES + [TEST_FILE]
    counts = list(records_per_file) + [test_records]
    for f, (name, count) in enumerate(zip(names, counts)):
        split = "test" if name == TEST_FILE else "train"
        data = b""
        for r in range(count):
            label = (3 * f + r) % 10
            image = known_image(f, r)
            data += record_bytes(label, image)
            expected[f"{split}_images"].append(image)
            expected[f"{split}_labels"].append(label)
        with open(os.path.join(folder, name), "wb") as fh:
            fh.write(data)
    return folder, {k: np.array(v) for k, v in expected.items()}


def assert_one_line_error(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message.strip(), message
    assert message.strip(), "empty message"
    for needle in needles:
        assert str(needle) in message, (needle, message)
    return message


def np_standardize(image):
    """(x - mean) / max(std, 1/sqrt(N)) over the whole image, in float64."""
    x = np.asarray(image, np.float64)
    return (x - x.mean()) / max(x.std(), 1.0 / np.sqrt(x.size))


def candidate_windows(image):
    """All 81 crop offsets x 2 flips of the 40x40 zero-padded image, standardized.

    Returns (windows (162, 32, 32, 3), [(dy, dx, flipped)]).
    """
    padded = np.zeros((40, 40, 3), np.float64)
    padded[4:36, 4:36] = image
    windows, keys = [], []
    for dy in range(9):
        for dx in range(9):
            window = padded[dy:dy + 32, dx:dx + 32]
            for flipped in (False, True):
                windows.append(np_standardize(window[:, ::-1] if flipped else window))
                keys.append((dy, dx, flipped))
    return np.stack(windows), keys


def match_window(output, windows, keys):
    """The (dy, dx, flipped) whose standardized window equals output, or None."""
    err = np.max(np.abs(windows - np.asarray(output, np.float64)[None]), axis=(1, 2, 3))
    best = int(np.argmin(err))
    return keys[best] if err[best] < 1e-4 else None


def tiny_data(num=10, seed=0):
    """num random uint8 images (no zero pixels) with unique labels 0..num-1."""
    rng = np.random.default_rng(seed)
    images = rng.integers(1, 256, (num, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(num, dtype=np.int32)
    return images, labels


def take(ds, n):
    return [(x.numpy(), y.numpy()) for x, y in ds.take(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa, xb)


# ----------------------------------------------------------------------------- binary source

def test_record_layout_helper_is_the_official_one():
    # Cross-check the writer on one byte by hand: record = label, R plane, G plane, B plane.
    image = known_image(0, 0)
    raw = record_bytes(4, image)
    assert raw[0] == 4
    assert raw[1 + 0 * 1024 + 1 * 32 + 2] == image[1, 2, 0]        # R at row 1, col 2
    assert raw[1 + 1 * 1024 + 31 * 32 + 0] == image[31, 0, 1]       # G at row 31, col 0
    assert raw[1 + 2 * 1024 + 5 * 32 + 7] == image[5, 7, 2]         # B at row 5, col 7
    assert len({int(image[3, 4, c]) for c in range(3)}) == 3


@pytest.mark.parametrize("which", ["parent", "folder"])
def test_binary_loader_decodes_exact_pixels_in_file_order(tmp_path, which):
    folder, expected = write_cifar_binary(str(tmp_path))
    data_dir = str(tmp_path) if which == "parent" else folder
    arrays = cifar_data.load_arrays("binary", data_dir)
    assert arrays.train_images.dtype == np.uint8 and arrays.test_images.dtype == np.uint8
    assert arrays.train_labels.dtype == np.int32 and arrays.test_labels.dtype == np.int32
    assert arrays.train_images.shape == (14, 32, 32, 3)
    assert arrays.test_images.shape == (3, 32, 32, 3)
    for key, value in expected.items():
        np.testing.assert_array_equal(getattr(arrays, key), value, err_msg=key)
    # Spot checks written out: file 1 (data_batch_2), record 0 is the third train image.
    assert arrays.train_labels[2] == 3
    assert tuple(arrays.train_images[2, 0, 0]) == (12, (200 + 13) % 256, (255 - 17) % 256)
    assert arrays.test_labels.tolist() == [5, 6, 7]     # f = 5: (15 + r) % 10


def test_binary_loader_accepts_pathlike(tmp_path):
    write_cifar_binary(str(tmp_path))
    arrays = cifar_data.load_arrays("binary", tmp_path)
    assert len(arrays.train_labels) == 14


def test_binary_truncated_file(tmp_path):
    folder, _ = write_cifar_binary(str(tmp_path))
    path = os.path.join(folder, "data_batch_2.bin")
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:
        fh.write(data[:-3])
    with pytest.raises(DataError) as excinfo:
        cifar_data.load_arrays("binary", str(tmp_path))
    assert_one_line_error(excinfo, path)


def test_binary_empty_file(tmp_path):
    folder, _ = write_cifar_binary(str(tmp_path))
    path = os.path.join(folder, "data_batch_4.bin")
    open(path, "wb").close()
    with pytest.raises(DataError) as excinfo:
        cifar_data.load_arrays("binary", str(tmp_path))
    assert_one_line_error(excinfo, path)


def test_binary_missing_train_file(tmp_path):
    folder, _ = write_cifar_binary(str(tmp_path))
    path = os.path.join(folder, "data_batch_3.bin")
    os.remove(path)
    with pytest.raises(DataError) as excinfo:
        cifar_data.load_arrays("binary", str(tmp_path))
    assert_one_line_error(excinfo, "data_batch_3.bin")


@pytest.mark.parametrize("bad_label", [10, 255])
def test_binary_label_out_of_range(tmp_path, bad_label):
    folder, _ = write_cifar_binary(str(tmp_path))
    path = os.path.join(folder, "test_batch.bin")
    with open(path, "r+b") as fh:
        fh.seek(3073)            # label byte of record 1
        fh.write(bytes([bad_label]))
    with pytest.raises(DataError) as excinfo:
        cifar_data.load_arrays("binary", str(tmp_path))
    assert_one_line_error(excinfo, path, bad_label)


def test_binary_data_dir_without_files(tmp_path):
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    with pytest.raises(DataError) as excinfo:
        cifar_data.load_arrays("binary", str(empty))
    assert_one_line_error(excinfo, str(empty))


def test_binary_data_dir_missing_folder(tmp_path):
    missing = str(tmp_path / "does_not_exist")
    with pytest.raises(DataError) as excinfo:
        cifar_data.load_arrays("binary", missing)
    assert_one_line_error(excinfo, missing)


def test_binary_data_dir_none():
    with pytest.raises(DataError) as excinfo:
        cifar_data.load_arrays("binary", None)
    assert_one_line_error(excinfo, "--data_dir")


def test_unknown_source():
    with pytest.raises(DataError) as excinfo:
        cifar_data.load_arrays("imagenet")
    assert_one_line_error(excinfo, "imagenet")


# ----------------------------------------------------------------------------- synthetic source

def test_synthetic_arrays_shapes_dtypes_and_determinism():
    a = cifar_data.synthetic_arrays(12, 5, seed=3)
    b = cifar_data.synthetic_arrays(12, 5, seed=3)
    c = cifar_data.synthetic_arrays(12, 5, seed=4)
    assert a.train_images.shape == (12, 32, 32, 3) and a.test_images.shape == (5, 32, 32, 3)
    assert a.train_labels.shape == (12,) and a.test_labels.shape == (5,)
    assert a.train_images.dtype == np.uint8 and a.test_images.dtype == np.uint8
    assert a.train_labels.dtype == np.int32 and a.test_labels.dtype == np.int32
    for key in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
        assert 0 <= getattr(a, key).min() and getattr(a, key).max() <= (
            255 if "images" in key else 9)
    assert not np.array_equal(a.train_images, c.train_images)


def test_load_arrays_synthetic_has_cifar_sizes():
    arrays = cifar_data.load_arrays("synthetic", seed=1)
    assert arrays.train_images.shape == (50_000, 32, 32, 3)
    assert arrays.test_images.shape == (10_000, 32, 32, 3)
    assert arrays.train_labels.shape == (50_000,) and arrays.test_labels.shape == (10_000,)
    assert arrays.train_images.dtype == np.uint8 and arrays.train_labels.dtype == np.int32
    assert set(np.unique(arrays.test_labels).tolist()) == set(range(10))


# ----------------------------------------------------------------------------- TFDS source

def test_tfds_mocked(monkeypatch, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from tensorflow_datasets.core import splits as splits_lib
    # tfds.load(batch_size=-1) batches by info.splits.total_num_examples, which is
    # 0 under mock_data without the (not shipped) metadata files; tfds then uses
    # padded_batch(sys.maxsize) and the process aborts with std::length_error.
    # Give the mocked splits a size; the real dataset_info has 60,000.
    monkeypatch.setattr(splits_lib.SplitDict, "total_num_examples", property(lambda self: 64))
    monkeypatch.setattr(cifar_data, "_check_network", lambda url: None)   # mock_data needs none
    with tfds.testing.mock_data(num_examples=6):
        arrays = cifar_data.load_arrays("tfds", str(tmp_path))
    assert arrays.train_images.shape == (6, 32, 32, 3)
    assert arrays.test_images.shape == (6, 32, 32, 3)
    assert arrays.train_labels.shape == (6,) and arrays.test_labels.shape == (6,)
    assert arrays.train_images.dtype == np.uint8 and arrays.test_images.dtype == np.uint8
    assert arrays.train_labels.dtype == np.int32 and arrays.test_labels.dtype == np.int32
    assert arrays.train_labels.min() >= 0 and arrays.train_labels.max() <= 9


@pytest.mark.parametrize("error", [
    OSError("Network is unreachable\nwhile fetching https://www.cs.toronto.edu/..."),
    ConnectionError("Failed to establish a new connection"),
    RuntimeError(""),
])
def test_tfds_download_failure(monkeypatch, tmp_path, error):
    tfds = pytest.importorskip("tensorflow_datasets")

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(tfds, "load", fail)
    monkeypatch.setattr(cifar_data, "_check_network", lambda url: None)   # the network answers
    with pytest.raises(DataError) as excinfo:
        cifar_data.load_arrays("tfds", str(tmp_path))
    message = assert_one_line_error(excinfo, "--data_source=binary", "synthetic",
                                    type(error).__name__)
    if isinstance(error, OSError) and not isinstance(error, ConnectionError):
        assert "Network is unreachable" in message and "fetching" not in message


# ----------------------------------------------------------------------------- preprocessing

def test_per_image_standardization_matches_numpy():
    rng = np.random.default_rng(5)
    nearly_flat = np.zeros((32, 32, 3), np.uint8)
    nearly_flat[7, 9, 1] = 1                  # std 0.018039, just under 1/sqrt(3072) = 0.018042
    tiny = np.zeros((32, 32, 3), np.float32)
    tiny[7, 9, 1] = 0.01                      # std 1.8e-4: far under the floor
    images = [
        rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
        np.full((32, 32, 3), 200, np.uint8),  # std 0 -> all zeros, no NaN
        nearly_flat,
        tiny,
    ]
    for image in images:
        got = cifar_data.preprocess_test(tf.constant(image)).numpy()
        assert got.dtype == np.float32 and got.shape == (32, 32, 3)
        np.testing.assert_allclose(got, np_standardize(image), rtol=1e-4, atol=1e-5)
    # The floor: deviations are divided by 1/sqrt(N), not by the (much smaller) std,
    # which would give about 55 here instead of 0.55.
    got = cifar_data.preprocess_test(tf.constant(tiny)).numpy()
    assert got[7, 9, 1] == pytest.approx(0.01 * (1 - 1 / N_PIXELS) * np.sqrt(N_PIXELS), rel=1e-4)
    # uint8 input is standardized in pixel units (0..255), as the original cast to
    # float32 first; a conversion to [0, 1] would make the floor bite on ordinary images.
    low_contrast = (100 + rng.integers(0, 3, (32, 32, 3))).astype(np.uint8)   # std ~0.8
    got = cifar_data.preprocess_test(tf.constant(low_contrast)).numpy()
    assert float(got.std()) == pytest.approx(1.0, rel=1e-3)


def test_preprocess_train_is_a_window_of_the_padded_image():
    rng = np.random.default_rng(7)
    image = rng.integers(1, 256, (32, 32, 3), dtype=np.uint8)   # no zeros: padding is visible
    windows, keys = candidate_windows(image)
    seen = set()
    for s in range(120):
        out = cifar_data.preprocess_train(tf.constant(image), tf.constant([s, 17], tf.int64))
        out = out.numpy()
        assert out.shape == (32, 32, 3) and out.dtype == np.float32
        key = match_window(out, windows, keys)
        assert key is not None, f"seed {s}: output is no standardized window of the padded image"
        seen.add(key)
    offsets = {(dy, dx) for dy, dx, _ in seen}
    # 120 draws over 81 offsets: about 62 distinct expected; > 20 can only fail if
    # the crop is (nearly) fixed. Both flip states must occur.
    assert len(offsets) > 20
    assert {f for _, _, f in seen} == {False, True}
    # Every row and column offset 0..8 occurs, so the padding is the full 4 pixels
    # (a 36x36 pad would only reach offsets 2..6). A given offset is missed by 120
    # uniform draws with probability (8/9)^120 < 1e-6.
    assert {dy for dy, _ in offsets} == set(range(9))
    assert {dx for _, dx in offsets} == set(range(9))
    # Same seed, same crop and flip.
    a = cifar_data.preprocess_train(tf.constant(image), tf.constant([3, 4], tf.int64))
    b = cifar_data.preprocess_train(tf.constant(image), tf.constant([3, 4], tf.int64))
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_preprocess_train_constant_image_crops_stay_inside():
    image = np.full((32, 32, 3), 200, np.uint8)
    windows, keys = candidate_windows(image)
    for s in range(40):
        out = cifar_data.preprocess_train(tf.constant(image), tf.constant([s, 0], tf.int64))
        assert match_window(out.numpy(), windows, keys) is not None, s


# ----------------------------------------------------------------------------- test dataset

def test_test_dataset_in_order_standardized_and_deterministic():
    images, labels = tiny_data(10, seed=1)
    ds = cifar_data.test_dataset(images, labels, batch_size=4)
    first = take(ds, 100)
    second = take(ds, 100)
    assert_batches_equal(first, second)
    assert [len(y) for _, y in first] == [4, 4, 2]
    xs = np.concatenate([x for x, _ in first])
    ys = np.concatenate([y for _, y in first])
    np.testing.assert_array_equal(ys, labels)
    expected = np.stack([np_standardize(im) for im in images])
    np.testing.assert_allclose(xs, expected, rtol=1e-4, atol=1e-5)
    assert xs.dtype == np.float32


def test_test_dataset_eval_steps():
    images, labels = tiny_data(10, seed=2)
    ds = cifar_data.test_dataset(images, labels, batch_size=4, eval_steps=2)
    batches = take(ds, 100)
    assert len(batches) == 2
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), labels[:8])
    assert len(take(ds, 100)) == 2      # and again, after the cache is filled


# ----------------------------------------------------------------------------- train dataset

def test_train_dataset_batches_shapes_and_standardization():
    images, labels = tiny_data(10, seed=3)
    ds = cifar_data.train_dataset(images, labels, batch_size=4, seed=0)
    windows = [candidate_windows(im) for im in images]
    for x, y in take(ds, 3):
        assert x.shape == (4, 32, 32, 3) and x.dtype == np.float32
        assert y.shape == (4,) and y.dtype == np.int32
        for image, label in zip(x, y):
            assert abs(float(image.mean())) < 1e-4
            assert float(image.std()) == pytest.approx(1.0, rel=1e-3)
            # The image really is an augmented view of the image with that label.
            assert match_window(image, *windows[label]) is not None


def test_train_dataset_seed_determinism():
    images, labels = tiny_data(10, seed=4)
    a = take(cifar_data.train_dataset(images, labels, 4, seed=1), 4)
    b = take(cifar_data.train_dataset(images, labels, 4, seed=1), 4)
    c = take(cifar_data.train_dataset(images, labels, 4, seed=2), 4)
    assert_batches_equal(a, b)
    assert not all(np.array_equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))
    assert not all(np.array_equal(ya, yc) for (_, ya), (_, yc) in zip(a, c))


@pytest.mark.parametrize("start_step", [1, 2, 3, 5, 7])
def test_train_dataset_resume_matches_uninterrupted_stream(start_step):
    # 10 images, batch 4: step 2 starts 8 images in (its batch crosses into pass 1),
    # step 3 starts inside pass 1 (12 = 10 + 2), step 5 exactly at pass 2 (20).
    images, labels = tiny_data(10, seed=5)
    full = cifar_data.train_dataset(images, labels, 4, seed=9)
    resumed = cifar_data.train_dataset(images, labels, 4, seed=9, start_step=start_step)
    assert_batches_equal(take(full.skip(start_step), 3), take(resumed, 3))


def test_train_dataset_every_pass_is_a_permutation():
    images, labels = tiny_data(10, seed=6)
    batches = take(cifar_data.train_dataset(images, labels, 4, seed=3), 10)   # 4 passes
    stream = np.concatenate([y for _, y in batches])
    assert len(stream) == 40
    passes = stream.reshape(4, 10)
    for p in passes:
        assert sorted(p.tolist()) == list(range(10)), p
    assert len({tuple(p) for p in passes}) > 1           # reshuffled every pass


def test_train_dataset_fewer_images_than_a_batch():
    images, labels = tiny_data(3)
    with pytest.raises(DataError) as excinfo:
        cifar_data.train_dataset(images, labels, batch_size=4)
    assert_one_line_error(excinfo, "3", "4")


def test_train_dataset_exactly_one_batch():
    images, labels = tiny_data(4)
    batches = take(cifar_data.train_dataset(images, labels, batch_size=4, seed=0), 3)
    for _, y in batches:
        assert sorted(y.tolist()) == [0, 1, 2, 3]
