"""Tests of the theory overlay: the equilibrium formula against a simulation
(analysis/equilibrium.py), phases and predictions of a config (analysis/predictions.py),
the growth law without decay (analysis/growth.py), late-phase measurements of fabricated
event logs and the theory tables of the CLI (analysis/theory.py), and the dashed level
lines of the figures.

Fast: the simulation is a NumPy toy (a few thousand steps in R^1000), runs are
fabricated with tf.summary, nothing is trained.
"""

import csv
import json
import math
import os

import numpy as np
import pytest

from analysis import equilibrium, figures, growth, loading, make_figures, predictions, theory
from resnet_cifar import events, tags
from tests.helpers import f32, write_events

LAYERS = ("conv2d", "conv2d_1", "conv2d_2")


# --- the formula against a toy scale-invariant problem ---------------------------------

def simulate(lr, wd, momentum, steps, d=1000, norm0=1.0, seed=0, chunk=1000):
    """TF1 momentum with L2 on w in R^d under the gradient of a scale-invariant loss:
    a random N(0, I) vector projected orthogonal to w and divided by ||w||.

    Returns (||dw||/||w|| per step, ||w||² before each step and after the last).
    """
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(d)
    w *= norm0 / np.linalg.norm(w)
    accum = np.zeros(d)
    rel = np.empty(steps)
    sqnorm = np.empty(steps + 1)
    for c0 in range(0, steps, chunk):
        for j, g in enumerate(rng.standard_normal((min(chunk, steps - c0), d))):
            sq = w @ w
            sqnorm[c0 + j] = sq
            g = (g - (g @ w) / sq * w) / math.sqrt(sq)
            accum = momentum * accum + g + wd * w
            dw = lr * accum
            rel[c0 + j] = math.sqrt((dw @ dw) / sq)
            w = w - dw
    sqnorm[steps] = w @ w
    return rel, sqnorm


@pytest.mark.parametrize("lr, wd, momentum", [(0.1, 5e-3, 0.0), (0.1, 5e-3, 0.5),
                                              (0.1, 5e-3, 0.9), (0.1, 1e-3, 0.9)])
def test_equilibrium_relative_step_matches_simulation(lr, wd, momentum):
    tau = equilibrium.equilibrium_time_constant(lr, wd, momentum)
    # From a norm far from equilibrium, 5 τ to settle, then 2,000 steps (≥ 2 τ) measured.
    settle = int(5 * tau)
    measure = int(max(2000, 2 * tau))
    rel, _ = simulate(lr, wd, momentum, settle + measure)

    measured = rel[settle:].mean()
    predicted = equilibrium.equilibrium_relative_step(lr, wd, momentum)
    print(f"lr={lr} wd={wd} m={momentum}: measured {measured:.5g}, formula {predicted:.5g}, "
          f"ratio {measured / predicted:.4f}")
    assert measured == pytest.approx(predicted, rel=0.03)
    if momentum:   # the momentum factor is really needed: the m=0 formula is far off
        assert abs(measured / math.sqrt(2 * lr * wd) - 1) > 0.15


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_norm_relaxes_with_time_constant_one_minus_m_over_2_lr_wd(momentum):
    """Far above equilibrium ||w||² decays as exp(-t/τ), τ = (1-m)/(2·lr·wd): momentum
    shortens the plain-SGD time 1/(2·lr·wd) by (1-m)."""
    lr, wd, d = 0.1, 1e-3, 1000
    tau = equilibrium.equilibrium_time_constant(lr, wd, momentum)
    assert tau == pytest.approx((1 - momentum) / (2 * lr * wd))
    eq_sqnorm = math.sqrt(lr * (d - 1) / (2 * wd * (1 - momentum)))  # ||w||⁴ = lr·||g||²||w||²/(2wd(1-m))
    _, sqnorm = simulate(lr, wd, momentum, int(tau), d=d, norm0=10 * math.sqrt(eq_sqnorm))

    decay = sqnorm[int(tau)] / sqnorm[0]
    print(f"m={momentum}: ||w||² after τ={tau:.0f} steps: x{decay:.4f} (theory e^-1 = {math.exp(-1):.4f})")
    assert decay == pytest.approx(math.exp(-1), rel=0.05)


def test_time_constant_numbers():
    assert equilibrium.equilibrium_time_constant(0.1, 2e-4, 0.9) == pytest.approx(2_500)
    assert equilibrium.equilibrium_time_constant(0.01, 2e-4, 0.9) == pytest.approx(25_000)
    assert equilibrium.equilibrium_time_constant(0.1, 2e-4, 0.0) == pytest.approx(25_000)
    assert equilibrium.equilibrium_time_constant(0.1, 0.0, 0.9) == math.inf


# --- phases and predictions of a config ------------------------------------------------

POST_CONFIG = {"batch_size": 128, "boundary_epochs": [50.0, 100.0], "decay_rates": [1.0, 0.1, 0.01],
               "train_epochs": 150, "weight_decay": 2e-4, "conv_l2": True, "conv_grad_scale": False}


