"""The custom train step against an independent float64 NumPy computation of the update."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from resnet_cifar import config as config_lib
from resnet_cifar import fidelity, models, optim, train
from tests.helpers import XLA, BATCH, assert_close_update, batch, data_gradients, hand_piecewise, make_model

MOMENTUM = fidelity.MOMENTUM


def expected_update(model, cfg, grads_data, weights, accum, step, steps_per_epoch, data_accum):
    """NumPy float64: L2 gradient, conv factor, TF1 momentum.

    Returns (new weights, new accum, factor, new data_accum): data_accum is the momentum
    accumulator of the data gradients alone (scaled like them), the part of the update that
    carries float32 rounding (see assert_close_update in tests/helpers.py).
    """
    names = [v.path for v in model.trainable_variables]
    is_conv = ["conv2d" in n for n in names]         # the post's name-based selection
    epoch = step / steps_per_epoch
    rate = cfg.base_learning_rate * cfg.decay_rates[int(np.searchsorted(cfg.boundary_epochs, epoch, "right"))]
    conv_sq = sum(float(np.sum(w ** 2)) for w, c in zip(weights, is_conv) if c)
    factor = hand_piecewise(epoch) * conv_sq / 800.0 if cfg.conv_grad_scale else 1.0
    new_w, new_a, new_d = [], [], []
    for g, w, a, d, c in zip(grads_data, weights, accum, data_accum, is_conv):
        scale = factor if c else 1.0
        l2 = cfg.weight_decay * w if (cfg.conv_l2 or not c) else 0.0   # d/dw of wd * sum(w^2)/2
        a = MOMENTUM * a + scale * (g + l2)              # TF1: accumulate raw gradients
        new_w.append(w - rate * a)                       # ... times the current rate
        new_a.append(a)
        new_d.append(MOMENTUM * d + scale * g)
    return new_w, new_a, factor, new_d, rate


def check_steps(n_steps, steps_per_epoch=10, weight_decay=0.1, **overrides):
    """n train steps, each against NumPy. weight_decay is raised from 2e-4 so that an L2
    mistake (e.g. Keras' L2, twice the original) moves updates far beyond tolerance."""
    model, cfg = make_model(steps_per_epoch, weight_decay=weight_decay, **overrides)
    x, y = batch()
    accum = [np.zeros(v.shape) for v in model.trainable_variables]
    data_accum = [np.zeros(v.shape) for v in model.trainable_variables]
    for step in range(n_steps):
        weights = [v.numpy().astype(np.float64) for v in model.trainable_variables]
        grads = data_gradients(model, x, y)
        want, accum, factor, data_accum, rate = expected_update(
            model, cfg, grads, weights, accum, step, steps_per_epoch, data_accum)
        model.train_on_batch(x, y)
        for v, w0, w1, d in zip(model.trainable_variables, weights, want, data_accum):
            assert_close_update(v.numpy() - w0, w1 - w0, w0, v.path, rate * d)
    return model, cfg, factor


def test_baseline_step_matches_numpy():
    check_steps(2)


def test_noconv_l2_step_matches_numpy():
    check_steps(2, conv_l2=False)


def test_conv_lr_scale_step_matches_numpy():
    # steps_per_epoch=1: steps 0 and 1 are epochs 0 and 1, factors 1.0 and 0.95 * sqsum/800.
    model, _, factor = check_steps(2, steps_per_epoch=1, conv_l2=False, conv_grad_scale=True,
                                   boundary_epochs=(50, 100))
    # The factor the step used and logged (each step starts an epoch here, so the epoch mean is
    # the second step's) against NumPy's 0.95 * sqsum / 800 of the weights before that step:
    # a float32 sum of 272k squares, relative error well under 1e-5.
    logged = model.diagnostics.means()["lr_factor"]
    # (sqsum is near 800 here, 0.95 alone is off by about 1e-3: beyond that tolerance.)
    np.testing.assert_allclose(logged, np.full(len(models.conv_kernels(model)), factor), rtol=1e-5)


BOUNDARY = dict(steps_per_epoch=1, boundary_epochs=(1, 2), decay_rates=(1, 0.1, 0.01))


def test_momentum_across_learning_rate_boundary_is_tf1():
    """Boundary at epoch 1 (= step 1): the drop multiplies the whole accumulator at once."""
    check_steps(3, **BOUNDARY)


def test_keras_sgd_would_fail_the_boundary_check(monkeypatch):
    """The check above can fail: with Keras' SGD (its velocity keeps the old rate's part)
    in place of TF1's momentum, the step after the boundary is off the NumPy update."""
    from resnet_cifar import optim

    monkeypatch.setitem(optim.BUILD, "momentum", lambda lr, wd, no_decay: keras.optimizers.SGD(lr, momentum=MOMENTUM))
    check_steps(1, **BOUNDARY)                         # before any boundary the two agree
    with pytest.raises(AssertionError):
        check_steps(2, **BOUNDARY)


def test_scaling_touches_only_conv_kernels():
    """Factor != 1 changes conv updates only; every other variable moves as without scaling."""
    x, y = batch(3)
    deltas = {}
    for scale in (False, True):
        model, _ = make_model(1, seed=5, conv_l2=False, conv_grad_scale=scale)
        # Inflate the conv weights so the factor (piecewise(0) = 1 times sqsum/800) is near 4.
        for k in models.conv_kernels(model):
            k.assign(k * 2.0)
        factor = sum(float(np.sum(k.numpy().astype(np.float64) ** 2)) for k in models.conv_kernels(model)) / 800
        before = [v.numpy() for v in model.trainable_variables]
        model.train_on_batch(x, y)
        deltas[scale] = {v.path: v.numpy() - b for v, b in zip(model.trainable_variables, before)}
        before_w = {v.path: b for v, b in zip(model.trainable_variables, before)}
    conv = {k.path for k in models.conv_kernels(model)}
    for path, d in deltas[True].items():
        if path in conv:
            want = deltas[False][path] * factor
        else:
            want = deltas[False][path]
        assert_close_update(d, want, before_w[path], path, data_part=want)


def test_l2_term_is_half_sum_of_squares_over_right_variables():
    for conv_l2, n_vars in ((True, 68), (False, 46)):
        model, cfg = make_model(conv_l2=conv_l2)
        chosen = [v for v in model.trainable_variables if conv_l2 or "conv2d" not in v.path]
        assert len(chosen) == n_vars == len(model.l2_variables())
        want = cfg.weight_decay * sum(np.sum(v.numpy().astype(np.float64) ** 2) / 2 for v in chosen)
        assert float(model.l2_penalty()) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("epoch,value", [(0, 1.0), (10, 0.5), (30, 0.45), (50, 0.4), (75, 0.55),
                                         (100, 0.7), (150, 0.75)])
def test_piecewise_factor_matches_post(epoch, value):
    assert float(optim.piecewise(float(epoch))) == pytest.approx(value, abs=1e-6)
    assert hand_piecewise(float(epoch)) == pytest.approx(value, abs=1e-12)


def test_piecewise_factor_between_points():
    for e in np.linspace(0, 160, 97):
        assert float(optim.piecewise(e)) == pytest.approx(hand_piecewise(e), abs=1e-5)


def test_diagnostics_of_one_step():
    model, _ = make_model(conv_l2=False)
    x, y = batch(1)
    conv = models.conv_kernels(model)
    before = [k.numpy().astype(np.float64) for k in conv]
    model.train_on_batch(x, y)
    want = [np.linalg.norm(k.numpy() - b) / np.linalg.norm(b) for k, b in zip(conv, before)]
    means = model.diagnostics.means()
    np.testing.assert_allclose(means["relative_step"], want, rtol=1e-3)
    np.testing.assert_allclose(means["lr_factor"], 1.0)
    assert means["learning_rate"] == pytest.approx(0.1 * BATCH / 128)
    assert means["steps"] == 1


def test_learning_rate_scales_with_batch():
    for b in (64, 128, 256):
        cfg = config_lib.TrainConfig(model_dir="/x", batch_size=b)
        assert cfg.base_learning_rate == pytest.approx(0.1 * b / 128)


@pytest.mark.parametrize("dtype", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_keeps_float32_weights_and_factor(dtype):
    """The opt-in mixed policies compute in low precision; weights and the conv factor stay float32."""
    try:
        model, _ = make_model(conv_l2=False, conv_grad_scale=True, dtype=dtype)
        assert model.layers[1].compute_dtype != "float32"            # the first conv runs in low precision
        x, y = batch(2)
        sq = sum(float(np.sum(k.numpy().astype(np.float64) ** 2)) for k in models.conv_kernels(model))
        model.train_on_batch(x, y)
        assert all(v.dtype == "float32" for v in model.trainable_variables)
        np.testing.assert_allclose(model.diagnostics.means()["lr_factor"], sq / 800.0, rtol=1e-5)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def test_steps_per_execution_gives_the_same_updates():
    x, y = batch(4)
    results = []
    for spe in (1, 2):
        keras.utils.set_random_seed(7)
        cfg = config_lib.TrainConfig(model_dir="/unused", batch_size=BATCH, jit_compile=XLA,
                                     steps_per_execution=spe, conv_l2=False, conv_grad_scale=True)
        model = train.build_model(cfg, steps_per_epoch=4)
        ds = tf.data.Dataset.from_tensors((x, y)).repeat(4)
        model.fit(ds, epochs=1, steps_per_epoch=4, verbose=0)
        results.append([v.numpy() for v in model.trainable_variables])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("flags", [{}, {"conv_l2": False},
                                   {"conv_l2": False, "conv_grad_scale": True, "conv_lr_factor": "piecewise"}])
def test_step_traces_to_at_most_1_25x_the_ops_of_a_bare_step(flags):
    """The step's compute ops against a bare GradientTape + Keras SGD step of the same ResNet-20
    (experiments.reference_step, the benchmark's reference loop): per-layer work is grouped, not 22 chains of ops."""
    from experiments import reference_step
    from resnet_cifar import config as config_lib
    from resnet_cifar import train

    model = train.build_model(config_lib.TrainConfig(model_dir="/unused", **flags), 390)
    spec = (tf.TensorSpec([8, 32, 32, 3], tf.float32), tf.TensorSpec([8], tf.int32))
    project = reference_step.compute_ops(tf.function(model.train_step).get_concrete_function(spec))
    _, bare = reference_step.bare_loop(8)
    assert bare > 1000                  # the reference itself is a whole ResNet-20 step
    assert project <= 1.25 * bare, (project, bare)


def test_diagnostics_restart_at_each_epochs_first_step():
    """The sums start afresh at every epoch's first step (iterations % steps_per_epoch == 0),
    with no callback resetting them: after 3 steps of 2-step epochs they hold step 3 alone."""
    model, _ = make_model(steps_per_epoch=2, conv_l2=False)
    for i in range(3):
        x, y = batch(i)
        conv = models.conv_kernels(model)
        before = [k.numpy().astype(np.float64) for k in conv]
        model.train_on_batch(x, y)
        assert model.diagnostics.means()["steps"] == [1, 2, 1][i]
    want = [np.linalg.norm(k.numpy() - b) / np.linalg.norm(b) for k, b in zip(conv, before)]
    np.testing.assert_allclose(model.diagnostics.means()["relative_step"], want, rtol=1e-3)


def test_fit_traces_the_step_once(monkeypatch):
    """Every variable exists before the first trace (a variable created inside it makes
    TensorFlow trace the whole step a second time, seconds of start-up per run)."""
    from resnet_cifar.models import ReproductionModel

    traces = {"train": 0, "test": 0}
    for kind in traces:
        original = getattr(ReproductionModel, f"{kind}_step")

        def counting(self, data, kind=kind, original=original):
            traces[kind] += 1                      # Python runs only while TensorFlow traces
            return original(self, data)
        monkeypatch.setattr(ReproductionModel, f"{kind}_step", counting)
    model, _ = make_model(steps_per_epoch=2, resnet_size=8)
    x, y = batch()
    data = tf.data.Dataset.from_tensors((x, y)).repeat()
    model.fit(data, epochs=2, steps_per_epoch=2, validation_data=data, validation_steps=1, verbose=0)
    assert traces == {"train": 1, "test": 1}
