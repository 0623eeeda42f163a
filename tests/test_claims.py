"""analysis.claims on fabricated 150-epoch runs whose verdicts are known by construction.

Each run's curves are flat levels with a small epoch-to-epoch zigzag, so every
difference the command measures is set by the test, and the noise it derives can be
computed by hand from the zigzag's amplitude.
"""

import json
import math
import os
import re

import numpy as np
import pytest

from analysis import claims, figures
from resnet_cifar import fidelity, tags
from tests.helpers import ROOT, hand_piecewise, python, write_run

EPOCHS = fidelity.TRAIN_EPOCHS
ZIGZAG_ACC = 0.001       # ±0.1 points of test accuracy, epoch to epoch
ZIGZAG_LOSS = 0.0005

# name -> (phase-1 test accuracy, final test accuracy, train loss, test loss)
LEVELS = {
    "baseline": (0.80, 0.910, 0.100, 0.350),
    "noconv_l2": (0.80, 0.895, 0.125, 0.399),     # -1.5 pts; train loss +0.025; gap +0.024
    "conv_lr_scale": (0.70, 0.910, 0.110, 0.360),  # same final; phase 1 -10 pts
    "conv_lr_scale_bn098": (0.81, 0.910, 0.110, 0.360),  # phase 1 above both
}


def zigzag(level, amplitude, n):
    return level + amplitude * (-1.0) ** np.arange(n)


def curves(name, levels, epochs=EPOCHS):
    phase1, final, train_loss, test_loss = levels
    e1 = np.arange(1, epochs + 1)
    e0 = np.arange(0, epochs + 1)
    accuracy = np.where(e1 <= 50, phase1, final) + ZIGZAG_ACC * (-1.0) ** e1
    # The baseline's conv_sqsum is 3% above 800 / piecewise (hand transcription of the post's fit).
    sqsum = {"baseline": 1.03 * 800 / np.array([hand_piecewise(e) for e in e0]),
             "noconv_l2": 800 * (1 + e0 / 10)}.get(name, 800 * np.exp(e0 / 30))
    step = 0.01 / (1 + e1 / 10) if name == "noconv_l2" else 0.01 * (1.0 if name == "baseline" else 1.05)
    train = {tags.EPOCH_LOSS: (e1, zigzag(train_loss, ZIGZAG_LOSS, epochs)),
             tags.CONV_SQSUM: (e0, sqsum),
             tags.CONV_RELATIVE_STEP: (e1, np.broadcast_to(step, e1.shape))}
    test = {tags.EPOCH_ACCURACY: (e1, accuracy), tags.EPOCH_LOSS: (e1, zigzag(test_loss, ZIGZAG_LOSS, epochs))}
    return train, test


def make_results(root, levels=None, epochs=None):
    levels = dict(LEVELS, **(levels or {}))
    for name, lv in levels.items():
        n = (epochs or {}).get(name, EPOCHS)
        write_run(os.path.join(root, name, "seed_0"), *curves(name, lv, n), done=n == EPOCHS, epochs=EPOCHS)
    return root


def verdicts(root):
    return {v.key: v for v in claims.measure(claims.load(root))}


@pytest.fixture(scope="module")
def post_like(tmp_path_factory):
    return verdicts(make_results(str(tmp_path_factory.mktemp("post"))))


def test_every_claim_holds_on_runs_built_to_match_the_post(post_like):
    assert [k for k, _ in fidelity.POST_CLAIMS] == list(post_like)
    assert {k: v.verdict for k, v in post_like.items() if v.verdict != claims.HOLDS} == {}


def test_accuracy_noise_is_seed_std_and_the_zigzag_by_hand(post_like):
    # last 10 epochs alternate ±0.1 pts: differences ±0.2, their std / sqrt(2)
    diffs = np.diff(100 * ZIGZAG_ACC * (-1.0) ** np.arange(10))
    s_run = math.hypot(claims.SEED_STD_ACCURACY, np.std(diffs, ddof=1) / math.sqrt(2))
    band = 2 * math.sqrt(2) * s_run
    text = post_like["noconv_below_baseline"].measured
    assert text.startswith("-1.50 pts (89.60% vs 91.10%")   # epoch 150 is even: level + 0.1
    assert f"noise ±{band:.2f}" in text


def test_loss_differences_are_the_posts(post_like):
    assert post_like["noconv_train_loss"].measured.startswith("+0.0250 ")
    assert post_like["noconv_loss_gap"].measured.startswith("+0.0240 ")


