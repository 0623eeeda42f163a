"""What a GPU run does by default, forced on this CPU.

On a GPU, `--jit_compile=auto` compiles the train step with XLA, `setup_runtime` turns on
memory growth, and the runner gives each run a share of one GPU. CPU XLA compiles the
same graph that GPU XLA does, so every step variant trains here with `jit_compile=True`:
each conv-factor mode, each optimizer, each precision, several steps per call, a killed
and resumed run, and the runner. The XLA step's updates are compared with the non-XLA
step's from the same state, within float32 bounds derived below.

The whole suite can also run this way: RESNET_CIFAR_TEST_XLA=1 (tests/helpers.py).
"""

import os
import signal

import keras
import numpy as np
import pytest
import tensorflow as tf

from resnet_cifar import config as config_lib
from resnet_cifar import events, models, optim, train
from tests.helpers import TAU, U32, batch, fabricate_baseline, meaningful
from tests.test_per_channel import fabricate_channel_log

STEPS = 3
STEPS_PER_EPOCH = 2        # the 3 steps cross an epoch boundary (diagnostics restart, factor moves)

# conv-factor modes: (TrainConfig fields, needs a baseline to replay)
MODES = {
    "none": (dict(), False),
    "noconv_l2": (dict(conv_l2=False), False),
    "piecewise": (dict(conv_l2=False, conv_grad_scale=True, conv_lr_factor="piecewise"), False),
    "replay": (dict(conv_l2=False, conv_grad_scale=True, conv_lr_factor="replay", train_epochs=4), True),
    "per_layer": (dict(conv_l2=False, conv_grad_scale=True, conv_lr_factor="per_layer", train_epochs=4), True),
    "per_channel": (dict(conv_l2=False, conv_grad_scale=True, conv_lr_factor="per_channel", train_epochs=4),
                    True),
}


@pytest.fixture(autouse=True)
def no_op_determinism():
    """Op determinism is process-wide, and an in-process run of another test file in this
    worker may have turned it on: Keras then compiles no XLA step (see config.py)."""
    from tensorflow.python.framework import config as tf_config

    was = tf_config.is_op_determinism_enabled()
    tf_config.disable_op_determinism()
    yield
    if was:
        tf_config.enable_op_determinism()


@pytest.fixture(scope="module")
def baseline_dir(tmp_path_factory):
    """A fabricated finished baseline with per-layer and per-channel conv_sqsum logs."""
    path = fabricate_baseline(str(tmp_path_factory.mktemp("xla") / "baseline"))
    fabricate_channel_log(path)
    return path


def build(jit, baseline_dir=None, seed=1, **fields):
    """The model training builds for these fields, with or without XLA."""
    keras.utils.set_random_seed(seed)
    if fields.get("conv_lr_factor") in config_lib.REPLAY_FACTORS and fields.get("conv_grad_scale"):
        fields["replay_from"] = baseline_dir
    cfg = config_lib.TrainConfig(model_dir="/unused", batch_size=8, jit_compile=jit, **fields)
    baseline = None
    if "replay_from" in fields:
        baseline = events.load_baseline(baseline_dir, cfg.train_epochs,
                                              per_channel=cfg.conv_lr_factor == "per_channel")
    model = train.build_model(cfg, STEPS_PER_EPOCH, baseline)
    assert model.jit_compile is jit
    return model, cfg


def copy_state(src, dst):
    """dst's weights, BN statistics and optimizer state (iterations included) := src's."""
    assert len(src.variables) == len(dst.variables)
    for a, b in zip(src.variables, dst.variables):
        b.assign(a)
    assert len(src.optimizer.variables) == len(dst.optimizer.variables)
    for a, b in zip(src.optimizer.variables, dst.optimizer.variables):
        b.assign(a)


