"""Figures span the runs' own epochs: a 2-epoch run of a 150-epoch schedule fills its axis."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from analysis import figures  # noqa: E402

CONFIG = {"train_epochs": 150, "boundary_epochs": [50.0, 100.0], "decay_rates": [1, 0.1, 0.01]}
EPOCHS = np.arange(0, 3)        # a run stopped after epoch 2 of 150


def curves(values):
    return {name: [(EPOCHS, np.asarray(values, float))] for name in
            (figures.BASELINE, figures.NOCONV_L2, figures.CONV_LR_SCALE, figures.CONV_LR_SCALE_BN098)}


@pytest.mark.parametrize("name", sorted(figures.FIGURES))
def test_the_x_axis_ends_near_the_last_epoch_logged(name):
    kwargs = {"configs": {n: [CONFIG] for n in curves([0, 0, 0])}}
    if name in figures.LEVEL_FIGURES:      # predicted levels per phase, up to epoch 150
        kwargs["levels"] = [(0, 50, 0.01), (50, 100, 0.003), (100, 150, 0.001)]
    fig = figures.FIGURES[name][0](curves([800.0, 0.5, 0.9]), **kwargs)
    if fig is None:
        pytest.skip(f"{name} draws nothing for these runs")
    right = fig.axes[0].get_xlim()[1]
    assert 2 <= right < 3, (name, fig.axes[0].get_xlim())