def test_phases_and_predicted_levels_by_hand():
    np.testing.assert_allclose(predictions.phases(POST_CONFIG),
                               [(0.0, 50.0, 0.1), (50.0, 100.0, 0.01), (100.0, 150.0, 0.001)], rtol=1e-12)
    levels = predictions.predicted_levels(POST_CONFIG)
    # sqrt(2 * lr * 2e-4 / 1.9)
    np.testing.assert_allclose([lv.predicted for lv in levels], [4.588e-3, 1.451e-3, 4.588e-4],
                               rtol=1e-3)
    assert [lv[:3] for lv in levels] == predictions.phases(POST_CONFIG)
    assert predictions.level_segments(POST_CONFIG) == [(lv.start, lv.end, lv.predicted) for lv in levels]

    # Batch 256: lr 0.2 · rates; a run cut at 75 epochs has two phases.
    big = dict(POST_CONFIG, batch_size=256, train_epochs=75)
    np.testing.assert_allclose(predictions.phases(big), [(0.0, 50.0, 0.2), (50.0, 75.0, 0.02)], rtol=1e-12)
    assert predictions.predicted_levels(big)[0].predicted == pytest.approx(math.sqrt(2 * 0.2 * 2e-4 / 1.9))


def test_predictions_per_kind_of_run():
    noconv = dict(POST_CONFIG, conv_l2=False)
    scaled = dict(noconv, conv_grad_scale=True, conv_lr_factor="replay")
    both = dict(POST_CONFIG, conv_grad_scale=True)
    no_wd = dict(POST_CONFIG, weight_decay=0.0)
    baseline = [lv.predicted for lv in predictions.predicted_levels(POST_CONFIG)]
    assert [lv.predicted for lv in predictions.predicted_levels(noconv)] == [None] * 3
    assert [lv.predicted for lv in predictions.predicted_levels(scaled)] == baseline
    assert [lv.predicted for lv in predictions.predicted_levels(both)] == [None] * 3
    assert [lv.predicted for lv in predictions.predicted_levels(no_wd)] == [None] * 3
    assert predictions.level_segments(noconv) == []
    # Missing keys: the training defaults (the post's schedule), cut at train_epochs.
    assert predictions.phases({"train_epochs": 6}) == [(0.0, 6.0, 0.1)]


def test_phase_epochs_and_late_windows():
    # Logged epoch e is the mean over [e-1, e): a phase [s, t) holds epochs s+1..t.
    assert predictions.phase_epochs(predictions.Phase(0.0, 50.0, 0.1)) == (1, 50)
    assert predictions.phase_epochs(predictions.Phase(50.0, 100.0, 0.01)) == (51, 100)
    assert theory.late_window(predictions.Phase(0.0, 50.0, 0.1)) == (41, 50)
    assert theory.late_window(predictions.Phase(4.0, 6.0, 0.1)) == (6, 6)      # at least one epoch
    assert theory.late_window(predictions.Phase(0.0, 10.0, 0.1), 0.5) == (6, 10)
    # Fractional boundary: epoch 3 straddles 2.5 and belongs to neither phase.
    assert predictions.phase_epochs(predictions.Phase(0.0, 2.5, 0.1)) == (1, 2)
    assert predictions.phase_epochs(predictions.Phase(2.5, 6.0, 0.01)) == (4, 6)
    assert predictions.phase_epochs(predictions.Phase(2.2, 2.7, 0.01)) == (3, 3)   # shorter than an epoch


# --- late-phase measurements of fabricated logs ------------------------------------------

def write_relative_run(run_dir, config, relative, layers, steps_per_epoch=None):
    """A run folder with conv_relative_step and its per-layer tags at steps 1..E; its
    run_config.json holds `config` as given, and records `steps_per_epoch` as training does,
    or (None) nothing, as older code."""
    epochs = range(1, len(relative) + 1)
    scalars = {tags.CONV_RELATIVE_STEP: list(zip(epochs, relative))}
    for layer, values in layers.items():
        scalars[tags.per_layer(tags.CONV_RELATIVE_STEP, layer)] = list(zip(epochs, values))
    write_events(os.path.join(run_dir, tags.TRAIN_DIR), scalars)
    record = {"config": config}
    if steps_per_epoch is not None:
        record["steps_per_epoch"] = steps_per_epoch
    with open(os.path.join(run_dir, tags.RUN_CONFIG_FILE), "w") as f:
        json.dump(record, f)
    return run_dir


def write_baseline_and_noconv(root, config, rng, epochs=10):
    """A baseline and a NoConvL2 run of `config` under `root`, 390 steps per epoch recorded."""
    write_relative_run(str(root / figures.BASELINE), config, *fake_relative(rng, epochs), steps_per_epoch=390)
    write_relative_run(str(root / figures.NOCONV_L2), dict(config, conv_l2=False), *fake_relative(rng, epochs),
                       steps_per_epoch=390)


def fake_relative(rng, epochs):
    layers = {name: rng.uniform(1e-4, 1e-2, epochs) for name in LAYERS}
    return np.mean([layers[n] for n in LAYERS], axis=0), layers


