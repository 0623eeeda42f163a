"""--conv_lr_factor=per_channel and the angular update, against NumPy.

The baseline's per-channel log is fabricated (a .npz written here with NumPy), the
factors are recomputed by hand (np.interp per channel), and the angle is checked
against float64 NumPy on the same float32 weights.
"""

import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from resnet_cifar import config as config_lib, callbacks, events, models, optim, tags, train
from resnet_cifar.models import StepStats, angular_update
from tests.helpers import XLA, BASELINE_EPOCHS, LAYERS, assert_close_in_norm, fabricate_baseline

# ResNet-20's output channels per conv layer in creation order (stem, then per stage:
# projection, first conv, 5 more), written out.
COUT = [16] + [16] * 7 + [32] * 7 + [64] * 7


def channel_curve(i, cout):
    """(epochs, cout): channel c of layer i starts at 0.5 + 0.1·c and grows by (1 + 0.02·(c % 5))^e."""
    c = np.arange(cout)
    return (0.5 + 0.1 * c)[None, :] * (1.0 + 0.02 * (c % 5))[None, :] ** BASELINE_EPOCHS[:, None]


def fabricate_channel_log(path, epochs=BASELINE_EPOCHS):
    layers = {name: channel_curve(i, COUT[i])[: len(epochs)] for i, name in enumerate(LAYERS)}
    np.savez(os.path.join(path, tags.CHANNEL_SQSUM_FILE), epochs=np.asarray(epochs), **layers)


@pytest.fixture
def baseline_dir(tmp_path):
    path = fabricate_baseline(str(tmp_path / "b"))
    fabricate_channel_log(path)
    return path


def test_reader_returns_the_log(baseline_dir):
    epochs, layers = events.read_channel_sqsum(baseline_dir)
    np.testing.assert_array_equal(epochs, BASELINE_EPOCHS)
    assert sorted(layers) == sorted(LAYERS)
    np.testing.assert_allclose(layers["conv2d_9"], channel_curve(9, 32))


def test_channel_factors_by_hand(baseline_dir):
    traj = events.load_baseline(baseline_dir, train_epochs=4, per_channel=True)
    factor = optim.ConvLRFactor("per_channel", traj.aligned_channels(LAYERS, COUT))
    rng = np.random.default_rng(0)
    sq = [rng.uniform(0.5, 3.0, c).astype(np.float32) for c in COUT]
    for epoch in (0.0, 1.25, 3.5, 7.0):
        got = factor.channel_factors(tf.constant(epoch), [tf.constant(s) for s in sq])
        for i, (g, s) in enumerate(zip(got, sq)):
            curve = channel_curve(i, COUT[i])
            base = np.array([np.interp(epoch, BASELINE_EPOCHS, curve[:, c]) for c in range(COUT[i])])
            np.testing.assert_allclose(g.numpy(), s / base, rtol=1e-5, err_msg=f"{LAYERS[i]} epoch {epoch}")


def test_per_channel_scaling_in_the_step(baseline_dir):
    """Each output channel's update is its own factor times the unscaled update."""
    x = np.random.default_rng(0).standard_normal((8, 32, 32, 3)).astype(np.float32)
    y = np.arange(8, dtype=np.int32) % 10
    deltas, factors = {}, {}
    for scale in (False, True):
        keras.utils.set_random_seed(4)
        kwargs = dict(conv_grad_scale=True, conv_lr_factor="per_channel", replay_from=baseline_dir) if scale else {}
        cfg = config_lib.TrainConfig(model_dir="/unused", batch_size=8, conv_l2=False, train_epochs=4,
                                     jit_compile=XLA, **kwargs)
        traj = events.load_baseline(baseline_dir, 4, per_channel=True) if scale else None
        model = train.build_model(cfg, steps_per_epoch=10, baseline=traj)
        layers = models.conv_layers(model)
        if scale:
            for layer in layers:
                w = layer.kernel.numpy().astype(np.float64)
                i = LAYERS.index(layer.name)
                factors[layer.kernel.path] = np.sum(w ** 2, axis=(0, 1, 2)) / channel_curve(i, COUT[i])[0]
        before = {l.kernel.path: l.kernel.numpy() for l in layers}
        model.train_on_batch(x, y)
        deltas[scale] = {l.kernel.path: l.kernel.numpy() - before[l.kernel.path] for l in layers}
    logged = model.diagnostics.means()["lr_factor"]
    for j, layer in enumerate(models.conv_layers(model)):
        path = layer.kernel.path
        f = factors[path]
        assert f.max() / f.min() > 2, "channels must get different factors"
        assert_close_in_norm(deltas[True][path], f * deltas[False][path], before[path], path)
        assert logged[j] == pytest.approx(f.mean(), rel=1e-4)     # logged: the layer's mean factor


