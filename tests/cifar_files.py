"""Tiny CIFAR-10 files in the official binary layout, for tests that need real files."""

import os

import numpy as np

from resnet_cifar import fidelity


def encode_records(images, labels):
    """(N,32,32,3) uint8 + labels -> bytes: 1 label byte, then the R, G, B planes."""
    planes = np.asarray(images, np.uint8).transpose(0, 3, 1, 2).reshape(len(labels), -1)
    return np.concatenate([np.asarray(labels, np.uint8)[:, None], planes], axis=1).tobytes()


def learnable_arrays(n, seed):
    """Images whose mean colour encodes the label, plus noise: a few steps can learn them."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, fidelity.NUM_CLASSES, n)
    base = (labels[:, None, None, None] * 25 + rng.integers(0, 20, (n, 1, 1, 3))).astype(np.int32)
    noise = rng.integers(-20, 20, (n, 32, 32, 3))
    return np.clip(base + noise + 10, 0, 255).astype(np.uint8), labels.astype(np.int32)


def write_binary_cifar(parent, per_train_file=64, num_test=64, seed=0):
    """Writes parent/cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin; returns the folder."""
    folder = os.path.join(parent, fidelity.BINARY_FOLDER)
    os.makedirs(folder, exist_ok=True)
    for i, name in enumerate(fidelity.TRAIN_FILES):
        images, labels = learnable_arrays(per_train_file, seed + i)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(encode_records(images, labels))
    images, labels = learnable_arrays(num_test, seed + 100)
    with open(os.path.join(folder, fidelity.TEST_FILES[0]), "wb") as f:
        f.write(encode_records(images, labels))
    return folder


def set_record_label(path, record, label):
    """Overwrites the label byte of one record of an official binary file in place."""
    with open(path, "r+b") as f:
        f.seek(record * fidelity.RECORD_BYTES)
        f.write(bytes([label]))


def truncate(path, drop_bytes):
    """Cuts the last `drop_bytes` bytes off a file (a half-copied download)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(max(size - drop_bytes, 0))


CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck")


def write_binary_archive(path, per_train_file=4, num_test=4, seed=0):
    """A tiny `cifar-10-binary.tar.gz` in the official layout (cifar-10-batches-bin/ with the
    five train files, the test file and batches.meta.txt). Returns {file name: (images, labels)}."""
    import io
    import tarfile

    contents = {}
    for i, name in enumerate(fidelity.TRAIN_FILES):
        contents[name] = learnable_arrays(per_train_file, seed + i)
    contents[fidelity.TEST_FILES[0]] = learnable_arrays(num_test, seed + 100)
    files = {name: encode_records(*arrays) for name, arrays in contents.items()}
    files["batches.meta.txt"] = ("\n".join(CLASS_NAMES) + "\n\n").encode()
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{fidelity.BINARY_FOLDER}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return contents
