"""The theory overlay per optimizer: AdamW's equilibrium angular update against a NumPy
simulation of a scale-invariant weight; Adam (L2 in the loss) has none; momentum as before."""

import math

import numpy as np
import pytest

from analysis import equilibrium, predictions


def simulate_adamw(lr, wd, steps, d=1000, norm0=None, b1=0.9, b2=0.999, eps=1e-7, seed=0):
    """Keras AdamW on w in R^d under the gradient of a scale-invariant loss (a random
    N(0, I) vector projected orthogonal to w, divided by ||w||). Returns the angle
    between consecutive weights per step and ||w||² after the last step."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(d)
    if norm0 is not None:
        w *= norm0 / np.linalg.norm(w)
    m = np.zeros(d)
    v = np.zeros(d)
    angle = np.empty(steps)
    for t in range(1, steps + 1):
        sq = w @ w
        g = rng.standard_normal(d)
        g = (g - (g @ w) / sq * w) / math.sqrt(sq)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        new = w - lr * wd * w
        new = new - lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (np.sqrt(v) + eps)
        u, n = w / np.linalg.norm(w), new / np.linalg.norm(new)
        angle[t - 1] = 2 * math.asin(np.linalg.norm(u - n) / 2)
        w = new
    return angle, w @ w


@pytest.mark.parametrize("lr, wd", [(1e-3, 1.0), (2e-3, 0.25)])
def test_adamw_equilibrium_angular_update_matches_simulation(lr, wd):
    d = 1000
    tau = equilibrium.adamw_time_constant(lr, wd)
    settle, measure = int(4 * tau), 4000
    # Start 3x off the equilibrium norm, so that the relaxation is part of the test.
    angle, sq = simulate_adamw(lr, wd, settle + measure, d=d, norm0=math.sqrt(3 * lr * d / (2 * wd)))
    predicted = equilibrium.equilibrium_angular_update("adamw", lr, wd)
    measured = float(np.sqrt(np.mean(angle[settle:] ** 2)))
    assert measured == pytest.approx(predicted, rel=0.02)
    assert sq == pytest.approx(lr * d / (2 * wd), rel=0.1)       # equilibrium norm lr·C/(2·wd)
    # The β1 factor matters: without it (sqrt(2·lr·wd)) the level would be 4.4x higher.
    assert abs(measured - math.sqrt(2 * lr * wd)) > 0.5 * measured


def test_per_optimizer_predictions():
    lr, wd = 0.1, 2e-4
    assert equilibrium.equilibrium_angular_update("momentum", lr, wd) == pytest.approx(math.sqrt(2 * lr * wd / 1.9))
    assert equilibrium.equilibrium_angular_update("adam", 1e-3, wd) is None
    assert equilibrium.equilibrium_angular_update("adamw", 1e-3, 0.01) == pytest.approx(
        math.sqrt(2 * 1e-3 * 0.01 * 0.1 / 1.9))
    assert equilibrium.equilibrium_angular_update("adamw", 1e-3, 0.0) is None


def test_levels_of_adam_configs():
    base = {"batch_size": 128, "boundary_epochs": [2, 4], "decay_rates": [1, 0.1, 0.01],
            "train_epochs": 6, "weight_decay": 0.01, "conv_l2": True, "conv_grad_scale": False}
    adamw = predictions.predicted_levels(dict(base, optimizer="adamw"))
    assert [lv.predicted for lv in adamw] == pytest.approx(
        [math.sqrt(2 * r * 0.01 * 0.1 / 1.9) for r in (1e-3, 1e-4, 1e-5)])
    assert predictions.prediction_basis(dict(base, optimizer="adam")).startswith("none")
    assert all(lv.predicted is None for lv in predictions.predicted_levels(dict(base, optimizer="adam")))
    assert all(lv.predicted is None for lv in predictions.predicted_levels(dict(base, optimizer="adamw", conv_l2=False)))
    # Momentum configs (with or without the new key) are predicted as before.
    old = predictions.predicted_levels(base)
    assert [lv.predicted for lv in old] == [lv.predicted for lv in predictions.predicted_levels(dict(base, optimizer="momentum"))]
    assert old[0].predicted == pytest.approx(math.sqrt(2 * 0.1 * 0.01 / 1.9))


def test_angular_update_figure_draws_the_baselines_level(tmp_path):
    from analysis import loading, make_figures
    from resnet_cifar import events, tags
    from tests.helpers import write_run

    e1 = np.arange(1, 7)
    config = {"batch_size": 128, "boundary_epochs": [2, 4], "decay_rates": [1, 0.1, 0.01], "train_epochs": 6,
              "weight_decay": 0.01, "conv_l2": True, "conv_grad_scale": False, "optimizer": "adamw"}
    write_run(str(tmp_path / "baseline"), {tags.CONV_ANGULAR_UPDATE: (e1, np.full(6, 1e-3))}, config=config,
              done=True, epochs=6)
    paths = make_figures.write_all(loading.load_results(events.find_runs(str(tmp_path))), str(tmp_path / "f"))
    assert any(p.endswith("angular_update.png") for p in paths)
    from analysis import angular

    levels = predictions.baseline_segments(loading.load_results(events.find_runs(str(tmp_path))))
    fig = angular.angular_update(make_figures.curves(
        loading.load_results(events.find_runs(str(tmp_path))), tags.CONV_ANGULAR_UPDATE, tags.TRAIN_DIR),
        levels=levels)
    (levels_drawn,) = fig.axes[0].collections          # Axes.hlines, one segment per phase
    segments = levels_drawn.get_segments()
    assert [tuple(s[:, 0]) for s in segments] == [(0, 2), (2, 4), (4, 6)]
    assert [s[0, 1] for s in segments] == [s[1, 1] for s in segments] == pytest.approx(
        [math.sqrt(2 * r * 0.01 * 0.1 / 1.9) for r in (1e-3, 1e-4, 1e-5)])


@pytest.mark.parametrize("optimizer", ["sgd", "lion"])
def test_an_optimizer_without_an_entry_gets_no_prediction_and_no_time_constant(optimizer):
    config = {"batch_size": 128, "boundary_epochs": [2], "decay_rates": [1, 0.1], "train_epochs": 4,
              "weight_decay": 2e-4, "conv_l2": True, "optimizer": optimizer}
    assert equilibrium.equilibrium_angular_update(optimizer, 0.1, 2e-4) is None
    assert math.isnan(equilibrium.time_constant(optimizer, 0.1, 2e-4))
    assert predictions.prediction_basis(config) == f"none: no theory for optimizer {optimizer!r}"
    assert [lv.predicted for lv in predictions.predicted_levels(config)] == [None, None]
    assert predictions.level_label(config) == f"no predicted level: no theory for optimizer {optimizer!r}"
    # Adam (an entry without a level) has no τ either, not momentum's.
    assert math.isnan(equilibrium.time_constant("adam", 1e-3, 2e-4))


def test_adding_an_optimizers_theory_is_one_entry(monkeypatch):
    """Plain SGD as a new entry: its levels sqrt(2·lr·wd) and τ = 1/(2·lr·wd) (the m = 0
    case of the momentum formulas, by hand) reach the levels, the basis and the legend."""
    sgd = equilibrium.OptimizerTheory(basis="SGD equilibrium", formula="SGD equilibrium sqrt(2·lr·wd)",
                                      level=lambda lr, wd, m: math.sqrt(2 * lr * wd),
                                      time_constant=lambda lr, wd, m: 1 / (2 * lr * wd))
    monkeypatch.setitem(equilibrium.THEORIES, "sgd", sgd)
    config = {"batch_size": 128, "boundary_epochs": [2], "decay_rates": [1, 0.1], "train_epochs": 4,
              "weight_decay": 5e-4, "conv_l2": True, "optimizer": "sgd", "learning_rate": 0.2}
    assert [lv.predicted for lv in predictions.predicted_levels(config)] == pytest.approx(
        [math.sqrt(2 * 0.2 * 5e-4), math.sqrt(2 * 0.02 * 5e-4)])
    assert equilibrium.time_constant("sgd", 0.2, 5e-4) == pytest.approx(5000)
    assert predictions.prediction_basis(config) == "SGD equilibrium"
    assert predictions.level_label(config) == "SGD equilibrium sqrt(2·lr·wd)"
    # Gradient-scaled runs take the baseline's level only where the entry says so.
    scaled = dict(config, conv_l2=False, conv_grad_scale=True)
    assert all(lv.predicted is None for lv in predictions.predicted_levels(scaled))
