"""Replayed and per-layer conv factors against hand computations on fabricated event logs."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from resnet_cifar import config as config_lib
from resnet_cifar import events, models, optim, tags, train
from tests.helpers import (XLA, BASELINE_EPOCHS, BASELINE_TOTAL, LAYERS, assert_close_update, fabricate_baseline,
                           layer_curve)


def old_per_layer(tag, layer):
    """Per-layer tag names of runs logged before the `per_layer/` prefix."""
    return f"{tag}/{layer}"


def test_replay_factor_by_hand(tmp_path):
    traj = events.load_baseline(fabricate_baseline(str(tmp_path / "b")), train_epochs=4)
    factor = optim.ConvLRFactor("replay", traj)
    sq = np.full(22, 50.0, np.float32)                   # sum 1100
    for epoch, baseline in [(0.0, 800.0), (1.5, 1100.0), (2.25, 1175.0), (4.0, 1000.0), (9.0, 1000.0)]:
        got = factor.multipliers(tf.constant(epoch), tf.constant(sq), [None] * 22)[1].numpy()
        np.testing.assert_allclose(got, 1100.0 / baseline, rtol=1e-6, err_msg=f"epoch {epoch}")


@pytest.mark.parametrize("naming", ["per_layer/<tag>/<layer>", "<tag>/<layer> (earlier runs)"])
def test_per_layer_factor_by_hand(tmp_path, naming):
    per_layer = tags.per_layer if naming.startswith("per_layer") else old_per_layer
    traj = events.load_baseline(fabricate_baseline(str(tmp_path / "b"), per_layer=per_layer),
                                 train_epochs=4)
    factor = optim.ConvLRFactor("per_layer", traj.aligned(LAYERS))
    sq = np.arange(1, 23, dtype=np.float32) * 3.0
    epoch = 2.5
    want = [sq[i] / (0.5 * layer_curve(i)[2] + 0.5 * layer_curve(i)[3]) for i in range(22)]
    multipliers, logged = factor.multipliers(tf.constant(epoch), tf.constant(sq), [None] * 22)
    np.testing.assert_allclose(logged.numpy(), want, rtol=1e-5)
    np.testing.assert_allclose([float(m) for m in multipliers], want, rtol=1e-5)     # one per kernel


def test_piecewise_factor_is_global(tmp_path):
    sq = np.arange(1, 23, dtype=np.float32)
    multipliers, logged = optim.ConvLRFactor("piecewise").multipliers(
        tf.constant(30.0), tf.constant(sq), [None] * 22)
    np.testing.assert_allclose(logged.numpy(), 0.45 * sq.sum() / 800.0, rtol=1e-6)
    np.testing.assert_allclose([float(m) for m in multipliers], 0.45 * sq.sum() / 800.0, rtol=1e-6)


def test_per_layer_scaling_in_the_step(tmp_path):
    """Each conv layer's update is its own factor times the unscaled update."""
    baseline_dir = fabricate_baseline(str(tmp_path / "b"))
    x = np.random.default_rng(0).standard_normal((8, 32, 32, 3)).astype(np.float32)
    y = np.arange(8, dtype=np.int32) % 10
    deltas, factors = {}, None
    for scale in (False, True):
        keras.utils.set_random_seed(4)
        kwargs = dict(conv_grad_scale=True, conv_lr_factor="per_layer", replay_from=baseline_dir) if scale else {}
        cfg = config_lib.TrainConfig(model_dir="/unused", batch_size=8, conv_l2=False, train_epochs=4,
                                     jit_compile=XLA, **kwargs)
        traj = events.load_baseline(baseline_dir, 4) if scale else None
        model = train.build_model(cfg, steps_per_epoch=10, baseline=traj)
        conv = models.conv_kernels(model)
        if scale:
            sq = np.array([np.sum(k.numpy().astype(np.float64) ** 2) for k in conv])
            names = [layer.name for layer in models.conv_layers(model)]
            factors = {k.path: sq[j] / layer_curve(LAYERS.index(names[j]))[0] for j, k in enumerate(conv)}
        before = {k.path: k.numpy() for k in conv}
        model.train_on_batch(x, y)
        deltas[scale] = {k.path: k.numpy() - before[k.path] for k in conv}
    spread = max(factors.values()) / min(factors.values())
    assert spread > 2, "the fabricated baseline must give the layers different factors"
    for path, f in factors.items():
        want = f * deltas[False][path]                  # no conv L2: all of it is data gradient
        assert_close_update(deltas[True][path], want, before[path], path, data_part=want)


@pytest.mark.parametrize("make,needle", [
    (lambda p: p + "_missing", "no such run folder"),
    (lambda p: fabricate_baseline(p, done=False), "has not finished"),
    (lambda p: fabricate_baseline(p, with_sqsum=False), "no conv_sqsum"),
    (lambda p: fabricate_baseline(p, epochs=np.array([0, 1, 2])), "ends at epoch 2"),
])
def test_bad_replay_input_is_a_clear_error(tmp_path, make, needle):
    path = make(str(tmp_path / "b"))
    with pytest.raises(config_lib.ConfigError) as err:
        events.load_baseline(path, train_epochs=4)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_interpolate_clamps_and_is_linear():
    for e, want in [(-1.0, 800.0), (0.5, 900.0), (3.5, 1050.0), (7.0, 1000.0)]:
        assert float(optim.interpolate(e, BASELINE_EPOCHS, BASELINE_TOTAL)) == pytest.approx(want)
