"""The training program end to end: flags, a few real steps, TensorBoard tags, bad input."""

import json
import os
import re
import platform
import subprocess
import sys

import numpy as np
import pytest

from resnet_cifar import config as config_lib, cifar_data
from resnet_cifar import events, models, tags, train
from tests.cifar_files import write_binary_cifar
from tests.helpers import LAYERS, ROOT, env, parse, train_cli


# ----------------------------------------------------------------------------- flags


def test_defaults_reproduce_the_baseline():
    cfg = parse(["--model_dir=/tmp/x"])
    # --verbose not given: a progress bar on a terminal, one line per epoch into a pipe or file
    assert cfg == config_lib.TrainConfig(model_dir="/tmp/x", verbose=1 if sys.stdout.isatty() else 0)
    assert (cfg.train_epochs, cfg.boundary_epochs, cfg.decay_rates) == (150, (50.0, 100.0), (1.0, 0.1, 0.01))
    assert (cfg.weight_decay, cfg.bn_decay, cfg.batch_size, cfg.conv_l2) == (2e-4, 0.997, 128, True)
    assert not cfg.conv_grad_scale
    assert cfg.phase_end_epochs == (50, 100)        # the checkpoints kept beside the rotation


@pytest.mark.parametrize("flags, want", [
    (["--boundary_epochs=2,4", "--train_epochs=6", "--decay_rates=1,0.1,0.01"], (2, 4)),   # the quick preset
    (["--boundary_epochs=2.5", "--train_epochs=6", "--decay_rates=1,0.1"], (2,)),     # the last whole epoch
    (["--boundary_epochs=0.5,3", "--train_epochs=6", "--decay_rates=1,0.1,0.01"], (3,)),  # none before epoch 1
    (["--boundary_epochs=6,9", "--train_epochs=6", "--decay_rates=1,0.1,0.01"], ()),   # the end is the final one
])
def test_phase_end_epochs(flags, want):
    assert parse(["--model_dir=/tmp/x", *flags]).phase_end_epochs == want


@pytest.mark.parametrize("spelling", ["--noconv_l2", "--flag_noconv_l2", "--conv_l2=false"])
def test_noconv_l2_spellings(spelling):
    assert parse(["--model_dir=/tmp/x", spelling]).conv_l2 is False


def test_flags_reach_the_step():
    """--noconv_l2, --conv_grad_scale and --bn_decay change the built model, not just the config."""
    cfg = parse(["--model_dir=/tmp/x", "--flag_noconv_l2", "--conv_grad_scale", "--bn_decay=0.98",
                 "--batch_size=8"])
    model = train.build_model(cfg, steps_per_epoch=10)
    conv = {id(k) for k in models.conv_kernels(model)}
    assert not conv & {id(v) for v in model.l2_variables()}
    assert len(model.l2_variables()) == len(model.trainable_variables) - 22
    assert {bn.momentum for bn in models.batch_norm_layers(model)} == {0.98}
    # The factor used by the step: piecewise(0) * sqsum / 800, per layer.
    sq = np.array([np.sum(k.numpy().astype(np.float64) ** 2) for k in models.conv_kernels(model)])
    factor = model.conv_factor().numpy()
    np.testing.assert_allclose(factor, sq.sum() / 800.0, rtol=1e-5)
    baseline = train.build_model(parse(["--model_dir=/tmp/x", "--batch_size=8"]), 10)
    assert len(baseline.l2_variables()) == len(baseline.trainable_variables)
    np.testing.assert_allclose(baseline.conv_factor().numpy(), 1.0)


def cli_doc_row(flag):
    """The cells (flag, default, meaning) of the row of `--flag` in docs/cli.md's flag table."""
    with open(os.path.join(ROOT, "docs", "cli.md"), encoding="utf-8") as f:
        for line in f:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cells[0] == f"`--{flag}`":
                return cells
    raise AssertionError(f"docs/cli.md has no row for --{flag}")


@pytest.mark.parametrize("flag,registry", [("data_source", cifar_data.SOURCES),
                                           ("optimizer", config_lib.OPTIMIZERS)])
