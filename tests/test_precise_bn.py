"""analysis.precise_bn: the stored-statistics evaluation reproduces the run's logged test
accuracy, and the recomputed statistics are the mean of the batches' statistics (NumPy)."""

import json
import os

import numpy as np
import pytest

from analysis import precise_bn
from tests.cifar_files import write_binary_cifar
from tests.helpers import train_cli

NUM_TEST = 64


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """3 epochs of 4 steps on tiny binary files, through the real CLI, whole test set evaluated."""
    tmp = tmp_path_factory.mktemp("pbn")
    write_binary_cifar(str(tmp / "data"), per_train_file=16, num_test=NUM_TEST)
    run = tmp / "results" / "baseline" / "seed_0"
    r = train_cli(f"--model_dir={run}", "--data_source=binary", f"--data_dir={tmp / 'data'}", "--train_epochs=3",
                  "--steps_per_epoch=4", "--batch_size=16", "--boundary_epochs=2", "--decay_rates=1,0.1",
                  "--verbose=0")
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, run


def test_each_pass_of_a_run_is_announced(tiny_run, capsys):
    """Progress within a run: its three passes as they start, above its result line."""
    tmp, _ = tiny_run
    assert precise_bn.main([str(tmp / "results"), "--bn_batches=3", "--again"]) == 0
    out = capsys.readouterr().out.splitlines()
    progress = [line for line in out if line.startswith("  baseline/seed_0: ")]
    assert out.index(progress[-1]) + 1 == [i for i, line in enumerate(out) if line.startswith("baseline/seed_0: ")][0]
    assert [line.split(": ", 1)[1][:3] for line in progress] == ["1/3", "2/3", "3/3"], progress
    assert "BN statistics from 3 training batches" in progress[1]


def test_stored_statistics_reproduce_the_logged_accuracy(tiny_run, capsys):
    tmp, run = tiny_run
    out = tmp / "tables"
    assert precise_bn.main([str(tmp / "results"), "--bn_batches=3", f"--out={out}"]) == 0

    result = json.loads((run / precise_bn.RESULT_FILE).read_text())
    assert result["epoch"] == result["train_epochs"] == 3 and result["bn_batches"] == 3
    # The same weights, data and statistics as the run's last evaluation: the same accuracy,
    # to one image (the training process may have used other CPU kernels than this one).
    assert result["logged"] is not None
    assert abs(result["stored_bn"] - result["logged"]) <= 1 / NUM_TEST + 1e-9, result
    assert 0.0 <= result["precise_bn"] <= 1.0
    assert precise_bn.read_result(str(run)) == result
    table = (out / "precise_bn.md").read_text()
    assert "| baseline/seed_0 | 3 |" in table and "recomputed − stored" in table
    assert "baseline/seed_0: epoch 3, logged" in capsys.readouterr().out

    # Evaluated already: reused; --again evaluates anew (same checkpoint, same numbers).
    (run / precise_bn.RESULT_FILE).write_text(json.dumps(dict(result, precise_bn=0.5)))
    assert precise_bn.main([str(run), "--bn_batches=3"]) == 0
    assert f"recomputed BN 50.00% (from its {precise_bn.RESULT_FILE}; --again to redo)" in capsys.readouterr().out
    assert precise_bn.main([str(run), "--bn_batches=3", "--again"]) == 0
    assert "--again to redo" not in capsys.readouterr().out
    again = precise_bn.read_result(str(run))
    # the same statistics up to float32 summation order: the same accuracy, to one image
    assert abs(again.pop("precise_bn") - result["precise_bn"]) <= 1 / NUM_TEST + 1e-9
    assert again == {k: v for k, v in result.items() if k != "precise_bn"}


