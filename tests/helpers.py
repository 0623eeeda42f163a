"""Helpers shared by the test modules: processes, their stderr, run folders, fabricated event
logs, flags, and the float32 tolerances of train-step comparisons.

TensorFlow and Keras are imported inside the helpers that need them: importing this module
does not import TensorFlow.
"""

import contextlib
import hashlib
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from resnet_cifar import events, fidelity, tags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository

# The suite's XLA switch: RESNET_CIFAR_TEST_XLA=1 makes every training test train as a GPU
# does by default (`--jit_compile=auto` is XLA on a GPU): the in-process models of
# `make_model` compile their step with XLA, and every trainer and runner started through
# these helpers gets `--jit_compile=true` unless the test sets --jit_compile itself or
# trains with --deterministic (which Keras never compiles with XLA: see config.py).
# CI runs the training tests both ways (.ci/run).
XLA = os.environ.get("RESNET_CIFAR_TEST_XLA", "") == "1"


def with_xla(args):
    """Training flags `args`, plus `--jit_compile=true` under the suite's XLA switch."""
    args = [str(a) for a in args]
    if XLA and not any(a.startswith(("--jit_compile", "--deterministic")) for a in args):
        args.append("--jit_compile=true")
    return args

# ResNet-20's conv layers in creation order, as Keras names them.
LAYERS = ["conv2d"] + [f"conv2d_{i}" for i in range(1, 22)]


# ----------------------------------------------------------------------------- processes


def env(log_level=None):
    """os.environ with the repository on PYTHONPATH and, if given, TensorFlow's C++ log level."""
    out = dict(os.environ, PYTHONPATH=ROOT)
    if log_level is not None:
        out["TF_CPP_MIN_LOG_LEVEL"] = str(log_level)
    return out


def python(*args, log_level=None, timeout=300):
    """`python *args` in a fresh process started in the repository with env(log_level);
    the CompletedProcess, its output captured as text."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env(log_level),
                          capture_output=True, text=True, timeout=timeout)


def train_cli(*args, log_level=None, timeout=300):
    """The training entry point, `python -m resnet_cifar.train *args` (see `python`), with
    `--jit_compile=true` added under the suite's XLA switch."""
    if not any(str(a).startswith(("--helpfull", "--help")) for a in args):
        args = with_xla(args)
    return python("-m", "resnet_cifar.train", *args, log_level=log_level, timeout=timeout)


# A ResNet-8 run on synthetic data, 2 epochs of 2 steps.
SMALL = ["--data_source=synthetic", "--steps_per_epoch=2", "--eval_steps=1", "--resnet_size=8",
         "--train_epochs=2", "--batch_size=16", "--boundary_epochs=1", "--decay_rates=1,0.1", "--verbose=0"]


def train_small(model_dir, *extra, timeout=300):
    """Trains SMALL (then `extra` flags) into `model_dir`, TensorFlow's C++ log level 2."""
    return train_cli(f"--model_dir={model_dir}", *SMALL, *extra, log_level=2, timeout=timeout)


# Tiny deterministic synthetic ResNet-8 runs for the runner (after its `--`).
TINY = with_xla(["--data_source=synthetic", "--train_epochs=2", "--steps_per_epoch=2", "--eval_steps=1",
                 "--batch_size=8", "--boundary_epochs=1", "--decay_rates=1,0.1", "--deterministic",
                 "--resnet_size=8"])


# TensorFlow's C++ start-up lines (I0000 00:00:..., E0000 ..., absl W1125 03:37:21...).
TF_NOISE = re.compile(r"^([IWEF]\d{4} \d\d:\d\d:\d\d|WARNING: All log messages before absl)")


def meaningful(stderr):
    """stderr without blank lines and TensorFlow's start-up lines."""
    return [line for line in stderr.splitlines() if line.strip() and not TF_NOISE.match(line)]


