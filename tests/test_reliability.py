"""Reliability of the training program: kills, resumes, divergence, guarded run folders, bad data.

Every training here is tiny (3 epochs of 3 steps of 16 images, one test batch) and
goes through the real entry point (`python -m resnet_cifar.train`) in a subprocess,
except where a fault has to be injected inside the process (a kill in the middle
of a checkpoint write, a full disk). A failing run must exit with its code, say
what went wrong in exactly one `error: ` line on stderr (TensorFlow's own start-up
lines aside), and leave whatever was already on disk as it was.
"""

import collections
import csv
import functools
import glob
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types

import numpy as np
import pytest

from resnet_cifar import callbacks, checkpoints, events, process, run_dir, tags
from resnet_cifar import config as config_lib
from tests.cifar_files import set_record_label, truncate, write_binary_cifar
from tests.helpers import (ROOT, assert_same_curves, curves, env, meaningful, one_error_line, python, snapshot,
                           tmpfs, train_cli, with_xla)

EPOCHS = 3
# The same run as flags (for the CLI) and as a TrainConfig (for in-process drivers).
# 12 steps per epoch: the SIGKILL sent on "epoch 1/3" must land while epoch 2 still
# runs, so an epoch must outlast the test's reaction time even on a loaded machine.
RUN = dict(data_source="binary", train_epochs=EPOCHS, steps_per_epoch=12, batch_size=16, eval_steps=1,
           boundary_epochs=(2,), decay_rates=(1, 0.1), seed=1, deterministic=True, verbose=2)
CKPT_RE = re.compile(r"ckpt-(\d+)\.")
LOG_LEVEL = 1   # TensorFlow's C++ log level in the training processes here
run_cli = functools.partial(train_cli, log_level=LOG_LEVEL)


# ----------------------------------------------------------------------------- helpers


def train_args(model_dir, data_dir, **overrides):
    """Flags of RUN (or overrides) for `python -m resnet_cifar.train`."""
    values = dict(RUN, model_dir=model_dir, data_dir=data_dir)
    values.update(overrides)
    out = []
    for name, value in values.items():
        if isinstance(value, bool):
            out.append(f"--{name}" if value else f"--no{name}")
        elif isinstance(value, tuple):
            out.append(f"--{name}={','.join(f'{v:g}' for v in value)}")
        else:
            out.append(f"--{name}={value}")
    return with_xla(out)


def copy_run(src, dst, finished=True):
    shutil.copytree(src, dst)
    if not finished:
        os.remove(os.path.join(dst, tags.DONE_FILE))
    return str(dst)


def checkpoint_numbers(model_dir):
    """Numbers of the checkpoints whose files exist on disk."""
    names = os.listdir(os.path.join(model_dir, run_dir.CHECKPOINTS))
    return sorted({int(m.group(1)) for m in map(CKPT_RE.match, names) if m})


def checkpoint_tensors(prefix):
    import tensorflow as tf

    reader = tf.train.load_checkpoint(prefix)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name not in ("_CHECKPOINTABLE_OBJECT_GRAPH", checkpoints.IDENTITY_KEY)}


def latest_checkpoint(model_dir, folder=run_dir.CHECKPOINTS):
    """The name (ckpt-N) of the checkpoint the index file of model_dir/folder names."""
    import tensorflow as tf

    return os.path.basename(tf.train.latest_checkpoint(os.path.join(model_dir, folder)))


def assert_same_weights(dir_a, dir_b):
    """The latest checkpoints of two runs hold bitwise-identical variables (and the same names)."""
    assert latest_checkpoint(dir_a) == latest_checkpoint(dir_b) == f"ckpt-{EPOCHS}"
    a, b = [checkpoint_tensors(os.path.join(d, run_dir.CHECKPOINTS, f"ckpt-{EPOCHS}")) for d in (dir_a, dir_b)]
    assert sorted(a) == sorted(b)
    # Model weights, BN moving statistics, momentum accumulators, iteration and epoch counters.
    assert len(a) > 100 and any(n.startswith("optimizer/") for n in a), sorted(a)
    assert any("moving_mean" in n for n in a), sorted(a)
    differ = [n for n in a if a[n].dtype != b[n].dtype or a[n].shape != b[n].shape
              or a[n].tobytes() != b[n].tobytes()]
    # and the same run identity (checkpoints.py): the same seed and settings
    assert len({checkpoints.identity_of(os.path.join(d, run_dir.CHECKPOINTS, f"ckpt-{EPOCHS}"))
                for d in (dir_a, dir_b)}) == 1
    assert not differ, f"{len(differ)} of {len(a)} variables differ, e.g. {differ[:5]}"


def assert_every_epoch_once(c, epochs=EPOCHS):
    """Weight-based tags at 0..epochs (0: the initial state), the rest at 1..epochs."""
    assert list(c[tags.TRAIN_DIR, tags.CONV_SQSUM][0]) == list(range(epochs + 1))
    assert list(c[tags.TRAIN_DIR, tags.EPOCH_LOSS][0]) == list(range(1, epochs + 1))
    assert list(c[tags.VALIDATION_DIR, tags.EPOCH_ACCURACY][0]) == list(range(1, epochs + 1))
    for (subdir, tag), (steps, _) in c.items():
        if tag.endswith("_vs_iterations"):   # Keras' evaluation_*_vs_iterations: step = train steps
            assert list(steps) == [e * RUN["steps_per_epoch"] for e in range(1, epochs + 1)], (tag, steps)
        else:
            assert list(steps) in (list(range(epochs + 1)), list(range(1, epochs + 1))), (tag, steps)


def raw_events(model_dir, subdir):
    """tag -> [(step, value), ...] of every event in the files, duplicates included."""
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.util import tensor_util

    acc = ea.EventAccumulator(os.path.join(model_dir, subdir), size_guidance={ea.TENSORS: 0},
                              purge_orphaned_data=False)
    acc.Reload()
    return {tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
            for tag in acc.Tags()[ea.TENSORS]
            if acc.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"}   # not the layout


def duplicated_epochs(model_dir):
    """{epoch: [(subdir, tag, values)]} of the epochs logged more than once for a tag."""
    dup = collections.defaultdict(list)
    for subdir in (tags.TRAIN_DIR, tags.VALIDATION_DIR):
        for tag, evs in raw_events(model_dir, subdir).items():
            if tag.endswith("_vs_iterations"):   # logged at the train step, not the epoch
                evs = [(step / RUN["steps_per_epoch"], v) for step, v in evs]
            counts = collections.Counter(step for step, _ in evs)
            for step, n in counts.items():
                if n > 1:
                    dup[step].append((subdir, tag, [v for s, v in evs if s == step]))
    return dict(dup)


def run_until_line(args, prefix, err_path, timeout=240, sig=signal.SIGKILL):
    """Starts training, reads stdout line by line, sends `sig` right after a line starting `prefix`."""
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "resnet_cifar.train", *args], cwd=ROOT, env=env(LOG_LEVEL),
                                stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)
    lines = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen, deadline, killed = [], time.monotonic() + timeout, False
    try:
        while True:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                pytest.fail(f"no {prefix!r} line within {timeout}s; stdout so far: {''.join(seen)[-2000:]}")
            if line is None:
                pytest.fail(f"training ended before {prefix!r}: {''.join(seen)[-2000:]}"
                            f"{open(err_path).read()[-2000:]}")
            seen.append(line)
            if line.startswith(prefix):
                proc.send_signal(sig)
                killed = True
                break
    finally:
        if not killed and proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    return proc.returncode, seen


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Tiny learnable CIFAR-10 binary files (80 train, 32 test images)."""
    parent = tmp_path_factory.mktemp("data")
    write_binary_cifar(str(parent), per_train_file=16, num_test=32)
    return str(parent)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted deterministic run every other run is compared with (never modified)."""
    model_dir = str(tmp_path_factory.mktemp("reference") / "run")
    r = run_cli(*train_args(model_dir, data))
    assert r.returncode == 0, r.stderr[-3000:]
    assert not meaningful(r.stderr), r.stderr[-3000:]
    assert [line.split(" | ")[0] for line in r.stdout.splitlines() if line.startswith("epoch ")] == \
        [f"epoch {e}/{EPOCHS}" for e in range(1, EPOCHS + 1)]
    return model_dir