def test_choice_flags_list_their_registry(flag, registry):
    """--data_source and --optimizer accept, and their help describes, exactly the registry's
    entries; docs/cli.md's row names exactly these, in backticks."""
    assert train.FLAGS[flag].parser.enum_values == list(registry)
    help_text = train.FLAGS[flag].help
    for name, entry in registry.items():
        assert f"{name}: {entry.description}" in help_text
    assert sorted(re.findall(r"`([^`]+)`", cli_doc_row(flag)[2])) == sorted(registry)


def test_learning_rate_defaults_in_help_and_doc_are_the_registrys():
    want = {name: spec.default_learning_rate for name, spec in config_lib.OPTIMIZERS.items()}
    help_text = train.FLAGS["learning_rate"].help
    assert all(f"{rate:g} for {name}" in help_text for name, rate in want.items()), help_text
    # docs/cli.md: "0.1 (momentum), 1e-3 (adam, adamw)"
    documented = {name.strip(): float(rate)
                  for rate, names in re.findall(r"([0-9.e+-]+) \(([^)]*)\)", cli_doc_row("learning_rate")[1])
                  for name in names.split(",")}
    assert documented == want


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
    # Non-finite floats pass every comparison (nan < 0 is False) and nan != nan
    # would make the run folder impossible to resume.
    (["--weight_decay=nan"], "--weight_decay=nan must be a finite number"),
    (["--bn_decay=nan"], "--bn_decay=nan must be a finite number"),
    (["--boundary_epochs=nan,100"], "--boundary_epochs=nan,100 must be finite numbers"),
    (["--decay_rates=1,inf,0.01"], "--decay_rates=1,inf,0.01 must be finite numbers"),
    (["--seed=-1"], "--seed=-1 must be in [0, 2147483647]"),
    (["--seed=4294967296"], "--seed=4294967296 must be at most 2147483647"),
    (["--seed=2147483648"], "--seed=2147483648 must be at most 2147483647"),
    # Keras runs whole executions: 7 per call with 5 steps per epoch trained 14 steps in 2 epochs.
    (["--steps_per_epoch=5", "--steps_per_execution=7"], "--steps_per_execution=7 must divide the 5 steps"),
    (["--data_source=synthetic", "--steps_per_execution=7"], "must divide the 390 steps of an epoch"),
    (["--data_source=synthetic", "--batch_size=1000000"], "--batch_size=1000000 is larger than the 50000"),
    (["--flagfile=/nonexistent/x.flags"], "x.flags"),
    (["--data_source=binary"], "--data_source=binary needs --data_dir"),
])
def test_bad_flags_fail_in_one_line_before_training(tmp_path, args, needle):
    model_dir = tmp_path / "run"
    r = train_cli(f"--model_dir={model_dir}", *args, timeout=60)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not model_dir.exists()          # nothing was started


@pytest.mark.parametrize("content", [b"\xff\xfe--seed=1\n\x80\x81", b"--seed=1\n\xc3\x28\n"])
def test_undecodable_flagfile_fails_in_one_line(tmp_path, content):
    flagfile = tmp_path / "bad.flags"
    flagfile.write_bytes(content)
    model_dir = tmp_path / "run"
    for path in (flagfile, tmp_path):            # not text; a folder
        r = train_cli(f"--model_dir={model_dir}", f"--flagfile={path}", timeout=60)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        assert "flagfile" in lines[0] and "Traceback" not in r.stderr
        assert not model_dir.exists()


@pytest.mark.parametrize("args,name", [
    ([], "baseline"), (["--flag_noconv_l2"], "noconv_l2"), (["--data_source=synthetic"], "baseline_synthetic"),
    (["--noconv_l2", "--conv_grad_scale", "--bn_decay=0.98", "--seed=2"], "conv_lr_scale_bn098_seed2"),
    (["--optimizer=adam"], "NAME")])
