"""make_figures recognises the post's runs by their run_config.json, whatever their folders' names."""

import json
import os

import pytest

from resnet_cifar import runs, tags
from tests.helpers import python, write_events

BASE = {"optimizer": "momentum", "conv_l2": True, "conv_grad_scale": False, "bn_decay": 0.997,
        "conv_lr_factor": "piecewise"}


@pytest.mark.parametrize("flags,want", [
    ({}, runs.BASELINE),
    ({"conv_l2": False}, runs.NOCONV_L2),
    ({"conv_l2": False, "conv_grad_scale": True}, runs.CONV_LR_SCALE),
    ({"conv_l2": False, "conv_grad_scale": True, "conv_lr_factor": "replay"}, runs.CONV_LR_SCALE),
    ({"conv_l2": False, "conv_grad_scale": True, "bn_decay": 0.98}, runs.CONV_LR_SCALE_BN098),
    ({"conv_l2": False, "conv_grad_scale": True, "conv_lr_factor": "per_layer"}, runs.CONV_LR_SCALE_PER_LAYER),
    ({"conv_l2": False, "conv_grad_scale": True, "conv_lr_factor": "per_channel"}, runs.CONV_LR_SCALE_PER_CHANNEL),
    ({"optimizer": "adam"}, None),
    ({"bn_decay": 0.98}, None),
    ({"conv_grad_scale": True}, None),       # scaling with conv L2 kept: none of the post's
])
def test_name_of_a_config(flags, want):
    assert runs.name_of(dict(BASE, **flags)) == want


def test_make_figures_names_folders_by_their_runs(tmp_path):
    """runs/a (NoConvL2) and runs/b (baseline): the figures and the summary call them so."""
    import numpy as np

    for folder, flags in (("a", {"conv_l2": False}), ("b", {})):
        run_dir = tmp_path / folder
        for subdir, tag_values in ((tags.TRAIN_DIR, {tags.EPOCH_LOSS: 1.0, tags.CONV_SQSUM: 900.0,
                                                      tags.CONV_RELATIVE_STEP: 0.01}),
                                   (tags.VALIDATION_DIR, {tags.EPOCH_ACCURACY: 0.5, tags.EPOCH_LOSS: 1.2})):
            write_events(str(run_dir / subdir), {tag: [(step, value * np.float32(step)) for step in (1, 2)]
                                                 for tag, value in tag_values.items()})
        (run_dir / tags.RUN_CONFIG_FILE).write_text(json.dumps({"config": dict(BASE, train_epochs=2, **flags)}))
    r = python("-m", "analysis.make_figures", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "a: recognised as NoConvL2 (noconv_l2)" in r.stderr
    summary = (tmp_path / "figures" / "summary.md").read_text()
    assert "NoConvL2" in summary and "Baseline" in summary
    assert os.path.isfile(tmp_path / "figures" / "test_accuracy.png")    # drawn: both runs found