# ----------------------------------------------------------------------------- the bound
#
# Both steps start from the same float32 state and differ only in float32 rounding: XLA
# fuses and reorders the same operations. TF1 momentum's update is -rate * a_new with
# a_new = momentum * a + s * (g + wd * w); a and w are the same on both sides, so
#   |du_xla - du_eager| <= rate * (|s * dg| + |ds * (g + wd * w)|) + 2 * 2u|w|
# - dg, the data gradient's rounding: the same analysis as the NumPy comparisons
#   (tests/helpers.py): |dg| <= TAU * |g| for two float32 computations of one gradient;
# - ds, the conv factor's rounding: it is a sum of positive squares (a layer's, at most
#   n_max = 3*3*64*64 = 36864 terms, then at most L = 22 layer sums), times or over a
#   float32 constant; a sum of positive terms errs by at most (n-1)u relative (Higham,
#   Thm 4.3), so |ds| <= 2 * (n_max + L + 4) * u * s for the two sides (2.2e-3 each);
# - reading each update back as a difference of float32 weights: 2u|w| per side.
# rate * s * g is the part of rate * (a_new - momentum * a) that is not L2; the eager
# model's accumulators give it (the L2 part is computed from w, the same on both sides).
#
# One effect is not rounding of a smooth function: a ReLU whose input lies within rounding
# of zero (|z| ~ 1e-7 of an O(1) normalized input) is on in one graph and off in the other.
# About 131k ReLU inputs per early layer of a batch of 8 make that happen about once a step
# somewhere in the network. The flipped element's backward signal is then one term more or
# less in the N = 8 * 32 * 32 = 8192-term reductions of the gradients below it; with terms of
# random sign |g| ~ sqrt(N) rms(term), and one term is at most ~4.5 rms (the largest of 8192
# near-normal terms), so a flip moves those gradients by at most ~4.5 / sqrt(N) = 5% of |g|.
# Measured: 3 of 65 tensors at 1.0-1.3% in one step of four, the median tensor at 5e-6.
# So every tensor is held to TAU plus two flips, and at least 3/4 of the tensors (those that
# no flip reaches) to TAU alone: a wrong L2 set (22 of 65 tensors) or factor fails that.
FLIP = 4.5 / np.sqrt(8 * 32 * 32)


def factor_gamma(model):
    """One side's relative rounding of the conv factor: (n_max + L + 4) u (see above)."""
    kernels = models.conv_kernels(model)
    return (max(int(np.prod(k.shape)) for k in kernels) + len(kernels) + 4) * U32


def compare_momentum_steps(xla, plain, cfg, steps=STEPS, name=""):
    """`steps` steps of both models from the same state (xla's), each update compared."""
    conv = {id(v) for v in models.conv_kernels(xla)}
    gamma = factor_gamma(xla)
    in_l2 = {id(v) for v in plain.l2_variables()}
    for step in range(steps):
        copy_state(xla, plain)
        x, y = batch(step)
        before = [v.numpy().astype(np.float64) for v in xla.trainable_variables]
        accum = [a.numpy().astype(np.float64) for a in plain.optimizer.accumulators]
        rate = float(plain.optimizer.learning_rate.numpy())
        xla.train_on_batch(x, y)
        plain.train_on_batch(x, y)
        within_rounding, failures = 0, []
        for i, (vx, ve) in enumerate(zip(xla.trainable_variables, plain.trainable_variables)):
            step_part = rate * (plain.optimizer.accumulators[i].numpy().astype(np.float64) - 0.9 * accum[i])
            data_part = step_part - (rate * cfg.weight_decay * before[i] if id(vx) in in_l2 else 0.0)
            scaled = cfg.conv_grad_scale and id(vx) in conv
            rounding = (TAU * np.linalg.norm(data_part) + 4 * U32 * np.linalg.norm(before[i]) + 1e-12
                        + (2 * gamma * np.linalg.norm(step_part) if scaled else 0.0))
            err = np.linalg.norm(vx.numpy().astype(np.float64) - ve.numpy().astype(np.float64))
            within_rounding += err <= rounding
            if err > rounding + 2 * FLIP * np.linalg.norm(data_part):
                failures.append(f"{vx.path}: |xla - eager| {err:.3g} (|update| {np.linalg.norm(step_part):.3g})")
        n = len(xla.trainable_variables)
        assert not failures, f"{name} step {step}: beyond rounding and two ReLU flips: {failures[:3]}"
        assert within_rounding >= 0.75 * n, f"{name} step {step}: {n - within_rounding} of {n} beyond rounding"


@pytest.mark.parametrize("mode", list(MODES))
def test_xla_step_matches_the_eager_step_in_every_mode(baseline_dir, mode):
    fields, _ = MODES[mode]
    xla, _ = build(True, baseline_dir, **fields)
    plain, cfg = build(False, baseline_dir, **fields)
    compare_momentum_steps(xla, plain, cfg, name=mode)
    # The logged diagnostics agree too: the conv factor within its two sums' rounding.
    fx, fe = xla.diagnostics.means(), plain.diagnostics.means()
    np.testing.assert_allclose(fx["lr_factor"], fe["lr_factor"], rtol=2 * factor_gamma(xla))
    assert fx["steps"] == fe["steps"] == 1 and fx["learning_rate"] == pytest.approx(fe["learning_rate"])
    np.testing.assert_allclose(fx["relative_step"], fe["relative_step"], rtol=2 * FLIP + TAU)
    if mode in ("per_layer", "per_channel"):
        assert np.ptp(fx["lr_factor"]) > 0.01            # each layer its own factor
    if cfg.conv_grad_scale:
        assert not np.allclose(fx["lr_factor"], 1.0, atol=0.01)   # factors that are not one