def test_ratios_by_hand(post_like):
    sqsum = {n: curves(n, LEVELS[n])[0][tags.CONV_SQSUM][1][-1] for n in LEVELS}
    assert f"{sqsum['noconv_l2'] / sqsum['baseline']:.3g}x" in post_like["noconv_sqsum"].measured
    assert f"{sqsum['conv_lr_scale'] / sqsum['baseline']:.3g}x" in post_like["scale_sqsum"].measured
    assert "median |ratio-1| 5.0%" in post_like["scale_relative_step"].measured
    assert "median |ratio-1| 3.0%, max 3.0%" in post_like["piecewise_fit"].measured


@pytest.mark.parametrize("final, verdict", [(0.925, claims.FAILS), (0.911, claims.NOISE),
                                            (0.880, claims.HOLDS)])
def test_noconv_below_baseline_each_verdict(tmp_path, final, verdict):
    got = verdicts(make_results(str(tmp_path), {"noconv_l2": (0.80, final, 0.125, 0.399)}))
    assert got["noconv_below_baseline"].verdict == verdict


def test_a_claimed_equality_fails_beyond_noise_and_absolute_numbers_are_checked(tmp_path):
    # ConvLRScale 1 point above the baseline: beyond 2 sqrt(2) 0.22 = 0.63 points, "same" fails;
    # a baseline at 88% is 3 points from the post's ~91%.
    got = verdicts(make_results(str(tmp_path), {"conv_lr_scale": (0.70, 0.89, 0.11, 0.36),
                                                "baseline": (0.80, 0.88, 0.10, 0.35)}))
    assert got["scale_final"].verdict == claims.FAILS
    assert got["baseline_final"].verdict == claims.FAILS
    got = verdicts(make_results(str(tmp_path / "b"), {"conv_lr_scale": (0.70, 0.913, 0.11, 0.36)}))
    assert got["scale_final"].verdict == claims.HOLDS          # 0.3 points: within the noise


def test_nothing_is_claimed_before_it_is_measured(tmp_path):
    got = verdicts(make_results(str(tmp_path), epochs={"noconv_l2": 120, "conv_lr_scale": 40,
                                                       "conv_lr_scale_bn098": 0}))
    missing = {k for k, v in got.items() if v.verdict == claims.MISSING}
    assert missing == {"noconv_final", "noconv_below_baseline", "noconv_train_loss", "noconv_loss_gap",
                       "noconv_sqsum", "noconv_relative_step", "scale_final", "scale_phase1",
                       "scale_relative_step", "scale_sqsum", "bn098_training", "bn098_phase1_fix",
                       "bn098_phase1_baseline"}
    assert "needs noconv_l2 at epoch 150 (now 120)" == got["noconv_final"].measured
    assert "needs conv_lr_scale at epoch 50 (now 40)" == got["scale_phase1"].measured
    assert got["baseline_final"].verdict == claims.HOLDS and got["piecewise_fit"].verdict == claims.HOLDS


@pytest.mark.parametrize("config", [{"train_epochs": 6, "boundary_epochs": [2, 4]},    # the quick preset
                                    {"train_epochs": 150, "boundary_epochs": [30, 60]}])
def test_runs_on_another_schedule_are_never_judged_against_the_post(tmp_path, config):
    """Finished runs of another schedule: the post's numbers and its epoch windows do not apply,
    so every claim is "not measured" and says why (no NaN verdict, no numpy warning)."""
    for name, levels in LEVELS.items():
        epochs = config["train_epochs"]
        write_run(str(tmp_path / name / "seed_0"), *curves(name, levels, epochs), config=config, done=True,
                  epochs=epochs)
    got = verdicts(str(tmp_path))
    assert {v.verdict for v in got.values()} == {claims.MISSING}
    bounds = ", ".join(str(b) for b in config["boundary_epochs"])
    assert got["baseline_final"].measured == ("needs baseline on the post's schedule (150 epochs, lr drops "
                                              f"after 50, 100; it has {config['train_epochs']} epochs, lr drops "
                                              f"after {bounds})")
    out = python("-m", "analysis.claims", str(tmp_path), timeout=120)
    assert out.returncode == 0 and "Warning" not in out.stderr, out.stderr
    assert out.stdout.count("not measured") == len(fidelity.POST_CLAIMS)


