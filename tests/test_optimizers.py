"""--optimizer=adam / adamw: the train step against an independent float64 NumPy Adam.

Adam as Kingma & Ba with Keras' epsilon placement (outside the bias correction):
    m = b1·m + (1-b1)·g,  v = b2·v + (1-b2)·g²,
    w -= lr·sqrt(1-b2^t)/(1-b1^t) · m / (sqrt(v) + eps)
adam: g includes the L2 term wd·w (the post's objective); adamw: no L2 in the loss,
w -= lr·wd·w before the Adam step (decoupled), on the L2 variable set only.

The whole-step checks run with conv kernels in the L2 set: with L2 (or decay)
dominating, the step is insensitive to the data gradient's float32 rounding.
Without it, the pure data gradient of the first convs can change by ~1% between
eager and tf.function when a ReLU input sits at zero, and Adam's per-element
normalization does not damp that; the optimizer rule itself is then checked on
fabricated gradients (`test_optimizer_rule_against_numpy`), the L2/decay
variable sets structurally.
"""

import numpy as np
import pytest

from resnet_cifar import config as config_lib
from resnet_cifar import optim
from tests.helpers import TAU, U32, batch, data_gradients, make_model

B1, B2, EPS = 0.9, 0.999, 1e-7


def numpy_adam(model, cfg, grads, weights, state, t, mistake=None):
    """One step in float64; t is 1-based. Returns new weights. `mistake`: a wrong rule, to
    show that the comparison catches it."""
    names = [v.path for v in model.trainable_variables]
    in_l2 = [cfg.conv_l2 or "conv2d" not in n for n in names]
    lr = cfg.base_learning_rate     # step < first boundary
    out = []
    for i, (g, w, l2) in enumerate(zip(grads, weights, in_l2)):
        if cfg.optimizer == "adam" and l2 and mistake != "L2 left out":
            g = g + cfg.weight_decay * w
        if cfg.optimizer == "adamw" and l2 and mistake != "L2 left out":
            w = w - lr * cfg.weight_decay * w
        m, v = state[i]
        m = B1 * m + (1 - B1) * g
        v = B2 * v + (1 - B2) * (np.abs(g) if mistake == "v of |g|" else g * g)
        state[i] = (m, v)
        alpha = lr if mistake == "no bias correction" else lr * np.sqrt(1 - B2 ** t) / (1 - B1 ** t)
        out.append(w - alpha * m / (np.sqrt(v) + EPS))
    return out


def check_adam(optimizer, n_steps=2, weight_decay=1e-2, **overrides):
    model, cfg = make_model(10, optimizer=optimizer, weight_decay=weight_decay, **overrides)
    x, y = batch()
    state = [(np.zeros(v.shape), np.zeros(v.shape)) for v in model.trainable_variables]
    for t in range(1, n_steps + 1):
        weights = [v.numpy().astype(np.float64) for v in model.trainable_variables]
        grads = data_gradients(model, x, y)
        want = numpy_adam(model, cfg, grads, weights, state, t)
        model.train_on_batch(x, y)
        counts = [adam_bound(v.numpy() - w0, w1 - w0, w0, *state[i], t, cfg.base_learning_rate, grads[i],
                             f"step {t} {v.path}", readbacks=1)
                  for i, (v, w0, w1) in enumerate(zip(model.trainable_variables, weights, want))]
        assert_mostly_well_conditioned(counts)
    return model, cfg


def assert_mostly_well_conditioned(counts):
    """(well-conditioned, all) per tensor: over 90% of all elements are well-conditioned."""
    assert sum(g for g, _ in counts) > 0.9 * sum(n for _, n in counts), "too few well-conditioned elements"