@pytest.mark.parametrize("mistake", [dict(conv_l2=False), dict(weight_decay=0.2)])
def test_the_comparison_catches_a_different_step(mistake):
    """The same comparison fails when the XLA model's L2 differs (weight decay 0.1, so that
    L2 is about a tenth of a conv kernel's step): the bound is not so loose as to pass anything."""
    xla, _ = build(True, **dict(dict(weight_decay=0.1), **mistake))
    plain, cfg = build(False, weight_decay=0.1)
    with pytest.raises(AssertionError):
        compare_momentum_steps(xla, plain, cfg, steps=1)


@pytest.mark.parametrize("optimizer,weight_decay", [("adam", 1e-2), ("adamw", 50.0)])
def test_xla_step_matches_the_eager_step_for_every_optimizer(optimizer, weight_decay):
    """Adam divides each element by its own gradient scale, so the data gradient's rounding is
    amplified where that scale is small: the same bound as tests/test_optimizers.py derives."""
    from tests.test_optimizers import adam_bound, assert_mostly_well_conditioned

    xla, cfg = build(True, optimizer=optimizer, weight_decay=weight_decay)
    plain, _ = build(False, optimizer=optimizer, weight_decay=weight_decay)
    for step in range(STEPS):
        copy_state(xla, plain)
        x, y = batch(step)
        before = [v.numpy().astype(np.float64) for v in xla.trainable_variables]
        xla.train_on_batch(x, y)
        plain.train_on_batch(x, y)
        state = adam_state(plain)
        t = step + 1
        grads = [np.asarray(g) for g in data_gradients_at(plain, before, x, y)]
        counts = [adam_bound(vx.numpy() - before[i], ve.numpy() - before[i], before[i], *state[i], t,
                             cfg.base_learning_rate, grads[i], f"{optimizer} step {t} {vx.path}")
                  for i, (vx, ve) in enumerate(zip(xla.trainable_variables, plain.trainable_variables))]
        assert_mostly_well_conditioned(counts)


def adam_state(model):
    """(m, v) per trainable variable, float64, from Keras' Adam after its step."""
    opt = model.optimizer
    return [(opt._momentums[i].numpy().astype(np.float64), opt._velocities[i].numpy().astype(np.float64))
            for i in range(len(model.trainable_variables))]


def data_gradients_at(model, weights, x, y):
    """The data gradient at `weights` (the state before the step), for the bound's scale."""
    from tests.helpers import data_gradients

    now = [v.numpy() for v in model.trainable_variables]
    for v, w in zip(model.trainable_variables, weights):
        v.assign(w.astype(np.float32))
    try:
        return data_gradients(model, x, y)
    finally:
        for v, w in zip(model.trainable_variables, now):
            v.assign(w)


