"""CIFAR-10 from TFDS and from the official archive, on a fresh machine.

The TFDS test runs TFDS's real preparation of `cifar10`: download manager, checksum
validation, extraction of the archive, example generation, TFRecord writing and
loading. Only the network is replaced: requests' transport hands over a tiny archive
in the official layout, and the builder's checksum registry lists that archive's
sha256 (TFDS would rightly refuse it under the real archive's checksum).
"""

import hashlib
import io
import socket
import tarfile

import numpy as np
import pytest
import requests

from resnet_cifar import cifar_data, fidelity
from tests import cifar_files
from tests.helpers import python


def expected_arrays(contents):
    def join(names):
        return (np.concatenate([contents[n][0] for n in names]),
                np.concatenate([contents[n][1] for n in names]).astype(np.int32))
    return join(fidelity.TRAIN_FILES), join(fidelity.TEST_FILES)


@pytest.fixture
def archive(tmp_path):
    path = tmp_path / fidelity.ARCHIVE_NAME
    return path, cifar_files.write_binary_archive(path, per_train_file=4, num_test=6)


def serve_archive(monkeypatch, archive_path):
    """Replace the network by one server holding the archive at its official URL."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download import checksums

    data = archive_path.read_bytes()
    requests_seen = []

    def send(adapter, request, **kwargs):
        requests_seen.append((request.method, request.url))
        if request.url != fidelity.ARCHIVE_URL:
            raise requests.exceptions.ConnectionError(f"no route to {request.url}")
        response = requests.Response()
        response.status_code, response.reason, response.url, response.request = 200, "OK", request.url, request
        response.headers = requests.structures.CaseInsensitiveDict({"Content-Length": str(len(data))})
        response.raw = io.BytesIO(b"" if request.method == "HEAD" else data)
        return response

    monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", send)
    # The builder's registered checksum, which TFDS validates the download against.
    monkeypatch.setattr(tfds.builder_cls("cifar10"), "url_infos", {
        fidelity.ARCHIVE_URL: checksums.UrlInfo(size=len(data), checksum=hashlib.sha256(data).hexdigest(),
                                                filename=fidelity.ARCHIVE_NAME)})
    return requests_seen


def test_tfds_prepares_cifar10_from_the_official_archive(tmp_path, archive, monkeypatch):
    path, contents = archive
    seen = serve_archive(monkeypatch, path)
    data_dir = tmp_path / "tfds"
    arrays = cifar_data.load_arrays("tfds", str(data_dir))

    assert ("GET", fidelity.ARCHIVE_URL) in seen                    # TFDS downloaded it itself
    assert list(data_dir.glob("cifar10/*/cifar10-train.tfrecord*"))  # and really prepared TFRecords
    (train_x, train_y), (test_x, test_y) = expected_arrays(contents)
    # TFDS keeps the records' order within each file; compare as sets of (label, image) pairs.
    for got_x, got_y, want_x, want_y in ((arrays.train_images, arrays.train_labels, train_x, train_y),
                                         (arrays.test_images, arrays.test_labels, test_x, test_y)):
        assert got_x.shape == want_x.shape and got_x.dtype == np.uint8
        key = lambda x, y: sorted(bytes([l]) + im.tobytes() for im, l in zip(x, y))  # noqa: E731
        assert key(got_x, got_y) == key(want_x, want_y)

    # The archive stays in TFDS's downloads: a lost preparation is redone without network.
    assert cifar_data._download_cached(data_dir)

    # Prepared once, loaded again without any network.
    seen.clear()
    monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", lambda *a, **k: pytest.fail("network used"))
    again = cifar_data.load_arrays("tfds", str(data_dir))
    np.testing.assert_array_equal(again.test_images, arrays.test_images)


def no_network(*args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


def test_no_network_is_one_line_naming_the_cause(tmp_path, monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(cifar_data.DataError) as e:
        cifar_data.load_arrays("tfds", str(tmp_path / "tfds"))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("cannot download CIFAR-10: no network")
    assert "--data_source=binary" in msg and fidelity.ARCHIVE_NAME in msg and "synthetic" in msg
    assert "not installed" not in msg


def test_a_real_connection_error_out_of_tfds_reads_as_no_network(monkeypatch):
    """The classification of an exception as TFDS's downloader raises it (requests, offline)."""
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(requests.exceptions.ConnectionError) as e:
        requests.get(fidelity.ARCHIVE_URL, timeout=5)
    msg = cifar_data.describe_tfds_error(e.value)
    assert msg.startswith("cannot download CIFAR-10: no network") and "gaierror" in msg
    broken = cifar_data.describe_tfds_error(ModuleNotFoundError("No module named 'x_y'", name="x_y.z"))
    assert broken.startswith("TensorFlow Datasets is not installed correctly") and "pip install x_y`" in broken
    other = cifar_data.describe_tfds_error(RuntimeError("disk full"))
    assert "no network" not in other and "disk full" in other