@pytest.fixture
def held_run(reference, tmp_path):
    """A copy of the reference run stopped after its last checkpoint but before done.json."""
    return copy_run(reference, tmp_path / "held", finished=False)


@pytest.fixture
def finished_run(reference, tmp_path):
    return copy_run(reference, tmp_path / "finished")


# ----------------------------------------------------------------------------- 1. kill + resume


def test_sigkill_after_an_epoch_then_resume_is_exact(data, reference, tmp_path):
    model_dir = str(tmp_path / "run")
    args = train_args(model_dir, data)
    code, seen = run_until_line(args, "epoch 1/3 |", tmp_path / "killed.err")
    assert code == -signal.SIGKILL
    assert latest_checkpoint(model_dir) == "ckpt-1"
    assert not os.path.exists(os.path.join(model_dir, tags.DONE_FILE))

    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not meaningful(r.stderr), r.stderr[-3000:]
    assert re.search(r"^resuming .* after epoch 1 \(ckpt-1\)$", r.stdout, re.M), r.stdout
    assert [line.split(" | ")[0] for line in r.stdout.splitlines() if line.startswith("epoch ")] == \
        ["epoch 2/3", "epoch 3/3"]
    assert os.path.exists(os.path.join(model_dir, tags.DONE_FILE))

    assert_same_weights(reference, model_dir)
    c = assert_same_curves(reference, model_dir)
    assert_every_epoch_once(c)
    # Not just after de-duplication: no epoch was written twice (nor lost) in the files.
    assert duplicated_epochs(model_dir) == {}
    assert len(glob.glob(os.path.join(model_dir, tags.TRAIN_DIR, "*tfevents*"))) == 2   # two processes


# ----------------------------------------------------------------------------- 2. kill mid-checkpoint


DRIVER = textwrap.dedent("""
    import json, os, signal, sys
    sys.path.insert(0, {root!r})
    import tensorflow as tf
    from resnet_cifar import config as config_lib, cifar_data, train

    original = tf.train.Checkpoint._write

    def dying_write(self, file_prefix, options=None):
        if str(file_prefix).endswith("-{number}"):
            # Write checkpoint {number}'s files without the manager's callback (which
            # rewrites the `checkpoint` index), cut them to half their size as if the
            # disk write were under way, and die: SIGKILL cannot be caught.
            original(self, file_prefix)
            folder, base = os.path.split(str(file_prefix))
            for name in os.listdir(folder):
                if name.startswith(base + "."):
                    path = os.path.join(folder, name)
                    with open(path, "r+b") as f:
                        f.truncate(os.path.getsize(path) // 2)
            print("killing myself while writing", file_prefix, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, file_prefix, options=options)

    tf.train.Checkpoint._write = dying_write
    config = config_lib.TrainConfig(**json.loads(sys.argv[1]))
    train.train_and_evaluate(config, cifar_data.load_arrays(config.data_source, config.data_dir, config.seed))
    print("driver: training returned", flush=True)
""")


def test_kill_during_checkpoint_write_resumes_from_the_previous_one(data, reference, tmp_path):
    model_dir = str(tmp_path / "run")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=ROOT, number=2))
    config = dict(RUN, model_dir=model_dir, data_dir=data)
    config_lib.TrainConfig(**config)   # the driver's config is valid
    r = python(driver, json.dumps(config), log_level=LOG_LEVEL)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert "killing myself while writing" in r.stdout and "ckpt-2" in r.stdout
    assert "driver: training returned" not in r.stdout
    # Half-written files of checkpoint 2 are on disk; the index still names checkpoint 1.
    assert checkpoint_numbers(model_dir) == [1, 2]
    assert latest_checkpoint(model_dir) == "ckpt-1"

    r = run_cli(*train_args(model_dir, data))
    assert r.returncode == 0, r.stderr[-3000:]
    assert not meaningful(r.stderr), r.stderr[-3000:]
    # The half-written ckpt-2 is found on disk, fails to read back, and is named as skipped.
    assert re.search(r"^resuming .* after epoch 1 \(ckpt-1\); skipped ckpt-2: .+$", r.stdout, re.M), r.stdout
    assert os.path.exists(os.path.join(model_dir, tags.DONE_FILE))

    assert_same_weights(reference, model_dir)
    c = assert_same_curves(reference, model_dir)
    assert_every_epoch_once(c)
    # Epoch 2 was logged by the killed process (before its checkpoint) and again on
    # resume; the repeat is bitwise the same, and read_scalars kept one value.
    dup = duplicated_epochs(model_dir)
    assert set(dup) == {2}, sorted(dup)
    for subdir, tag, values in dup[2]:
        assert len(values) == 2 and (values[0] == values[1] or np.isnan(values).all()), (subdir, tag, values)


# ----------------------------------------------------------------------------- 3. divergence


def test_checkpoint_callback_never_saves_non_finite_state():
    """Unit check of the guard: a finite loss does not make NaN weights worth saving."""
    class Manager:
        def __init__(self):
            self.saved = []

        def save(self, checkpoint_number):
            self.saved.append(checkpoint_number)

    class Epoch:
        def assign(self, value):
            self.value = value

    cases = [({"loss": 2.0, tags.CONV_SQSUM: 800.0}, False, True),
             ({"loss": float("nan"), tags.CONV_SQSUM: 800.0}, True, False),
             ({"loss": float("inf")}, True, False),
             ({"loss": 2.0, tags.CONV_SQSUM: float("nan")}, False, False),   # weights went bad last step
             ({"loss": 2.0, tags.CONV_SQSUM: float("inf")}, False, False)]
    for logs, stop, saved in cases:
        manager = Manager()
        cb = callbacks.EpochCheckpoint(manager, Epoch())
        cb.set_model(types.SimpleNamespace(stop_training=stop))
        cb.on_epoch_end(4, logs)
        assert manager.saved == ([5] if saved else []), logs


