"""Tests of the ResNet-20 v1 model against what the original code pins down.

See docs/fidelity.md. Every check here recomputes its expectation
independently of resnet_cifar/models.py: the parameter count from a hand-written
architecture table, the block structure by walking the functional graph from
`model.get_config()`, the fixed padding with a NumPy convolution. No training;
a model builds in well under a second, so the file runs in a few seconds.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from resnet_cifar import fidelity, models
from tests.helpers import truncated_normal_square_moments

STAGES = ((16, 1), (32, 2), (64, 2))   # (filters, stride) written out, not read from fidelity
BLOCKS = 3
SEEDS = (0, 1, 2, 3, 4)


# ----------------------------------------------------------------------------- helpers

def hand_architecture():
    """Every conv of ResNet-20 v1 (CIFAR) as (kernel, in_channels, out_channels), by hand.

    Stem conv 3x3 3->16; per stage, block 0 has a 1x1 projection in->out plus
    conv3x3 in->out and conv3x3 out->out; blocks 1, 2 have two conv3x3 out->out.
    """
    convs = [(3, 3, 16)]
    c_in = 16
    for filters, _ in STAGES:
        convs.append((1, c_in, filters))             # projection shortcut
        convs.append((3, c_in, filters))             # first conv of block 0
        convs.append((3, filters, filters))          # second conv of block 0
        convs += [(3, filters, filters)] * (2 * (BLOCKS - 1))
        c_in = filters
    return convs


def hand_parameter_count():
    convs = hand_architecture()
    conv_params = sum(k * k * c_in * c_out for k, c_in, c_out in convs)   # no biases
    bn_params = sum(2 * c_out for _, _, c_out in convs)   # one BN (gamma, beta) after every conv
    dense_params = 64 * 10 + 10
    return conv_params + bn_params + dense_params


def _keras_tensor_sources(obj):
    """Names of the layers whose outputs appear in a serialized inbound node."""
    if isinstance(obj, dict):
        if obj.get("class_name") == "__keras_tensor__":
            return [obj["config"]["keras_history"][0]]
        return [n for v in obj.values() for n in _keras_tensor_sources(v)]
    if isinstance(obj, (list, tuple)):
        return [n for v in obj for n in _keras_tensor_sources(v)]
    return []


def graph_of(model):
    """name -> (class_name, config, [input layer names]) from the serialized functional graph."""
    graph = {}
    for layer in model.get_config()["layers"]:
        inputs = []
        for node in layer["inbound_nodes"]:
            inputs += _keras_tensor_sources(node)
        graph[layer["name"]] = (layer["class_name"], layer["config"], inputs)
    return graph


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    return models.build_resnet20()


@pytest.fixture(scope="module")
def graph(model):
    return graph_of(model)


# ----------------------------------------------------------------------------- parameter count

def test_hand_architecture_is_resnet20():
    convs = hand_architecture()
    assert len(convs) == 22 == fidelity.NUM_CONV_KERNELS
    assert sum(1 for k, _, _ in convs if k == 3) == 19
    assert sum(c_out for _, _, c_out in convs) == 800   # the blog's initial_conv2d_sqsum


def test_trainable_parameter_count(model):
    counted = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert counted == 272_762
    assert counted == fidelity.TRAINABLE_PARAMETERS
    assert counted == hand_parameter_count()
    assert model.count_params() - counted == 2 * 800   # BN moving mean and variance only


# ----------------------------------------------------------------------------- kernels and BN layers

def test_22_conv_kernels_and_22_batch_norms(model):
    assert len(models.conv_kernels(model)) == 22
    assert len(models.conv_layers(model)) == 22
    bns = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert len(bns) == 22
    assert models.batch_norm_layers(model) == bns


def _expected_conv_paths():
    return {"conv2d/kernel"} | {f"conv2d_{i}/kernel" for i in range(1, 22)}


def _check_conv_kernel_selection(model):
    kernels = models.conv_kernels(model)
    paths = [v.path for v in kernels]
    assert len(set(paths)) == len(paths) == 22
    by_name = {v.path for v in model.trainable_variables if "conv2d" in v.path}
    assert set(paths) == by_name
    assert set(paths) == _expected_conv_paths()
    # The selected objects really are the model's variables, not copies.
    trainable_ids = {id(v) for v in model.trainable_variables}
    assert all(id(v) in trainable_ids for v in kernels)
    # And the kernel shapes are the hand architecture's (as a multiset).
    shapes = sorted(tuple(v.shape) for v in kernels)
    assert shapes == sorted((k, k, ci, co) for k, ci, co in hand_architecture())


def test_conv_kernels_equal_name_selection(model):
    _check_conv_kernel_selection(model)


def test_conv_kernel_names_stable_after_other_models_in_session(model):
    # Pollute the Keras session: unnamed layers take the auto-names conv2d,
    # batch_normalization, dense, ... and a whole second ResNet is built too.
    x = keras.Input((8, 8, 3))
    y = keras.layers.Conv2D(4, 3)(x)
    y = keras.layers.Conv2D(4, 3)(y)
    y = keras.layers.BatchNormalization()(y)
    keras.Model(x, keras.layers.Dense(2)(keras.layers.Flatten()(y)))
    models.build_resnet20()
    again = models.build_resnet20()
    _check_conv_kernel_selection(again)
    names = sorted(l.name for l in models.conv_layers(again))
    assert names == sorted(["conv2d"] + [f"conv2d_{i}" for i in range(1, 22)])
    assert sorted(l.name for l in models.batch_norm_layers(again)) == sorted(
        ["batch_normalization"] + [f"batch_normalization_{i}" for i in range(1, 22)])
    assert again.get_layer("dense").kernel.path == "dense/kernel"


def test_batch_norm_configuration(model):
    for layer in models.batch_norm_layers(model):
        assert layer.momentum == pytest.approx(0.997)
        assert layer.epsilon == pytest.approx(1e-5)
        assert layer.center and layer.scale
        assert layer.gamma.trainable and layer.beta.trainable
    assert fidelity.BATCH_NORM_DECAY == 0.997 and fidelity.BATCH_NORM_EPSILON == 1e-5


def test_bn_decay_argument():
    fast = models.build_resnet20(bn_decay=0.98)
    assert {l.momentum for l in models.batch_norm_layers(fast)} == {0.98}
    assert {l.epsilon for l in models.batch_norm_layers(fast)} == {1e-5}


def test_bn_decay_takes_effect_in_the_moving_average_update():
    # TF1's decay: moving = decay * moving + (1 - decay) * batch_mean. Keras'
    # momentum must mean the same thing, and bn_decay must reach the update.
    m = models.build_resnet20(bn_decay=0.5)
    bn = m.get_layer("batch_normalization")
    before = bn.moving_mean.numpy()
    x = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    batch_mean = np.array(m.get_layer("conv2d")(x)).mean(axis=(0, 1, 2))
    m(x, training=True)
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.5 * before + 0.5 * batch_mean,
                               rtol=1e-5, atol=1e-6)


def test_conv_configuration(model):
    for layer in models.conv_layers(model):
        assert layer.use_bias is False
        assert layer.bias is None
        init = layer.kernel_initializer
        assert isinstance(init, keras.initializers.VarianceScaling)
        cfg = init.get_config()
        assert cfg["scale"] == 1.0
        assert cfg["mode"] == "fan_in"
        assert cfg["distribution"] == "truncated_normal"


# ----------------------------------------------------------------------------- initial weights

@pytest.fixture(scope="module")
def init_sqsums():
    """Per seed, per conv layer name: sum(w^2) at initialization."""
    rows = []
    for seed in SEEDS:
        keras.utils.set_random_seed(seed)
        m = models.build_resnet20()
        rows.append({l.name: float(np.sum(np.square(l.kernel.numpy().astype(np.float64))))
                     for l in models.conv_layers(m)})
    return rows


def test_initial_conv_sqsum_is_800_on_average(init_sqsums):
    totals = [sum(r.values()) for r in init_sqsums]
    assert len(set(totals)) == len(SEEDS)                 # the seeds really give different draws
    mean_total = float(np.mean(totals))
    assert abs(mean_total - 800.0) <= 0.02 * 800.0
    assert fidelity.INITIAL_CONV_SQSUM == 800.0
    # Tighter, statistical bound (see test_initial_sqsum_per_layer for the variance):
    # Var(sum_l S_l) = sum_l out_l^2 * R / n_l per draw.
    m2, m4 = truncated_normal_square_moments()
    ratio = (m4 - m2 * m2) / (m2 * m2)
    var = sum(co * co * ratio / (k * k * ci * co) for k, ci, co in hand_architecture())
    assert abs(mean_total - 800.0) <= 4.5 * math.sqrt(var / len(SEEDS))


def test_initial_sqsum_per_layer(model, init_sqsums):
    """Each layer's mean over seeds of sum(w^2) is its out_channels, within 4.5 sigma.

    Keras' VarianceScaling(1, fan_in, truncated_normal) draws w = c * Z with Z a
    standard normal truncated to [-2, 2] and c = sqrt(1/fan_in) / 0.87962566,
    where 0.87962566^2 = E[Z^2]; so E[w^2] = 1/fan_in and, over n = fan_in * out
    weights, E[sum w^2] = out. With R = Var(Z^2) / E[Z^2]^2 (about 1.366 here,
    against 2 for an untruncated normal), sum(w^2)/out has relative std
    sqrt(R / n) per draw and sqrt(R / (n * S)) as the mean of S seeds. For the
    smallest layer (1x1, 16 -> 16, n = 256) and S = 5 that is 3.3%. A sum of
    >= 256 i.i.d. terms is close to normal, so 4.5 sigma (two-sided 7e-6 per
    layer, < 2e-4 for all 22) is a bound a correct initializer practically never
    crosses, while a wrong initializer fails it (an untruncated normal with the
    0.8796 factor: +29% on every layer, 9 sigma even on the smallest; fan_avg or
    fan_out: -33% or -50% on the 16->32 and 32->64 convs).
    """
    m2, m4 = truncated_normal_square_moments()
    assert m2 == pytest.approx(0.87962566103423978 ** 2, rel=1e-7)
    ratio = (m4 - m2 * m2) / (m2 * m2)
    assert 1.3 < ratio < 1.4
    for layer in models.conv_layers(model):
        k, _, c_in, c_out = layer.kernel.shape
        n = k * k * c_in * c_out
        mean = float(np.mean([r[layer.name] for r in init_sqsums]))
        rel_sigma = math.sqrt(ratio / (n * len(SEEDS)))
        assert abs(mean / c_out - 1.0) <= 4.5 * rel_sigma, (layer.name, mean, c_out, rel_sigma)


def test_initial_weights_are_truncated_at_two_std(model):
    for layer in models.conv_layers(model):
        k, _, c_in, _ = layer.kernel.shape
        stddev = math.sqrt(1.0 / (k * k * c_in)) / 0.87962566103423978
        assert np.max(np.abs(layer.kernel.numpy())) <= 2 * stddev * (1 + 1e-6)


# ----------------------------------------------------------------------------- block structure

def test_block_structure_from_functional_graph(model, graph):
    consumers = {}
    for name, (_, _, inputs) in graph.items():
        for src in inputs:
            consumers.setdefault(src, []).append(name)

    def cls(name):
        return graph[name][0]

    def cfg(name):
        return graph[name][1]

    def single_input(name):
        inputs = graph[name][2]
        assert len(inputs) == 1, (name, inputs)
        return inputs[0]

    def conv_of(name, kernel, stride):
        """Checks a Conv2D (kernel, stride); returns the layer its input comes from
        (through the ZeroPadding2D when strided 3x3) and the layers passed."""
        assert cls(name) == "Conv2D", name
        assert tuple(cfg(name)["kernel_size"]) == (kernel, kernel), name
        assert tuple(cfg(name)["strides"]) == (stride, stride), name
        src = single_input(name)
        passed = [name]
        if stride > 1 and kernel > 1:
            assert cls(src) == "ZeroPadding2D", name
            passed.append(src)
            src = single_input(src)
        return src, passed

    expected_shape = {"images": (None, 32, 32, 3)}

    # Stem: images -> conv 3x3/1 -> BN -> ReLU
    stem_relus = [n for n in graph if cls(n) == "ReLU"
                  and cls(single_input(n)) == "BatchNormalization"
                  and cls(single_input(single_input(n))) == "Conv2D"
                  and single_input(single_input(single_input(n))) == "images"]
    assert len(stem_relus) == 1
    block_input = stem_relus[0]
    stem_bn = single_input(block_input)
    stem_conv = single_input(stem_bn)
    assert conv_of(stem_conv, 3, 1)[0] == "images"
    for n in (stem_conv, stem_bn, block_input):
        expected_shape[n] = (None, 32, 32, 16)

    adds = [l.name for l in model.layers if isinstance(l, keras.layers.Add)]
    assert len(adds) == 9
    assert sum(1 for n in graph if cls(n) == "Add") == 9

    # Follow the chain block by block from the stem: each Add's consumer ReLU
    # must be the next block's input.
    size = 32
    c_prev = 16
    stage_outputs = []
    visited_adds = []
    for s, (filters, stride) in enumerate(STAGES):
        for b in range(BLOCKS):
            st = stride if b == 0 else 1
            if b == 0:
                size //= stride
            shape = (None, size, size, filters)
            # The Add of this block is the one whose chain leads back to block_input.
            candidates = [a for a in adds if a not in visited_adds]
            found = None
            for add in candidates:
                inputs = graph[add][2]
                if len(inputs) != 2:
                    continue
                for main_bn, shortcut in (inputs, inputs[::-1]):
                    if cls(main_bn) != "BatchNormalization":
                        continue
                    conv_b = single_input(main_bn)
                    if cls(conv_b) != "Conv2D":
                        continue
                    relu_a, _ = conv_of(conv_b, 3, 1)
                    if cls(relu_a) != "ReLU":
                        continue
                    bn_a = single_input(relu_a)
                    conv_a = single_input(bn_a)
                    src, passed_a = conv_of(conv_a, 3, st)
                    if src == block_input:
                        found = (add, main_bn, conv_b, relu_a, bn_a, passed_a, shortcut)
                        break
                if found:
                    break
            assert found, f"no Add for stage {s} block {b} fed by {block_input}"
            add, main_bn, conv_b, relu_a, bn_a, passed_a, shortcut = found
            visited_adds.append(add)
            assert cls(bn_a) == "BatchNormalization"
            for n in (main_bn, conv_b, relu_a, bn_a, passed_a[0], add):
                expected_shape[n] = shape
            if len(passed_a) == 2:   # the ZeroPadding2D before a strided 3x3 conv
                expected_shape[passed_a[1]] = (None, 2 * size + 2, 2 * size + 2, c_prev)

            if b == 0:
                # Projection shortcut: BN <- conv 1x1 (stride) <- block input.
                assert cls(shortcut) == "BatchNormalization", (add, shortcut)
                proj = single_input(shortcut)
                src, _ = conv_of(proj, 1, st)
                assert src == block_input
                assert cfg(proj)["filters"] == filters
                expected_shape[shortcut] = expected_shape[proj] = shape
            else:
                # Identity shortcut: the previous block's output ReLU itself.
                assert shortcut == block_input, (add, shortcut)
                assert cls(shortcut) == "ReLU" and cls(single_input(shortcut)) == "Add"
            assert cfg(conv_a)["filters"] == cfg(conv_b)["filters"] == filters

            out_relus = consumers[add]
            assert len(out_relus) == 1 and cls(out_relus[0]) == "ReLU"
            block_input = out_relus[0]
            expected_shape[block_input] = shape
            c_prev = filters
        stage_outputs.append(block_input)

    assert sorted(visited_adds) == sorted(adds)
    assert [tuple(model.get_layer(n).output.shape) for n in stage_outputs] == [
        (None, 32, 32, 16), (None, 16, 16, 32), (None, 8, 8, 64)]

    # Head: global average pool of the last block, dense 10 logits.
    (gap,) = consumers[block_input]
    assert cls(gap) == "GlobalAveragePooling2D"
    (dense,) = consumers[gap]
    assert cls(dense) == "Dense" and cfg(dense)["units"] == 10 and cfg(dense)["use_bias"]
    expected_shape[gap] = (None, 64)
    expected_shape[dense] = (None, 10)
    assert tuple(model.output.shape) == (None, 10)
    assert dense not in consumers

    # The walk covered every layer; output shapes layer by layer.
    assert set(expected_shape) == set(graph)
    for layer in model.layers:
        assert tuple(layer.output.shape) == expected_shape[layer.name], layer.name


def test_forward_pass_shape(model):
    x = np.zeros((2, 32, 32, 3), np.float32)
    assert tuple(model(x, training=False).shape) == (2, 10)


# ----------------------------------------------------------------------------- fixed padding

def test_fixed_padding_values():
    assert models.fixed_padding(3) == (1, 1)
    assert models.fixed_padding(1) == (0, 0)
    assert models.fixed_padding(7) == (3, 3)


def test_strided_convs_use_explicit_padding_then_valid(model, graph):
    strided3, strided1 = [], []
    for layer in models.conv_layers(model):
        (src,) = graph[layer.name][2]
        if layer.strides == (1, 1):
            assert layer.padding == "same", layer.name
            assert graph[src][0] != "ZeroPadding2D"
            continue
        assert layer.strides == (2, 2)
        assert layer.padding == "valid", layer.name
        if layer.kernel_size == (3, 3):
            strided3.append(layer.name)
            assert graph[src][0] == "ZeroPadding2D", layer.name
            pad = model.get_layer(src).padding
            assert tuple(map(tuple, pad)) == ((1, 1), (1, 1)), (layer.name, pad)
        else:
            assert layer.kernel_size == (1, 1)
            strided1.append(layer.name)
            assert graph[src][0] == "ReLU"   # pad (0, 0): no padding layer
    assert len(strided3) == 2 and len(strided1) == 2


def _np_conv2d_single(x, k, stride, pad):
    """Cross-correlation (TF convention) of a 2-D x with a 2-D k, explicit padding."""
    (top, bottom), (left, right) = pad
    xp = np.pad(x, ((top, bottom), (left, right)))
    kh, kw = k.shape
    oh = (xp.shape[0] - kh) // stride + 1
    ow = (xp.shape[1] - kw) // stride + 1
    out = np.zeros((oh, ow))
    for i in range(oh):
        for j in range(ow):
            out[i, j] = np.sum(xp[i * stride:i * stride + kh, j * stride:j * stride + kw] * k)
    return out


def test_fixed_padding_numerically(model, graph):
    conv = next(l for l in models.conv_layers(model)
                if l.strides == (2, 2) and l.kernel_size == (3, 3))
    (pad_name,) = graph[conv.name][2]
    pad = model.get_layer(pad_name)
    _, _, c_in, c_out = conv.kernel.shape

    k = np.arange(1.0, 10.0).reshape(3, 3)               # not symmetric: detects shifts
    kernel = np.zeros((3, 3, c_in, c_out), np.float32)
    kernel[:, :, 0, 0] = k
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (1, 6, 6, c_in)).astype(np.float32)
    x[0, :, :, 0] = np.arange(1.0, 37.0).reshape(6, 6)
    x0 = x[0, :, :, 0].astype(np.float64)

    original = conv.kernel.numpy()
    try:
        conv.kernel.assign(kernel)
        y = np.array(conv(pad(x)))
    finally:
        conv.kernel.assign(original)

    assert y.shape == (1, 3, 3, c_out)
    expected = _np_conv2d_single(x0, k, 2, ((1, 1), (1, 1)))
    np.testing.assert_allclose(y[0, :, :, 0], expected, rtol=1e-5)
    np.testing.assert_allclose(y[0, :, :, 1:], 0.0, atol=1e-5)
    # One value by hand: window rows -1..1, cols -1..1 -> k[1:, 1:] * x0[:2, :2].
    assert y[0, 0, 0, 0] == pytest.approx(5 * 1 + 6 * 2 + 8 * 7 + 9 * 8)

    # TF "SAME" pads (0, 1) here (total 1, the extra at the end) and gives other numbers.
    same = np.array(tf.nn.conv2d(x, kernel, strides=2, padding="SAME"))[0, :, :, 0]
    np.testing.assert_allclose(same, _np_conv2d_single(x0, k, 2, ((0, 1), (0, 1))), rtol=1e-5)
    assert not np.allclose(same, expected)