SMALL_CONFIG = {"batch_size": 256, "boundary_epochs": [10.0, 15.0], "decay_rates": [1.0, 0.1, 0.01],
                "train_epochs": 20, "weight_decay": 2e-4, "conv_l2": True, "seed": 3}


def test_late_phase_measurements_match_hand_computation(tmp_path):
    rng = np.random.default_rng(0)
    relative, layers = fake_relative(rng, 20)
    run = events.load_run(write_relative_run(str(tmp_path / "run"), SMALL_CONFIG, relative, layers))

    got = theory.late_phase_measurements(run)

    # Phases 0-10, 10-15, 15-20 at lr 0.2/0.02/0.002; last 20%: epochs 9-10, 15, 20.
    windows = [(9, 10), (15, 15), (20, 20)]
    assert [(m.first_epoch, m.last_epoch) for m in got] == windows
    np.testing.assert_allclose([m.lr for m in got], [0.2, 0.02, 0.002])
    for m, (first, last) in zip(got, windows):
        sl = slice(first - 1, last)
        assert m.mean == pytest.approx(f32(relative)[sl].mean(), rel=1e-12)
        per_layer = {n: f32(layers[n])[sl].mean() for n in LAYERS}
        assert m.layers == pytest.approx(per_layer, rel=1e-12)
        assert m.layer_min == pytest.approx(min(per_layer.values()), rel=1e-12)
        assert m.layer_max == pytest.approx(max(per_layer.values()), rel=1e-12)

    half = theory.late_phase_measurements(run, fraction=0.5)
    assert (half[0].first_epoch, half[0].last_epoch) == (6, 10)
    assert half[0].mean == pytest.approx(f32(relative)[5:10].mean(), rel=1e-12)


def test_late_phase_of_an_unfinished_run_is_nan_where_not_logged(tmp_path):
    rng = np.random.default_rng(1)
    relative, layers = fake_relative(rng, 12)   # stopped during the second phase
    run = events.load_run(write_relative_run(str(tmp_path / "run"), SMALL_CONFIG, relative, layers))
    first, second, third = theory.late_phase_measurements(run)
    assert first.mean == pytest.approx(f32(relative)[8:10].mean(), rel=1e-12)
    assert math.isnan(second.mean) and math.isnan(third.mean) and math.isnan(second.layer_min)


# --- figures ------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [figures.relative_step, figures.relative_step_all])
def test_relative_step_figures_show_the_predicted_levels(make):
    steps = np.arange(1, 151)
    data = {figures.BASELINE: [(steps, np.full(150, 3e-3))],
            figures.NOCONV_L2: [(steps, np.full(150, 1e-3))],
            figures.CONV_LR_SCALE: [(steps, np.full(150, 2e-3))]}
    levels = predictions.level_segments(POST_CONFIG)

    ax = make(data, levels=levels, log_y=True).axes[0]

    runs = 2 if make is figures.relative_step else 3
    assert [line.get_label() for line in ax.lines] == ["Baseline", "NoConvL2", "ConvLRScale"][:runs]
    (drawn,) = ax.collections                    # Axes.hlines: one collection of segments
    assert drawn.get_label() == figures.LEVEL_LABEL
    segments = drawn.get_segments()
    assert len(segments) == 3
    # sqrt(2 * lr * 2e-4 / 1.9) over each phase of the post's schedule
    for segment, (start, end), value in zip(segments, [(0, 50), (50, 100), (100, 150)],
                                            [4.588e-3, 1.451e-3, 4.588e-4]):
        np.testing.assert_array_equal(segment[:, 0], [start, end])
        np.testing.assert_allclose(segment[:, 1], [value, value], rtol=1e-3)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend.count(figures.LEVEL_LABEL) == 1
    assert ax.get_yscale() == "log"
    assert ax.get_ylim()[0] > 1e-4 and ax.get_ylim()[1] < 1e-2    # the levels and runs, no more


def test_levels_without_prediction_are_skipped():
    steps = np.arange(1, 7)
    data = {figures.BASELINE: [(steps, np.full(6, 3e-3))], figures.NOCONV_L2: [(steps, np.full(6, 1e-3))]}
    noconv = predictions.predicted_levels(dict(POST_CONFIG, conv_l2=False, train_epochs=6))
    ax = figures.relative_step(data, levels=noconv).axes[0]
    assert len(ax.lines) == 2 and not ax.collections and ax.get_yscale() == "linear"


# --- the command line's theory tables ---------------------------------------------------

CLI_CONFIG = {"batch_size": 128, "boundary_epochs": [5.0], "decay_rates": [1.0, 0.1],
              "train_epochs": 10, "weight_decay": 2e-4, "conv_l2": True, "conv_grad_scale": False}