@pytest.mark.parametrize("dtype", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_every_precision_trains_under_xla(dtype):
    """Weights stay float32, the factor is float32 conv_sqsum/800 of the weights before the
    step (a float32 sum of 272k squares: well under 1e-5 relative), the loss is finite."""
    try:
        model, _ = build(True, conv_l2=False, conv_grad_scale=True, dtype=dtype)
        if dtype != "float32":
            assert model.layers[1].compute_dtype != "float32"
        for step in range(STEPS):
            sq = sum(float(np.sum(k.numpy().astype(np.float64) ** 2)) for k in models.conv_kernels(model))
            logs = model.train_on_batch(*batch(step), return_dict=True)
            assert np.isfinite(logs["loss"]), logs
        assert all(v.dtype == "float32" for v in model.trainable_variables)
        piecewise = float(optim.piecewise((STEPS - 1) / STEPS_PER_EPOCH))
        np.testing.assert_allclose(model.diagnostics.means()["lr_factor"], piecewise * sq / 800.0, rtol=1e-5)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def test_steps_per_execution_under_xla_gives_the_steps_of_one_per_call():
    """Two steps per compiled call against one: the same graph run twice per call, so the
    same float32 operations; only XLA's fusion across the two may round differently."""
    x, y = batch(4)
    results = []
    for spe in (1, 2):
        keras.utils.set_random_seed(7)
        cfg = config_lib.TrainConfig(model_dir="/unused", batch_size=8, jit_compile=True, steps_per_execution=spe,
                                     conv_l2=False, conv_grad_scale=True)
        model = train.build_model(cfg, steps_per_epoch=4)
        before = [v.numpy().astype(np.float64) for v in model.trainable_variables]
        model.fit(tf.data.Dataset.from_tensors((x, y)).repeat(4), epochs=1, steps_per_epoch=4, verbose=0)
        results.append([v.numpy().astype(np.float64) for v in model.trainable_variables])
    for w0, a, b, v in zip(before, *results, model.trainable_variables):
        # 4 steps of rounding of the data gradient (TAU each) on the total update.
        err, total = np.linalg.norm(a - b), np.linalg.norm(a - w0)
        assert err <= 4 * TAU * total + 4 * U32 * np.linalg.norm(w0) + 1e-12, (v.path, err, total)


# ----------------------------------------------------------------------------- what auto means on a GPU


def test_auto_on_a_gpu_means_xla_and_memory_growth(monkeypatch):
    """With a GPU listed, auto resolves to XLA and every GPU gets memory growth; the model
    built under that resolution trains here (CPU XLA compiles the graph a GPU's XLA does)."""
    fake = [tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU"),
            tf.config.PhysicalDevice("/physical_device:GPU:1", "GPU")]
    real = tf.config.list_physical_devices
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: fake if kind == "GPU" else real(kind))
    grown = []
    monkeypatch.setattr(tf.config.experimental, "set_memory_growth", lambda d, on: grown.append((d.name, on)))
    cfg = config_lib.TrainConfig(model_dir="/unused", batch_size=8)
    assert cfg.jit_compile is None and train.use_xla(cfg) is True
    train.setup_runtime(cfg)
    assert grown == [(d.name, True) for d in fake]
    keras.utils.set_random_seed(0)
    model = train.build_model(cfg, STEPS_PER_EPOCH)
    assert model.jit_compile is True
    logs = model.train_on_batch(*batch(), return_dict=True)
    assert np.isfinite(logs["loss"])
    monkeypatch.setattr(tf.config, "list_physical_devices", real)
    assert train.use_xla(cfg) is False                 # and on this CPU: no XLA


def test_auto_without_a_gpu_leaves_the_cpu_alone():
    for value, want in ((None, False), (True, True), (False, False)):
        assert train.use_xla(config_lib.TrainConfig(model_dir="/x", jit_compile=value)) is want


def test_deterministic_and_xla_exclude_each_other():
    """Keras compiles no XLA step under TF's op determinism: an explicit request for both is
    refused in one line, and auto on a GPU resolves to no XLA under --deterministic."""
    with pytest.raises(config_lib.ConfigError, match="--deterministic and --jit_compile=true exclude each other"):
        config_lib.TrainConfig(model_dir="/x", deterministic=True, jit_compile=True)
    cfg = config_lib.TrainConfig(model_dir="/x", deterministic=True)
    gpu = [tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tf.config, "list_physical_devices", lambda kind=None: gpu)
        assert train.use_xla(cfg) is False
        assert train.use_xla(config_lib.TrainConfig(model_dir="/x")) is True


# ----------------------------------------------------------------------------- a killed XLA run


def test_xla_run_killed_then_resumed_is_bit_exact(tmp_path):
    """A run under XLA, SIGKILLed after epoch 1 and resumed, ends bitwise equal to the same run
    uninterrupted: weights, optimizer state and every logged value. Not --deterministic (no
    XLA under it): CPU XLA runs the compiled step as one program, the same each time, and the
    data order is a function of the seed and step (measured: two runs agree to the bit)."""
    from tests.cifar_files import write_binary_cifar
    from tests.helpers import assert_same_curves, train_cli
    from tests.test_reliability import (EPOCHS, assert_same_weights, latest_checkpoint, run_until_line,
                                        train_args)

    data = tmp_path / "data"
    write_binary_cifar(str(data), per_train_file=16, num_test=32)
    flags = dict(deterministic=False, jit_compile="true")
    reference = str(tmp_path / "reference")
    r = train_cli(*train_args(reference, str(data), **flags), log_level=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json_runtime(reference)["xla"] is True
    run = str(tmp_path / "run")
    args = train_args(run, str(data), **flags)
    code, _ = run_until_line(args, f"epoch 1/{EPOCHS} |", tmp_path / "killed.err")
    assert code == -signal.SIGKILL and latest_checkpoint(run) == "ckpt-1"
    r = train_cli(*args, log_level=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not meaningful(r.stderr), r.stderr[-3000:]
    assert "resuming" in r.stdout and "after epoch 1 (ckpt-1)" in r.stdout, r.stdout
    assert_same_weights(reference, run)
    assert_same_curves(reference, run)


def json_runtime(model_dir):
    import json

    with open(os.path.join(model_dir, "run_config.json")) as f:
        return json.load(f)["runtime"]