def test_nan_stop_catches_non_finite_weights_after_a_finite_loss():
    stop = callbacks.EpochLog("/unused", 2)
    model = types.SimpleNamespace(stop_training=False)
    stop.set_model(model)
    for batch in range(3):
        stop.note_batch(1, batch, {"loss": 1e21})
    stop.note_epoch(1, {"loss": 1e21, tags.CONV_SQSUM: 800.0})
    assert stop.diverged is None and not model.stop_training
    stop.note_epoch(1, {"loss": 1e21, tags.CONV_SQSUM: float("nan")})
    assert model.stop_training and stop.diverged[:2] == (2, 3) and np.isnan(stop.diverged[3])
    assert "weights" in stop.diverged[2]


@pytest.mark.parametrize("decay_rates,train_epochs", [
    ("1,1e30", 3),   # the loss is NaN within epoch 2
    # The weights are NaN at the end of epoch 2 while its loss is still finite, and
    # epoch 2 is the last: no later step would see a NaN loss (once: checkpoint 2
    # held NaN weights, and the run exited 0 with done.json).
    ("1,1e8", 2),
])
def test_diverged_run_exits_1_and_keeps_only_good_checkpoints(data, tmp_path, decay_rates, train_epochs):
    model_dir = str(tmp_path / "run")
    r = run_cli(*train_args(model_dir, data, boundary_epochs=(1,), decay_rates=decay_rates,
                            train_epochs=train_epochs))
    line = one_error_line(r, 1, "training stopped", model_dir)
    m = re.match(r"error: (loss|the weights' conv_sqsum) became (nan|-?inf) at epoch (\d+), step (\d+)", line)
    assert m, line
    what, epoch, step = m.group(1), int(m.group(3)), int(m.group(4))
    if decay_rates == "1,1e30":
        assert what == "loss" and epoch == 2, line
    assert 2 <= epoch <= train_epochs and 1 <= step <= RUN["steps_per_epoch"], line   # epoch 1 is sane
    assert f"epoch {epoch}/{train_epochs} |" in r.stdout   # the diverged epoch's summary still printed
    assert not os.path.exists(os.path.join(model_dir, tags.DONE_FILE))

    # Event files are readable, up to the diverged epoch.
    c = curves(model_dir)
    steps, loss = c[tags.TRAIN_DIR, tags.EPOCH_LOSS]
    assert list(steps) == list(range(1, epoch + 1)) and np.isfinite(loss[0])
    sq_steps, sqsum = c[tags.TRAIN_DIR, tags.CONV_SQSUM]
    assert list(sq_steps) == list(range(epoch + 1)) and np.isfinite(sqsum[:-1]).all()
    assert not np.isfinite(loss[-1] if what == "loss" else sqsum[-1])
    assert list(c[tags.VALIDATION_DIR, tags.EPOCH_ACCURACY][0]) == list(range(1, epoch + 1))

    # No checkpoint of the diverged epoch; every checkpoint left holds finite numbers.
    numbers = checkpoint_numbers(model_dir)
    assert numbers and max(numbers) < epoch, numbers
    assert latest_checkpoint(model_dir) == f"ckpt-{max(numbers)}"
    for n in numbers:
        values = checkpoint_tensors(os.path.join(model_dir, run_dir.CHECKPOINTS, f"ckpt-{n}"))
        bad = [k for k, v in values.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
        assert not bad, f"ckpt-{n} holds non-finite {bad[:5]}"


# ----------------------------------------------------------------------------- 4. the model dir


def test_finished_run_rerun_is_a_no_op(data, finished_run):
    before = snapshot(finished_run)
    for extra in ([], ["--verbose=0", "--data_dir=/nonexistent"]):   # operational flags may differ
        r = run_cli(*train_args(finished_run, data), *extra, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "already finished" in r.stdout and "nothing to do" in r.stdout
        assert not meaningful(r.stderr), r.stderr
        assert snapshot(finished_run) == before


def test_other_flags_are_refused_naming_them(data, finished_run, held_run):
    for model_dir in (finished_run, held_run):
        before = snapshot(model_dir)
        r = run_cli(*train_args(model_dir, data, weight_decay=1e-4, bn_decay=0.98, train_epochs=4,
                                verbose=0), timeout=120)
        line = one_error_line(r, 2, model_dir, "other flags", "--overwrite",
                                     "--weight_decay: 0.0002 -> 0.0001", "--bn_decay: 0.997 -> 0.98",
                                     "--train_epochs: 3 -> 4")
        assert "--verbose" not in line and "--data_dir" not in line
        assert snapshot(model_dir) == before


def test_overwrite_replaces_the_run(data, finished_run):
    with open(os.path.join(finished_run, "notes.txt"), "w") as f:   # not the run's: must survive
        f.write("mine")
    old_results = ("precise_bn.json", "precise_bn.tfds.json", "precise_bn_epoch2.json", "precise_bn_epoch2.tfds.json")
    for name in old_results:                                       # results of the old weights: go
        with open(os.path.join(finished_run, name), "w") as f:
            f.write('{"epoch": 2, "precise_bn": 0.5}')
    old_events = set(os.listdir(os.path.join(finished_run, tags.TRAIN_DIR)))
    r = run_cli(*train_args(finished_run, data, weight_decay=1e-4, train_epochs=2), "--overwrite")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" not in r.stdout
    assert events.read_config(finished_run)["weight_decay"] == 1e-4
    with open(os.path.join(finished_run, tags.DONE_FILE)) as f:
        assert json.load(f)["epochs"] == 2
    new_events = set(os.listdir(os.path.join(finished_run, tags.TRAIN_DIR)))
    assert len(new_events) == 1 and not new_events & old_events
    assert checkpoint_numbers(finished_run) == [1, 2]          # the old ckpt-3 is gone
    assert_every_epoch_once(curves(finished_run), epochs=2)
    with open(os.path.join(finished_run, "notes.txt")) as f:
        assert f.read() == "mine"
    assert not [name for name in old_results if os.path.exists(os.path.join(finished_run, name))]


def test_unwritable_model_dir(data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cases = [str(blocker / "run")]
    if os.geteuid() != 0:               # root writes through 0o500; the file case covers it
        ro = tmp_path / "readonly"
        ro.mkdir()
        ro.chmod(0o500)
        cases.append(str(ro / "run"))
    try:
        for model_dir in cases:
            r = run_cli(*train_args(model_dir, data), timeout=120)
            one_error_line(r, 2, f"--model_dir={model_dir}", "not writable")
            assert not os.path.exists(model_dir)
        assert blocker.read_text() == "not a folder"
    finally:
        if len(cases) > 1:
            (tmp_path / "readonly").chmod(0o700)


def test_too_little_free_disk(data, reference, held_run, tmp_path, monkeypatch):
    from resnet_cifar import cifar_data, train

    arrays = cifar_data.synthetic_arrays(RUN["batch_size"], RUN["batch_size"])

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10 * 2**20))
    before = snapshot(held_run)
    fresh = str(tmp_path / "fresh")
    for model_dir in (held_run, fresh):
        # run_dir.check reads no data (its --data_dir does not exist); train_and_evaluate, given the
        # arrays, fingerprints the data's files (`data`) before it opens the folder.
        for call, data_dir in ((run_dir.check, "/nonexistent"), (lambda c: train.train_and_evaluate(c, arrays), data)):
            config = config_lib.TrainConfig(**dict(RUN, model_dir=model_dir, data_dir=data_dir))
            with pytest.raises(config_lib.ConfigError) as e:
                call(config)
            message = str(e.value)
            assert "\n" not in message and model_dir in message, message
            assert "only 10 MB free" in message and "needs 100 MB" in message, message
    # train_and_evaluate checks the folder under its lock, so it has rewritten .lock (who holds it),
    # and nothing else; `python -m resnet_cifar.train` refuses before taking the lock (run_dir.check).
    lock = process.LOCK_FILE
    assert {k: v for k, v in snapshot(held_run).items() if k != lock} == {
        k: v for k, v in before.items() if k != lock}
    assert snapshot(fresh) == {}


def test_too_little_free_disk_through_the_command(data, tmp_path):
    """The same refusal by `python -m resnet_cifar.train` on a real 32 MB disk: one line, exit
    code 2, and the run folder is not made."""
    with tmpfs(tmp_path / "disk", "32m") as mount:
        model_dir = mount / "run"
        r = run_cli(*train_args(str(model_dir), data), timeout=120)
        one_error_line(r, 2, str(model_dir), "MB free", "needs 100 MB")
        assert not model_dir.exists()


@pytest.mark.parametrize("content", ["{not json", "", "[1, 2]", '{"nothing": 1}', '{"config": 3}',
                                     '{"config": "x"}', '{"config": [1]}'])
def test_corrupt_run_config_is_a_clear_error(data, finished_run, content):
    path = os.path.join(finished_run, tags.RUN_CONFIG_FILE)
    with open(path, "w") as f:
        f.write(content)
    before = snapshot(finished_run)
    r = run_cli(*train_args(finished_run, data), timeout=120)
    one_error_line(r, 2, path, "unreadable", "--overwrite")
    assert snapshot(finished_run) == before


def test_overwrite_recovers_from_a_corrupt_run_config(data, reference, finished_run):
    with open(os.path.join(finished_run, tags.RUN_CONFIG_FILE), "w") as f:
        f.write("{not json")
    r = run_cli(*train_args(finished_run, data), "--overwrite")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" not in r.stdout and "already finished" not in r.stdout
    assert events.read_config(finished_run) == events.read_config(reference) | {"model_dir": finished_run,
                                                                                "overwrite": True}
    assert_every_epoch_once(curves(finished_run))
    assert len(os.listdir(os.path.join(finished_run, tags.TRAIN_DIR))) == 1
    # Retrained from scratch with the same flags: the same numbers as the reference.
    assert_same_weights(reference, finished_run)


def _no_conv_sqsum_baseline(reference, path):
    """A finished run whose train/ events lack conv_sqsum (only Keras' epoch tags)."""
    copy_run(reference, path)
    train = os.path.join(path, tags.TRAIN_DIR)
    shutil.rmtree(train)
    shutil.copytree(os.path.join(path, tags.VALIDATION_DIR), train)
    return str(path)


@pytest.mark.parametrize("baseline,needles", [
    ("missing", ["no such run folder"]),
    ("unfinished", ["has not finished", tags.DONE_FILE]),
    ("no_conv_sqsum", [f"no {tags.CONV_SQSUM} logged"]),
])
def test_bad_replay_baseline_fails_at_start_up(data, reference, tmp_path, baseline, needles):
    path = {"missing": lambda: str(tmp_path / "nope"),
            "unfinished": lambda: copy_run(reference, tmp_path / "base", finished=False),
            "no_conv_sqsum": lambda: _no_conv_sqsum_baseline(reference, tmp_path / "base")}[baseline]()
    before = snapshot(path)
    model_dir = str(tmp_path / "replay")
    r = run_cli(*train_args(model_dir, data, conv_l2=False, conv_grad_scale=True,
                            conv_lr_factor="replay", replay_from=path), timeout=180)
    one_error_line(r, 2, f"--replay_from={path}", *needles)
    assert snapshot(path) == before
    assert snapshot(model_dir) == {}       # nothing written (the folder itself may exist)
    assert "epoch 1/" not in r.stdout


def test_replay_baseline_shorter_than_the_run(reference):
    with pytest.raises(config_lib.ConfigError, match=rf"ends at epoch {EPOCHS}, this run needs 10"):
        events.load_baseline(reference, 10)
    assert events.load_baseline(reference, EPOCHS).per_layer.shape == (EPOCHS + 1, 22)


# ----------------------------------------------------------------------------- 5. bad data


def _bad_data(data, tmp_path, kind):
    """A copy of the data folder with one defect; returns (data_dir, words the error must contain)."""
    if kind == "missing_folder":
        return str(tmp_path / "no_data"), [f"--data_dir={tmp_path / 'no_data'} does not exist"]
    parent = tmp_path / "bad_data"
    shutil.copytree(data, parent)
    folder = os.path.join(parent, "cifar-10-batches-bin")
    f = lambda name: os.path.join(folder, name)   # noqa: E731
    if kind == "truncated":
        truncate(f("data_batch_3.bin"), 100)
        return str(parent), [f("data_batch_3.bin"), "not a whole number"]
    if kind == "empty":
        truncate(f("data_batch_1.bin"), 10**9)
        return str(parent), [f("data_batch_1.bin"), "0 bytes"]
    if kind == "label_10_in_test":
        set_record_label(f("test_batch.bin"), 5, 10)
        return str(parent), [f("test_batch.bin"), "record 5 has label 10"]
    if kind == "label_255_in_train":
        set_record_label(f("data_batch_2.bin"), 0, 255)
        return str(parent), [f("data_batch_2.bin"), "record 0 has label 255"]
    if kind == "missing_train_file":
        os.remove(f("data_batch_5.bin"))
        return str(parent), ["missing CIFAR-10 file", f("data_batch_5.bin")]
    if kind == "missing_test_file":
        os.remove(f("test_batch.bin"))
        return str(parent), ["no CIFAR-10 binary files in", "test_batch.bin"]
    raise AssertionError(kind)


BAD_DATA = ["missing_folder", "truncated", "empty", "label_10_in_test", "label_255_in_train",
            "missing_train_file", "missing_test_file"]


@pytest.mark.parametrize("kind", BAD_DATA)
def test_bad_data_fails_in_one_line_and_keeps_the_held_run(data, held_run, tmp_path, kind):
    data_dir, needles = _bad_data(data, tmp_path, kind)
    before = snapshot(held_run)
    r = run_cli(*train_args(held_run, data_dir), timeout=120)
    one_error_line(r, 2, *needles)
    assert snapshot(held_run) == before
    assert "resuming" not in r.stdout


def test_bad_data_in_a_fresh_model_dir_writes_nothing(data, tmp_path):
    data_dir, needles = _bad_data(data, tmp_path, "truncated")
    model_dir = str(tmp_path / "run")
    r = run_cli(*train_args(model_dir, data_dir), timeout=120)
    one_error_line(r, 2, *needles)
    assert snapshot(model_dir) == {}


# ----------------------------------------------------------------------------- 6. one writer per run


def test_a_held_folder_is_refused_at_once_naming_the_holder(data, held_run):
    import socket

    from resnet_cifar import process

    before = snapshot(held_run)
    with process.lock(held_run):
        during = snapshot(held_run)
        r = run_cli(*train_args(held_run, data), timeout=120)
    line = one_error_line(r, 2, f"--model_dir={held_run} is in use by pid {os.getpid()} "
                                       f"on host {socket.gethostname()}")
    assert "epoch" not in r.stdout and "resuming" not in r.stdout
    assert snapshot(held_run) == during                     # the refused process wrote nothing
    assert {k: v for k, v in during.items() if k != ".lock"} == \
        {k: v for k, v in before.items() if k != ".lock"}, line


def test_two_trainers_racing_for_one_folder(data, reference, tmp_path):
    """Started together on a fresh folder: one trains, the other refuses in one line naming it."""
    model_dir = str(tmp_path / "run")
    args = [sys.executable, "-m", "resnet_cifar.train", *train_args(model_dir, data)]
    procs = [subprocess.Popen(args, cwd=ROOT, env=env(LOG_LEVEL), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p.pid, p.returncode, out, err) for p in procs for out, err in [p.communicate(timeout=400)]]
    codes = sorted(code for _, code, _, _ in results)
    assert codes == [0, 2], [(code, err[-2000:]) for _, code, _, err in results]
    winner = next(pid for pid, code, _, _ in results if code == 0)
    _, _, out, err = next(res for res in results if res[1] == 2)
    one_error_line(types.SimpleNamespace(returncode=2, stderr=err), 2,
                          f"--model_dir={model_dir} is in use by pid {winner} on host")
    assert "epoch 1/" not in out
    # One run's files only: the same numbers as the reference, one event file per folder.
    assert_same_weights(reference, model_dir)
    assert_every_epoch_once(assert_same_curves(reference, model_dir))
    for subdir in (tags.TRAIN_DIR, tags.VALIDATION_DIR):
        assert len(glob.glob(os.path.join(model_dir, subdir, "*tfevents*"))) == 1
    assert duplicated_epochs(model_dir) == {}


# ----------------------------------------------------------------------------- 7. signals


# Counted from the kept checkpoint: the epoch in progress is the one after it.
STOPPED_RE = r"^stopped by {sig} (in epoch (\d+), after step \d+/12|after epoch (\d+)|at the end of epoch " \
             r"(\d+), before its checkpoint); checkpoint ckpt-(\d+) \(after epoch \5\) " \
             r"is kept: the same command resumes from it$"


def test_sigterm_and_sigint_mid_epoch_then_resume_is_exact(data, reference, tmp_path):
    model_dir = str(tmp_path / "run")
    args = train_args(model_dir, data)
    for sig, code, after in ((signal.SIGTERM, 143, 1), (signal.SIGINT, 130, 2)):
        err_path = tmp_path / f"{sig.name}.err"
        rc, seen = run_until_line(args, f"epoch {after}/3 |", err_path, sig=sig)
        stderr = err_path.read_text()
        assert rc == code, (rc, stderr[-3000:])
        lines = meaningful(stderr)
        assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
        m = re.match(STOPPED_RE.format(sig=sig.name), lines[0])
        assert m, lines[0]
        # Stopped in the next epoch, which is dropped; the last full epoch is kept.
        assert int(m.group(5)) == after, lines[0]
        assert int(m.group(2) or m.group(4) or after + 1) == after + 1 and int(m.group(3) or after) == after
        assert latest_checkpoint(model_dir) == f"ckpt-{after}"
        assert not os.path.exists(os.path.join(model_dir, tags.DONE_FILE))

    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"^resuming .* after epoch 2 \(ckpt-2\)$", r.stdout, re.M), r.stdout
    assert_same_weights(reference, model_dir)
    assert_every_epoch_once(assert_same_curves(reference, model_dir))
    assert duplicated_epochs(model_dir) == {}       # the interrupted epochs left nothing behind