# Float32 error analysis of an Adam step, for updates compared from the same state.
#
# The data gradient g carries float32 rounding dg, |dg| <= TAU * |g| per tensor (the
# analysis in tests/helpers.py). Adam's update of one element, with the previous m0, v0
# fixed and alpha = lr * sqrt(1 - b2^t) / (1 - b1^t),
#     u = alpha * m / (sqrt(v) + eps),  m = b1 m0 + (1 - b1) g,  v = b2 v0 + (1 - b2) g^2,
# moves with g by
#     du/dg = alpha * [(1 - b1) - (1 - b2) g m / (sqrt(v) (sqrt(v) + eps))] / (sqrt(v) + eps),
# and since v >= (1 - b2) g^2, (1 - b2) |g| / sqrt(v) <= sqrt(1 - b2), so
#     |du/dg| <= S = alpha * [(1 - b1) + sqrt(1 - b2) |m| / (sqrt(v) + eps)] / (sqrt(v) + eps),
# computable from the state after the step alone. S grows as 1/sqrt(v): Adam divides each
# element by its own gradient scale, so an element whose scale is small turns the gradient's
# rounding into a large error of its step (2.3e-6 against a 1.7e-6 bound of 1e-3 * |update| on
# an AVX2-only CPU, with the fixed tolerance this replaces). Hence:
# - well-conditioned elements (scale sqrt(v_hat) >= 5% of the tensor's rms scale, > 90% of
#   the model's): |du| <= 2 * max S * TAU * |g| (the 2: linearization margin), plus the 2u|w| of
#   reading each float32 update back;
# - the others: no further than Adam's largest possible step, alpha * |m| / sqrt(v) <= ~lr * t,
#   bounded here by 3x the tensor's largest step.
# A missing bias correction (x0.32 on step 1), a second moment of |g| instead of g^2, or a
# missing L2 / decay (weight decay 1e-2 and 50 below dominate the step) is far out
# (test_adam_bound_catches_a_wrong_rule). (beta_1 itself is not seen: the same batch each
# step gives nearly the same gradient, and m_hat of a constant gradient is that gradient.)
GOOD_SCALE = 0.05


def well_conditioned(v, t):
    """Elements whose Adam scale sqrt(v_hat) is at least GOOD_SCALE of the tensor's rms scale."""
    scale = np.sqrt(v / (1 - B2 ** t))
    return scale >= GOOD_SCALE * np.sqrt(np.mean(scale ** 2))


def adam_bound(actual, desired, weights, m, v, t, lr, data_grad, name, readbacks=2):
    """`actual` Adam update within float32 rounding of `desired` (the analysis above); m, v:
    the state after the step; `readbacks`: sides whose update is a float32 difference."""
    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    good = well_conditioned(v, t)
    alpha = lr * np.sqrt(1 - B2 ** t) / (1 - B1 ** t)
    root = np.sqrt(v) + EPS
    sensitivity = alpha * ((1 - B1) + np.sqrt(1 - B2) * np.abs(m) / root) / root
    err = np.linalg.norm(actual[good] - desired[good])
    bound = (2 * np.max(sensitivity[good]) * TAU * np.linalg.norm(data_grad)
             + readbacks * 2 * U32 * np.linalg.norm(weights[good]) + 1e-12)
    assert err <= bound, (f"{name}: |error| {err:.3g} > {bound:.3g} (|update| {np.linalg.norm(desired):.3g}, "
                          f"bound/|update| {bound / max(np.linalg.norm(desired[good]), 1e-30):.2g})")
    bad = ~good
    if bad.any():
        limit = 3 * np.max(np.abs(desired))
        assert np.max(np.abs(actual[bad] - desired[bad])) <= limit, name
    return int(good.sum()), good.size


def test_adam_rates_default_per_optimizer():
    for name, rate in (("momentum", 0.1), ("adam", 1e-3), ("adamw", 1e-3)):
        cfg = config_lib.TrainConfig(model_dir="/x", optimizer=name, batch_size=256)
        assert cfg.base_learning_rate == pytest.approx(rate * 2)
    assert config_lib.TrainConfig(model_dir="/x", optimizer="adam", learning_rate=3e-4).base_learning_rate \
        == pytest.approx(3e-4)


def test_adam_step_matches_numpy():
    model, _ = check_adam("adam")
    assert float(model.l2_penalty()) > 0           # the L2 term is in the loss


@pytest.mark.parametrize("optimizer,weight_decay", [("adam", 1e-2), ("adamw", 50.0)])
@pytest.mark.parametrize("mistake", ["no bias correction", "L2 left out", "v of |g|"])
def test_adam_bound_catches_a_wrong_rule(monkeypatch, optimizer, weight_decay, mistake):
    """The derived bound is loose where Adam amplifies rounding, yet a wrong rule is out of it."""
    import functools
    import sys

    module = sys.modules[__name__]
    monkeypatch.setattr(module, "numpy_adam", functools.partial(numpy_adam, mistake=mistake))
    with pytest.raises(AssertionError):
        check_adam(optimizer, weight_decay=weight_decay)


