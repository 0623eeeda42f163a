"""Grid sweeps in the analysis (analysis/grid.py): point folders, final accuracy over seeds, figure."""

import numpy as np
import pytest

from analysis import grid
from resnet_cifar import events, tags


def fake_run(final_accuracy, complete=True):
    steps = np.arange(4, dtype=np.int64)
    acc = np.array([0.1, 0.3, 0.5, final_accuracy])
    return events.Run(run_dir="/r", config={}, complete=complete,
                      scalars={tags.TRAIN_DIR: {}, tags.VALIDATION_DIR: {tags.EPOCH_ACCURACY: (steps, acc)}})


def test_parse_point():
    assert grid.parse_point("weight_decay=1e-4") == (("weight_decay", "1e-4"),)
    assert grid.parse_point("weight_decay=1e-4,bn_decay=0.9") == (("weight_decay", "1e-4"), ("bn_decay", "0.9"))
    for name in ("baseline", "figures", "weight_decay=", "=3", "a=1,b"):
        assert grid.parse_point(name) is None, name


def test_table_and_figure_mean_and_band_over_seeds():
    accs = {("1e-4", "baseline"): [0.50, 0.54, 0.58], ("1e-3", "baseline"): [0.60, 0.62, 0.61],
            ("1e-4", "noconv_l2"): [0.40, 0.44, 0.42], ("1e-3", "noconv_l2"): [0.52, 0.50, 0.57]}
    loaded = {}
    for (wd, name), values in accs.items():
        loaded.setdefault((("weight_decay", wd),), {})[name] = [fake_run(v) for v in values]
    rows = grid.table(loaded)
    assert len(rows) == 4
    for r in rows:
        want = np.array(accs[r["point"][0][1], r["run"]])
        assert r["seeds"] == 3
        assert r["mean"] == pytest.approx(want.mean()) and r["std"] == pytest.approx(want.std(ddof=1))
        assert (r["min"], r["max"]) == (want.min(), want.max())
    fig = grid.accuracy_figure(rows, "weight_decay")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"                           # 1e-4 .. 1e-3 spans a decade
    lines = {line.get_label(): line for line in ax.lines}
    assert set(lines) == {"Baseline", "NoConvL2"}
    base = lines["Baseline"]
    np.testing.assert_allclose(base.get_xdata(), [1e-4, 1e-3])  # sorted by value, not by name
    np.testing.assert_allclose(base.get_ydata(), [100 * np.mean([0.50, 0.54, 0.58]),
                                                  100 * np.mean([0.60, 0.62, 0.61])])
    bands = [c for c in ax.collections]
    assert len(bands) == 2                                    # a min-max band per run
    top = bands[0].get_paths()[0].vertices[:, 1].max()
    assert top == pytest.approx(100 * 0.62)