def test_cli_writes_theory_tables_and_level_lines(tmp_path):
    root = tmp_path / "results"
    rng = np.random.default_rng(2)
    logs = {}
    runs = {figures.BASELINE: [dict(CLI_CONFIG, seed=0), dict(CLI_CONFIG, seed=1)],
            figures.NOCONV_L2: [dict(CLI_CONFIG, conv_l2=False)],
            figures.CONV_LR_SCALE: [dict(CLI_CONFIG, conv_l2=False, conv_grad_scale=True)]}
    for name, configs in runs.items():
        logs[name] = []
        for k, config in enumerate(configs):
            folder = root / name / f"seed_{k}" if len(configs) > 1 else root / name
            folder.mkdir(parents=True)
            relative, layers = fake_relative(rng, 10)
            write_relative_run(str(folder), config, relative, layers, steps_per_epoch=390)
            logs[name].append((relative, layers))
    out = tmp_path / "figs"

    assert make_figures.main([str(root), "--out", str(out)]) == 0

    with open(out / "theory.csv") as f:
        table = {(r["name"], int(r["phase"])): r for r in csv.DictReader(f)}
    assert len(table) == 6
    predicted = [math.sqrt(2 * lr * 2e-4 / (1 + 0.9)) for lr in (0.1, 0.01)]    # sqrt(2·lr·wd/(1+m))
    for phase, epoch in ((0, 5), (1, 10)):   # one-epoch late windows: epochs 5 and 10
        base = table[(figures.BASELINE, phase)]
        seeds = [f32(rel)[epoch - 1] for rel, _ in logs[figures.BASELINE]]
        layer_values = [f32(lay[n])[epoch - 1] for _, lay in logs[figures.BASELINE] for n in LAYERS]
        assert float(base["lr"]) == pytest.approx([0.1, 0.01][phase])
        assert float(base["predicted"]) == pytest.approx(predicted[phase], rel=1e-12)
        assert float(base["measured_mean"]) == pytest.approx(np.mean(seeds), rel=1e-12)
        assert float(base["measured_std"]) == pytest.approx(np.std(seeds, ddof=1), rel=1e-9)
        assert float(base["layer_min"]) == pytest.approx(min(layer_values), rel=1e-12)
        assert float(base["layer_max"]) == pytest.approx(max(layer_values), rel=1e-12)
        assert float(base["ratio"]) == pytest.approx(np.mean(seeds) / predicted[phase], rel=1e-9)
        # 5 epochs of 390 steps against τ = (1 - 0.9) / (2 · lr · 2e-4)
        assert float(base["phase_over_tau"]) == pytest.approx(5 * 390 / (0.1 / (2 * [0.1, 0.01][phase] * 2e-4)))

        noconv = table[(figures.NOCONV_L2, phase)]
        assert noconv["predicted"] == "" and noconv["ratio"] == ""
        assert float(noconv["measured_mean"]) == pytest.approx(f32(logs[figures.NOCONV_L2][0][0])[epoch - 1])
        scaled = table[(figures.CONV_LR_SCALE, phase)]
        assert float(scaled["predicted"]) == pytest.approx(predicted[phase], rel=1e-12)

    md = (out / "theory.md").read_text()
    assert "Equilibrium needs time" in md and "(1−m)/(2·lr·wd)" in md
    seeds = [f32(rel)[4] for rel, _ in logs[figures.BASELINE]]
    assert f"{np.mean(seeds):.3e} ± {np.std(seeds, ddof=1):.1e}" in md

    with open(out / "theory_per_layer.csv") as f:
        per_layer = list(csv.DictReader(f))
    assert len(per_layer) == 4 * 2 * len(LAYERS)   # 4 run folders × 2 phases × 3 layers
    row = next(r for r in per_layer if r["run"] == figures.BASELINE and r["seed"] == "1"
               and r["phase"] == "1" and r["layer"] == "conv2d_2")
    assert float(row["measured"]) == pytest.approx(f32(logs[figures.BASELINE][1][1]["conv2d_2"])[9])
    assert float(row["predicted"]) == pytest.approx(predicted[1], rel=1e-12)

    svg = (out / "relative_step.svg").read_text()
    assert figures.LEVEL_LABEL in svg


def test_cli_names_the_adamw_formula_and_its_time_constant(tmp_path):
    """An AdamW baseline: its own level (decoupled decay, no momentum factor), its own
    τ = 1/(2·lr·wd) in the table, and the AdamW formula in the figures' legends."""
    root = tmp_path / "results"
    config = dict(CLI_CONFIG, optimizer="adamw", learning_rate=1e-3, weight_decay=0.05)
    rng = np.random.default_rng(3)
    write_baseline_and_noconv(root, config, rng)
    out = tmp_path / "figs"

    assert make_figures.main([str(root), "--out", str(out)]) == 0

    with open(out / "theory.csv") as f:
        table = {int(r["phase"]): r for r in csv.DictReader(f) if r["name"] == figures.BASELINE}
    for phase, lr in ((0, 1e-3), (1, 1e-4)):
        row = table[phase]
        assert float(row["predicted"]) == pytest.approx(math.sqrt(2 * lr * 0.05 * 0.1 / 1.9), rel=1e-12)
        assert float(row["tau_steps"]) == pytest.approx(1 / (2 * lr * 0.05), rel=1e-12)
        assert float(row["phase_over_tau"]) == pytest.approx(5 * 390 * 2 * lr * 0.05, rel=1e-12)
    assert "AdamW runs (decoupled decay)" in (out / "theory.md").read_text()
    for name in ("relative_step", "angular_update"):
        svg_path = out / f"{name}.svg"
        if name == "angular_update" and not svg_path.exists():
            continue   # the fabricated run logs no angular update
        svg = svg_path.read_text()
        assert "AdamW equilibrium" in svg and figures.LEVEL_LABEL not in svg


