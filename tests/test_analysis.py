"""Tests of reading event logs, the figures, the summary table and the CLI.

Runs are fabricated with tf.summary (as training writes them), a few epochs each,
so the whole file runs in seconds and never trains anything.
"""

import csv
import os

import numpy as np
import pytest

import tensorflow as tf

from analysis import angular, figures, loading, make_figures, summary
from resnet_cifar import events, fidelity, tags
from tests.helpers import f32, hand_piecewise, python, write_events, write_run

EPOCHS = 6
PER_LAYER = "conv_lr_scale_per_layer"
ALL_NAMES = [figures.BASELINE, figures.NOCONV_L2, figures.CONV_LR_SCALE,
             figures.CONV_LR_SCALE_BN098, PER_LAYER]


def fake_logs(rng, epochs=EPOCHS):
    """Per-epoch arrays of one run: Keras tags from epoch 1, diagnostics from epoch 0."""
    e1 = np.arange(1, epochs + 1)
    e0 = np.arange(0, epochs + 1)
    train = {
        tags.EPOCH_LOSS: (e1, rng.uniform(0.1, 2.0, epochs)),
        tags.EPOCH_ACCURACY: (e1, rng.uniform(0.3, 1.0, epochs)),
        tags.CONV_SQSUM: (e0, rng.uniform(500.0, 3000.0, epochs + 1)),
        tags.CONV_RELATIVE_STEP: (e1, rng.uniform(1e-3, 1e-2, epochs)),
        tags.per_layer(tags.CONV_SQSUM, "conv2d_3"): (e0, rng.uniform(1.0, 50.0, epochs + 1)),
    }
    validation = {
        tags.EPOCH_LOSS: (e1, rng.uniform(0.3, 2.5, epochs)),
        tags.EPOCH_ACCURACY: (e1, rng.uniform(0.3, 0.95, epochs)),
    }
    return train, validation


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A results folder with the post's runs (baseline with two seeds), an extra run,
    and an unfinished BN 0.98 run. Returns (folder, name -> [(train, validation)])."""
    root = str(tmp_path_factory.mktemp("results"))
    rng = np.random.default_rng(0)
    logs = {}
    for name in ALL_NAMES:
        if name == figures.BASELINE:
            dirs = [os.path.join(root, name, f"seed_{k}") for k in (0, 1)]
        else:
            dirs = [os.path.join(root, name)]
        epochs = 4 if name == figures.CONV_LR_SCALE_BN098 else EPOCHS
        logs[name] = []
        for k, run_dir in enumerate(dirs):
            train, validation = fake_logs(rng, epochs)
            write_run(run_dir, train, validation, {"seed": k},
                      done=name != figures.CONV_LR_SCALE_BN098, epochs=EPOCHS)
            logs[name].append((train, validation))
    return root, logs


# --- events.py --------------------------------------------------------------------------

def test_read_scalars_round_trips_values(tmp_path):
    values = np.random.default_rng(1).normal(size=EPOCHS + 1) * 1000
    steps = np.arange(EPOCHS + 1)
    run = write_run(str(tmp_path / "run"), train={tags.CONV_SQSUM: (steps, values)}, epochs=EPOCHS)

    got_steps, got_values = events.read_scalars(run, tags.CONV_SQSUM)

    assert got_steps.dtype == np.int64 and got_values.dtype == np.float64
    np.testing.assert_array_equal(got_steps, steps)
    np.testing.assert_array_equal(got_values, f32(values))


def test_read_scalars_keeps_last_value_of_a_repeated_step(tmp_path):
    run = str(tmp_path / "run")
    train = os.path.join(run, tags.TRAIN_DIR)
    # Out of step order, step 1 twice in one file, then a "resumed" writer redoes step 2.
    write_events(train, {tags.CONV_SQSUM: [(0, 800.0), (2, 1.5), (1, 10.0), (1, 11.0)]})
    write_events(train, {tags.CONV_SQSUM: [(2, 2.5), (3, 3.5)]})
    write_run(run, epochs=EPOCHS)

    steps, values = events.read_scalars(run, tags.CONV_SQSUM)

    np.testing.assert_array_equal(steps, [0, 1, 2, 3])
    np.testing.assert_array_equal(values, [800.0, 11.0, 2.5, 3.5])


def test_read_scalars_errors_are_one_line_and_name_run_and_tag(tmp_path):
    run = write_run(str(tmp_path / "run"), train={tags.EPOCH_LOSS: ([1], [0.5])}, epochs=EPOCHS)
    with pytest.raises(events.EventsError) as missing_tag:
        events.read_scalars(run, tags.CONV_SQSUM)
    with pytest.raises(events.EventsError) as missing_dir:
        events.read_scalars(run, tags.EPOCH_ACCURACY, tags.VALIDATION_DIR)
    for err in (missing_tag, missing_dir):
        assert "\n" not in str(err.value) and run in str(err.value)
    assert tags.CONV_SQSUM in str(missing_tag.value)
    assert isinstance(missing_tag.value, ValueError)


def test_tags_and_is_complete(tmp_path):
    layer_tag = tags.per_layer(tags.CONV_SQSUM, "conv2d_3")
    run = write_run(str(tmp_path / "a"), train={tags.CONV_SQSUM: ([0, EPOCHS], [800.0, 700.0]),
                                                layer_tag: ([0, EPOCHS], [16.0, 15.0])}, done=True, epochs=EPOCHS)
    unfinished = write_run(str(tmp_path / "b"), train={tags.CONV_SQSUM: ([0], [800.0])}, epochs=EPOCHS)
    # done.json names EPOCHS, the events stop at epoch 0: an event file cut short, not a finished run
    short = write_run(str(tmp_path / "c"), train={tags.CONV_SQSUM: ([0], [800.0])}, done=True, epochs=EPOCHS)
    assert sorted(events.read_all_scalars(run)) == sorted([tags.CONV_SQSUM, layer_tag])
    assert events.is_complete(run) and not events.is_complete(unfinished)
    assert not events.is_complete(short) and not events.load_run(short).complete


def test_find_runs_groups_seeds(tmp_path):
    root = tmp_path / "results"
    for d in ("baseline/seed_0", "baseline/seed_2", "baseline/seed_10", "noconv_l2"):
        write_run(str(root / d), epochs=EPOCHS)
    (root / "figures").mkdir()                 # output folder: not a run
    (root / "pending" / "seed_0").mkdir(parents=True)   # no run_config.json yet
    runs = events.find_runs(str(root))
    assert runs == {
        "baseline": [str(root / "baseline" / f"seed_{k}") for k in (0, 2, 10)],
        "noconv_l2": [str(root / "noconv_l2")],
    }
    with pytest.raises(events.EventsError):
        events.find_runs(str(tmp_path / "nowhere"))


# --- figures.py -------------------------------------------------------------------------

def test_piecewise_np_matches_the_posts_formula():
    epochs = [0, 10, 30, 50, 75, 100, 150]
    np.testing.assert_allclose(figures.piecewise_np(epochs),
                               [1.0, 0.5, 0.45, 0.4, 0.55, 0.7, 0.75], rtol=0, atol=1e-12)


def test_piecewise_figure_shows_the_fit_and_800_over_baseline_sqsum():
    steps = np.arange(0, 8)
    sqsum = np.array([800.0, 1000.0, 1300.0, 1500.0, 1700.0, 1600.0, 1650.0, 1700.0])
    fig = figures.piecewise_factor({figures.BASELINE: [(steps, sqsum)]})
    measured, fit = fig.axes[0].lines

    np.testing.assert_array_equal(measured.get_xdata(), steps)
    np.testing.assert_allclose(measured.get_ydata(), fidelity.INITIAL_CONV_SQSUM / sqsum)
    x, y = np.asarray(fit.get_xdata()), np.asarray(fit.get_ydata())
    assert x[0] == 0 and x[-1] == steps[-1]            # over the baseline's own epochs
    np.testing.assert_allclose(y, 1 - 0.05 * x, atol=1e-12)
    # Without a baseline: the fit alone, over the post's 150 epochs.
    (fit,) = figures.piecewise_factor({}).axes[0].lines
    x, y = np.asarray(fit.get_xdata()), np.asarray(fit.get_ydata())
    assert x[0] == 0 and x[-1] == fidelity.TRAIN_EPOCHS
    at = {e: y[np.flatnonzero(x == e)[0]] for e in (0, 10, 30, 50, 75, 100, 150)}
    np.testing.assert_allclose([at[e] for e in (0, 10, 30, 50, 75, 100, 150)],
                               [1.0, 0.5, 0.45, 0.4, 0.55, 0.7, 0.75], atol=1e-12)


def test_piecewise_of_the_figures_and_of_training_are_the_posts():
    """The figure must show the factor training applies (resnet_cifar.optim): both
    against a literal transcription of the post's chain, on a fine grid across its breaks."""
    optim = pytest.importorskip("resnet_cifar.optim")
    epochs = np.linspace(0.0, 160.0, 1601)
    want = np.array([hand_piecewise(e) for e in epochs])
    np.testing.assert_allclose(figures.piecewise_np(epochs), want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(optim.piecewise(epochs).numpy(), want, rtol=0, atol=1e-6)   # float32


# Which runs each figure shows, in order (the per-layer run stands for "other runs").
FIGURE_RUNS = {
    "test_accuracy": [figures.BASELINE, figures.NOCONV_L2],
    "conv_sqsum": [figures.BASELINE, figures.NOCONV_L2],
    "relative_step": [figures.BASELINE, figures.NOCONV_L2],
    "conv_lr_scale_accuracy": [figures.BASELINE, figures.NOCONV_L2, figures.CONV_LR_SCALE],
    "bn098_accuracy": [figures.BASELINE, figures.CONV_LR_SCALE, figures.CONV_LR_SCALE_BN098],
    "relative_step_all": [figures.BASELINE, figures.NOCONV_L2, figures.CONV_LR_SCALE, PER_LAYER],
    "conv_sqsum_log": [figures.BASELINE, figures.NOCONV_L2, figures.CONV_LR_SCALE, PER_LAYER],
    "test_accuracy_all": ALL_NAMES,
}


def test_every_figure_is_covered():
    assert set(FIGURE_RUNS) | {"piecewise_factor"} == set(figures.FIGURES)


@pytest.mark.parametrize("name", sorted(FIGURE_RUNS))
def test_figure_plots_the_given_arrays(name):
    make, tag, _ = figures.FIGURES[name]
    rng = np.random.default_rng(2)
    first = 1 if tag == tags.CONV_RELATIVE_STEP else 0
    steps = np.arange(first, EPOCHS + 1)
    data = {n: [(steps, rng.uniform(0.1, 900.0, len(steps)))] for n in ALL_NAMES}

    ax = make(data).axes[0]

    assert [line.get_label() for line in ax.lines] == [figures.label_of(n)
                                                      for n in FIGURE_RUNS[name]]
    percent = 100.0 if tag == tags.EPOCH_ACCURACY else 1.0     # accuracy in %, as in the table
    for line, run in zip(ax.lines, FIGURE_RUNS[name]):
        np.testing.assert_array_equal(line.get_xdata(), steps)
        np.testing.assert_allclose(line.get_ydata(), data[run][0][1] * percent, rtol=1e-15)
    assert not ax.collections                      # one seed: no band
    assert ax.get_yscale() == ("log" if name == "conv_sqsum_log" else "linear")


def test_relative_step_leaves_out_epoch_0():
    steps = np.arange(0, 4)
    data = {figures.BASELINE: [(steps, np.array([0.0, 3.0, 2.0, 1.0]))],
            figures.NOCONV_L2: [(steps, np.array([0.0, 4.0, 3.0, 2.0]))]}
    line = figures.relative_step(data).axes[0].lines[0]
    np.testing.assert_array_equal(line.get_xdata(), [1, 2, 3])
    np.testing.assert_array_equal(line.get_ydata(), [3.0, 2.0, 1.0])


def test_seeds_are_drawn_as_mean_and_min_max_band():
    rng = np.random.default_rng(3)
    steps = np.arange(1, EPOCHS + 1)
    seeds = [(steps, rng.uniform(0.5, 0.9, EPOCHS)) for _ in range(3)]
    stacked = np.stack([v for _, v in seeds])

    got_steps, mean, lo, hi = figures.aggregate_seeds(seeds)
    np.testing.assert_array_equal(got_steps, steps)
    np.testing.assert_allclose(mean, stacked.mean(axis=0), rtol=1e-15)
    np.testing.assert_array_equal(lo, stacked.min(axis=0))
    np.testing.assert_array_equal(hi, stacked.max(axis=0))

    other = [(steps, np.full(EPOCHS, 0.5))]
    ax = figures.conv_sqsum({figures.BASELINE: seeds, figures.NOCONV_L2: other}).axes[0]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), stacked.mean(axis=0), rtol=1e-15)
    (band,) = ax.collections
    band_y = band.get_paths()[0].vertices[:, 1]
    expected = np.concatenate([stacked.min(axis=0), stacked.max(axis=0)])
    assert np.isin(expected, band_y).all() and np.isin(band_y, expected).all()