def run_train(args, prelude=""):
    """The entry point in a fresh process; `prelude` runs first (to break the machine)."""
    code = f"{prelude}\nimport sys\nfrom resnet_cifar import train\nsys.argv = ['train'] + {args!r}\ntrain.run()"
    return python("-c", code, log_level=2)


BLOCK_IMPORTLIB_RESOURCES = """
import importlib.abc, sys
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'importlib_resources':
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Missing())
"""

NO_NETWORK = """
import socket
def fail(*a, **k):
    raise socket.gaierror(socket.EAI_NONAME, 'Name or service not known')
socket.getaddrinfo = fail
"""


def test_broken_tfds_install_names_the_module_and_the_fix(tmp_path):
    """TFDS 4.9.10 without importlib_resources (its undeclared dependency): named before any
    download is tried, so even offline the message is about the install, not the network."""
    r = run_train([f"--model_dir={tmp_path / 'run'}", f"--data_dir={tmp_path / 'tfds'}"],
                  prelude=BLOCK_IMPORTLIB_RESOURCES + NO_NETWORK)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert lines[-1].startswith("error: TensorFlow Datasets is not installed correctly"), r.stderr
    assert "importlib_resources" in lines[-1] and "pip install importlib_resources" in lines[-1]
    assert "network" not in lines[-1] and "Traceback" not in r.stderr


def test_offline_first_run_ends_in_one_line(tmp_path):
    r = run_train([f"--model_dir={tmp_path / 'run'}", f"--data_dir={tmp_path / 'tfds'}"], prelude=NO_NETWORK)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert lines[-1].startswith("error: cannot download CIFAR-10: no network"), r.stderr
    assert not any("WARNING" in line or line.startswith("W1") for line in lines), r.stderr   # absl noise
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "tfds").exists() or not any((tmp_path / "tfds").rglob("*.tfrecord*"))


# ----------------------------------------------------------------------------- the archive itself

def test_binary_source_reads_the_official_archive(archive):
    path, contents = archive
    arrays = cifar_data.load_arrays("binary", str(path))
    (train_x, train_y), (test_x, test_y) = expected_arrays(contents)
    np.testing.assert_array_equal(arrays.train_images, train_x)   # file order, record order
    np.testing.assert_array_equal(arrays.train_labels, train_y)
    np.testing.assert_array_equal(arrays.test_images, test_x)
    np.testing.assert_array_equal(arrays.test_labels, test_y)
    # The same as the extracted folder gives.
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}   # Python >= 3.11.4
    with tarfile.open(path) as tar:
        tar.extractall(path.parent / "x", **safe)
    folder = cifar_data.load_arrays("binary", str(path.parent / "x"))
    np.testing.assert_array_equal(folder.train_images, arrays.train_images)