def test_adam_noconv_l2_penalty_leaves_out_conv_kernels():
    model, cfg = make_model(10, optimizer="adam", weight_decay=1e-2, conv_l2=False)
    chosen = [v for v in model.trainable_variables if "conv2d" not in v.path]
    want = cfg.weight_decay * sum(np.sum(v.numpy().astype(np.float64) ** 2) / 2 for v in chosen)
    assert float(model.l2_penalty()) == pytest.approx(want, rel=1e-5)


def test_adamw_step_matches_numpy():
    # lr 1e-3·8/128 = 6.25e-5; wd 50 makes the decoupled shrink 3e-3·w per step, far above
    # Adam's ~lr-sized elementwise step: a missing or doubled decay is way out of tolerance.
    model, _ = check_adam("adamw", weight_decay=50.0)
    assert float(model.l2_penalty()) == 0.0         # decoupled: nothing in the loss


def test_adamw_noconv_l2_decays_the_l2_set_only():
    model, _ = make_model(10, optimizer="adamw", weight_decay=50.0, conv_l2=False)
    for v in model.trainable_variables:
        assert model.optimizer._use_weight_decay(v) == ("conv2d" not in v.path), v.path


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_optimizer_rule_against_numpy(name):
    """make_optimizer on fabricated float32 gradients, 4 steps across a rate drop,
    against float64 NumPy. Same gradients on both sides, so only float32 rounding
    separates them: elementwise within 1e-4 of the step plus 2 eps32 |w|. One
    variable is excluded from the decay (as conv kernels under --noconv_l2)."""
    import keras

    rng = np.random.default_rng(3)
    shapes = [(3, 3, 4, 5), (5,), (7, 2)]
    init = [rng.standard_normal(s) for s in shapes]
    grads = [[rng.standard_normal(s) * (1 + k) for s in shapes] for k in range(4)]
    variables = [keras.Variable(w.astype(np.float32)) for w in init]
    wd = 0.5
    schedule = optim.piecewise_by_epoch(0.01, (2,), (1.0, 0.1), steps_per_epoch=1)
    opt = optim.make_optimizer(name, schedule, weight_decay=wd, no_decay=[variables[1]])
    opt.build(variables)
    w = [x.astype(np.float64) for x in init]
    state = [(np.zeros(s), np.zeros(s)) for s in shapes]
    for t in range(1, 5):
        lr = 0.01 * (1.0 if t - 1 < 2 else 0.1)
        before = [v.numpy().astype(np.float64) for v in variables]
        opt.apply([g.astype(np.float32) for g in grads[t - 1]], variables)
        for i, g in enumerate(grads[t - 1]):
            g = g.astype(np.float32).astype(np.float64)
            if name == "adamw" and i != 1:
                w[i] = before[i] - lr * wd * before[i]
            else:
                w[i] = before[i]
            m, v = state[i]
            m = B1 * m + (1 - B1) * g
            v = B2 * v + (1 - B2) * g * g
            state[i] = (m, v)
            w[i] = w[i] - lr * np.sqrt(1 - B2 ** t) / (1 - B1 ** t) * m / (np.sqrt(v) + EPS)
            got = variables[i].numpy().astype(np.float64)
            step = np.abs(w[i] - before[i])
            bound = 1e-4 * step + 2 * np.finfo(np.float32).eps * np.abs(before[i]) + 1e-12
            assert np.all(np.abs(got - w[i]) <= bound), (name, t, i, np.max(np.abs(got - w[i]) / bound))


# ----------------------------------------------------------------------------- the registry

def test_registered_optimizers_build_what_they_say():
    """momentum: TF1 momentum 0.9, weight decay in the loss; adam: plain Adam, decay in the
    loss; adamw: AdamW, decay decoupled, on the L2 set only."""
    import keras
    from resnet_cifar.optim import TF1Momentum

    assert list(config_lib.OPTIMIZERS) == ["momentum", "adam", "adamw"]
    assert {n: o.decoupled_decay for n, o in config_lib.OPTIMIZERS.items()} == {
        "momentum": False, "adam": False, "adamw": True}
    kept, excluded = keras.Variable(np.ones(3, np.float32)), keras.Variable(np.ones(2, np.float32))
    momentum = optim.make_optimizer("momentum", 0.1, weight_decay=0.5, no_decay=[excluded])
    assert type(momentum) is TF1Momentum and momentum.momentum == pytest.approx(0.9)
    adam = optim.make_optimizer("adam", 1e-3, weight_decay=0.5)
    assert type(adam) is keras.optimizers.Adam and not adam.weight_decay
    adamw = optim.make_optimizer("adamw", 1e-3, weight_decay=0.5, no_decay=[excluded])
    assert type(adamw) is keras.optimizers.AdamW and adamw.weight_decay == pytest.approx(0.5)
    adamw.build([kept, excluded])
    assert adamw._use_weight_decay(kept) and not adamw._use_weight_decay(excluded)