def test_recomputed_statistics_are_the_mean_of_the_batch_statistics():
    """A conv and a BN layer; the BN's input is the conv's output (no BN before it), so the
    batch statistics can be computed in NumPy from a sub-model's output."""
    import keras

    inputs = keras.Input((8, 8, 3))
    conv = keras.layers.Conv2D(5, 3, padding="same", use_bias=False)(inputs)
    bn_layer = keras.layers.BatchNormalization(momentum=0.997, epsilon=1e-5)
    model = keras.Model(inputs, bn_layer(conv))
    conv_model = keras.Model(inputs, conv)
    rng = np.random.default_rng(0)
    batches = [rng.normal(1.0, 2.0, (16, 8, 8, 3)).astype(np.float32) for _ in range(4)]

    used = precise_bn.recompute_bn_statistics(model, iter(batches))

    assert used == 4
    outputs = [conv_model(b, training=False).numpy().astype(np.float64) for b in batches]
    want_mean = np.mean([o.mean(axis=(0, 1, 2)) for o in outputs], axis=0)
    want_var = np.mean([o.var(axis=(0, 1, 2)) for o in outputs], axis=0)      # biased, as Keras'
    # float32 means over 1,024 values per channel: errors ~1e-6 relative; the bound has 100x margin.
    scale = np.abs(want_mean).max() + np.sqrt(want_var).max()
    np.testing.assert_allclose(bn_layer.moving_mean.numpy(), want_mean, rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose(bn_layer.moving_variance.numpy(), want_var, rtol=1e-4)
    assert bn_layer.momentum == 0.997                 # the layer's own decay is put back


def test_errors_are_one_line(tmp_path, capsys):
    assert precise_bn.main([str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.startswith("error: no such folder")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps({"config": {"data_source": "synthetic"}}))
    assert precise_bn.main([str(run)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {run}: no checkpoint to evaluate"]


def test_a_finished_run_keeps_final_weights_that_evaluate_without_its_checkpoints(tiny_run, tmp_path, capsys):
    """final.weights.h5 holds the last checkpoint's model (compared through a second path,
    tf.train.Checkpoint); a copy of the run folder without checkpoints/ is evaluated from it,
    and export_final_weights writes the same weights from the checkpoint."""
    import shutil

    import tensorflow as tf

    from resnet_cifar import events, tags

    tmp, run = tiny_run
    weights = run / tags.FINAL_WEIGHTS_FILE
    assert weights.is_file() and weights.stat().st_size < 2_000_000
    config = events.read_config(str(run))
    images = tf.random.stateless_uniform((8, 32, 32, 3), seed=(1, 2))

    def outputs(path, epoch=None):
        model, at = precise_bn.restore_model(str(run), config, str(path), epoch)
        return model(images, training=False).numpy(), at

    from_checkpoint, epoch = outputs(precise_bn.newest_checkpoint(str(run)))
    from_weights, _ = outputs(weights, 3)
    assert epoch == 3
    np.testing.assert_array_equal(from_weights, from_checkpoint)   # the same weights, the same kernels

    shared = tmp_path / "shared" / "baseline" / "seed_0"
    shutil.copytree(run, shared, ignore=shutil.ignore_patterns("checkpoints", precise_bn.RESULT_FILE))
    assert precise_bn.main([str(shared), "--bn_batches=2"]) == 0
    result = precise_bn.read_result(str(shared))
    assert result["checkpoint"] == tags.FINAL_WEIGHTS_FILE and result["epoch"] == 3
    assert abs(result["stored_bn"] - result["logged"]) <= 1 / NUM_TEST + 1e-9, result
    capsys.readouterr()

    (run / tags.FINAL_WEIGHTS_FILE).rename(tmp_path / "kept.weights.h5")
    try:
        assert precise_bn.export_final_weights(str(run)) == str(weights)
        exported, _ = outputs(weights, 3)
        np.testing.assert_array_equal(exported, from_checkpoint)
        assert not [f for f in os.listdir(run) if ".tmp" in f]
    finally:
        os.replace(tmp_path / "kept.weights.h5", weights)
    (shared / tags.DONE_FILE).unlink()             # unfinished, no checkpoint: nothing to export or evaluate
    with pytest.raises(precise_bn.EvaluationError, match="not finished"):
        precise_bn.export_final_weights(str(shared))
    assert precise_bn.main([str(shared)]) == 1
    assert capsys.readouterr().err.strip() == f"error: {shared}: no checkpoint to evaluate"


def test_a_shared_copy_reuses_the_last_checkpoints_result_and_a_search_skips_unfinished_copies(
        tiny_run, tmp_path, capsys):
    """A shared results folder (as results/post of this repository): the finished run's
    precise_bn.json was written from its last checkpoint where it trained, the copy keeps the same
    weights as final.weights.h5, no checkpoints, and a placeholder for its data folder. The result
    is reused without data; a result of another epoch is not. A run still training elsewhere
    (no final weights, no checkpoints) is skipped with a note when found in the folder."""
    import shutil

    tmp, run = tiny_run
    results = tmp_path / "results"
    shared = results / "baseline" / "seed_0"
    shutil.copytree(run, shared, ignore=shutil.ignore_patterns("checkpoints", precise_bn.RESULT_FILE))
    run_config = json.loads((shared / "run_config.json").read_text())
    run_config["config"]["data_dir"] = "DATA_DIR"
    (shared / "run_config.json").write_text(json.dumps(run_config))
    unfinished = results / "noconv_l2" / "seed_0"
    shutil.copytree(shared, unfinished, ignore=shutil.ignore_patterns("done.json", "final.weights.h5"))
    from_checkpoint = dict(epoch=3, train_epochs=3, logged=0.5, stored_bn=0.5, precise_bn=0.25, bn_batches=2,
                           data_source="binary", own_data=True, eval_steps=None, checkpoint="ckpt-3")
    (shared / precise_bn.RESULT_FILE).write_text(json.dumps(from_checkpoint))

    assert precise_bn.main([str(results), "--bn_batches=2"]) == 0
    captured = capsys.readouterr()
    assert "baseline/seed_0: epoch 3, logged 50.00%, stored BN 50.00%, recomputed BN 25.00% (from its" \
        in captured.out, captured.out
    assert "noconv_l2" not in captured.out
    assert captured.err.strip() == "note: noconv_l2/seed_0 skipped: no final weights (not finished) and no checkpoints"
    assert precise_bn.main([str(unfinished)]) == 1                     # named itself: an error
    assert capsys.readouterr().err.strip() == f"error: {unfinished}: no checkpoint to evaluate"

    # Another epoch's result is not these weights': evaluated anew, which needs the data.
    (shared / precise_bn.RESULT_FILE).write_text(json.dumps(dict(from_checkpoint, epoch=2, checkpoint="ckpt-2")))
    assert precise_bn.main([str(shared), "--bn_batches=2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {shared}: data: ") and "DATA_DIR" in err, err
    assert err.endswith("; --data_dir=DIR names the data to evaluate on"), err
    assert precise_bn.main([str(shared), "--bn_batches=2", f"--data_dir={tmp / 'data'}"]) == 0
    assert precise_bn.read_result(str(shared))["epoch"] == 3


def test_other_data_source_does_not_take_the_runs_data_folder(tiny_run, tmp_path, monkeypatch):
    """--data_source other than the run's: its data folder is that source's default (None),
    not the run's (a binary folder handed to TFDS would become a download target), and the
    result is labelled as evaluated on other data."""
    import shutil

    from resnet_cifar import cifar_data

    _, run = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(precise_bn.RESULT_FILE))
    asked = []

    def recording(source, folder=None, seed=0):
        asked.append((source, folder))
        return cifar_data.synthetic_arrays(64, NUM_TEST, seed)     # small: only the call is checked

    monkeypatch.setattr(cifar_data, "load_arrays", recording)
    result = precise_bn.evaluate(str(copy), bn_batches=1, data_source="tfds")
    assert asked == [("tfds", None)]
    assert result["own_data"] is False and result["data_source"] == "tfds"


def test_the_checkpoints_that_end_a_phase_are_kept_and_evaluated_by_epoch(tmp_path, capsys):
    """5 epochs with the rate dropping after epochs 1 and 3: the trainer keeps ckpt-1 and ckpt-3
    in checkpoints/phase_ends/ beside its rotation (ckpt-4, ckpt-5); --epoch=3 evaluates ckpt-3,
    whose stored statistics reproduce the accuracy logged at epoch 3 (read from the event files)."""
    from resnet_cifar import checkpoints, events, tags

    write_binary_cifar(str(tmp_path / "data"), per_train_file=16, num_test=NUM_TEST)
    results = tmp_path / "results"
    run = results / "baseline" / "seed_0"
    r = train_cli(f"--model_dir={run}", "--data_source=binary", f"--data_dir={tmp_path / 'data'}",
                  "--train_epochs=5", "--steps_per_epoch=4", "--batch_size=16", "--boundary_epochs=1,3",
                  "--decay_rates=1,0.1,0.01", "--verbose=0")
    assert r.returncode == 0, r.stderr[-3000:]
    folder = run / tags.CHECKPOINTS_DIR
    assert checkpoints.numbers_on_disk(str(folder)) == [5, 4]
    assert checkpoints.numbers_on_disk(str(folder / checkpoints.PHASE_ENDS)) == [3, 1]

    assert precise_bn.main([str(run), "--epoch=3", "--bn_batches=2"]) == 0
    result = json.loads((run / "precise_bn_epoch3.json").read_text())
    assert (result["epoch"], result["train_epochs"], result["checkpoint"]) == (3, 5, "ckpt-3")
    steps, values = events.read_scalars(str(run), tags.EPOCH_ACCURACY, tags.VALIDATION_DIR)
    logged = dict(zip((int(s) for s in steps), (float(v) for v in values)))
    assert result["logged"] == pytest.approx(logged[3])
    assert abs(result["stored_bn"] - logged[3]) <= 1 / NUM_TEST + 1e-9, (result, logged)
    assert not (run / precise_bn.RESULT_FILE).exists()           # the final weights' result is another file
    assert "seed_0: epoch 3, logged" in capsys.readouterr().out

    # An epoch without a checkpoint: one line naming the epochs kept; in a search, a note.
    assert precise_bn.main([str(run), "--epoch=2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {run}: no checkpoint of epoch 2 (checkpoints/phase_ends/ holds epochs 1, 3, "
                   "the rotation epochs 4, 5)"), err
    assert precise_bn.main([str(results), "--epoch=2"]) == 0
    assert capsys.readouterr().err.strip() == "note: baseline/seed_0 skipped: no checkpoint of epoch 2"
    with pytest.raises(SystemExit) as e:
        precise_bn.main([str(run), "--epoch=0"])
    assert e.value.code == 2 and "--epoch: 0 must be positive" in capsys.readouterr().err


def test_a_data_error_is_said_once_for_all_runs_that_share_the_data(tiny_run, tmp_path, capsys):
    import shutil

    _, run = tiny_run
    results = tmp_path / "results"
    for name in ("baseline", "noconv_l2"):
        copy = results / name / "seed_0"
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns(precise_bn.RESULT_FILE, "final.weights.h5"))
        run_config = json.loads((copy / "run_config.json").read_text())
        run_config["config"]["data_dir"] = str(tmp_path / "gone")
        (copy / "run_config.json").write_text(json.dumps(run_config))
    assert precise_bn.main([str(results), "--bn_batches=2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2, err
    assert err[0].startswith(f"error: {results / 'baseline' / 'seed_0'}: data: --data_dir={tmp_path / 'gone'} "
                             "does not exist"), err
    assert err[0].endswith("; --data_dir=DIR names the data to evaluate on"), err
    assert err[1] == f"error: {results / 'noconv_l2' / 'seed_0'}: data: the same error as above"