def rewrite(path, edit):
    """Rewrites the archive with `edit(name, data) -> data or None (drop)` applied to each member."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            data = edit(name, data)
            if data is not None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("case,expect", [
    ("missing member", "lacks cifar-10-batches-bin/data_batch_3.bin"),
    ("bad label", "has label 12"),
    ("truncated member", "is not a whole number"),
    ("truncated archive", "is not a readable cifar-10-binary.tar.gz archive"),
])
def test_bad_archives_are_one_line_errors(archive, case, expect):
    path, _ = archive
    if case == "missing member":
        rewrite(path, lambda n, d: None if n.endswith("data_batch_3.bin") else d)
    elif case == "bad label":
        rewrite(path, lambda n, d: bytes([12]) + d[1:] if n.endswith("test_batch.bin") else d)
    elif case == "truncated member":
        rewrite(path, lambda n, d: d[:-5] if n.endswith("data_batch_1.bin") else d)
    else:
        cifar_files.truncate(str(path), 200)
    with pytest.raises(cifar_data.DataError) as e:
        cifar_data.load_arrays("binary", str(path))
    assert expect in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- the registry

def fake_source(calls):
    """A source that records what load_arrays passed it and returns tiny arrays."""
    def load(data_dir, seed):
        calls.append((data_dir, seed))
        return cifar_data.synthetic_arrays(4, 2, seed)
    return cifar_data.DataSource(load, "a source added by the test")


def test_a_new_source_is_loaded_accepted_and_listed(monkeypatch):
    """One entry in cifar_data.SOURCES: load_arrays calls it, TrainConfig accepts its name,
    and the --data_source help lists it."""
    from resnet_cifar import config as config_lib

    calls = []
    monkeypatch.setitem(cifar_data.SOURCES, "fake", fake_source(calls))
    arrays = cifar_data.load_arrays("fake", "/some/dir", seed=7)
    assert calls == [("/some/dir", 7)]
    np.testing.assert_array_equal(arrays.train_images, cifar_data.synthetic_arrays(4, 2, 7).train_images)
    assert config_lib.TrainConfig(model_dir="/x", data_source="fake").data_source == "fake"
    assert "fake: a source added by the test" in config_lib.choices_help(config_lib.DATA_SOURCES)


@pytest.mark.parametrize("added", [False, True])
def test_unknown_source_error_lists_exactly_the_registered_names(monkeypatch, added):
    from resnet_cifar import config as config_lib

    if added:
        monkeypatch.setitem(cifar_data.SOURCES, "fake", fake_source([]))
    want = ["tfds", "binary", "synthetic"] + (["fake"] if added else [])
    with pytest.raises(cifar_data.DataError) as e:
        cifar_data.load_arrays("imagenet")
    message = str(e.value)
    assert "'imagenet'" in message and "\n" not in message
    assert message.split("choose one of ")[1].split(", ") == want
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.TrainConfig(model_dir="/x", data_source="imagenet")
    assert str(e.value).split("choose one of ")[1].split(", ") == want


# ----------------------------------------------------------------------------- the data names itself


def test_the_official_archive_checksum_is_tfds_own():
    """fidelity's ARCHIVE_SHA256 and size are the ones the installed TFDS checks its download
    of the official archive against (its url_checksums file, read here as text)."""
    import os

    import tensorflow_datasets as tfds

    path = os.path.join(os.path.dirname(tfds.__file__), "url_checksums", "cifar10.txt")
    rows = [line.split("\t") for line in open(path).read().splitlines() if line.strip()]
    row = [r for r in rows if r[0] == fidelity.ARCHIVE_URL]
    assert row and int(row[0][1]) == fidelity.ARCHIVE_BYTES and row[0][2] == fidelity.ARCHIVE_SHA256, rows


def hand_arrays_sha256(contents, names):
    """The digest of a split by hand: its files' label bytes, then their R,G,B planes as HWC."""
    labels = b"".join(np.asarray(contents[n][1], np.uint8).tobytes() for n in names)
    images = b"".join(np.asarray(contents[n][0], np.uint8).tobytes() for n in names)
    return hashlib.sha256(labels + images).hexdigest()


