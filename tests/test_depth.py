"""--resnet_size: every supported depth against counts made by hand from the block structure.

The expectations here do not read models.py: the parameter count and the
expected initial conv sum of squares come from the architecture written out
(stem, 3 stages of n basic blocks, a projection in the first block of each
stage, BN after every conv, dense 64 -> 10). Each depth is built once.
"""

import math

import keras
import numpy as np
import pytest

from resnet_cifar import config as config_lib
from resnet_cifar import fidelity, models
from tests.helpers import STAGES, hand_parameter_count, truncated_normal_square_moments

DEPTHS = (20, 32, 44, 56, 110)


def hand_convs(resnet_size):
    """(kernel, in, out) of every conv of ResNet-(6n+2) v1 for CIFAR."""
    n = (resnet_size - 2) // 6
    convs = [(3, 3, 16)]
    c_in = 16
    for f in STAGES:
        convs += [(1, c_in, f), (3, c_in, f)] + [(3, f, f)] * (2 * n - 1)
        c_in = f
    return convs


@pytest.fixture(scope="module")
def built():
    out = {}
    for size in DEPTHS:
        keras.utils.set_random_seed(size)
        out[size] = models.build_resnet(size)
    return out


def test_hand_formulas_agree_with_each_other_and_resnet20():
    for size in DEPTHS:
        convs = hand_convs(size)
        by_table = sum(k * k * ci * co + 2 * co for k, ci, co in convs) + 650
        assert by_table == hand_parameter_count(size)
        assert len(convs) == size + 2     # stem + 3 stages x (2n convs + 1 projection) = 6n+4
    assert hand_parameter_count(20) == 272_762 == fidelity.TRAINABLE_PARAMETERS
    assert sum(co for _, _, co in hand_convs(20)) == 800 == fidelity.INITIAL_CONV_SQSUM


@pytest.mark.parametrize("size", DEPTHS)
def test_parameter_count_and_convs(built, size):
    model = built[size]
    counted = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert counted == hand_parameter_count(size)
    kernels = models.conv_kernels(model)
    assert len(kernels) == size + 2            # size-1 3x3 convs (stem + 2 per block) + 3 projections
    assert sorted(tuple(k.shape) for k in kernels) == sorted((k, k, ci, co) for k, ci, co in hand_convs(size))
    assert [l.name for l in models.conv_layers(model)] == ["conv2d"] + [f"conv2d_{i}" for i in range(1, size + 2)]
    assert models.expected_initial_conv_sqsum(model) == sum(co for _, _, co in hand_convs(size))


def test_resnet20_unchanged(built):
    model = built[20]
    assert model.name == "resnet20_v1"
    assert models.expected_initial_conv_sqsum(model) == fidelity.INITIAL_CONV_SQSUM == 800.0
    assert sum(int(np.prod(v.shape)) for v in model.trainable_variables) == 272_762
    assert len(models.conv_kernels(model)) == fidelity.NUM_CONV_KERNELS


@pytest.mark.parametrize("size", DEPTHS)
def test_initial_conv_sqsum_near_expectation(built, size):
    """One draw per depth: |sum w² - sum cout| within 5 sigma.

    Per layer sum(w²)/cout has relative variance R/n (R = Var(Z²)/E[Z²]² of the
    truncated normal, n = weights in the layer; see tests/test_models.py), so the
    total has variance sum_l cout_l² R / n_l. 5 sigma two-sided: 6e-7 per depth.
    A wrong initializer is far outside: an untruncated normal with the 0.8796
    correction is +29% (> 25 sigma here), fan_avg/fan_out −33%/−50% on some layers.
    """
    m2, m4 = truncated_normal_square_moments()
    ratio = (m4 - m2 * m2) / (m2 * m2)
    convs = hand_convs(size)
    expected = sum(co for _, _, co in convs)
    sigma = math.sqrt(sum(co * co * ratio / (k * k * ci * co) for k, ci, co in convs))
    total = sum(float(np.sum(np.square(k.numpy().astype(np.float64)))) for k in models.conv_kernels(built[size]))
    assert abs(total - expected) <= 5 * sigma, (size, total, expected, sigma)
    assert 5 * sigma < 0.05 * expected          # the bound is tight enough to mean something


@pytest.mark.parametrize("size", [0, 2, 7, 19, 21])
def test_bad_resnet_size_is_refused(size):
    with pytest.raises(config_lib.ConfigError, match=r"--resnet_size=.* must be 6n\+2"):
        config_lib.TrainConfig(model_dir="/x", resnet_size=size)
    with pytest.raises(ValueError):
        models.blocks_per_stage(size)


@pytest.mark.parametrize("overrides,names", [
    (dict(resnet_size=32), ["--resnet_size=32"]),
    (dict(train_epochs=6), ["--train_epochs=6"]),
    (dict(boundary_epochs=(2, 4)), ["--boundary_epochs=2,4"]),
    (dict(steps_per_epoch=160), ["--steps_per_epoch=160"]),
    (dict(optimizer="adam"), ["--optimizer=adam"]),
])
def test_piecewise_refused_outside_the_post(overrides, names):
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.TrainConfig(model_dir="/x", conv_l2=False, conv_grad_scale=True, **overrides)
    msg = str(err.value)
    assert "\n" not in msg and "--conv_lr_factor=replay" in msg
    assert all(n in msg for n in names), msg
    # The same settings are fine when replaying, or without gradient scaling.
    config_lib.TrainConfig(model_dir="/x", **overrides)
    config_lib.TrainConfig(model_dir="/x", conv_l2=False, conv_grad_scale=True, conv_lr_factor="replay",
                           replay_from="/b", **overrides)


@pytest.mark.parametrize("size", DEPTHS)
def test_the_trainers_piecewise_factor_takes_the_models_normalizer(built, size):
    """As the trainer builds the factor (ReproductionModel.configure): the normalizer is the
    model's sum of output channels (hand-counted: 800 for ResNet-20, 1248 for ResNet-32, ...)."""
    model = models.ReproductionModel(built[size].inputs, built[size].outputs)   # the same layers
    model.configure(weight_decay=0.0, conv_l2=True, steps_per_epoch=1, conv_lr_factor="piecewise")
    assert model._settings["conv_lr_factor"].initial_conv_sqsum == sum(co for _, _, co in hand_convs(size))


def test_piecewise_normalizer_is_the_models_expectation():
    from resnet_cifar import optim
    import tensorflow as tf

    sq = tf.constant(np.full(34, 10.0, np.float32))
    got = optim.ConvLRFactor("piecewise", initial_conv_sqsum=1248.0).multipliers(
        tf.constant(0.0), sq, [None] * 34)[1].numpy()
    np.testing.assert_allclose(got, 340.0 / 1248.0, rtol=1e-6)