def test_command_prints_one_line_per_claim_and_refuses_a_folder_without_runs(tmp_path):
    root = make_results(str(tmp_path / "r"), epochs={"conv_lr_scale_bn098": 10})
    out = python("-m", "analysis.claims", root, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == len(fidelity.POST_CLAIMS)
    assert all(re.match(r"^(holds|within noise|does not hold|not measured) +\S", line) for line in lines)
    os.makedirs(tmp_path / "empty")
    out = python("-m", "analysis.claims", str(tmp_path / "empty"), timeout=120)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_markdown_has_one_row_of_four_cells_per_claim(post_like):
    """The measured text holds |ratio-1|: escaped, so a Markdown renderer keeps 4 columns."""
    table = claims.to_markdown(list(post_like.values())).splitlines()
    assert len(table) == 2 + len(fidelity.POST_CLAIMS)
    for row in table:
        assert len(re.split(r"(?<!\\)\|", row)) == 4 + 2, row      # 5 unescaped bars
    assert any("\\|ratio-1\\|" in row for row in table)


def test_the_fidelity_doc_lists_the_claims():
    with open(os.path.join(ROOT, "docs", "fidelity.md"), encoding="utf-8") as f:
        rows = re.findall(r"^\| `([a-z0-9_]+)` \| ([^|]+?) \|", f.read(), flags=re.M)
    assert rows == list(fidelity.POST_CLAIMS)


def test_post_table_sets_the_posts_words_beside_the_runs_final_numbers(tmp_path):
    """analysis.make_figures writes post.md for the post's 150-epoch runs: each run's last logged
    values (by hand from the fabricated levels and zigzags) beside what the post says."""
    from analysis import loading, summary
    from resnet_cifar import events

    root = make_results(str(tmp_path / "post"))
    rows = summary.summarize(loading.load_results(events.find_runs(root)))
    assert summary.is_post_schedule(rows)
    table = summary.to_post_markdown(rows)
    last = EPOCHS                                              # zigzag sign at the last epoch / index
    for name, (_, final, train_loss, test_loss) in LEVELS.items():
        acc = final + ZIGZAG_ACC * (-1.0) ** last
        train = train_loss + ZIGZAG_LOSS * (-1.0) ** (last - 1)
        test = test_loss + ZIGZAG_LOSS * (-1.0) ** (last - 1)
        sqsum = {"baseline": 1.03 * 800 / hand_piecewise(EPOCHS),
                 "noconv_l2": 800 * (1 + EPOCHS / 10)}.get(name, 800 * math.exp(EPOCHS / 30))
        row = next(line for line in table.splitlines() if line.startswith(f"| {figures.label_of(name)} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "150/150" and cells[4] == "n/a", cells          # no precise_bn.json here
        assert float(cells[3]) == pytest.approx(100 * acc, abs=0.006), cells
        assert float(cells[6]) == pytest.approx(train, abs=6e-4) and float(cells[8]) == pytest.approx(test - train, abs=6e-4)
        assert float(cells[9]) == pytest.approx(sqsum, rel=1e-3, abs=1), cells
        post = {"baseline": ("~91", "", "~0.34 (derived)"),
                "noconv_l2": ("~89.5", "baseline + 0.025", "baseline + 0.024"),
                "conv_lr_scale": ("baseline's", "", ""), "conv_lr_scale_bn098": ("", "", "")}[name]
        assert (cells[2], cells[5], cells[7]) == post, cells

    out = tmp_path / "figures"                                 # what make_figures writes
    out.mkdir()
    assert str(out / "post.md") in summary.write_summary(rows, str(out))
    assert (out / "post.md").read_text() == table
    quick = tmp_path / "quick"                                 # another schedule: no post table
    make_results(str(quick), epochs={n: 20 for n in LEVELS})
    for config in quick.glob("*/seed_0/run_config.json"):
        config.write_text(json.dumps({"config": {"train_epochs": 20, "seed": 0}}))
    rows = summary.summarize(loading.load_results(events.find_runs(str(quick))))
    assert not summary.is_post_schedule(rows)
    (out / "q").mkdir()
    assert not any(p.endswith("post.md") for p in summary.write_summary(rows, str(out / "q")))


# ----------------------------------------------------------------------------- several seeds


def make_seeded_results(root, final_offsets):
    """Every run at LEVELS, one folder per seed; `final_offsets`: name -> the final test accuracy
    of each seed, in points from its level (the zigzag's noise is the same in every seed)."""
    for name, lv in LEVELS.items():
        for seed, offset in enumerate(final_offsets[name]):
            phase1, final, train_loss, test_loss = lv
            write_run(os.path.join(root, name, f"seed_{seed}"),
                      *curves(name, (phase1, final + offset / 100, train_loss, test_loss)),
                      config={"seed": seed}, done=True, epochs=EPOCHS)
    return verdicts(root)


def band_of(text):
    return float(re.search(r"noise ±([0-9.]+)", text).group(1))


def test_five_seeds_measure_the_noise_of_a_difference_paired_by_seed(tmp_path):
    """Paired: baseline and NoConvL2 share a seed's offset (+x in both), which cancels; the
    difference's own spread is what counts, std(d) / sqrt(5), by hand."""
    shared = [0.0, 1.0, -1.0, 2.0, -2.0]               # large, and the same in both runs
    own = [0.1, -0.1, 0.2, -0.2, 0.0]                  # NoConvL2's own, on top
    v = make_seeded_results(str(tmp_path), {
        "baseline": shared, "noconv_l2": [s + o for s, o in zip(shared, own)],
        "conv_lr_scale": [0.0] * 5, "conv_lr_scale_bn098": [0.0] * 5})
    d = np.array(own) - 1.5                            # NoConvL2 - baseline, per seed, points
    std = np.std(d, ddof=1)
    text = v["noconv_below_baseline"].measured
    assert band_of(text) == pytest.approx(2 * std / math.sqrt(5), abs=0.006), text
    assert f"measured over 5 seeds (paired by seed)" in text and f"{d.mean():+.2f} pts" in text, text
    assert "seeds " + ", ".join(f"{x:+.2f}" for x in d) in text, text
    assert v["noconv_below_baseline"].verdict == claims.HOLDS
    # Each run's final accuracy: the mean over its seeds, noise its seeds' std / sqrt(5).
    base = v["baseline_final"].measured
    final = 91.0 + 100 * ZIGZAG_ACC + np.mean(shared)     # epoch 150: the zigzag at +
    assert base.startswith(f"{final:.2f}%") and "measured over 5 seeds" in base, base


def test_a_difference_within_its_seeds_spread_is_within_noise(tmp_path):
    """One seed: -1.5 points against the assumed noise holds. Five seeds whose paired differences
    scatter by 3 points: the same mean difference is within the measured noise."""
    own = [3.0, -3.0, 3.0, -3.0, 0.0]
    v = make_seeded_results(str(tmp_path), {
        "baseline": [0.0] * 5, "noconv_l2": own, "conv_lr_scale": [0.0] * 5, "conv_lr_scale_bn098": [0.0] * 5})
    assert v["noconv_below_baseline"].verdict == claims.NOISE, v["noconv_below_baseline"].measured
    one = verdicts(make_results(str(tmp_path / "one")))
    assert one["noconv_below_baseline"].verdict == claims.HOLDS


def test_two_seeds_that_agree_too_well_keep_the_assumed_noise(tmp_path):
    """Two seeds 0.02 points apart: a measured std far below the assumed 0.2 points is not
    trusted with fewer than MIN_TRUSTED_SEEDS seeds; the line says the assumed was used."""
    v = make_seeded_results(str(tmp_path), {name: [0.0, 0.02] for name in LEVELS})
    text = v["baseline_final"].measured
    assert "below the assumed" in text and "the assumed used" in text, text
    s_one = math.hypot(claims.SEED_STD_ACCURACY, np.std(np.diff(100 * ZIGZAG_ACC * (-1.0) ** np.arange(10)),
                                                        ddof=1) / math.sqrt(2))
    assert float(re.search(r"tolerance ±([0-9.]+)", text).group(1)) == pytest.approx(
        0.5 + 2 * s_one / math.sqrt(2), abs=0.006)


def test_spread_rule_by_hand():
    assert claims.spread([1.0], 0.3) == (0.3, "")
    noise, how = claims.spread([1.0, 2.0, 3.0, 4.0, 5.0], 0.3)
    assert noise == pytest.approx(np.std([1, 2, 3, 4, 5], ddof=1) / math.sqrt(5)) and "measured over 5" in how
    noise, how = claims.spread([1.0, 1.01], 0.3)
    assert noise == pytest.approx(0.3 / math.sqrt(2)) and "the assumed used" in how
    noise, how = claims.spread([1.0, 3.0], 0.3)                # above the assumed: trusted
    assert noise == pytest.approx(np.std([1, 3], ddof=1) / math.sqrt(2)) and "measured over 2" in how