def sgd_spec(decoupled):
    """A new optimizer: Keras SGD, with its own (decoupled) decay or not."""
    def build(learning_rate, weight_decay, no_decay):
        import keras

        optimizer = keras.optimizers.SGD(learning_rate, weight_decay=weight_decay if decoupled else None)
        if decoupled:
            optimizer.exclude_from_weight_decay(var_list=list(no_decay))
        return optimizer
    return config_lib.OptimizerChoice(default_learning_rate=0.05, decoupled_decay=decoupled,
                                      description=f"SGD, decoupled={decoupled}"), build


def register_sgd(monkeypatch, decoupled):
    """A new optimizer: its entry with the setting (config.OPTIMIZERS) and its builder (optim.BUILD)."""
    choice, build = sgd_spec(decoupled)
    monkeypatch.setitem(config_lib.OPTIMIZERS, "sgd", choice)
    monkeypatch.setitem(optim.BUILD, "sgd", build)


@pytest.mark.parametrize("decoupled", [False, True])
def test_a_new_optimizer_is_an_entry_and_a_builder(monkeypatch, decoupled):
    """Registered at test time: TrainConfig accepts it with its default rate, the --optimizer
    and --learning_rate help list it, the trainer builds it, and its decoupled_decay alone
    decides whether the L2 term stays in the loss."""
    import keras

    register_sgd(monkeypatch, decoupled)
    cfg = config_lib.TrainConfig(model_dir="/x", optimizer="sgd", batch_size=256)
    assert cfg.base_learning_rate == pytest.approx(0.05 * 2)
    assert f"sgd: SGD, decoupled={decoupled}" in config_lib.choices_help(config_lib.OPTIMIZERS)
    assert "0.05 for sgd" in config_lib.rates_help()
    model, _ = make_model(10, optimizer="sgd", weight_decay=1e-2)
    assert type(model.optimizer) is keras.optimizers.SGD
    if decoupled:
        assert float(model.l2_penalty()) == 0.0
        assert model.optimizer.weight_decay == pytest.approx(1e-2)
    else:
        assert float(model.l2_penalty()) > 0
        assert not model.optimizer.weight_decay


def test_unknown_optimizer_error_lists_the_registered_names(monkeypatch):
    register_sgd(monkeypatch, False)
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.TrainConfig(model_dir="/x", optimizer="lion")
    assert str(e.value).split("choose one of ")[1].split(", ") == ["momentum", "adam", "adamw", "sgd"]
    with pytest.raises(ValueError, match="choose one of momentum, adam, adamw, sgd"):
        optim.make_optimizer("lion", 0.1)


def test_bad_optimizer_and_rate_are_refused():
    with pytest.raises(config_lib.ConfigError, match="--optimizer='sgd'"):
        config_lib.TrainConfig(model_dir="/x", optimizer="sgd")
    with pytest.raises(config_lib.ConfigError, match="--learning_rate=0"):
        config_lib.TrainConfig(model_dir="/x", learning_rate=0.0)


@pytest.mark.parametrize("boundaries,rates,steps_per_epoch", [
    ((50, 100), (1, 0.1, 0.01), 390), ((2, 4), (1, 0.1, 0.01), 160), ((0.5, 1.25), (1, 0.5, 0.25), 3),
    ((1,), (1, 0.1), 1)])
def test_rate_schedule_drops_at_the_first_step_of_each_boundary_epoch(boundaries, rates, steps_per_epoch):
    """The rate at optimizer step s (0-based) is base * rates[number of boundaries <= s / steps_per_epoch]."""
    schedule = optim.piecewise_by_epoch(0.1, boundaries, rates, steps_per_epoch)
    last = int(max(boundaries) * steps_per_epoch) + 3
    for step in sorted({0, last} | {int(b * steps_per_epoch) + d for b in boundaries for d in (-1, 0, 1)}):
        if step < 0:
            continue
        want = 0.1 * rates[sum(step / steps_per_epoch >= b for b in boundaries)]
        assert float(schedule(step)) == pytest.approx(want, rel=1e-6), step