def test_fingerprint_of_extracted_files_is_not_verified(tmp_path):
    import os

    contents = {}
    folder = cifar_files.write_binary_cifar(str(tmp_path), per_train_file=4, num_test=6)
    for name in fidelity.TRAIN_FILES + fidelity.TEST_FILES:
        with open(os.path.join(folder, name), "rb") as f:
            raw = np.frombuffer(f.read(), np.uint8).reshape(-1, fidelity.RECORD_BYTES)
        contents[name] = (raw[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), raw[:, 0])
    arrays = cifar_data.load_arrays("binary", str(tmp_path))
    fp = cifar_data.fingerprint(arrays, "binary", str(tmp_path))
    assert fp["train"] == {"images": 20, "arrays_sha256": hand_arrays_sha256(contents, fidelity.TRAIN_FILES)}
    assert fp["test"] == {"images": 6, "arrays_sha256": hand_arrays_sha256(contents, fidelity.TEST_FILES)}
    for name, digest in fp["files_sha256"].items():
        with open(os.path.join(folder, name), "rb") as f:
            assert digest == hashlib.sha256(f.read()).hexdigest(), name
    assert fp["official"] is None and fp["name"] == "CIFAR-10 layout, not verified as the official files"


def test_fingerprint_of_an_archive_is_official_only_with_the_official_checksum(archive, monkeypatch):
    path, contents = archive
    arrays = cifar_data.load_arrays("binary", str(path))
    fp = cifar_data.fingerprint(arrays, "binary", str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert fp["files_sha256"] == {fidelity.ARCHIVE_NAME: digest}
    assert fp["official"] is False and fp["name"] == "CIFAR-10 layout, not the official files"
    assert fp["train"]["arrays_sha256"] == hand_arrays_sha256(contents, fidelity.TRAIN_FILES)
    monkeypatch.setattr(fidelity, "ARCHIVE_SHA256", digest)        # as if this were the release
    fp = cifar_data.fingerprint(arrays, "binary", str(path))
    assert fp["official"] is True and fp["name"] == "official CIFAR-10"


def test_a_run_records_its_data_and_record_data_adds_it_to_older_runs(tmp_path):
    """A trained run's run_config.json names its data; analysis.record_data adds the same to a
    run that lacks it (nothing else changed), repeats harmlessly, and refuses other data."""
    import json
    import os
    import shutil

    from tests.helpers import train_small

    data_dir = str(tmp_path / "data")
    cifar_files.write_binary_cifar(data_dir, per_train_file=16, num_test=16)
    run = tmp_path / "run"
    r = train_small(run, "--data_source=binary", f"--data_dir={data_dir}")
    assert r.returncode == 0, r.stderr[-3000:]
    recorded = json.loads((run / "run_config.json").read_text())["data"]
    want = cifar_data.fingerprint(cifar_data.load_arrays("binary", data_dir), "binary", data_dir)
    assert recorded == want and recorded["train"]["images"] == 80
    old = tmp_path / "old"
    shutil.copytree(run, old)
    payload = json.loads((old / "run_config.json").read_text())
    del payload["data"]
    (old / "run_config.json").write_text(json.dumps(payload))
    for _ in range(2):
        r = python("-m", "analysis.record_data", str(old), "--data_source=binary", f"--data_dir={data_dir}")
        assert r.returncode == 0, r.stderr[-2000:]
        assert json.loads((old / "run_config.json").read_text()) == dict(payload, data=want)
    other = str(tmp_path / "other")
    cifar_files.write_binary_cifar(other, per_train_file=16, num_test=16, seed=5)
    r = python("-m", "analysis.record_data", str(old), "--data_source=binary", f"--data_dir={other}")
    assert r.returncode == 2 and "records other data" in r.stderr, r.stderr
    assert os.path.exists(old / "run_config.json")