def test_baseline_without_channel_log_is_a_clear_error(tmp_path):
    path = fabricate_baseline(str(tmp_path / "b"))
    with pytest.raises(config_lib.ConfigError) as err:
        events.load_baseline(path, 4, per_channel=True)
    msg = str(err.value)
    assert "\n" not in msg and tags.CHANNEL_SQSUM_FILE in msg and "per_channel" in msg
    fabricate_channel_log(path, epochs=BASELINE_EPOCHS[:3])
    with pytest.raises(config_lib.ConfigError, match="ends at epoch 2, this run needs 4"):
        events.load_baseline(path, 4, per_channel=True)


def test_channel_log_callback_writes_and_replaces_on_resume(tmp_path):
    keras.utils.set_random_seed(0)
    cfg = config_lib.TrainConfig(model_dir=str(tmp_path), batch_size=8, jit_compile=XLA)
    model = train.build_model(cfg, steps_per_epoch=10)
    cb = callbacks.EpochLog(str(tmp_path), 2)
    cb.set_model(model)
    layers = models.conv_layers(model)
    expect = {}

    def snapshot(epoch):
        expect[epoch] = {l.name: np.sum(l.kernel.numpy().astype(np.float64) ** 2, axis=(0, 1, 2)) for l in layers}

    cb.save_channels(0, fresh=True)        # on_train_begin of a new run
    snapshot(0)
    for epoch in (1, 2):
        for l in layers:
            l.kernel.assign(l.kernel * 1.1)
        cb.save_channels(epoch)             # on_epoch_end
        snapshot(epoch)
    # A resumed run redoes epoch 2 from other weights: its row is replaced, not appended.
    for l in layers:
        l.kernel.assign(l.kernel * 0.5)
    cb.save_channels(2)
    snapshot(2)
    epochs, got = events.read_channel_sqsum(str(tmp_path))
    np.testing.assert_array_equal(epochs, [0, 1, 2])
    for e in (0, 1, 2):
        for name, want in expect[e].items():
            np.testing.assert_allclose(got[name][e], want, rtol=1e-5)
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


# --- the angular update -------------------------------------------------------------------

@pytest.mark.parametrize("angle", [1e-1, 1e-3, 1e-5, 1e-6])
def test_angular_update_against_float64(angle):
    """float32 weights rotated by `angle`, through the step's float32 computation (unit
    vectors by rsqrt of the sum of squares, the squared difference summed, then
    `angular_update`): within 1e-4 relative + 2e-7 absolute of the float64 angle between
    the same float32 vectors. acos of the float32 cosine can not do this below ~3e-4 rad
    (the cosine rounds to 1); shown for contrast."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal(20_000)
    e = rng.standard_normal(20_000)
    e -= (e @ a) / (a @ a) * a
    b = (np.cos(angle) * a / np.linalg.norm(a) + np.sin(angle) * e / np.linalg.norm(e)) * 1.3 * np.linalg.norm(a)
    a32, b32 = a.astype(np.float32).reshape(10, 10, 200), b.astype(np.float32).reshape(10, 10, 200)
    x, y = a32.astype(np.float64).ravel(), b32.astype(np.float64).ravel()
    perp = y - x * (x @ y) / (x @ x)
    want = math.atan2(np.linalg.norm(perp), (x @ y) / np.linalg.norm(x))
    u, v = (tf.reshape(tf.constant(t), [-1]) for t in (a32, b32))
    unit_diff = v * tf.math.rsqrt(tf.reduce_sum(v * v)) - u * tf.math.rsqrt(tf.reduce_sum(u * u))
    stats = StepStats(sqsum_before=None, step_sqsum=None, factor=None,
                      unit_diff_sqsum=tf.reduce_sum(tf.square(unit_diff)))
    got = float(angular_update(stats))
    assert abs(got - want) <= 1e-4 * want + 2e-7, (got, want)
    cos32 = np.float32(np.sum(a32 * b32, dtype=np.float32) / (np.linalg.norm(a32) * np.linalg.norm(b32)))
    naive = float(np.arccos(np.clip(cos32, -1, 1)))
    if angle <= 1e-5:
        assert abs(naive - want) > 1e-4 * want + 2e-7      # what the careful formula avoids


def test_angular_update_diagnostic_of_one_step():
    keras.utils.set_random_seed(2)
    cfg = config_lib.TrainConfig(model_dir="/unused", batch_size=8, jit_compile=XLA)
    model = train.build_model(cfg, steps_per_epoch=10)
    x = np.random.default_rng(5).standard_normal((8, 32, 32, 3)).astype(np.float32)
    y = np.arange(8, dtype=np.int32) % 10
    conv = models.conv_kernels(model)
    before = [k.numpy().astype(np.float64).ravel() for k in conv]
    model.train_on_batch(x, y)
    got = model.diagnostics.means()["angular_update"]
    for j, (k, a) in enumerate(zip(conv, before)):
        b = k.numpy().astype(np.float64).ravel()
        perp = b - a * (a @ b) / (a @ a)
        want = math.atan2(np.linalg.norm(perp), (a @ b) / np.linalg.norm(a))
        assert abs(got[j] - want) <= 1e-4 * want + 2e-7, (k.path, got[j], want)
    rel = model.diagnostics.means()["relative_step"]
    assert np.all(got <= rel * 1.0001)          # the angle never exceeds ||dw||/||w||