def one_error_line(r, code, *needles):
    """Exit `code`, and exactly one meaningful stderr line: 'error: ...' containing `needles`
    (as str); no traceback and no warning anywhere on stderr. Returns the error line."""
    lines = meaningful(r.stderr)
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "Warning" not in r.stderr, r.stderr[-3000:]
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


@contextlib.contextmanager
def tmpfs(mount, size, why_skipped=""):
    """A tmpfs of `size` (as mount's -o size=) mounted on `mount` (made here) for the block;
    the test is skipped where mounting is not allowed."""
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here{why_skipped}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


# ----------------------------------------------------------------------------- flags


def parse(argv):
    """The training program's own flag definitions, parsed afresh from `argv`, as a TrainConfig."""
    from resnet_cifar import config as config_lib
    from resnet_cifar import train

    train.FLAGS.unparse_flags()
    try:
        train.FLAGS(["train"] + list(argv))
        return config_lib.from_flags(train.FLAGS)
    finally:
        train.FLAGS.unparse_flags()


# ----------------------------------------------------------------------------- run folders


def snapshot(folder):
    """Every file under `folder`: relative path -> (size, mtime_ns, sha1). {} if absent."""
    out = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            st = os.stat(path)
            with open(path, "rb") as f:
                digest = hashlib.sha1(f.read()).hexdigest()
            out[os.path.relpath(path, folder)] = (st.st_size, st.st_mtime_ns, digest)
    return out


def curves(model_dir):
    """(subdir, tag) -> (steps, values) of everything logged, as the analysis reads it."""
    out = {}
    for subdir in (tags.TRAIN_DIR, tags.VALIDATION_DIR):
        for tag, series in events.read_all_scalars(str(model_dir), subdir).items():
            out[subdir, tag] = series
    return out


def assert_same_curves(dir_a, dir_b):
    """The two runs logged the same tags, at the same steps, with bitwise-identical values."""
    a, b = curves(dir_a), curves(dir_b)
    assert sorted(a) == sorted(b) and a
    for key in a:
        np.testing.assert_array_equal(a[key][0], b[key][0], err_msg=str(key))
        np.testing.assert_array_equal(a[key][1], b[key][1], err_msg=str(key))
        assert a[key][1].tobytes() == b[key][1].tobytes(), (key, a[key][1], b[key][1])
    return a


# ----------------------------------------------------------------------------- fabricated event logs


def f32(values):
    """What a logged value reads back as: tf.summary stores float32."""
    return np.asarray(values, dtype=np.float32).astype(np.float64)


def write_events(folder, scalars):
    """Write tag -> list of (step, value) with one TF2 summary writer, in list order."""
    import tensorflow as tf

    writer = tf.summary.create_file_writer(folder)
    with writer.as_default():
        for tag, points in scalars.items():
            for step, value in points:
                tf.summary.scalar(tag, value, step=step)
    writer.close()


def write_run(run_dir, train=None, validation=None, config=None, done=False, *, epochs):
    """A fake run folder: train/ and validation/ as tag -> (steps, values); run_config.json
    with {"train_epochs": epochs, "seed": 0} updated by `config`; if `done`, a done.json
    naming `epochs`."""
    os.makedirs(run_dir, exist_ok=True)
    for subdir, scalars in ((tags.TRAIN_DIR, train), (tags.VALIDATION_DIR, validation)):
        if scalars:
            write_events(os.path.join(run_dir, subdir),
                         {tag: list(zip(s, v)) for tag, (s, v) in scalars.items()})
    with open(os.path.join(run_dir, tags.RUN_CONFIG_FILE), "w") as f:
        json.dump({"config": dict({"train_epochs": epochs, "seed": 0}, **(config or {}))}, f)
    if done:
        with open(os.path.join(run_dir, tags.DONE_FILE), "w") as f:
            json.dump({"epochs": epochs}, f)
    return run_dir


# A baseline to replay: conv_sqsum and every layer's at epochs 0..4.
BASELINE_EPOCHS = np.array([0, 1, 2, 3, 4])
BASELINE_TOTAL = np.array([800.0, 1000.0, 1200.0, 1100.0, 1000.0])