def test_steps_per_epoch_is_what_the_run_recorded_not_50000_over_the_batch(tmp_path):
    """A run on other data (run_config.json: 7 steps per epoch) is not assumed to have 390."""
    config = {"batch_size": 128, "steps_per_epoch": None}
    (tmp_path / tags.RUN_CONFIG_FILE).write_text(json.dumps({"config": config, "steps_per_epoch": 7,
                                                            "num_train_images": 1000}))
    assert predictions.steps_per_epoch(config, str(tmp_path)) == 7
    # Only the training-set size recorded: size // batch, as training computes it.
    (tmp_path / tags.RUN_CONFIG_FILE).write_text(json.dumps({"config": config, "num_train_images": 1000}))
    assert predictions.steps_per_epoch(config, str(tmp_path)) == 7            # 1000 // 128
    assert predictions.steps_per_epoch(dict(config, batch_size=100), str(tmp_path)) == 10
    assert predictions.steps_per_epoch(dict(config, steps_per_epoch=160)) == 160
    assert predictions.steps_per_epoch(config) is None                     # nothing recorded: unknown


def test_a_run_without_recorded_steps_per_epoch_says_so(tmp_path):
    """A run_config.json written by older code (no steps_per_epoch, no num_train_images): the
    table names the run and leaves phase / τ blank instead of assuming a CIFAR-10 epoch."""
    rng = np.random.default_rng(6)
    old = events.load_run(write_relative_run(str(tmp_path / "old"), SMALL_CONFIG, *fake_relative(rng, 20)))
    new = events.load_run(write_relative_run(str(tmp_path / "new"), dict(SMALL_CONFIG, conv_l2=False),
                                    *fake_relative(rng, 20), steps_per_epoch=195))
    out = tmp_path / "out"
    out.mkdir()

    theory.write_theory({figures.BASELINE: [old], figures.NOCONV_L2: [new]}, str(out))

    with open(out / "theory.csv") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        if r["name"] == figures.BASELINE:
            assert r["steps_per_epoch"] == r["phase_steps"] == r["phase_over_tau"] == ""
        else:
            assert r["steps_per_epoch"] == "195"
            assert float(r["phase_steps"]) == (float(r["end_epoch"]) - float(r["start_epoch"])) * 195
    md = (out / "theory.md").read_text()
    assert "**Steps per epoch not recorded** for Baseline:" in md
    baseline_rows = [line for line in md.splitlines() if line.startswith("| Baseline |")]
    assert len(baseline_rows) == 3 and all(line.endswith("| — |") for line in baseline_rows)


