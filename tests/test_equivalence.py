"""The equivalence study's table and figure on a fabricated weight-decay grid, against
hand-computed deviations."""

import numpy as np
import pytest

from analysis import equivalence
from resnet_cifar import tags
from tests.helpers import write_run

E1 = np.arange(1, 5)
# run_config.json's train_epochs (and so the epoch precise_bn.json must name); done.json
# names the 4 epochs the runs log.
TRAIN_EPOCHS = 6
LAYERS = ["conv2d", "conv2d_1"]
WDS = (1e-4, 5e-4)


def logs(rel, layer_factors, acc):
    train = {tags.CONV_RELATIVE_STEP: (E1, rel)}
    for name, k in zip(LAYERS, layer_factors):
        train[tags.per_layer(tags.CONV_RELATIVE_STEP, name)] = (E1, rel * k)
    return train, {tags.EPOCH_ACCURACY: (E1, np.array([0.3, 0.4, 0.5, acc]))}


def fabricate(root):
    base = np.array([4e-3, 2e-3, 1e-3, 5e-4])
    for wd in WDS:
        folder = root / f"weight_decay={wd:g}"
        # Two baseline seeds: seed 1 is seed 0 x1.04 in every step (layers: x1.04 and x0.9), 1 point apart.
        for seed, (scale, layer_k, acc) in enumerate([(1.0, (1.0, 1.0), 0.60), (1.04, (1.04, 0.90), 0.61)]):
            train, val = logs(base * scale, layer_k, acc)
            write_run(str(folder / "baseline" / f"seed_{seed}"), train, val,
                      {"weight_decay": wd, "train_epochs": TRAIN_EPOCHS}, done=True, epochs=len(E1))
        # Global replay: mean step x1.10 at one epoch, layers x0.8 / x1.2; accuracy 2 points off.
        # Per layer: x1.02, layers x1.02 / x0.99; per channel: x1.01, layers exact; same accuracy.
        for name, mult, layer_k, acc_off in [
                ("conv_lr_scale", np.array([1.0, 1.1, 1.0, 1.0]), (0.8, 1.2), 0.02),
                ("conv_lr_scale_per_layer", np.full(4, 1.02), (1.02, 0.99), 0.0),
                ("conv_lr_scale_per_channel", np.full(4, 1.01), (1.0, 1.0), -0.005)]:
            for seed, (scale, acc) in enumerate([(1.0, 0.60), (1.04, 0.61)]):
                train, val = logs(base * scale * mult, layer_k, acc + acc_off)
                # the baseline's layers of that seed, times the replay's layer factor
                if seed == 1:
                    for name_l, k_base, k in zip(LAYERS, (1.04, 0.90), layer_k):
                        train[tags.per_layer(tags.CONV_RELATIVE_STEP, name_l)] = (E1, base * scale * mult * k_base * k)
                write_run(str(folder / name / f"seed_{seed}"), train, val,
                          {"weight_decay": wd, "conv_grad_scale": True, "train_epochs": TRAIN_EPOCHS},
                          done=True, epochs=len(E1))
    return root


def test_rows_by_hand(tmp_path):
    rows = equivalence.study_rows(equivalence.load_grid(str(fabricate(tmp_path))))
    assert sorted({r["weight_decay"] for r in rows}) == list(WDS)
    got = {(r["weight_decay"], r["granularity"]): r for r in rows}
    for wd in WDS:
        g = got[(wd, "global")]
        assert g["pairs"] == 2
        assert g["acc_gap"] == pytest.approx(0.02, rel=1e-5)
        assert g["step_dev"] == pytest.approx(0.10, rel=1e-5)
        # layers, max over epochs: |0.8 - 1| = 0.2 (not |0.8·1.1 - 1|) and |1.2·1.1 - 1| = 0.32; median 0.26
        assert g["layer_dev"] == pytest.approx((0.2 + 0.32) / 2, rel=1e-5)
        pl = got[(wd, "per layer")]
        assert pl["step_dev"] == pytest.approx(0.02, rel=1e-5) and pl["acc_gap"] == pytest.approx(0.0, abs=1e-7)
        assert pl["layer_dev"] == pytest.approx((abs(1.02 * 1.02 - 1) + abs(1.02 * 0.99 - 1)) / 2, rel=1e-5)
        pc = got[(wd, "per channel")]
        assert pc["step_dev"] == pytest.approx(0.01, rel=1e-4) and pc["layer_dev"] == pytest.approx(0.01, rel=1e-4)
        assert pc["acc_gap"] == pytest.approx(0.005, rel=1e-4)
        assert pc["acc_diff"] == pytest.approx(-0.005, rel=1e-4) and g["acc_diff"] == pytest.approx(0.02, rel=1e-5)
        floor = got[(wd, equivalence.NOISE_FLOOR)]
        assert floor["pairs"] == 1
        assert floor["acc_gap"] == pytest.approx(0.01, rel=1e-4)
        assert floor["step_dev"] == pytest.approx(0.04, rel=1e-5)
        assert floor["layer_dev"] == pytest.approx((abs(1.04 * 1.04 - 1) + abs(1.04 * 0.90 - 1)) / 2, rel=1e-5)