def layer_curve(i):
    """A distinct trajectory per layer: starts at its share, grows by (i+1)% per epoch."""
    return (10.0 + i) * (1.0 + 0.01 * (i + 1)) ** BASELINE_EPOCHS


def fabricate_baseline(path, done=True, with_sqsum=True, epochs=BASELINE_EPOCHS, per_layer=tags.per_layer):
    """A baseline run folder (conv_l2) logging the loss, BASELINE_TOTAL and each layer's
    layer_curve at `epochs`; done.json names the last of them if `done`."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, tags.RUN_CONFIG_FILE), "w") as f:
        json.dump({"config": {"conv_l2": True}}, f)
    if done:
        with open(os.path.join(path, tags.DONE_FILE), "w") as f:
            json.dump({"epochs": int(epochs[-1])}, f)
    steps = [int(e) for e in epochs]
    scalars = {tags.EPOCH_LOSS: [(e, 1.0) for e in steps]}
    if with_sqsum:
        scalars[tags.CONV_SQSUM] = [(e, BASELINE_TOTAL[e]) for e in steps]
        # Written in reverse order: the reader must align by name, not by position.
        for i in reversed(range(len(LAYERS))):
            scalars[per_layer(tags.CONV_SQSUM, LAYERS[i])] = [(e, layer_curve(i)[e]) for e in steps]
    write_events(os.path.join(path, tags.TRAIN_DIR), scalars)
    return path


# ----------------------------------------------------------------------------- the train step

BATCH = 8


def hand_piecewise(e):
    """The post's tf.where chain, transcribed literally (an independent copy of
    fidelity.piecewise, which training and the figures share)."""
    if e < 10.0:
        return 1.0 - 0.05 * e
    if e < 50.0:
        return 0.5 - 0.0025 * (e - 10.0)
    if e < 100.0:
        return 0.4 + 0.006 * (e - 50.0)
    return 0.7 + 0.001 * (e - 100.0)


def make_model(steps_per_epoch=10, seed=1, **overrides):
    """A model built as training builds it (batch BATCH; XLA under the suite's switch, unless
    `jit_compile` is given), and its TrainConfig."""
    import keras

    from resnet_cifar import config as config_lib
    from resnet_cifar import train

    keras.utils.set_random_seed(seed)
    overrides.setdefault("jit_compile", XLA)
    cfg = config_lib.TrainConfig(model_dir="/unused", batch_size=BATCH, **overrides)
    return train.build_model(cfg, steps_per_epoch), cfg


def batch(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, BATCH).astype(np.int32)
    return x, y


def data_gradients(model, x, y):
    """Gradient of the mean cross entropy alone (no L2, no scaling), by plain autodiff.

    BN in training mode uses batch statistics, so this forward pass is the one the
    train step will make; its moving-average update does not touch trainables.
    """
    import tensorflow as tf

    with tf.GradientTape() as tape:
        logits = model(x, training=True)
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
    return [g.numpy().astype(np.float64) for g in tape.gradient(loss, model.trainable_variables)]


# Float32 error analysis of the comparison (u = 2**-24, unit roundoff).
#
# The update is rate * accum with accum = momentum * accum + factor * (g + wd * w). Everything
# but the data gradient g is elementwise arithmetic, exact to a few u relative to each
# element, and reading the update back as a difference of float32 weights rounds it by at
# most u * |w| per element (2 u |w| in norm, with margin). The data gradient is where two
# float32 computations (the test's autodiff, and the graph inside the train step, whose
# kernels differ between CPUs and with oneDNN on or off) legitimately differ:
#  - each weight or BN-parameter gradient is a reduction over the N = 8 * 32 * 32 = 8192
#    positions of a batch of 8 (the longest reduction of the network; the conv reductions
#    of the backward pass are 3 * 3 * 64 = 576 long at most);
#  - a float32 sum of n terms errs by at most gamma_n * sum|t_i|, gamma_n ~ n u (Higham,
#    "Accuracy and Stability of Numerical Algorithms", Thm 4.3), and errors entering at each
#    of the L = 20 layers of the backward chain add up to first order: L * N * u = 9.8e-3;
#  - the terms' magnitudes sum|t_i| exceed |g| where terms cancel (BN's backward pass
#    subtracts the batch means); worst-case n u overestimates random-sign rounding by ~sqrt(n)
#    (Higham & Mary, SISC 2019), a factor 90 that covers such cancellation.
# So |error| <= L * N * u * rate * |accum of data gradients| + 2 u |w|, per tensor. Measured
# worst ratio error / (rate * |data accum|) on an AVX-512 CPU: 3.5e-3 with
# TF_ENABLE_ONEDNN_OPTS=0, 2.7e-4 with =1, i.e. 2.8x and 36x inside the bound. test_train_step's
# weight decay (0.1) makes the L2 part 10% of a conv kernel's update and most of a BN
# scale's, so an L2 mistake exceeds the bound: twice the coefficient, or the conv kernels
# wrongly in or out of the sum, gave errors 15x the bound on the first conv kernel and
# 130x on a BN scale.
U32 = 2.0 ** -24
REDUCTION = BATCH * 32 * 32
DEPTH = fidelity.RESNET_SIZE
TAU = DEPTH * REDUCTION * U32


def assert_close_update(actual, desired, weights, name, data_part):
    """`actual` update within float32 rounding of `desired`: see the analysis above."""
    err = np.linalg.norm(actual - desired)
    bound = TAU * np.linalg.norm(data_part) + 2 * U32 * np.linalg.norm(weights) + 1e-12
    assert err <= bound, (f"{name}: |error| {err:.3g} > {bound:.3g} (|update| {np.linalg.norm(desired):.3g}, "
                          f"|data part| {np.linalg.norm(data_part):.3g})")


def assert_close_in_norm(actual, desired, weights, name, tol=1e-3):
    """`actual` within `tol` of `desired`'s norm, plus the 2 u |w| of reading an update back
    as a difference of float32 weights: for comparisons that involve no independent
    autodiff (two train steps of one graph), or that bound what they compare themselves."""
    err = np.linalg.norm(actual - desired)
    bound = tol * np.linalg.norm(desired) + 2 * U32 * np.linalg.norm(weights) + 1e-12
    assert err <= bound, f"{name}: |error| {err:.3g} > {bound:.3g} (|update| {np.linalg.norm(desired):.3g})"


# ----------------------------------------------------------------------------- the architecture written out

STAGES = (16, 32, 64)   # the filters of ResNet-(6n+2)'s three stages


def hand_parameter_count(resnet_size):
    """Closed form: 432 + sum over stages of (10·c_in·f + 9·(2n-1)·f²) conv weights,
    2·(16 + (2n+1)·(16+32+64)) BN parameters, 650 dense."""
    n = (resnet_size - 2) // 6
    conv = 3 * 3 * 3 * 16
    c_in = 16
    for f in STAGES:
        conv += 10 * c_in * f + 9 * (2 * n - 1) * f * f
        c_in = f
    bn = 2 * (16 + (2 * n + 1) * sum(STAGES))
    return conv + bn + 64 * 10 + 10


def truncated_normal_square_moments(a=2.0):
    """E[Z^2], E[Z^4] of a standard normal truncated to [-a, a] (closed form).

    With P = Phi(a) - Phi(-a) and phi the density, integrating by parts:
    int_{-a}^{a} z^2 phi = P - 2 a phi(a),  int z^4 phi = 3 P - 2 (a^3 + 3 a) phi(a).
    """
    phi = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    p = math.erf(a / math.sqrt(2))
    m2 = 1 - 2 * a * phi / p
    m4 = 3 - 2 * (a ** 3 + 3 * a) * phi / p
    return m2, m4