def test_theory_tables_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A failure half-way through theory.csv leaves the previous file, and no partial one."""
    rng = np.random.default_rng(5)
    run = events.load_run(write_relative_run(str(tmp_path / "run"), SMALL_CONFIG, *fake_relative(rng, 20)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "theory.csv").write_text("old\n")

    class Unwritable:
        """A cell the CSV writer cannot turn into text: writing theory.csv fails at its first row."""

        def __str__(self):
            raise OSError("disk full")

    monkeypatch.setattr(theory, "csv_number", lambda _: Unwritable())
    with pytest.raises(OSError, match="disk full"):
        theory.write_theory({figures.BASELINE: [run]}, str(out))
    assert (out / "theory.csv").read_text() == "old\n"
    assert sorted(p.name for p in out.iterdir()) == ["theory.csv", "theory.md"]


def test_cli_says_there_is_no_theory_for_an_unknown_optimizer(tmp_path):
    """A run of an optimizer the theory has no entry for ('sgd'): no level, no τ, and the
    table, its notes and the figures' legends say so; nothing of momentum's shows."""
    root = tmp_path / "results"
    config = dict(CLI_CONFIG, optimizer="sgd")
    rng = np.random.default_rng(7)
    write_baseline_and_noconv(root, config, rng)
    out = tmp_path / "figs"

    assert make_figures.main([str(root), "--out", str(out)]) == 0

    with open(out / "theory.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4                                 # 2 runs × 2 phases
    for r in rows:
        assert r["optimizer"] == "sgd"
        assert r["basis"] == "none: no theory for optimizer 'sgd'"
        assert r["predicted"] == r["ratio"] == r["tau_steps"] == r["phase_over_tau"] == ""
        assert float(r["phase_steps"]) == 5 * 390         # known: the run recorded its steps
    md = (out / "theory.md").read_text()
    assert "**No theory for optimizer 'sgd'** (Baseline, NoConvL2)" in md
    for momentum_text in ("sqrt(2·lr·wd/(1+m))", "(1−m)/(2·lr·wd)", "Equilibrium needs time",
                          "AdamW"):
        assert momentum_text not in md
    table = [line for line in md.splitlines() if line.startswith("| Baseline |")]
    assert len(table) == 2 and all(line.count("| — |") >= 2 for line in table)

    svg = (out / "relative_step.svg").read_text()
    assert "no theory for optimizer" in svg and figures.LEVEL_LABEL not in svg
    loaded = loading.load_results(events.find_runs(str(root)))
    assert predictions.baseline_segments(loaded) == []
    label = predictions.baseline_level_label(loaded)
    assert label == "no predicted level: no theory for optimizer 'sgd'"
    steps = np.arange(1, 11)
    data = {figures.BASELINE: [(steps, np.full(10, 3e-3))], figures.NOCONV_L2: [(steps, np.full(10, 1e-3))]}
    ax = figures.relative_step(data, levels=[], level_label=label).axes[0]
    legend = ax.get_legend()
    assert legend.get_title().get_text() == label
    assert [t.get_text() for t in legend.get_texts()] == ["Baseline", "NoConvL2"]
    assert len(ax.lines) == 2 and not ax.collections          # no level drawn


# --- free growth without decay ------------------------------------------------------------

def simulate_free_growth(lr, momentum, steps, correlation=0.0, scale=None, d=1000, norm0=100.0, seed=0):
    """TF1 momentum without decay on w in R^d under the gradient of a scale-invariant loss:
    N(0, I) noise (each step's correlated with the previous by `correlation`; 1: one fixed
    direction), times `scale[t]` if given, projected orthogonal to w and divided by ||w||.
    Returns (||dw||/||w|| per step, ||w||² before each step and after the last)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(d)
    w *= norm0 / np.linalg.norm(w)
    accum, noise = np.zeros(d), rng.standard_normal(d)
    rel, sqnorm = np.empty(steps), np.empty(steps + 1)
    for t in range(steps):
        sq = w @ w
        sqnorm[t] = sq
        noise = correlation * noise + math.sqrt(1 - correlation ** 2) * rng.standard_normal(d)
        g = (noise - (noise @ w) / sq * w) / math.sqrt(sq) * (1.0 if scale is None else scale[t])
        accum = momentum * accum + g
        dw = lr * accum
        rel[t] = math.sqrt((dw @ dw) / sq)
        w = w - dw
    sqnorm[steps] = w @ w
    return rel, sqnorm


@pytest.mark.parametrize("lr, momentum, correlation, varying", [   # lr: a gain of 4-40% in 4000 steps
    (1.0, 0.0, 0.0, False), (0.5, 0.5, 0.0, False), (0.1, 0.9, 0.0, False), (0.03, 0.9, 0.99, False),
    (0.05, 0.9, 1.0, False), (0.3, 0.9, -0.8, False), (0.1, 0.9, 0.0, True), (0.1, 0.9, 0.5, True)])
def test_free_growth_law_holds_whatever_the_gradients(lr, momentum, correlation, varying):
    """Without decay the steps add (1+m)/(1-m)·Σ||dw||² to ||w||², for uncorrelated,
    strongly correlated, fixed-direction and anticorrelated gradients, of constant or
    varying size: measured on the simulated weight, against the squared steps it took."""
    steps = 4000
    t = np.arange(steps)
    scale = np.exp(1.5 * np.sin(2 * np.pi * t / 700)) if varying else None   # 20x between extremes
    rel, sqnorm = simulate_free_growth(lr, momentum, steps, correlation, scale)

    gain = sqnorm[-1] - sqnorm[0]
    steps_sq = np.sum(rel ** 2 * sqnorm[:-1])            # Σ ||dw||²
    print(f"m={momentum} rho={correlation} varying={varying}: gain {gain:.5g}, "
          f"(1+m)/(1-m)·Σ||dw||² {(1 + momentum) / (1 - momentum) * steps_sq:.5g}")
    assert gain > 0.02 * sqnorm[0]
    assert gain == pytest.approx(growth.growth_per_step(momentum) * steps_sq, rel=5e-3)
    if momentum:   # the momentum factor is needed: plain SGD's 1 per ||dw||² is far off
        assert gain / steps_sq > 2


@pytest.mark.parametrize("lr, momentum, correlation", [(1.0, 0.0, 0.0), (0.5, 0.5, 0.0), (0.1, 0.9, 0.0),
                                                        (0.1, 0.9, 0.5)])
