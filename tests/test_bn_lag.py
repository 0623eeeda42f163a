"""analysis.bn_lag: make_figures' table of the test accuracy at the ends of the learning-rate
phases, logged and with recomputed BN statistics (analysis.precise_bn's results files)."""

import csv
import json

from analysis import make_figures
from resnet_cifar import tags
from tests.helpers import f32, write_run


def test_make_figures_tabulates_the_bn_lag_at_the_phase_ends(tmp_path):
    """Fabricated runs (6 epochs, rate drops after 2 and 4.5: phase ends 2, 4, 6) and results
    files: bn_lag.md/.csv hold each phase end's logged accuracy and, where a result of that epoch
    on the run's own data exists, its recomputed one; results of other epochs or other data are
    not used, and a results folder without any result gets no table."""
    results = tmp_path / "results"
    accuracy = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    config = {"boundary_epochs": [2.0, 4.5], "decay_rates": [1.0, 0.1, 0.01]}
    validation = {tags.EPOCH_ACCURACY: (range(1, 7), accuracy), tags.EPOCH_LOSS: (range(1, 7), [1.0] * 6)}
    train = {tags.EPOCH_LOSS: (range(1, 7), [0.5] * 6)}
    for folder in ("baseline/seed_0", "noconv_l2/seed_0", "conv_lr_scale"):      # the last without seeds
        write_run(str(results / folder), train, validation, config, done=True, epochs=6)

    out = tmp_path / "figures"
    assert make_figures.main([str(results), "--out", str(out)]) == 0
    assert not (out / "bn_lag.md").exists()

    def result(folder, file, epoch, value, own_data=True):
        (results / folder / file).write_text(json.dumps(dict(
            epoch=epoch, precise_bn=value, own_data=own_data, data_source="binary")))

    result("baseline/seed_0", "precise_bn.json", 6, 0.65)
    result("baseline/seed_0", "precise_bn_epoch6.json", 6, 0.11)              # the final weights' comes first
    result("baseline/seed_0", "precise_bn_epoch2.json", 2, 0.35)
    result("baseline/seed_0", "precise_bn_epoch4.json", 3, 0.99)              # another epoch's: not used
    result("noconv_l2/seed_0", "precise_bn_epoch4.json", 4, 0.45, own_data=False)   # other data: not used
    result("noconv_l2/seed_0", "precise_bn.json", 5, 0.99)                    # an earlier evaluation: not used
    result("noconv_l2/seed_0", "precise_bn_epoch6.json", 6, 0.55)             # the last checkpoint's
    result("conv_lr_scale", "precise_bn.json", 6, 0.75)
    assert make_figures.main([str(results), "--out", str(out)]) == 0
    with open(out / "bn_lag.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], r["seed"], r["epoch"], r["precise_bn"]) for r in rows] == [
        ("Baseline", "seed_0", "2", "0.35"), ("Baseline", "seed_0", "4", ""), ("Baseline", "seed_0", "6", "0.65"),
        ("NoConvL2", "seed_0", "2", ""), ("NoConvL2", "seed_0", "4", ""), ("NoConvL2", "seed_0", "6", "0.55"),
        ("ConvLRScale", "", "2", ""), ("ConvLRScale", "", "4", ""), ("ConvLRScale", "", "6", "0.75")]
    assert [float(r["logged"]) for r in rows] == list(f32([0.2, 0.4, 0.6] * 3))
    table = (out / "bn_lag.md").read_text()
    assert "| Baseline | seed_0 | 2 of 6 | 20.00% | 35.00% | +15.00 pts |" in table
    assert "| Baseline | seed_0 | 4 of 6 | 40.00% | n/a | n/a |" in table
    assert "| Baseline | seed_0 | 6 of 6 | 60.00% | 65.00% | +5.00 pts |" in table
    assert "| ConvLRScale |  | 6 of 6 | 60.00% | 75.00% | +15.00 pts |" in table