def test_missing_model_dir_flag_suggests_the_runs_name(args, name):
    r = train_cli(*args, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: --model_dir is required: the run's folder, e.g. --model_dir=runs/{name}"], r.stderr


@pytest.mark.parametrize("flag", ["--help", "-h", "--helpfull"])
def test_help_exits_0(flag):
    """The help asked for is a success (absl itself exits 1 after it); -h is --help."""
    r = train_cli(flag, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--model_dir" in r.stdout and "--[no]flag_noconv_l2" in r.stdout and "Traceback" not in r.stderr


def test_help_into_a_closed_pipe_is_quiet():
    """`... --help | head -1`: the reader is gone before the help is written (EPIPE);
    no error line (it once read "cannot read flagfile None: Broken pipe") and exit code 0."""
    read, write = os.pipe()
    os.close(read)                          # closed before the child writes a byte
    try:
        r = subprocess.run([sys.executable, "-m", "resnet_cifar.train", "--help"], cwd=ROOT, env=env(2),
                           stdout=write, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write)
    assert r.returncode == 0 and r.stderr == "", r.stderr[-2000:]


# ----------------------------------------------------------------------------- real steps


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """4 epochs of 8 steps on tiny learnable binary files, through the real CLI."""
    tmp = tmp_path_factory.mktemp("short")
    write_binary_cifar(str(tmp / "data"), per_train_file=52, num_test=64)
    model_dir = tmp / "run"
    r = train_cli(f"--model_dir={model_dir}", "--data_source=binary", f"--data_dir={tmp / 'data'}",
                  "--train_epochs=4", "--steps_per_epoch=8", "--batch_size=32", "--boundary_epochs=3",
                  "--decay_rates=1,0.1", "--seed=3", timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    return model_dir, r


def test_output_to_a_pipe_has_one_line_per_epoch(short_run):
    """--verbose not given and stdout a pipe: the trainer's line per epoch alone (no Keras line
    repeating its numbers), no ANSI codes."""
    _, r = short_run
    assert "\x1b" not in r.stdout
    assert not re.findall(r"^8/8 ", r.stdout, flags=re.M), r.stdout
    assert len(re.findall(r"^epoch \d/4 \| loss ", r.stdout, flags=re.M)) == 4, r.stdout


def test_a_long_epoch_prints_a_status_line_without_the_bar(capsys, tmp_path):
    """Without the progress bar, an epoch longer than `status_every` prints where it is: step,
    rate and the epoch's ETA (here every step, with status_every=0)."""
    import keras

    from resnet_cifar import callbacks
    from tests.helpers import batch, make_model

    model, _ = make_model(steps_per_epoch=3, resnet_size=8)
    data = tf_dataset(batch())
    model.fit(data, epochs=1, steps_per_epoch=3, verbose=0,
              callbacks=[callbacks.EpochLog(str(tmp_path), 1, status_every=0.0)])
    out = capsys.readouterr().out.splitlines()
    status = [line for line in out if line.startswith("  epoch 1/1: step ")]
    assert [line.split(",")[0] for line in status] == [f"  epoch 1/1: step {k}/3" for k in (1, 2, 3)], out
    assert all("steps/s, epoch ETA " in line for line in status), status
    assert [line.split(" | ")[0] for line in out if line.startswith("epoch ")] == ["epoch 1/1"]
    keras.backend.clear_session()


def tf_dataset(xy):
    import tensorflow as tf

    return tf.data.Dataset.from_tensors(xy).repeat()


def test_no_tensorflow_start_up_lines_on_the_console(short_run):
    """The oneDNN notice, CUDA probing (cuInit) and absl's pre-init warning stay off stderr."""
    _, r = short_run
    for noise in ("oneDNN custom operations", "cuInit", "cuda drivers", "absl::InitializeLog", "I0000"):
        assert noise not in r.stderr, r.stderr[:2000]


def test_loss_falls(short_run):
    model_dir, _ = short_run
    _, loss = events.read_scalars(str(model_dir), tags.EPOCH_LOSS)
    assert loss[-1] < 0.7 * loss[0], loss


def test_event_files_contain_every_documented_tag(short_run):
    model_dir, _ = short_run
    train_tags = set(events.read_all_scalars(str(model_dir), tags.TRAIN_DIR))
    want = {tags.EPOCH_LOSS, tags.EPOCH_ACCURACY, tags.EPOCH_L2_LOSS, tags.CONV_SQSUM,
            tags.CONV_RELATIVE_STEP, tags.CONV_LR_FACTOR, tags.LEARNING_RATE}
    want |= {tags.per_layer(t, name) for t in (tags.CONV_SQSUM, tags.CONV_RELATIVE_STEP) for name in LAYERS}
    assert want <= train_tags, want - train_tags
    assert {tags.EPOCH_LOSS, tags.EPOCH_ACCURACY} <= set(events.read_all_scalars(str(model_dir), tags.VALIDATION_DIR))
    # Steps: epoch numbers, with the initial state at 0 for the weight-based tags.
    steps, sqsum = events.read_scalars(str(model_dir), tags.CONV_SQSUM)
    assert list(steps) == [0, 1, 2, 3, 4]
    assert abs(sqsum[0] - 800) / 800 < 0.1
    assert list(events.read_scalars(str(model_dir), tags.CONV_RELATIVE_STEP)[0]) == [1, 2, 3, 4]
    assert list(events.read_scalars(str(model_dir), tags.EPOCH_ACCURACY, tags.VALIDATION_DIR)[0]) == [1, 2, 3, 4]
    # The total is the sum of the per-layer values; the rate drops at epoch 3 (0.1*32/128 = 0.025).
    per_layer = sum(events.read_scalars(str(model_dir), tags.per_layer(tags.CONV_SQSUM, n))[1] for n in LAYERS)
    np.testing.assert_allclose(per_layer, sqsum, rtol=1e-5)
    # Each layer's last logged value is NumPy's sum of squares of the final weights' kernel of
    # that name (float32 sums of up to 37k squares: relative error far below 1e-5).
    model = models.build_resnet()
    model.load_weights(str(model_dir / tags.FINAL_WEIGHTS_FILE))
    for layer in models.conv_layers(model):
        _, logged = events.read_scalars(str(model_dir), tags.per_layer(tags.CONV_SQSUM, layer.name))
        want = float(np.sum(layer.kernel.numpy().astype(np.float64) ** 2))
        assert logged[-1] == pytest.approx(want, rel=1e-5), layer.name
    _, lr = events.read_scalars(str(model_dir), tags.LEARNING_RATE)
    np.testing.assert_allclose(lr, [0.025, 0.025, 0.025, 0.025, 0.0025], rtol=1e-6)


def test_no_duplicate_or_iteration_stepped_tags(short_run):
    """Each main tag is one TensorBoard card: per-layer values only under per_layer/,
    one learning-rate tag, and nothing logged at optimizer iterations."""
    model_dir, _ = short_run
    train_tags = sorted(events.read_all_scalars(str(model_dir), tags.TRAIN_DIR))
    all_tags = train_tags + sorted(events.read_all_scalars(str(model_dir), tags.VALIDATION_DIR))
    assert not [t for t in all_tags if "learning_rate" in t and t != tags.LEARNING_RATE]
    assert not [t for t in all_tags if t.startswith("evaluation_")]
    top_level = [t for t in train_tags if not t.startswith(tags.PER_LAYER_PREFIX + "/")]
    assert sorted(top_level) == sorted([tags.EPOCH_LOSS, tags.EPOCH_ACCURACY, tags.EPOCH_L2_LOSS,
                                        tags.CONV_SQSUM, tags.CONV_RELATIVE_STEP,
                                        tags.CONV_LR_FACTOR, tags.LEARNING_RATE,
                                        tags.CONV_ANGULAR_UPDATE])
    for subdir in (tags.TRAIN_DIR, tags.VALIDATION_DIR):
        for tag in sorted(events.read_all_scalars(str(model_dir), subdir)):
            assert max(events.read_scalars(str(model_dir), tag, subdir)[0]) <= 4, (subdir, tag)


def read_layout(model_dir):
    """The custom-scalars layout(s) logged in train/, parsed with TensorBoard's own proto."""
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata
    from tensorboard.util import tensor_util

    acc = ea.EventAccumulator(os.path.join(model_dir, tags.TRAIN_DIR), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    if metadata.CONFIG_SUMMARY_TAG not in acc.Tags()[ea.TENSORS]:
        return []
    return [layout_pb2.Layout.FromString(tensor_util.make_ndarray(e.tensor_proto).item())
            for e in acc.Tensors(metadata.CONFIG_SUMMARY_TAG)]


def test_custom_scalars_layout_shows_the_posts_curves_first(short_run):
    import re

    model_dir, _ = short_run
    (layout,) = read_layout(str(model_dir))                # written once
    first = layout.category[0]
    assert not first.closed
    logged = set(events.read_all_scalars(str(model_dir), tags.TRAIN_DIR)) | set(
        events.read_all_scalars(str(model_dir), tags.VALIDATION_DIR))
    chart_tags = [[t for t in logged if any(re.search(rx, t) for rx in chart.multiline.tag)]
                  for chart in first.chart]
    # The three curves of the post come first, one tag each; every chart shows something.
    assert chart_tags[:3] == [[tags.EPOCH_ACCURACY], [tags.CONV_SQSUM], [tags.CONV_RELATIVE_STEP]]
    assert "test accuracy" in first.chart[0].title
    assert all(chart_tags)
    # The per-layer curves are apart, folded, and only there.
    per_layer = [t for c in layout.category[1:] for chart in c.chart for rx in chart.multiline.tag
                 for t in logged if re.search(rx, t)]
    # every per-layer diagnostic of the step (conv_sqsum, relative step, factor, angular update), per layer
    from resnet_cifar.models import DIAGNOSTICS
    assert len(per_layer) == sum(1 for d in DIAGNOSTICS if d.layers) * len(LAYERS) == 4 * len(LAYERS)
    assert all(c.closed for c in layout.category[1:])
    assert not set(per_layer) & {t for ts in chart_tags for t in ts}


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
    # The code's commit, as git itself names it (None for a copy outside a git checkout).
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True)
    want_commit = head.stdout.strip() if head.returncode == 0 else None
    assert rc["source"]["commit"] == want_commit and rc["sources"] == [rc["source"]]
    # oneDNN: the entry point's default (on) unless the environment says otherwise,
    # as TensorFlow itself reports it; TF's default thread pools.
    want = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1")
    runtime = rc["runtime"]
    assert runtime["TF_ENABLE_ONEDNN_OPTS"] == want
    if platform.machine() in ("x86_64", "AMD64"):        # TF's x86 builds carry oneDNN
        assert runtime["onednn"] is (want == "1")
    assert (runtime["intra_op_threads"], runtime["inter_op_threads"]) == (0, 0)
    assert runtime["cpu_count"] == os.cpu_count() and runtime["cpu"]


@pytest.mark.parametrize("preset,want", [(None, "1"), ("0", "0"), ("1", "1")])
def test_entry_point_chooses_onednn_before_tensorflow_is_imported(preset, want):
    """oneDNN is fixed when TF is imported: importing the entry point must set the
    default (keeping the user's value) and must not import TensorFlow itself."""
    environ = env()
    environ.pop("TF_ENABLE_ONEDNN_OPTS", None)
    if preset is not None:
        environ["TF_ENABLE_ONEDNN_OPTS"] = preset
    code = ("import os, sys; import resnet_cifar.train; "
            "print(os.environ.get('TF_ENABLE_ONEDNN_OPTS'), 'tensorflow' in sys.modules, 'keras' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environ, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [want, "False", "False"]


def test_progress_output(short_run):
    _, r = short_run
    lines = [line for line in r.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split(" | ")[0] for line in lines] == [f"epoch {i}/4" for i in range(1, 5)]
    assert all("ETA" in line and "test acc" in line for line in lines)
    # One summary line per epoch, each with its ETA.
    assert len([line for line in r.stdout.splitlines() if ", ETA " in line]) == 4


def block_lines(stdout):
    """The end-of-run block: the lines between the last two rules of dashes."""
    lines = stdout.splitlines()
    rules = [i for i, line in enumerate(lines) if line and set(line) == {"-"}]
    assert len(rules) >= 2, stdout[-2000:]
    return lines[rules[-2] + 1:rules[-1]]


def assert_final_block(stdout, model_dir, epochs):
    """The block's numbers against the event files, its paths against the disk."""
    block = "\n".join(block_lines(stdout))
    d = os.path.abspath(str(model_dir))
    _, acc = events.read_scalars(d, tags.EPOCH_ACCURACY, tags.VALIDATION_DIR)
    _, loss = events.read_scalars(d, tags.EPOCH_LOSS, tags.TRAIN_DIR)
    _, sqsum = events.read_scalars(d, tags.CONV_SQSUM, tags.TRAIN_DIR)
    assert f"finished: {epochs} epochs" in block
    assert f"test accuracy  {100 * acc[-1]:.2f} %" in block, block
    assert f"train loss     {loss[-1]:.4f}" in block, block
    assert f"conv_sqsum     {sqsum[-1]:.1f}" in block, block
    for path in (os.path.join(d, tags.TRAIN_DIR), os.path.join(d, tags.VALIDATION_DIR),
                 os.path.join(d, "checkpoints"), os.path.join(d, tags.RUN_CONFIG_FILE),
                 os.path.join(d, tags.DONE_FILE)):
        assert path in block and os.path.exists(path), path
    command = next(line for line in block.splitlines() if "tensorboard --logdir" in line)
    assert command.split("TensorBoard: ", 1)[1] == f"tensorboard --logdir {d}"


def test_final_block(short_run):
    model_dir, r = short_run
    assert_final_block(r.stdout, model_dir, 4)


def test_progress_bar_and_epoch_summary_on_separate_lines(tmp_path):
    """verbose=1: Keras' progress bar rewrites its line with \\r; the summary starts a new one."""
    model_dir = tmp_path / "run"
    r = train_cli(f"--model_dir={model_dir}", "--data_source=synthetic", "--train_epochs=2",
                  "--steps_per_epoch=3", "--eval_steps=1", "--batch_size=8", "--verbose=1", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.split("\n")
    at = [i for i, line in enumerate(lines) if ", ETA " in line]
    assert [lines[i].split(" | ")[0] for i in at] == ["epoch 1/2", "epoch 2/2"], r.stdout
    # Each follows its epoch's finished bar (with the test metrics), not a bar still running.
    assert all("━" in lines[i - 1] and "val_accuracy" in lines[i - 1] for i in at), r.stdout
    assert_final_block(r.stdout, model_dir, 2)


def test_finished_run_rerun_is_a_no_op(short_run):
    model_dir, _ = short_run
    before = sorted(os.listdir(model_dir / tags.TRAIN_DIR))
    r = train_cli(f"--model_dir={model_dir}", "--data_source=binary", "--data_dir=/nonexistent",
                  "--train_epochs=4", "--steps_per_epoch=8", "--batch_size=32", "--boundary_epochs=3",
                  "--decay_rates=1,0.1", "--seed=3", timeout=120)
    assert r.returncode == 0 and "already finished" in r.stdout, r.stderr
    assert sorted(os.listdir(model_dir / tags.TRAIN_DIR)) == before


def test_other_flags_on_same_model_dir_are_refused(short_run):
    model_dir, _ = short_run
    r = train_cli(f"--model_dir={model_dir}", "--data_source=binary", "--data_dir=/nonexistent",
                  "--train_epochs=4", "--steps_per_epoch=8", "--batch_size=32", "--boundary_epochs=3",
                  "--decay_rates=1,0.1", "--seed=3", "--noconv_l2", "--bn_decay=0.98", timeout=120)
    line = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(line) == 1, r.stderr
    assert "--conv_l2: True -> False" in line[0] and "--bn_decay: 0.997 -> 0.98" in line[0]
    assert (model_dir / tags.DONE_FILE).exists()     # nothing damaged


def test_deterministic_runs_are_bit_identical(tmp_path):
    """Two --deterministic runs at the real batch size give the same weights bit for bit.

    At batch 128 on a multi-core CPU, op determinism alone is not enough: with more
    than one inter-op thread the gradients differed in their last bits between
    evaluations (oneDNN on or off), and after a few steps in every weight.
    """
    import tensorflow as tf

    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        r = train_cli(f"--model_dir={d}", "--data_source=synthetic", "--deterministic", "--train_epochs=1",
                      "--steps_per_epoch=3", "--eval_steps=1", "--verbose=0", timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]

    def weights(d):
        reader = tf.train.load_checkpoint(str(d / "checkpoints"))
        return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
                if name.startswith(("model/", "optimizer/"))}

    a, b = weights(dirs[0]), weights(dirs[1])
    assert a.keys() == b.keys() and len(a) > 100
    assert [name for name in a if not np.array_equal(a[name], b[name])] == []
    with open(dirs[0] / tags.RUN_CONFIG_FILE) as f:
        assert json.load(f)["runtime"]["inter_op_threads"] == 1