def test_epoch_wise_prediction_matches_simulation(lr, momentum, correlation):
    """Without decay ||w||² gains (1+m)/(1-m)·||dw||² per step, whatever the correlation of
    successive gradients: predicted per 'epoch' of 400 steps from the squared norm at its
    start and its mean relative step, as the table does from logged values."""
    assert growth.growth_per_step(momentum) == pytest.approx((1 + momentum) / (1 - momentum))
    epoch, epochs = 400, 10
    rel, sqnorm = simulate_free_growth(lr, momentum, epoch * epochs, correlation)

    measured = sqnorm[-1] - sqnorm[0]
    predicted = sum(growth.predicted_growth({"w": sqnorm[e * epoch]}, {"w": rel[e * epoch:(e + 1) * epoch].mean()},
                                            epoch, momentum) for e in range(epochs))
    print(f"m={momentum} rho={correlation}: ||w||² {sqnorm[0]:.1f} -> {sqnorm[-1]:.1f}, gain measured "
          f"{measured:.4g}, predicted {predicted:.4g}, ratio {measured / predicted:.4f}")
    assert measured > 0.02 * sqnorm[0]            # a gain well above float noise
    assert measured == pytest.approx(predicted, rel=0.02)
    if momentum:   # the momentum factor is needed: plain SGD's 1 per ||dw||² is far off
        plain = sum(growth.predicted_growth({"w": sqnorm[e * epoch]}, {"w": rel[e * epoch:(e + 1) * epoch].mean()},
                                            epoch, 0.0) for e in range(epochs))
        assert measured / plain > 2


def write_growth_run(run_dir, config, sqsum, relative, steps_per_epoch=195, drop=()):
    """A run folder with per-layer conv_sqsum at steps 0..E and per-layer relative steps
    at 1..E (layer -> values), both main tags, and the steps per epoch recorded; `drop`
    leaves out the (tag, layer, step) named."""
    scalars = {tags.CONV_SQSUM: list(enumerate(np.sum(list(sqsum.values()), axis=0))),
               tags.CONV_RELATIVE_STEP: list(enumerate(np.mean(list(relative.values()), axis=0), 1))}
    for layer in sqsum:
        for tag, points in ((tags.CONV_SQSUM, enumerate(sqsum[layer])),
                            (tags.CONV_RELATIVE_STEP, enumerate(relative[layer], 1))):
            scalars[tags.per_layer(tag, layer)] = [(k, v) for k, v in points if (tag, layer, k) not in drop]
    write_events(os.path.join(run_dir, tags.TRAIN_DIR), scalars)
    with open(os.path.join(run_dir, tags.RUN_CONFIG_FILE), "w") as f:
        json.dump({"config": config, "steps_per_epoch": steps_per_epoch}, f)
    return run_dir


def fake_growth(rng, epochs):
    sqsum = {n: np.cumsum(rng.uniform(1, 5, epochs + 1)) * 10 for n in LAYERS}
    relative = {n: rng.uniform(1e-3, 6e-3, epochs) for n in LAYERS}
    return sqsum, relative


def hand_growth(sqsum, relative, first, last, steps, m=0.9):
    """(sqsum before, measured gain, predicted gain) over epochs first..last, by NumPy."""
    s = np.array([f32(sqsum[n]) for n in LAYERS])            # (layers, epochs + 1)
    r = np.array([f32(relative[n]) for n in LAYERS])         # (layers, epochs), epoch e at e - 1
    e = np.arange(first, last + 1)
    predicted = np.sum(s[:, e - 1] * (np.exp((1 + m) / (1 - m) * steps * r[:, e - 1] ** 2) - 1))
    return s[:, first - 1].sum(), s[:, last].sum() - s[:, first - 1].sum(), predicted


def test_growth_rows_match_hand_computation(tmp_path):
    """Runs without conv decay get a row per phase they have logged (an unfinished run's
    last phase up to its last epoch); the baseline and an AdamW run without conv L2 none."""
    rng = np.random.default_rng(7)
    noconv, unfinished = fake_growth(rng, 20), fake_growth(rng, 12)
    base = fake_growth(rng, 20)
    loaded = {
        figures.BASELINE: [events.load_run(write_growth_run(str(tmp_path / "b"), SMALL_CONFIG, *base))],
        figures.NOCONV_L2: [events.load_run(write_growth_run(
            str(tmp_path / "n"), dict(SMALL_CONFIG, conv_l2=False), *noconv))],
        figures.CONV_LR_SCALE: [events.load_run(write_growth_run(
            str(tmp_path / "s"), dict(SMALL_CONFIG, conv_l2=False, conv_grad_scale=True), *unfinished, 100))],
        "adamw_noconv": [events.load_run(write_growth_run(
            str(tmp_path / "a"), dict(SMALL_CONFIG, conv_l2=False, optimizer="adamw"), *noconv))],
    }

    rows = growth.growth_rows(loaded)

    # Phases 0-10, 10-15, 15-20: epochs 1-10, 11-15, 16-20; the unfinished run's 11-12.
    expected = [(figures.NOCONV_L2, 0, 1, 10, noconv, 195), (figures.NOCONV_L2, 1, 11, 15, noconv, 195),
                (figures.NOCONV_L2, 2, 16, 20, noconv, 195),
                (figures.CONV_LR_SCALE, 0, 1, 10, unfinished, 100), (figures.CONV_LR_SCALE, 1, 11, 12, unfinished, 100)]
    assert [(r.name, r.phase, r.first_epoch, r.last_epoch) for r in rows] == [e[:4] for e in expected]
    for row, (_, _, first, last, data, steps) in zip(rows, expected):
        before, measured, predicted = hand_growth(*data, first, last, steps)
        assert row.before == [pytest.approx(before, rel=1e-9)]
        assert row.measured == [pytest.approx(measured, rel=1e-9)]
        assert row.predicted == [pytest.approx(predicted, rel=1e-9)]
        assert row.ratios == [pytest.approx(measured / predicted, rel=1e-9)]

    md = growth.growth_markdown(rows)
    assert md.count("| NoConvL2 |") == 3 and md.count("| ConvLRScale |") == 2
    assert f"{rows[0].measured[0] / rows[0].predicted[0]:.3f} |" in md and "19×" in md