def test_figure_and_tables_written(tmp_path):
    out = tmp_path / "figs"
    paths = equivalence.write(str(fabricate(tmp_path / "grid")), str(out))
    names = sorted(p.rsplit("/", 1)[1] for p in paths)
    assert names == ["equivalence.csv", "equivalence.md", "equivalence.png", "equivalence.svg"]
    assert "2 seed pairs per point" in (out / "equivalence.svg").read_text()   # global replays: 2 seeds each
    fig = equivalence.equivalence_figure(equivalence.study_rows(equivalence.load_grid(str(tmp_path / "grid"))))
    for ax in fig.axes:
        lines = {l.get_label(): l for l in ax.get_lines()}
        assert set(lines) == {"global", "per layer", "per channel", equivalence.NOISE_FLOOR}
        np.testing.assert_allclose(lines["global"].get_xdata(), WDS)
    np.testing.assert_allclose(fig.axes[1].get_lines()[0].get_ydata(), [0.10, 0.10], rtol=1e-5)
    # accuracy in percentage points: 2 points off in the fabricated global replay
    np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_ydata(), [2.0, 2.0], rtol=1e-5)
    assert all(ax.get_ylim()[0] == 0 for ax in fig.axes)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["1e-4", "5e-4"]
    table = (out / "equivalence.md").read_text()
    # signed: the global replay 2 points above its baselines, the per-channel one 0.5 below;
    # the fabricated runs log no train accuracy
    assert "| 1e-4 | global | 2 | 2.00 pts | +2.00 pts | n/a | n/a | 10.0% | 26.0% |" in table
    assert "| 5e-4 | per channel | 2 | 0.50 pts | -0.50 pts | n/a | n/a |" in table
    assert fig.axes[0].get_title() == "final test accuracy (BN moving averages)"


def test_no_grid_is_one_line_error(tmp_path, capsys):
    assert equivalence.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "weight_decay=" in err


def test_unfinished_runs_are_left_out_and_named(tmp_path, capsys):
    """A sweep still running: the per-channel replay of one weight decay and seed has no
    done.json yet (its last accuracy is not its final one), so that pair is not compared."""
    root = fabricate(tmp_path / "grid")
    running = root / "weight_decay=0.0001" / "conv_lr_scale_per_channel" / "seed_1"
    (running / tags.DONE_FILE).unlink()
    out = tmp_path / "figs"

    assert equivalence.main([str(root), "--out", str(out)]) == 0

    err = capsys.readouterr().err
    assert "1 run(s) not finished, left out of the comparison: " \
           "weight_decay=0.0001/conv_lr_scale_per_channel/seed_1" in err
    rows = {(r["weight_decay"], r["granularity"]): r
            for r in equivalence.study_rows(equivalence.load_grid(str(root)))}
    assert rows[(1e-4, "per channel")]["pairs"] == 1       # seed 0 only
    assert rows[(5e-4, "per channel")]["pairs"] == 2
    assert "| 1e-4 | per channel | 1 |" in (out / "equivalence.md").read_text()


def test_decay_labels_as_the_grid_writes_them():
    assert [equivalence.decay_label(wd) for wd in (1e-4, 2e-4, 5e-4, 1e-3, 0.05, 2.5e-4)] == \
        ["1e-4", "2e-4", "5e-4", "1e-3", "5e-2", "2.5e-4"]


def test_recomputed_bn_accuracy_is_used_where_every_run_has_it(tmp_path):
    """precise_bn.json in every run folder: the table gets its signed column and the figure's
    accuracy panel switches to it (here the replays are 0.3 points above, the moving
    averages said 2)."""
    import json

    from analysis import precise_bn

    root = fabricate(tmp_path / "grid")
    for config_path in root.rglob("run_config.json"):
        run = config_path.parent
        seed = int(run.name.split("_")[1])
        accuracy = 0.70 + 0.01 * seed + (0.003 if run.parent.name != "baseline" else 0.0)
        (run / precise_bn.RESULT_FILE).write_text(json.dumps(
            dict(epoch=TRAIN_EPOCHS, train_epochs=TRAIN_EPOCHS, logged=None, stored_bn=0.6, precise_bn=accuracy)))
    rows = {(r["weight_decay"], r["granularity"]): r
            for r in equivalence.study_rows(equivalence.load_grid(str(root)))}
    assert rows[(1e-4, "global")]["precise_diff"] == pytest.approx(0.003, rel=1e-6)
    assert rows[(1e-4, equivalence.NOISE_FLOOR)]["precise_diff"] == pytest.approx(0.01, rel=1e-6)

    out = tmp_path / "figs"
    equivalence.write(str(root), str(out))
    assert "| 1e-4 | global | 2 | 2.00 pts | +2.00 pts | +0.30 pts | n/a |" in (out / "equivalence.md").read_text()
    fig = equivalence.equivalence_figure(list(rows.values()))
    assert fig.axes[0].get_title() == "final test accuracy (BN statistics recomputed)"
    np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_ydata(), [0.3, 0.3], rtol=1e-5)
