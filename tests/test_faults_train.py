"""Hostile inputs and faults of the training command (issue 22), each through a real process.

Every case ends in one `error: ` line and a non-zero exit, or in correct behaviour; a
refused command leaves what was on disk as it was. Runs are ResNet-8 on synthetic data,
2 epochs of 2 steps.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import types

import pytest

from resnet_cifar import callbacks, run_dir, tags
from tests.helpers import ROOT, SMALL, env, meaningful, one_error_line, python, snapshot, tmpfs, with_xla
from tests.helpers import train_small as train


@pytest.fixture
def held(finished, tmp_path):
    """A copy of the finished run that has not finished: done.json and ckpt-2 gone, epoch 2 to train."""
    path = str(tmp_path / "held")
    shutil.copytree(finished, path)
    os.remove(os.path.join(path, tags.DONE_FILE))
    for name in os.listdir(os.path.join(path, run_dir.CHECKPOINTS)):
        if name.startswith("ckpt-2."):
            os.remove(os.path.join(path, run_dir.CHECKPOINTS, name))
    return path


# ------------------------------------------------------------------ 1. bad numbers


def float_flags():
    """Every float flag of resnet_cifar.train, and its lists of numbers."""
    from absl import flags

    from resnet_cifar import train as train_module

    names = [f.name for f in train_module.FLAGS.get_flags_for_module("resnet_cifar.config")
             if isinstance(f.parser, flags.FloatParser)]
    assert {"learning_rate", "weight_decay", "bn_decay"} <= set(names)
    return names + ["boundary_epochs", "decay_rates"]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e300"])
def test_every_float_flag_refuses_non_finite_and_overflowing_numbers(tmp_path, value):
    for name in float_flags():
        shown = value if name != "decay_rates" else f"1,{value}"
        r = train(tmp_path / "run", f"--{name}={shown}", timeout=60)
        one_error_line(r, 2, f"--{name}")
        assert not os.path.exists(tmp_path / "run")


def integer_flags():
    """Every integer flag of resnet_cifar.train."""
    from absl import flags

    from resnet_cifar import train as train_module

    names = [f.name for f in train_module.FLAGS.get_flags_for_module("resnet_cifar.config")
             if isinstance(f.parser, flags.IntegerParser)]
    assert {"train_epochs", "batch_size", "steps_per_epoch", "seed", "resnet_size"} <= set(names)
    return names


@pytest.mark.parametrize("value", ["100000000000000000000", "-100000000000000000000", "2147483648"])
def test_every_integer_flag_refuses_absurd_sizes(tmp_path, value):
    for name in integer_flags():
        r = train(tmp_path / "run", f"--{name}={value}", timeout=60)
        one_error_line(r, 2, f"--{name}={value} must be at most 2147483647")
        assert not os.path.exists(tmp_path / "run")


def test_more_steps_than_a_run_can_count_is_one_line(tmp_path):
    r = train(tmp_path / "run", "--train_epochs=1073741824", "--steps_per_epoch=4", timeout=60)
    one_error_line(r, 2, "--train_epochs=1073741824 of 4 steps each is 4294967296 steps")
    assert not os.path.exists(tmp_path / "run")


def test_no_boundaries_is_one_constant_rate(tmp_path):
    """--boundary_epochs= (empty) with one rate: the base rate throughout, logged as such."""
    r = train(tmp_path / "run", "--boundary_epochs=", "--decay_rates=0.5")
    assert r.returncode == 0, r.stderr[-3000:]
    rates = [float(line.split(" | lr ")[1].split(" ")[0]) for line in r.stdout.splitlines()
             if line.startswith("epoch ")]
    assert rates == [0.1 * 16 / 128 * 0.5] * 2, r.stdout
    one_error_line(train(tmp_path / "other", "--boundary_epochs=", "--decay_rates="), 2, "--decay_rates needs 1 value")


# ------------------------------------------------------------------ 2. run identity


def test_checkpoints_without_run_config_are_refused_never_resumed(held):
    os.remove(os.path.join(held, tags.RUN_CONFIG_FILE))
    before = snapshot(held)
    for extra in ([], ["--seed=7"], ["--weight_decay=1e-3"]):
        r = train(held, *extra)
        one_error_line(r, 2, "no run_config.json", "--overwrite")
        assert snapshot(held) == before
    r = train(held, "--seed=7", "--overwrite")          # a fresh run under these flags
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" not in r.stdout
    with open(os.path.join(held, tags.RUN_CONFIG_FILE)) as f:
        assert json.load(f)["config"]["seed"] == 7


def test_another_seed_is_refused(held):
    before = snapshot(held)
    one_error_line(train(held, "--seed=3"), 2, "--seed: 0 -> 3")
    assert snapshot(held) == before


@pytest.mark.parametrize("other,rename", [(["--seed=1"], False), (["--seed=1"], True),
                                          (["--weight_decay=1e-3"], False)])
def test_another_runs_checkpoint_is_refused_whatever_its_name(held, tmp_path, other, rename):
    """The checkpoint of another run (another seed, or other settings) copied into a stopped
    run's folder, under the name this run's next one has (ckpt-2), from their ckpt-2 or renamed
    from their ckpt-1: refused in one line, never resumed as this run; the folder is left as it
    was (its lock file aside)."""
    theirs = str(tmp_path / "theirs")
    r = train(theirs, *other)
    assert r.returncode == 0, r.stderr[-3000:]
    source = "ckpt-1" if rename else "ckpt-2"
    mine = os.path.join(held, run_dir.CHECKPOINTS)
    for name in os.listdir(os.path.join(theirs, run_dir.CHECKPOINTS)):
        if name.startswith(source + "."):
            shutil.copy(os.path.join(theirs, run_dir.CHECKPOINTS, name),
                        os.path.join(mine, "ckpt-2" + name[len(source):]))
    before = snapshot(held)
    what = "seed 1" if "--seed=1" in other else "seed 0, settings"
    one_error_line(train(held), 2, "ckpt-2 was written by another run", f"({what}", "--overwrite")
    after = snapshot(held)
    after.pop(".lock"), before.pop(".lock")          # the lock records its last holder
    assert after == before


def test_a_checkpoint_without_identity_still_resumes(tmp_path):
    """Checkpoints written before they carried an identity (the shipped campaign's) restore."""
    import tensorflow as tf

    from resnet_cifar import checkpoints

    v = tf.Variable([1.0, 2.0])
    ckpt = tf.train.Checkpoint(v=v)
    folder = str(tmp_path / "ckpts")
    checkpoints.CheckpointStore(ckpt, folder).save(1)
    assert checkpoints.identity_of(os.path.join(folder, "ckpt-1")) is None
    v.assign([0.0, 0.0])
    store = checkpoints.CheckpointStore(ckpt, folder, identity="seed 0, settings abc")
    assert store.restore() == (1, []) and v.numpy().tolist() == [1.0, 2.0]
    store.save(2)
    assert checkpoints.identity_of(os.path.join(folder, "ckpt-2")) == "seed 0, settings abc"
    with pytest.raises(checkpoints.ForeignCheckpoint, match=r"another run \(seed 0, settings abc\)"):
        checkpoints.CheckpointStore(ckpt, folder, identity="seed 1, settings abc").restore()


@pytest.mark.parametrize("factor", ["replay", "per_layer", "per_channel"])
def test_a_replay_baseline_of_another_depth_is_refused(finished, tmp_path, factor):
    r = train(tmp_path / "replay", "--resnet_size=14", "--conv_grad_scale", f"--conv_lr_factor={factor}",
              f"--replay_from={finished}")
    one_error_line(r, 2, "ResNet-8", "ResNet-14")
    assert not os.path.exists(tmp_path / "replay")


# ------------------------------------------------------------------ 3. a damaged run folder


def _make_file(path):
    shutil.rmtree(path)
    with open(path, "w") as f:
        f.write("not a folder\n")


@pytest.mark.parametrize("kind,needle", [
    ("checkpoints is a file", "checkpoints is a file"),
    ("train is a file", "train is a file"),
    ("garbage npz", tags.CHANNEL_SQSUM_FILE),
    ("lock is a folder", ".lock is a folder: remove that folder, then run again"),
])
def test_a_damaged_run_folder_is_one_line(held, kind, needle):
    if kind == "checkpoints is a file":
        _make_file(os.path.join(held, run_dir.CHECKPOINTS))
    elif kind == "train is a file":
        _make_file(os.path.join(held, tags.TRAIN_DIR))
    elif kind == "garbage npz":
        with open(os.path.join(held, tags.CHANNEL_SQSUM_FILE), "wb") as f:
            f.write(b"PK\x03\x04 garbage")
    else:
        if os.path.exists(os.path.join(held, ".lock")):
            os.remove(os.path.join(held, ".lock"))
        os.makedirs(os.path.join(held, ".lock"))
    before = snapshot(held)
    one_error_line(train(held), 2, needle)
    assert snapshot(held) == before
    if kind != "lock is a folder":          # --overwrite starts it afresh, whatever kind each part is
        r = train(held, "--overwrite")
        assert r.returncode == 0, r.stderr[-3000:]
        assert os.path.isdir(os.path.join(held, tags.TRAIN_DIR))


def test_a_checkpoint_index_that_is_a_folder_is_rewritten(held):
    index = os.path.join(held, run_dir.CHECKPOINTS, "checkpoint")
    os.remove(index)
    os.makedirs(index)
    r = train(held)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stdout and "after epoch 1 (ckpt-1)" in r.stdout
    assert os.path.isfile(index) and os.path.isfile(os.path.join(held, tags.DONE_FILE))


# ------------------------------------------------------------------ 4. signals


@pytest.mark.parametrize("delay", [0.3, 1.5, 3.0])
def test_sigterm_during_start_up_stops_the_run(tmp_path, delay):
    model_dir = tmp_path / "run"
    args = with_xla([f"--model_dir={model_dir}", *SMALL])
    p = subprocess.Popen([sys.executable, "-m", "resnet_cifar.train", *args],
                         cwd=ROOT, env=env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode in (143, -signal.SIGTERM), (p.returncode, err[-3000:])
    assert "Traceback" not in err
    assert not os.path.exists(model_dir / tags.DONE_FILE)


def test_a_signal_that_a_library_swallows_still_stops_the_run(tmp_path):
    """A bare `except:` around an import (TF and its dependencies have some) once ate the
    SIGTERM of a run's first seconds, and the run then finished."""
    script = textwrap.dedent(f"""
        import builtins, os, signal, sys, time
        real_import = builtins.__import__
        fired = []

        def swallowing_import(name, *args, **kwargs):
            if name in ("keras", "tensorflow") and not fired:
                fired.append(1)
                try:
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(0.2)
                except BaseException:
                    pass
            return real_import(name, *args, **kwargs)

        builtins.__import__ = swallowing_import
        from resnet_cifar import train
        sys.argv = ["train", "--model_dir={tmp_path / 'run'}"] + {SMALL!r}
        train.run()
    """)
    r = python("-c", script, log_level=2)
    assert r.returncode == 143, (r.returncode, r.stderr[-3000:])
    assert meaningful(r.stderr)[-1].startswith("stopped by SIGTERM"), r.stderr[-3000:]
    assert not os.path.exists(tmp_path / "run" / tags.DONE_FILE)


def _progress(step, good, steps_per_epoch=4):
    from resnet_cifar.callbacks import Progress

    p = Progress(types.SimpleNamespace(optimizer=types.SimpleNamespace(
        iterations=types.SimpleNamespace(numpy=lambda: step))), steps_per_epoch)
    p.store = types.SimpleNamespace(good=good)
    return p.stopped_message("SIGTERM")


def test_stop_messages_agree_with_the_checkpoint_kept():
    # During epoch 2's evaluation (its 8 steps trained), ckpt-1 kept: the resume redoes epoch 2.
    m = _progress(8, [1])
    assert "epoch 2" in m and "epoch 3" not in m and "ckpt-1 (after epoch 1) is kept" in m, m
    # After the last epoch's checkpoint, before done.json.
    m = _progress(8, [2])
    assert m.startswith("stopped by SIGTERM after epoch 2;") and "ckpt-2 (after epoch 2)" in m, m
    # Mid-epoch 2, and the first epoch: never "stopped at epoch 2; no epoch had finished".
    assert "in epoch 2, after step 1/4" in _progress(5, [1])
    m = _progress(2, [])
    assert "in epoch 1, after step 2/4" in m and "no epoch had finished" in m, m


# ------------------------------------------------------------------ 7. a sweep's folder as --model_dir


@pytest.mark.parametrize("layout", ["name", "name/seed_0", "weight_decay=1e-4/name/seed_0"])
def test_a_model_dir_holding_a_sweep_is_refused(finished, tmp_path, layout):
    sweep = tmp_path / "results"
    shutil.copytree(finished, sweep / layout)
    before = snapshot(sweep)
    one_error_line(train(sweep), 2, "holds the runs of a sweep", tags.RUN_CONFIG_FILE)
    assert snapshot(sweep) == before


# ------------------------------------------------------------------ errors that name their cause


def test_tfds_data_dir_that_is_a_file_is_named(tmp_path):
    path = tmp_path / "cifar-10-binary.tar.gz"
    path.write_bytes(b"x")
    one_error_line(train(tmp_path / "run", "--data_source=tfds", f"--data_dir={path}"), 2,
                   "is a file", "--data_source=binary")


def test_a_finished_run_on_a_read_only_mount_is_finished(finished, tmp_path):
    with tmpfs(tmp_path / "ro", "64m") as mount:
        shutil.copytree(finished, mount / "run")
        assert subprocess.run(["mount", "-o", "remount,ro", str(mount)], capture_output=True).returncode == 0
        r = train(mount / "run")
        assert r.returncode == 0, r.stderr[-3000:]
        assert "already finished" in r.stdout


# ------------------------------------------------------------------ short runs: BN's lag


def test_the_final_report_names_precise_bn_when_bn_lags_once():
    logs = {"accuracy": 0.35, "val_accuracy": 0.10, "loss": 1.9}
    text = callbacks.final_report("runs/quick", 2, logs, steps=200, bn_decay=0.997)
    assert text.count("analysis.precise_bn") == 1 and "BN's moving averages" in text, text
    # A long run, or test accuracy close to train accuracy: no note.
    assert "precise_bn" not in callbacks.final_report("r", 150, logs, steps=58500, bn_decay=0.997)
    assert "precise_bn" not in callbacks.final_report("r", 2, dict(logs, val_accuracy=0.33),
                                                    steps=200, bn_decay=0.997)