def test_seeds_of_different_lengths_average_what_exists():
    a = (np.array([1, 2, 3]), np.array([1.0, 2.0, 3.0]))
    b = (np.array([1, 2]), np.array([3.0, 6.0]))
    steps, mean, lo, hi = figures.aggregate_seeds([a, b])
    np.testing.assert_array_equal(steps, [1, 2, 3])
    np.testing.assert_array_equal(mean, [2.0, 4.0, 3.0])
    np.testing.assert_array_equal(lo, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(hi, [3.0, 6.0, 3.0])


def test_a_figure_without_its_run_is_not_drawn(capsys):
    """bn098_accuracy is about the BN 0.98 run: with only the baseline it says nothing."""
    only_baseline = {figures.BASELINE: [(np.arange(1, 4), np.array([0.5, 0.6, 0.7]))]}
    for make in (figures.bn098_accuracy, figures.conv_lr_scale_accuracy, figures.test_accuracy):
        assert make(only_baseline) is None
    err = capsys.readouterr().err
    assert "ConvLRScale BN 0.98" in err and "skipped" in err
    assert figures.test_accuracy_all({}) is None


def test_a_figure_missing_another_run_says_so_in_its_title(capsys):
    series = [(np.arange(1, 4), np.array([0.5, 0.6, 0.7]))]
    fig = figures.conv_lr_scale_accuracy({figures.BASELINE: series, figures.CONV_LR_SCALE: series})
    assert [line.get_label() for line in fig.axes[0].lines] == ["Baseline", "ConvLRScale"]
    assert "(no NoConvL2 run)" in fig._suptitle.get_text()
    assert "NoConvL2" in capsys.readouterr().err
    complete = figures.conv_lr_scale_accuracy(
        {figures.BASELINE: series, figures.NOCONV_L2: series, figures.CONV_LR_SCALE: series})
    assert "no " not in complete._suptitle.get_text()
    fit_alone = figures.piecewise_factor({})
    assert "no Baseline run" in fit_alone._suptitle.get_text()


QUICK = {"data_source": "binary", "train_epochs": 6, "steps_per_epoch": 160, "batch_size": 128,
         "boundary_epochs": [2.0, 4.0], "decay_rates": [1.0, 0.1, 0.01]}


def every_figure(seeds=1, config=QUICK):
    """Each figure of FIGURES drawn from made-up curves of every run, with run configs."""
    rng = np.random.default_rng(4)
    out = {}
    for name, (make, tag, _) in figures.FIGURES.items():
        steps = np.arange(1 if tag == tags.CONV_RELATIVE_STEP else 0, EPOCHS + 1)
        low, high = (0.1, 0.9) if tag == tags.EPOCH_ACCURACY else (500.0, 900.0)
        data = {n: [(steps, rng.uniform(low, high, len(steps))) for _ in range(seeds)] for n in ALL_NAMES}
        out[name] = make(data, configs={n: [config] * seeds for n in ALL_NAMES})
    return out


def test_figures_have_titles_axis_words_and_accuracy_in_percent():
    for name, fig in every_figure().items():
        ax = fig.axes[0]
        _, tag, _ = figures.FIGURES[name]
        assert fig._suptitle.get_text(), name
        assert ax.get_xlabel() == "epoch"
        ylabel = ax.get_ylabel()
        assert " " in ylabel and "_" not in ylabel, (name, ylabel)      # words, not a tag name
        if tag == tags.EPOCH_ACCURACY:
            assert ylabel == "test accuracy (%)"
            runs = [l for l in ax.lines if l.get_linestyle() == "-"]
            values = np.concatenate([l.get_ydata() for l in runs])
            assert 10 <= values.min() and values.max() <= 90             # made from 0.1 .. 0.9
            assert 5 <= ax.get_ylim()[0] and 50 < ax.get_ylim()[1] <= 95      # a % axis


def test_figures_mark_the_learning_rate_boundaries_from_the_configs():
    for name, fig in every_figure().items():
        ax = fig.axes[0]
        (drawn,) = [c for c in ax.collections if c.get_label() == figures.BOUNDARY_LABEL]
        # Axes.vlines in the x-axis transform: x in epochs, y from the bottom (0) to the top (1).
        assert drawn.get_transform() == ax.get_xaxis_transform(), name
        assert [s.tolist() for s in drawn.get_segments()] == [[[2.0, 0.0], [2.0, 1.0]],
                                                               [[4.0, 0.0], [4.0, 1.0]]], name
        if figures.FIGURES[name][1] != tags.EPOCH_ACCURACY and name != "piecewise_factor":
            assert ax.get_ylim()[0] > 100, name     # data 500..900: the lines leave y alone
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert legend.count(figures.BOUNDARY_LABEL) == 1, name


def test_subtitle_gives_data_schedule_and_seeds():
    for name, fig in every_figure(seeds=2).items():
        sub = fig.axes[0].get_title()
        assert sub == "CIFAR-10 (binary files) · 6 short epochs of 160 steps, batch 128 · 2 seeds", name
    post = dict(QUICK, data_source="tfds", train_epochs=150, steps_per_epoch=None, boundary_epochs=[50, 100])
    series = [(np.arange(1, 4), np.array([0.5, 0.6, 0.7]))]
    fig = figures.test_accuracy({figures.BASELINE: series * 2, figures.NOCONV_L2: series},
                                configs={figures.BASELINE: [post, post], figures.NOCONV_L2: [post]})
    assert fig.axes[0].get_title() == ("CIFAR-10 (TFDS) · the post's schedule (150 full epochs, "
                                       "batch 128) · 1–2 seeds per run")


def test_angular_update_figure_has_the_subtitle_and_boundaries_of_the_others():
    steps = np.arange(1, EPOCHS + 1)
    data = {n: [(steps, np.full(len(steps), 1e-3))] for n in ALL_NAMES}
    ax = angular.angular_update(data, configs={n: [QUICK] for n in ALL_NAMES}).axes[0]
    assert ax.get_title() == "CIFAR-10 (binary files) · 6 short epochs of 160 steps, batch 128 · 1 seed"
    (drawn,) = [c for c in ax.collections if c.get_label() == figures.BOUNDARY_LABEL]
    assert [s.tolist() for s in drawn.get_segments()] == [[[2.0, 0.0], [2.0, 1.0]], [[4.0, 0.0], [4.0, 1.0]]]


def test_per_layer_tags_read_new_and_earlier_names():
    names = [tags.CONV_SQSUM, tags.per_layer(tags.CONV_SQSUM, "conv2d_1"), "conv_sqsum/conv2d",
             "conv_sqsum/conv2d_1", tags.per_layer(tags.CONV_RELATIVE_STEP, "conv2d")]
    assert tags.per_layer(tags.CONV_SQSUM, "conv2d_3") == "per_layer/conv_sqsum/conv2d_3"
    assert tags.per_layer_tags(names, tags.CONV_SQSUM) == {
        "conv2d": "conv_sqsum/conv2d", "conv2d_1": "per_layer/conv_sqsum/conv2d_1"}
    assert tags.per_layer_series({n: i for i, n in enumerate(names)}, tags.CONV_RELATIVE_STEP) == {"conv2d": 4}


def test_events_skip_the_custom_scalars_layout(tmp_path):
    """The layout training writes is a string tensor beside the scalars: readers skip it."""
    from resnet_cifar import callbacks
    from tensorboard.plugins.custom_scalar import summary as cs_summary

    run = write_run(str(tmp_path / "run"), train={tags.CONV_SQSUM: ([0, 1], [800.0, 900.0])}, epochs=EPOCHS)
    writer = tf.summary.create_file_writer(os.path.join(run, tags.TRAIN_DIR))
    with writer.as_default():
        tf.summary.experimental.write_raw_pb(cs_summary.pb(callbacks.scalars_layout()).SerializeToString(),
                                             step=0)
    writer.close()
    assert sorted(events.read_all_scalars(run)) == [tags.CONV_SQSUM]
    np.testing.assert_array_equal(events.read_scalars(run, tags.CONV_SQSUM)[1], [800.0, 900.0])


# --- summary.py ---------------------------------------------------------------------------

def test_summary_values_match_hand_computation(results):
    root, logs = results
    loaded = loading.load_results(events.find_runs(root))
    rows = {r.name: r for r in summary.summarize(loaded)}
    assert list(rows) == ALL_NAMES                 # the post's order, extras after

    def final(run_logs, subdir, tag):
        train, validation = run_logs
        return f32((train if subdir == tags.TRAIN_DIR else validation)[tag][1])[-1]

    for name, row in rows.items():
        acc = [final(r, tags.VALIDATION_DIR, tags.EPOCH_ACCURACY) for r in logs[name]]
        gap = [final(r, tags.VALIDATION_DIR, tags.EPOCH_LOSS) - final(r, tags.TRAIN_DIR, tags.EPOCH_LOSS)
               for r in logs[name]]
        assert row.test_accuracy == acc
        assert row.loss_gap == pytest.approx(gap, rel=1e-12)
        assert row.seeds == len(logs[name])

    base = rows[figures.BASELINE]
    acc = np.array(base.test_accuracy)
    assert summary.mean_std(base.test_accuracy) == pytest.approx((acc.mean(), acc.std(ddof=1)))
    markdown = summary.to_markdown(rows.values())
    assert f"{acc.mean() * 100:.2f} ± {acc.std(ddof=1) * 100:.2f}" in markdown


def test_summary_adds_recomputed_bn_accuracy_where_evaluated(tmp_path):
    """precise_bn.json of the summarised epoch: a column (mean ± std over seeds); one of
    another epoch (an older checkpoint) is not used."""
    import json

    from analysis import precise_bn

    rng = np.random.default_rng(5)
    for name, values in ((figures.BASELINE, (0.70, 0.74)), (figures.NOCONV_L2, (0.66, None))):
        for seed, value in enumerate(values):
            run = write_run(str(tmp_path / name / f"seed_{seed}"), *fake_logs(rng), done=True, epochs=EPOCHS)
            if value is not None:
                epoch = EPOCHS if name == figures.BASELINE else EPOCHS - 1   # NoConvL2: stale
                with open(os.path.join(run, precise_bn.RESULT_FILE), "w") as f:
                    json.dump(dict(epoch=epoch, train_epochs=EPOCHS, precise_bn=value), f)
    rows = {r.name: r for r in summary.summarize(loading.load_results(events.find_runs(str(tmp_path))))}
    assert rows[figures.BASELINE].precise_accuracy == [0.70, 0.74]
    assert all(np.isnan(rows[figures.NOCONV_L2].precise_accuracy))
    markdown = summary.to_markdown(rows.values())
    assert "test accuracy, BN statistics recomputed (%)" in markdown
    assert f"| {72.0:.2f} ± {np.std([70, 74], ddof=1):.2f} |" in markdown
    line = next(l for l in markdown.splitlines() if l.startswith("| NoConvL2 |"))
    assert line.count("| n/a |") == 1


def test_summary_marks_incomplete_runs(results):
    root, _ = results
    rows = {r.name: r for r in summary.summarize(loading.load_results(events.find_runs(root)))}
    bn = rows[figures.CONV_LR_SCALE_BN098]
    assert not bn.complete and bn.epochs == [4] and bn.train_epochs == EPOCHS
    assert rows[figures.BASELINE].complete
    line = next(l for l in summary.to_markdown(rows.values()).splitlines()
                if l.startswith("| ConvLRScale BN 0.98 |"))
    assert "| no |" in line and "| 4/6 |" in line


# --- the command line ---------------------------------------------------------------------

def run_cli(*args):
    return python("-m", "analysis.make_figures", *args, timeout=120)


def test_cli_writes_every_figure_and_the_table(results, tmp_path):
    root, logs = results
    out = tmp_path / "figs"
    proc = run_cli(root, "--out", str(out))
    assert proc.returncode == 0, proc.stderr

    for name in figures.FIGURES:
        for fmt in ("png", "svg"):
            path = out / f"{name}.{fmt}"
            assert path.is_file() and str(path) in proc.stdout
        assert (out / f"{name}.png").stat().st_size < 200_000
    with open(out / "summary.csv") as f:
        table = {row["name"]: row for row in csv.DictReader(f)}
    assert table[figures.CONV_LR_SCALE_BN098]["complete"] == "no"
    assert table[figures.NOCONV_L2]["complete"] == "yes"
    acc = f32(logs[figures.NOCONV_L2][0][1][tags.EPOCH_ACCURACY][1])[-1]
    assert float(table[figures.NOCONV_L2]["test_accuracy_mean"]) == acc
    assert "ConvLRScale BN 0.98" in (out / "summary.md").read_text()


def test_data_name_replaces_the_configs_data_in_every_subtitle(tmp_path):
    # The configs say --data_source=binary, which the subtitles call "CIFAR-10 (binary files)";
    # a copy re-encoded into that layout is named by --data_name, in every figure drawn.
    rng = np.random.default_rng(7)
    for name in ALL_NAMES:
        write_run(str(tmp_path / "results" / name), *fake_logs(rng), {"data_source": "binary"},
                  done=True, epochs=EPOCHS)
    name = "CIFAR-10, JPEG q75 re-encoding"
    root = str(tmp_path / "results")
    assert make_figures.main([root, "--out", str(tmp_path / "named"), "--data_name", name]) == 0
    assert make_figures.main([root, "--out", str(tmp_path / "plain")]) == 0
    named = {p.name: p.read_text() for p in (tmp_path / "named").glob("*.svg")}
    plain = {p.name: p.read_text() for p in (tmp_path / "plain").glob("*.svg")}
    assert named.keys() == plain.keys() and len(named) >= len(figures.FIGURES), sorted(named)
    for file in named:
        assert name in named[file] and "binary files" not in named[file], file
        assert "CIFAR-10 (binary files)" in plain[file] and name not in plain[file], file


def test_the_runs_recorded_data_names_it_without_data_name(tmp_path):
    """Runs that recorded their data (run_config.json "data") are labelled by it in every
    subtitle; --data_name still overrides it."""
    import json

    rng = np.random.default_rng(8)
    for name in ALL_NAMES:
        run_dir = str(tmp_path / "results" / name)
        write_run(run_dir, *fake_logs(rng), {"data_source": "binary"}, done=True, epochs=EPOCHS)
        path = os.path.join(run_dir, "run_config.json")
        payload = json.load(open(path))
        payload["data"] = {"name": "CIFAR-10 layout, not the official files", "official": False}
        json.dump(payload, open(path, "w"))
    root = str(tmp_path / "results")
    assert make_figures.main([root, "--out", str(tmp_path / "recorded")]) == 0
    assert make_figures.main([root, "--out", str(tmp_path / "named"), "--data_name", "mine"]) == 0
    for svg in (tmp_path / "recorded").glob("*.svg"):
        text = svg.read_text()
        assert "not the official files" in text and "binary files" not in text, svg.name
    for svg in (tmp_path / "named").glob("*.svg"):
        assert "mine" in svg.read_text() and "not the official" not in svg.read_text(), svg.name


def test_cli_writes_no_figure_about_a_missing_run(tmp_path):
    rng = np.random.default_rng(5)
    root = tmp_path / "results"
    for name in (figures.BASELINE, figures.CONV_LR_SCALE):
        train, validation = fake_logs(rng)
        write_run(str(root / name), train, validation, done=True, epochs=EPOCHS)
    out = tmp_path / "figs"
    proc = run_cli(str(root), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    written = {p.stem for p in out.glob("*.png")}
    assert written == {"conv_lr_scale_accuracy", "relative_step_all", "conv_sqsum_log",
                       "test_accuracy_all", "piecewise_factor"}
    assert "bn098_accuracy: no ConvLRScale BN 0.98" in proc.stderr


@pytest.mark.parametrize("folder", ["empty", "missing"])
def test_cli_without_runs_exits_2_with_one_line(tmp_path, folder):
    path = tmp_path / folder
    if folder == "empty":
        path.mkdir()
    proc = run_cli(str(path))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert str(path) in proc.stderr