def test_cli_writes_the_growth_table_only_for_runs_without_conv_decay(tmp_path):
    rng = np.random.default_rng(8)
    root = tmp_path / "results"
    write_growth_run(str(root / figures.BASELINE), CLI_CONFIG, *fake_growth(rng, 10))
    only_baseline = tmp_path / "figs0"
    assert make_figures.main([str(root), "--out", str(only_baseline)]) == 0
    assert "Conv weight growth" not in (only_baseline / "theory.md").read_text()
    assert (only_baseline / "theory_growth.csv").read_text().strip() == ",".join(growth.GROWTH_FIELDS)

    noconv = fake_growth(rng, 10)
    write_growth_run(str(root / figures.NOCONV_L2 / "seed_0"), dict(CLI_CONFIG, conv_l2=False), *noconv)
    write_growth_run(str(root / figures.NOCONV_L2 / "seed_1"), dict(CLI_CONFIG, conv_l2=False, seed=1),
                     *fake_growth(rng, 10))
    out = tmp_path / "figs"
    assert make_figures.main([str(root), "--out", str(out)]) == 0

    assert "## Conv weight growth without conv L2" in (out / "theory.md").read_text()
    with open(out / "theory_growth.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["name"], r["seed_index"], r["phase"]) for r in table] == [
        (figures.NOCONV_L2, k, p) for p in "01" for k in "01"]
    first = table[0]
    before, measured, predicted = hand_growth(*noconv, 1, 5, 195)
    assert float(first["sqsum_before"]) == pytest.approx(before, rel=1e-9)
    assert float(first["measured_gain"]) == pytest.approx(measured, rel=1e-9)
    assert float(first["predicted_gain"]) == pytest.approx(predicted, rel=1e-9)
    assert float(first["ratio"]) == pytest.approx(measured / predicted, rel=1e-9)


def test_growth_rows_where_values_are_missing_and_without_decay(tmp_path):
    """A run whose last epoch has its sums of squares but not yet its relative steps is
    measured up to the epoch before; one missing value in a phase makes that phase n/a,
    with a note saying why; conv L2 at weight_decay 0 grows freely too."""
    rng = np.random.default_rng(9)
    noconv = dict(SMALL_CONFIG, conv_l2=False)
    sqsum, relative = fake_growth(rng, 12)
    lagging = {n: v[:11] for n, v in relative.items()}          # relative steps up to epoch 11
    holed, no_wd = fake_growth(rng, 12), fake_growth(rng, 12)
    loaded = {
        figures.NOCONV_L2: [events.load_run(write_growth_run(str(tmp_path / "n"), noconv, sqsum, lagging))],
        figures.CONV_LR_SCALE: [events.load_run(write_growth_run(
            str(tmp_path / "s"), noconv, *holed, drop={(tags.CONV_RELATIVE_STEP, "conv2d_1", 3)}))],
        "no_weight_decay": [events.load_run(write_growth_run(
            str(tmp_path / "w"), dict(SMALL_CONFIG, weight_decay=0.0), *no_wd))],
    }

    rows = {(r.name, r.phase): r for r in growth.growth_rows(loaded)}

    assert sorted(rows) == sorted([(figures.NOCONV_L2, 0), (figures.NOCONV_L2, 1), (figures.CONV_LR_SCALE, 0),
                                   (figures.CONV_LR_SCALE, 1), ("no_weight_decay", 0), ("no_weight_decay", 1)])
    lag = rows[(figures.NOCONV_L2, 1)]
    assert (lag.first_epoch, lag.last_epoch) == (11, 11)
    assert lag.measured == [pytest.approx(hand_growth(sqsum, relative, 11, 11, 195)[1], rel=1e-9)]
    assert math.isnan(rows[(figures.CONV_LR_SCALE, 0)].ratios[0])
    assert rows[(figures.CONV_LR_SCALE, 1)].ratios == [pytest.approx(hand_growth(*holed, 11, 12, 195)[1]
                                                                     / hand_growth(*holed, 11, 12, 195)[2], rel=1e-9)]
    assert rows[("no_weight_decay", 0)].predicted == [pytest.approx(hand_growth(*no_wd, 1, 10, 195)[2], rel=1e-9)]
    md = growth.growth_markdown(list(rows.values()))
    assert "| n/a |" in md and "n/a: a layer's conv_sqsum or relative step is missing" in md
