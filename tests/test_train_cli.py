"""The training program end to end: flags, a few real steps, TensorBoard tags, bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from resnet_cifar import config as config_lib
from resnet_cifar import events, models, tags, train, trainer
from tests.cifar_files import write_binary_cifar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ["conv2d"] + [f"conv2d_{i}" for i in range(1, 22)]


def parse(argv):
    """The program's own flag definitions, parsed afresh from `argv`, as a TrainConfig."""
    train.FLAGS.unparse_flags()
    try:
        train.FLAGS(["train"] + argv)
        return train.config_from_flags()
    finally:
        train.FLAGS.unparse_flags()


def run_cli(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "resnet_cifar.train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- flags


def test_defaults_reproduce_the_baseline():
    cfg = parse(["--model_dir=/tmp/x"])
    assert cfg == config_lib.TrainConfig(model_dir="/tmp/x")
    assert (cfg.train_epochs, cfg.boundary_epochs, cfg.decay_rates) == (150, (50.0, 100.0), (1.0, 0.1, 0.01))
    assert (cfg.weight_decay, cfg.bn_decay, cfg.batch_size, cfg.conv_l2) == (2e-4, 0.997, 128, True)
    assert not cfg.conv_grad_scale


@pytest.mark.parametrize("spelling", ["--noconv_l2", "--flag_noconv_l2", "--conv_l2=false"])
def test_noconv_l2_spellings(spelling):
    assert parse(["--model_dir=/tmp/x", spelling]).conv_l2 is False


def test_flags_reach_the_step():
    """--noconv_l2, --conv_grad_scale and --bn_decay change the built model, not just the config."""
    cfg = parse(["--model_dir=/tmp/x", "--flag_noconv_l2", "--conv_grad_scale", "--bn_decay=0.98",
                 "--batch_size=8"])
    model = trainer.build_model(cfg, steps_per_epoch=10)
    conv = {id(k) for k in models.conv_kernels(model)}
    assert not conv & {id(v) for v in model.l2_variables()}
    assert len(model.l2_variables()) == len(model.trainable_variables) - 22
    assert {bn.momentum for bn in models.batch_norm_layers(model)} == {0.98}
    # The factor used by the step: piecewise(0) * sqsum / 800, per layer.
    sq = np.array([np.sum(k.numpy().astype(np.float64) ** 2) for k in models.conv_kernels(model)])
    factor = model.conv_factor(sq.astype(np.float32)).numpy()
    np.testing.assert_allclose(factor, sq.sum() / 800.0, rtol=1e-5)
    baseline = trainer.build_model(parse(["--model_dir=/tmp/x", "--batch_size=8"]), 10)
    assert len(baseline.l2_variables()) == len(baseline.trainable_variables)
    np.testing.assert_allclose(baseline.conv_factor(sq.astype(np.float32)).numpy(), 1.0)


@pytest.mark.parametrize("args,needle", [
    (["--data_source=bogus"], "data_source"),
    (["--boundary_epochs=100,50"], "strictly increasing"),
    (["--boundary_epochs=50,50"], "strictly increasing"),
    (["--decay_rates=1,-0.1,0.01"], "negative"),
    (["--decay_rates=1,0.1"], "needs 3 values"),
    (["--batch_size=0"], "batch_size"),
    (["--batch_size=abc"], "batch_size"),
    (["--bn_decay=1.5"], "bn_decay"),
    (["--weight_decay=-1"], "weight_decay"),
    (["--conv_lr_factor=replay", "--conv_grad_scale"], "replay_from"),
    (["--conv_lr_factor=sideways"], "conv_lr_factor"),
    (["--no_such_flag"], "no_such_flag"),
    (["stray_argument"], "unexpected"),
    (["--conv_l2", "--flag_noconv_l2"], "contradict"),
])
def test_bad_flags_fail_in_one_line_before_training(tmp_path, args, needle):
    model_dir = tmp_path / "run"
    r = run_cli(f"--model_dir={model_dir}", *args, timeout=60)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not model_dir.exists()          # nothing was started


def test_missing_model_dir_flag():
    r = run_cli("--data_source=synthetic", timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: --model_dir is required"]


# ----------------------------------------------------------------------------- real steps


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """4 epochs of 8 steps on tiny learnable binary files, through the real CLI."""
    tmp = tmp_path_factory.mktemp("short")
    write_binary_cifar(str(tmp / "data"), per_train_file=52, num_test=64)
    model_dir = tmp / "run"
    r = run_cli(f"--model_dir={model_dir}", "--data_source=binary", f"--data_dir={tmp / 'data'}",
                "--train_epochs=4", "--steps_per_epoch=8", "--batch_size=32", "--boundary_epochs=3",
                "--decay_rates=1,0.1", "--verbose=2", "--seed=3", timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    return model_dir, r


def test_loss_falls(short_run):
    model_dir, _ = short_run
    _, loss = events.read_scalars(str(model_dir), tags.EPOCH_LOSS)
    assert loss[-1] < 0.7 * loss[0], loss


def test_event_files_contain_every_documented_tag(short_run):
    model_dir, _ = short_run
    train_tags = set(events.list_tags(str(model_dir), tags.TRAIN_DIR))
    want = {tags.EPOCH_LOSS, tags.EPOCH_ACCURACY, tags.EPOCH_L2_LOSS, tags.CONV_SQSUM,
            tags.CONV_RELATIVE_STEP, tags.CONV_LR_FACTOR, tags.LEARNING_RATE}
    want |= {tags.per_layer(t, name) for t in (tags.CONV_SQSUM, tags.CONV_RELATIVE_STEP) for name in LAYERS}
    assert want <= train_tags, want - train_tags
    assert {tags.EPOCH_LOSS, tags.EPOCH_ACCURACY} <= set(events.list_tags(str(model_dir), tags.VALIDATION_DIR))
    # Steps: epoch numbers, with the initial state at 0 for the weight-based tags.
    steps, sqsum = events.read_scalars(str(model_dir), tags.CONV_SQSUM)
    assert list(steps) == [0, 1, 2, 3, 4]
    assert abs(sqsum[0] - 800) / 800 < 0.1
    assert list(events.read_scalars(str(model_dir), tags.CONV_RELATIVE_STEP)[0]) == [1, 2, 3, 4]
    assert list(events.read_scalars(str(model_dir), tags.EPOCH_ACCURACY, tags.VALIDATION_DIR)[0]) == [1, 2, 3, 4]
    # The total is the sum of the per-layer values; the rate drops at epoch 3 (0.1*32/128 = 0.025).
    per_layer = sum(events.read_scalars(str(model_dir), tags.per_layer(tags.CONV_SQSUM, n))[1] for n in LAYERS)
    np.testing.assert_allclose(per_layer, sqsum, rtol=1e-5)
    _, lr = events.read_scalars(str(model_dir), tags.LEARNING_RATE)
    np.testing.assert_allclose(lr, [0.025, 0.025, 0.025, 0.025, 0.0025], rtol=1e-6)


def test_run_config_records_the_run(short_run):
    model_dir, _ = short_run
    with open(model_dir / tags.RUN_CONFIG_FILE) as f:
        rc = json.load(f)
    assert rc["trainable_parameters"] == 272_762
    assert rc["seed"] == 3 and rc["config"]["seed"] == 3
    assert rc["config"]["boundary_epochs"] == [3.0] and rc["config"]["conv_l2"] is True
    assert rc["versions"]["tensorflow"].startswith("2.21")
    assert rc["steps_per_epoch"] == 8
    assert (model_dir / tags.DONE_FILE).exists()


def test_progress_output(short_run):
    _, r = short_run
    lines = [line for line in r.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split(" | ")[0] for line in lines] == [f"epoch {i}/4" for i in range(1, 5)]
    assert all("ETA" in line and "test acc" in line for line in lines)


def test_finished_run_rerun_is_a_no_op(short_run):
    model_dir, _ = short_run
    before = sorted(os.listdir(model_dir / tags.TRAIN_DIR))
    r = run_cli(f"--model_dir={model_dir}", "--data_source=binary", "--data_dir=/nonexistent",
                "--train_epochs=4", "--steps_per_epoch=8", "--batch_size=32", "--boundary_epochs=3",
                "--decay_rates=1,0.1", "--seed=3", timeout=120)
    assert r.returncode == 0 and "already finished" in r.stdout, r.stderr
    assert sorted(os.listdir(model_dir / tags.TRAIN_DIR)) == before


def test_other_flags_on_same_model_dir_are_refused(short_run):
    model_dir, _ = short_run
    r = run_cli(f"--model_dir={model_dir}", "--data_source=binary", "--data_dir=/nonexistent",
                "--train_epochs=4", "--steps_per_epoch=8", "--batch_size=32", "--boundary_epochs=3",
                "--decay_rates=1,0.1", "--seed=3", "--noconv_l2", "--bn_decay=0.98", timeout=120)
    line = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(line) == 1, r.stderr
    assert "--conv_l2: True -> False" in line[0] and "--bn_decay: 0.997 -> 0.98" in line[0]
    assert (model_dir / tags.DONE_FILE).exists()     # nothing damaged