# ----------------------------------------------------------------------------- 8. damaged checkpoints


def _small_checkpoint():
    import tensorflow as tf

    variables = {"w": tf.Variable(np.zeros(3000, np.float32)), "b": tf.Variable(np.zeros(7, np.float32))}
    return variables, tf.train.Checkpoint(**variables)


def _damage(folder, number, kind):
    """Damages checkpoint `number` (or the index file) in one of the ways a disk or a user does."""
    index = os.path.join(folder, "checkpoint")
    prefix = os.path.join(folder, f"ckpt-{number}")
    data_file = glob.glob(prefix + ".data-*")[0]
    if kind == "garbage_index_file":
        with open(index, "w") as f:
            f.write("\x00garbage: [not a checkpoint state\n")
    elif kind == "empty_index_file":
        open(index, "w").close()
    elif kind == "no_index_file":
        os.remove(index)
    elif kind == "index_names_missing":
        with open(index, "w") as f:
            f.write(f'model_checkpoint_path: "ckpt-{number + 5}"\n')
    elif kind == "truncated_data":
        truncate(data_file, os.path.getsize(data_file) // 2)
    elif kind == "empty_data":
        truncate(data_file, 10**9)
    elif kind == "flipped_data":
        with open(data_file, "r+b") as f:
            f.seek(os.path.getsize(data_file) // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif kind == "missing_data":
        os.remove(data_file)
    elif kind == "missing_dot_index":
        os.remove(prefix + ".index")
    elif kind == "truncated_dot_index":
        truncate(prefix + ".index", 40)
    else:
        raise AssertionError(kind)


INDEX_DAMAGE = ["garbage_index_file", "empty_index_file", "no_index_file", "index_names_missing"]
FILE_DAMAGE = ["truncated_data", "empty_data", "flipped_data", "missing_data", "missing_dot_index",
               "truncated_dot_index"]


@pytest.mark.parametrize("kind", INDEX_DAMAGE + FILE_DAMAGE)
def test_restore_uses_the_newest_checkpoint_that_reads_back_whole(tmp_path, kind):
    from resnet_cifar import checkpoints

    folder = str(tmp_path / "ckpts")
    variables, ckpt = _small_checkpoint()
    store = checkpoints.CheckpointStore(ckpt, folder)
    for n in (1, 2):
        variables["w"].assign(np.full(3000, n, np.float32))
        store.save(checkpoint_number=n)
    _damage(folder, 2, kind)

    variables, ckpt = _small_checkpoint()                       # a fresh process, in effect
    store = checkpoints.CheckpointStore(ckpt, folder)
    restored, skipped = store.restore()
    want = 2 if kind in INDEX_DAMAGE else 1                     # the index is never trusted alone
    assert restored == want and (variables["w"].numpy() == want).all(), (kind, restored, skipped)
    assert [name for name, _ in skipped] == ([] if want == 2 else ["ckpt-2"])
    assert all("\n" not in reason for _, reason in skipped)
    assert latest_checkpoint(folder, "") == f"ckpt-{want}"          # the index is repaired

    # The next save replaces the damaged files; the good checkpoint it resumed from stays.
    variables["w"].assign(np.full(3000, 9, np.float32))
    store.save(checkpoint_number=want + 1)
    on_disk = checkpoints.numbers_on_disk(folder)
    assert sorted(on_disk) == [want, want + 1], on_disk
    assert all(checkpoints.unreadable_reason(os.path.join(folder, f"ckpt-{n}")) is None for n in on_disk)
    assert latest_checkpoint(folder, "") == f"ckpt-{want + 1}"


def test_nothing_readable_is_refused_never_a_fresh_start(tmp_path):
    from resnet_cifar import checkpoints

    folder = str(tmp_path / "ckpts")
    variables, ckpt = _small_checkpoint()
    store = checkpoints.CheckpointStore(ckpt, folder)
    for n in (1, 2):
        store.save(checkpoint_number=n)
    _damage(folder, 2, "truncated_data")
    _damage(folder, 1, "missing_dot_index")
    before = snapshot(folder)
    with pytest.raises(checkpoints.NothingReadable) as e:
        checkpoints.CheckpointStore(_small_checkpoint()[1], folder).restore()
    message = str(e.value)
    assert "\n" not in message and "ckpt-2: " in message and "ckpt-1: its .index file is missing" in message
    assert snapshot(folder) == before


def test_a_kill_during_the_first_save_is_a_fresh_start_not_a_refusal(tmp_path):
    """Killed while writing ckpt-1, before its .index and the index file: no earlier checkpoint
    exists, so nothing is lost by starting afresh; the leftover is named as skipped. The same
    files under an index that names ckpt-1 (a save that finished) are damage: refused."""
    from resnet_cifar import checkpoints

    folder = str(tmp_path / "ckpts")
    variables, ckpt = _small_checkpoint()
    checkpoints.CheckpointStore(ckpt, folder).save(checkpoint_number=1)
    os.remove(os.path.join(folder, "ckpt-1.index"))
    index = os.path.join(folder, checkpoints.INDEX_FILE)
    with open(index) as f:
        committed_index = f.read()
    os.remove(index)

    variables, ckpt = _small_checkpoint()
    store = checkpoints.CheckpointStore(ckpt, folder)
    restored, skipped = store.restore()
    assert restored == 0 and [n for n, _ in skipped] == ["ckpt-1"], skipped
    assert "unfinished save" in skipped[0][1] and ".index file is missing" in skipped[0][1]
    variables["w"].assign(np.full(3000, 7, np.float32))
    store.save(checkpoint_number=1)                       # the fresh start's save replaces it
    assert checkpoints.unreadable_reason(os.path.join(folder, "ckpt-1")) is None
    assert latest_checkpoint(folder, "") == "ckpt-1"

    os.remove(os.path.join(folder, "ckpt-1.index"))
    with open(index, "w") as f:
        f.write(committed_index)
    with pytest.raises(checkpoints.NothingReadable) as e:
        checkpoints.CheckpointStore(_small_checkpoint()[1], folder).restore()
    assert "ckpt-1: its .index file is missing" in str(e.value)


def test_a_failed_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """A full disk during a save (injected: the error TensorFlow raises on ENOSPC)."""
    import tensorflow as tf

    from resnet_cifar import checkpoints

    folder = str(tmp_path / "ckpts")
    variables, ckpt = _small_checkpoint()
    store = checkpoints.CheckpointStore(ckpt, folder)
    store.save(checkpoint_number=1)
    before = snapshot(folder)
    real_write = tf.train.Checkpoint.write

    def full_disk(self, file_prefix, options=None):
        real_write(self, file_prefix, options=options)           # leaves files behind, like a partial write
        raise tf.errors.ResourceExhaustedError(None, None, f"{file_prefix}: No space left on device")

    monkeypatch.setattr(tf.train.Checkpoint, "write", full_disk)
    with pytest.raises(checkpoints.SaveError) as e:
        store.save(checkpoint_number=2)
    message = str(e.value)
    assert "\n" not in message and "could not save checkpoint ckpt-2" in message
    assert "No space left on device" in message and "the last good checkpoint ckpt-1 is kept" in message
    assert snapshot(folder) == before                           # ckpt-1 and its index untouched
    assert checkpoints.numbers_on_disk(folder) == [1]


def _saved_w(prefix):
    """The first value of `w` in the checkpoint at `prefix`, read from the files."""
    import tensorflow as tf

    return float(tf.train.load_checkpoint(prefix).get_tensor("w/.ATTRIBUTES/VARIABLE_VALUE")[0])


def _save_epochs(store, variables, numbers):
    for n in numbers:
        variables["w"].assign(np.full(3000, n, np.float32))
        store.save(checkpoint_number=n)


def test_phase_end_checkpoints_are_kept_beside_the_rotation_which_restore_ignores(tmp_path):
    from resnet_cifar import checkpoints

    folder = str(tmp_path / "ckpts")
    kept = os.path.join(folder, checkpoints.PHASE_ENDS)
    variables, ckpt = _small_checkpoint()
    store = checkpoints.CheckpointStore(ckpt, folder, phase_ends=(2, 4))
    _save_epochs(store, variables, range(1, 7))
    assert checkpoints.numbers_on_disk(folder) == [6, 5]                  # the rotation as before
    assert checkpoints.numbers_on_disk(kept) == [4, 2]
    assert sorted(os.listdir(kept)) == sorted(f"ckpt-{n}.{ext}" for n in (2, 4)
                                              for ext in ("index", "data-00000-of-00001"))
    assert [_saved_w(os.path.join(kept, f"ckpt-{n}")) for n in (2, 4)] == [2.0, 4.0]

    # Restore reads the rotation only: damaged, the run is refused (not resumed from epoch 4).
    _damage(folder, 6, "truncated_data")
    _damage(folder, 5, "missing_data")
    with pytest.raises(checkpoints.NothingReadable):
        checkpoints.CheckpointStore(_small_checkpoint()[1], folder, phase_ends=(2, 4)).restore()


def test_an_interrupted_phase_end_copy_is_redone_until_it_is_kept(tmp_path, monkeypatch, capsys):
    """Kills during copies leave a staging folder and, at worst, data without its .index; the
    next copy fails too. The rotation keeps ckpt-2 until a copy exists, whatever the number of
    saves in between."""
    import shutil

    from resnet_cifar import checkpoints

    folder = str(tmp_path / "ckpts")
    kept = os.path.join(folder, checkpoints.PHASE_ENDS)
    variables, ckpt = _small_checkpoint()
    _save_epochs(checkpoints.CheckpointStore(ckpt, folder), variables, (1, 2))   # died before copying
    os.makedirs(os.path.join(kept, ".staging-ckpt-2"))
    with open(os.path.join(kept, ".staging-ckpt-2", "ckpt-2.index"), "wb") as f:
        f.write(b"half")
    shutil.copy2(glob.glob(os.path.join(folder, "ckpt-2.data-*"))[0], kept)     # data, no .index

    variables, ckpt = _small_checkpoint()                       # the resumed process
    store = checkpoints.CheckpointStore(ckpt, folder, phase_ends=(2,))
    assert store.restore() == (2, [])
    real_copy = shutil.copy2
    monkeypatch.setattr(shutil, "copy2", lambda *a, **k: (_ for _ in ()).throw(OSError(5, "I/O error")))
    _save_epochs(store, variables, (3, 4))
    assert checkpoints.numbers_on_disk(folder) == [4, 3, 2]          # ckpt-2 stays for the next try
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: could not keep ckpt-2 (the end of a learning-rate "
                                               "phase)") and "I/O error" in err[0], err
    monkeypatch.setattr(shutil, "copy2", real_copy)
    _save_epochs(store, variables, (5,))
    assert checkpoints.numbers_on_disk(folder) == [5, 4]
    assert sorted(os.listdir(kept)) == ["ckpt-2.data-00000-of-00001", "ckpt-2.index"]
    assert _saved_w(os.path.join(kept, "ckpt-2")) == 2.0


@pytest.mark.parametrize("fault", ["full disk during the copy", "phase_ends is a file"])
def test_a_failed_phase_end_copy_is_a_warning_and_training_goes_on(tmp_path, monkeypatch, capsys, fault):
    """The copy is secondary: the save of ckpt-2 stands, one warning line says what failed, and
    the copy is made once the fault is gone."""
    import errno
    import shutil

    from resnet_cifar import checkpoints

    folder = str(tmp_path / "ckpts")
    kept = os.path.join(folder, checkpoints.PHASE_ENDS)
    variables, ckpt = _small_checkpoint()
    store = checkpoints.CheckpointStore(ckpt, folder, phase_ends=(2,))
    _save_epochs(store, variables, (1,))
    real_copy = shutil.copy2
    if fault == "phase_ends is a file":
        with open(kept, "w") as f:
            f.write("not a folder")
        needle = "Not a directory"
    else:
        def full_disk(src, dst, **kwargs):
            real_copy(src, dst, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(shutil, "copy2", full_disk)
        needle = "No space left on device"
    _save_epochs(store, variables, (2, 3))
    assert latest_checkpoint(folder, "") == "ckpt-3"
    assert checkpoints.numbers_on_disk(folder) == [3, 2]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: could not keep ckpt-2") and needle in err[0], err
    assert "training goes on" in err[0]

    if fault == "phase_ends is a file":
        os.remove(kept)
    monkeypatch.setattr(shutil, "copy2", real_copy)
    _save_epochs(store, variables, (4,))
    assert checkpoints.numbers_on_disk(folder) == [4, 3]
    assert sorted(os.listdir(kept)) == ["ckpt-2.data-00000-of-00001", "ckpt-2.index"]
    assert _saved_w(os.path.join(kept, "ckpt-2")) == 2.0


def test_a_fresh_start_drops_phase_ends_of_another_trajectory(tmp_path):
    from resnet_cifar import checkpoints

    folder = str(tmp_path / "ckpts")
    variables, ckpt = _small_checkpoint()
    _save_epochs(checkpoints.CheckpointStore(ckpt, folder, phase_ends=(2,)), variables, (1, 2, 3))
    for path in glob.glob(os.path.join(folder, "ckpt-*")) + [os.path.join(folder, "checkpoint")]:
        os.remove(path)                                         # the rotation deleted by hand
    variables, ckpt = _small_checkpoint()
    store = checkpoints.CheckpointStore(ckpt, folder, phase_ends=(2,))
    assert store.restore() == (0, [])
    _save_epochs(store, variables, (1,))
    assert not os.path.exists(os.path.join(folder, checkpoints.PHASE_ENDS))
    _save_epochs(store, variables, (2,))
    assert _saved_w(os.path.join(folder, checkpoints.PHASE_ENDS, "ckpt-2")) == 2.0


def test_damaged_checkpoint_then_resume_is_exact(data, reference, held_run):
    """Garbage in the index and a truncated newest checkpoint: resume from the intact one."""
    folder = os.path.join(held_run, run_dir.CHECKPOINTS)
    _damage(folder, 3, "garbage_index_file")     # once: a silent restart at epoch 1, then
    _damage(folder, 3, "truncated_data")         # rotation deleted the intact checkpoint
    r = run_cli(*train_args(held_run, data))
    assert r.returncode == 0, r.stderr[-3000:]
    assert not meaningful(r.stderr), r.stderr[-3000:]
    # One line: which one was used and why the newer one was not.
    assert re.search(r"^resuming .* after epoch 2 \(ckpt-2\); skipped ckpt-3: .+$", r.stdout, re.M), r.stdout
    assert [line.split(" | ")[0] for line in r.stdout.splitlines() if line.startswith("epoch ")] == ["epoch 3/3"]
    assert_same_weights(reference, held_run)
    assert checkpoint_numbers(held_run) == [2, 3]


def test_overwrite_of_the_same_run_starts_it_afresh(data, reference, finished_run, held_run):
    """Same flags, --overwrite: a finished run is trained again and an unfinished one is not
    resumed; each starts at epoch 1 and, deterministic, ends with the reference's weights."""
    for model_dir in (finished_run, held_run):
        old_events = set(os.listdir(os.path.join(model_dir, tags.TRAIN_DIR)))
        r = run_cli(*train_args(model_dir, data), "--overwrite")
        assert r.returncode == 0, r.stderr[-3000:]
        assert "starting afresh (--overwrite)" in r.stdout and "resuming" not in r.stdout, r.stdout
        assert [line.split(" | ")[0] for line in r.stdout.splitlines() if line.startswith("epoch ")] == \
            [f"epoch {e}/{EPOCHS}" for e in range(1, EPOCHS + 1)]
        assert not set(os.listdir(os.path.join(model_dir, tags.TRAIN_DIR))) & old_events
        assert_every_epoch_once(curves(model_dir))
        assert_same_weights(reference, model_dir)


def test_no_readable_checkpoint_refuses_and_overwrite_restarts(data, reference, held_run):
    folder = os.path.join(held_run, run_dir.CHECKPOINTS)
    for n in (2, 3):
        _damage(folder, n, "flipped_data")
    before = snapshot(held_run)
    r = run_cli(*train_args(held_run, data))
    one_error_line(r, 2, "reads back whole", "ckpt-3: ", "ckpt-2: ", "--overwrite")
    assert "epoch 1/" not in r.stdout
    after = snapshot(held_run)
    assert {k: v for k, v in after.items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}

    r = run_cli(*train_args(held_run, data), "--overwrite")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "starting afresh (--overwrite)" in r.stdout and "resuming" not in r.stdout
    assert_same_weights(reference, held_run)


def test_logs_beyond_the_checkpoints_refuse_and_overwrite_restarts(data, reference, held_run):
    """Checkpoints deleted (or lost with a machine while the logs were kept): the run has logged 3
    epochs and has none to resume from. Going on would redo all 3 over the logged curves; it is
    refused in one line, and --overwrite starts it afresh. (A kill between an epoch's logs and its
    checkpoint leaves one epoch more, which resumes: the kill tests above.) The phase-end copy
    (ckpt-2), which resuming never reads, is left as it was."""
    folder = os.path.join(held_run, run_dir.CHECKPOINTS)
    assert os.listdir(os.path.join(folder, "phase_ends"))
    for name in os.listdir(folder):
        if name != "phase_ends":
            os.remove(os.path.join(folder, name))
    before = snapshot(held_run)
    r = run_cli(*train_args(held_run, data))
    one_error_line(r, 2, "has logged 3 epochs but it has no checkpoint", "--overwrite")
    assert "epoch 1/" not in r.stdout
    after = snapshot(held_run)
    assert {k: v for k, v in after.items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}

    r = run_cli(*train_args(held_run, data), "--overwrite")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "starting afresh (--overwrite)" in r.stdout
    assert_every_epoch_once(curves(held_run))
    assert_same_weights(reference, held_run)


# ----------------------------------------------------------------------------- 9. divergence of the test loss


def test_a_non_finite_test_loss_stops_the_run_and_is_not_checkpointed():
    class Store:
        saved = []

        def save(self, checkpoint_number):
            self.saved.append(checkpoint_number)

    class Epoch:
        def assign(self, value):
            self.value = value

    logs = {"loss": 2.0, "l2_loss": 0.1, tags.CONV_SQSUM: 800.0, "val_loss": float("nan")}
    model = types.SimpleNamespace(stop_training=False)
    cb = callbacks.EpochCheckpoint(Store(), Epoch())
    cb.set_model(model)
    cb.on_epoch_end(4, logs)
    assert Store.saved == []
    stop = callbacks.EpochLog("/unused", 5)
    stop.set_model(model)
    stop.note_batch(4, 11, {"loss": 2.0})
    stop.note_epoch(4, logs)
    assert model.stop_training and stop.diverged[:2] == (5, 12) and np.isnan(stop.diverged[3])
    assert stop.diverged[2] == "the test loss"
    cb.on_epoch_end(4, dict(logs, val_loss=2.5))
    assert Store.saved == [5]


# ----------------------------------------------------------------------------- 10. replay sources


def _with_config(reference, path, **changes):
    copy_run(reference, path)
    config_path = os.path.join(path, tags.RUN_CONFIG_FILE)
    with open(config_path) as f:
        rc = json.load(f)
    rc["config"].update(changes)
    with open(config_path, "w") as f:
        json.dump(rc, f)
    return str(path)


@pytest.mark.parametrize("changes,what", [
    (dict(conv_l2=False), "NoConvL2 (--noconv_l2"),
    (dict(conv_l2=False, conv_grad_scale=True, conv_lr_factor="replay"),
     "ConvLRScale (--conv_grad_scale --conv_lr_factor=replay --noconv_l2)"),
])
def test_replay_source_must_be_a_baseline(reference, tmp_path, changes, what):
    path = _with_config(reference, tmp_path / "source", **changes)
    with pytest.raises(config_lib.ConfigError) as e:
        events.load_baseline(path, EPOCHS)
    message = str(e.value)
    assert "\n" not in message and f"--replay_from={path} is not a baseline run: it is {what}" in message


def test_replay_source_with_a_damaged_event_file_is_refused(reference, tmp_path):
    path = copy_run(reference, tmp_path / "source")
    event_file = glob.glob(os.path.join(path, tags.TRAIN_DIR, "*tfevents*"))[0]
    truncate(event_file, 5)
    with pytest.raises(config_lib.ConfigError, match=rf"damaged event file {re.escape(event_file)}: "):
        events.load_baseline(path, EPOCHS)


# ----------------------------------------------------------------------------- 11. damaged event files


@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
def test_analysis_names_a_damaged_event_file_and_marks_the_run_incomplete(reference, tmp_path, capsys,
                                                                          damage):
    from analysis import make_figures

    results = tmp_path / "results"
    good = copy_run(reference, results / "baseline")
    bad = copy_run(reference, results / "noconv_l2")
    event_file = glob.glob(os.path.join(bad, tags.VALIDATION_DIR, "*tfevents*"))[0]
    size = os.path.getsize(event_file)
    if damage == "truncated":
        truncate(event_file, 7)
    else:
        with open(event_file, "r+b") as f:
            f.seek(size // 2)
            f.write(b"\xde\xad\xbe\xef")

    run = events.load_run(bad)
    assert not run.complete and len(run.damaged) == 1 and run.damaged[0].startswith(event_file + ": ")
    assert events.load_run(good).complete and not events.load_run(good).damaged

    assert make_figures.main([str(results), "--out", str(tmp_path / "figs")]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "damaged" in line]
    assert len(notes) == 1 and event_file in notes[0] and "incomplete" in notes[0], notes
    table = (tmp_path / "figs" / "summary.md").read_text()
    row = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert " | no, damaged events | " in next(v for k, v in row.items() if "NoConv" in k), table
    assert " | yes | " in next(v for k, v in row.items() if k.startswith("Baseline")), table
    with open(tmp_path / "figs" / "summary.csv") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert rows["noconv_l2"]["complete"] == "no" and rows["noconv_l2"]["damaged_seeds"] == "1"
    assert rows["baseline"]["complete"] == "yes"


# ----------------------------------------------------------------------------- 12. a full disk, for real


@pytest.fixture
def small_disk(tmp_path):
    """A 104 MB tmpfs (the trainer wants 100 MB free to start); skipped where mounting is not allowed."""
    with tmpfs(tmp_path / "disk", "104m", " (the in-process save failure test covers the checkpoint)") as mount:
        yield mount


def test_disk_full_mid_run_stops_in_one_line_and_resumes(data, small_disk, tmp_path):
    model_dir = str(small_disk / "run")
    args = train_args(model_dir, data)
    err_path = tmp_path / "full.err"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "resnet_cifar.train", *args], cwd=ROOT, env=env(LOG_LEVEL),
                                stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)
    filler = small_disk / "filler"
    try:
        for line in proc.stdout:
            if line.startswith("epoch 1/3 |"):
                with open(filler, "wb") as f:      # fill the disk while epoch 2 runs
                    try:
                        while True:
                            f.write(b"\0" * 2**20)
                    except OSError:
                        pass
                break
        proc.stdout.read()
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = err_path.read_text()
    r = types.SimpleNamespace(returncode=proc.returncode, stderr="\n".join(
        line for line in stderr.splitlines() if not line.startswith("\t")))   # TF's continuation lines
    one_error_line(r, 1, "No space left on device", "ckpt-1 is kept", "the same command")
    assert latest_checkpoint(model_dir) == "ckpt-1"

    filler.unlink()
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"^resuming .* after epoch 1 \(ckpt-1\)", r.stdout, re.M), r.stdout
    assert os.path.exists(os.path.join(model_dir, tags.DONE_FILE))
