"""The replay-match comparison (global vs per-layer factor) against hand-computed ratios."""

import numpy as np
import pytest

from analysis import loading, make_figures, replay_match
from resnet_cifar import events, tags
from tests.helpers import write_run

EPOCHS = np.arange(0, 5)
RUN_EPOCHS = 6          # the train_epochs of run_config.json and the epochs of done.json
LAYERS = ["conv2d", "conv2d_1", "conv2d_2"]


def run_logs(rel, layer_rel, sqsum, per_layer=tags.per_layer):
    train = {tags.CONV_RELATIVE_STEP: (EPOCHS[1:], rel), tags.CONV_SQSUM: (EPOCHS, sqsum)}
    for name, values in zip(LAYERS, layer_rel):
        train[per_layer(tags.CONV_RELATIVE_STEP, name)] = (EPOCHS[1:], values)
    return train


def fabricate(tmp_path, old_baseline=False):
    """old_baseline: the baseline's per-layer tags named as before the per_layer/ prefix."""
    base_rel = np.array([4e-3, 2e-3, 1e-3, 5e-4])
    base_layers = [base_rel * k for k in (0.5, 1.0, 2.0)]
    base_names = (lambda tag, layer: f"{tag}/{layer}") if old_baseline else tags.per_layer
    write_run(str(tmp_path / "baseline" / "seed_0"),
              run_logs(base_rel, base_layers, np.full(5, 900.0), base_names),
              config={"conv_grad_scale": False}, done=True, epochs=RUN_EPOCHS)
    # Global replay: the mean matches within 10%, layers are off by x0.8 .. x1.3.
    glob_rel = base_rel * np.array([1.0, 1.1, 0.95, 1.05])
    glob_layers = [base_layers[0] * 0.8, base_layers[1] * 1.0, base_layers[2] * 1.3]
    write_run(str(tmp_path / "conv_lr_scale" / "seed_0"),
              run_logs(glob_rel, glob_layers, np.linspace(800, 2700, 5)),
              config={"conv_grad_scale": True, "conv_lr_factor": "replay"}, done=True, epochs=RUN_EPOCHS)
    # Per-layer replay: every layer within 2%.
    pl_layers = [v * 1.02 for v in base_layers]
    write_run(str(tmp_path / "conv_lr_scale_per_layer" / "seed_0"),
              run_logs(base_rel * 1.02, pl_layers, np.linspace(800, 1800, 5)),
              config={"conv_grad_scale": True, "conv_lr_factor": "per_layer"}, done=True, epochs=RUN_EPOCHS)
    # NoConvL2 does not scale gradients: not in the comparison.
    write_run(str(tmp_path / "noconv_l2" / "seed_0"), run_logs(base_rel / 3, base_layers, np.full(5, 5e3)),
              config={"conv_grad_scale": False}, done=True, epochs=RUN_EPOCHS)
    return loading.load_results(events.find_runs(str(tmp_path)))


@pytest.mark.parametrize("old_baseline", [False, True], ids=["per_layer_names", "earlier_names"])
def test_rows_match_hand_computation(tmp_path, old_baseline):
    table = {r["run"]: r for r in replay_match.rows(fabricate(tmp_path, old_baseline))}
    assert set(table) == {"conv_lr_scale", "conv_lr_scale_per_layer"}
    g, p = table["conv_lr_scale"], table["conv_lr_scale_per_layer"]
    assert abs(g["mean_step_max_dev"] - 0.10) < 1e-5 and g["within_tolerance"]
    assert abs(g["layer_max_dev"] - 0.30) < 1e-5
    assert abs(g["layer_median_dev"] - 0.20) < 1e-5          # devs 0.2, 0.0, 0.3
    assert abs(g["final_sqsum_ratio"] - 3.0) < 1e-5          # 2700 / 900
    assert abs(p["layer_max_dev"] - 0.02) < 1e-5 and abs(p["mean_step_max_dev"] - 0.02) < 1e-5


def test_figure_shows_mean_ratio_and_layer_band(tmp_path):
    fig = replay_match.replay_match_figure(fabricate(tmp_path))
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.lines}
    np.testing.assert_allclose(lines["ConvLRScale"].get_xdata(), [1, 2, 3, 4])
    np.testing.assert_allclose(lines["ConvLRScale"].get_ydata(), [1.0, 1.1, 0.95, 1.05], rtol=1e-6)
    band = ax.collections[0].get_paths()[0].vertices
    assert abs(band[:, 1].min() - 0.8) < 1e-5 and abs(band[:, 1].max() - 1.3) < 1e-5


def test_cli_writes_the_replay_match_outputs(tmp_path):
    fabricate(tmp_path)
    out = tmp_path / "figs"
    assert make_figures.main([str(tmp_path), "--out", str(out)]) == 0
    for name in ("replay_match.png", "replay_match.svg", "replay_match.md", "replay_match.csv"):
        assert (out / name).is_file(), name
    assert "| ConvLRScale | 1 | 4 | 10.0% | yes | 30.0% |" in (out / "replay_match.md").read_text()


def test_two_baseline_seeds_give_a_noise_floor_row(tmp_path):
    fabricate(tmp_path)
    rel = np.array([4e-3, 2e-3, 1e-3, 5e-4])
    layers = [rel * k * 1.1 for k in (0.5, 1.0, 2.0)]          # seed 1: every layer 10% higher
    write_run(str(tmp_path / "baseline" / "seed_1"), run_logs(rel * 1.1, layers, np.full(5, 990.0)),
              config={"conv_grad_scale": False}, done=True, epochs=RUN_EPOCHS)
    loaded = loading.load_results(events.find_runs(str(tmp_path)))
    table = {r["run"]: r for r in replay_match.rows(loaded)}
    floor = table[replay_match.NOISE_FLOOR]
    assert abs(floor["mean_step_max_dev"] - 0.1) < 1e-5 and abs(floor["layer_max_dev"] - 0.1) < 1e-5
    assert abs(floor["final_sqsum_ratio"] - 1.1) < 1e-5
    # Scaled runs are still paired with the baseline of their own seed (seed_0 here).
    assert abs(table["conv_lr_scale"]["layer_max_dev"] - 0.30) < 1e-5
