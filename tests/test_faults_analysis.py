"""Hostile inputs and faults of the analysis commands (issue 22), through real processes and files.

A damaged event file must not pass for a finished run; precise_bn and equivalence end
a failed write in one line and leave no half-written file; every module the README
and docs name as a command runs as one.
"""

import functools
import glob
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from analysis import precise_bn
from resnet_cifar import events, run_dir, tags
from tests.cifar_files import write_binary_cifar
from tests.helpers import ROOT, one_error_line, python, tmpfs

# `python -m module *args`, TensorFlow's C++ log level 2.
command = functools.partial(python, "-m", log_level=2)


@pytest.fixture
def run(finished, tmp_path):
    path = str(tmp_path / "results" / "baseline")
    shutil.copytree(finished, path)
    return path


# ------------------------------------------------------------------ 5. damaged event files


def _records(path):
    """Byte offsets where each TFRecord of an event file ends."""
    with open(path, "rb") as f:
        data = f.read()
    ends, pos = [], 0
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 8], "little")
        pos += 8 + 4 + length + 4
        ends.append(pos)
    return ends


@pytest.mark.parametrize("subdir", [tags.TRAIN_DIR, tags.VALIDATION_DIR])
@pytest.mark.parametrize("damage", ["empty", "cut at a record boundary"])
def test_a_finished_run_with_short_event_files_is_not_complete(run, subdir, damage):
    assert events.load_run(run).complete and events.is_complete(run)
    path, = glob.glob(os.path.join(run, subdir, "*tfevents*"))
    ends = _records(path)
    with open(path, "r+b") as f:
        f.truncate(0 if damage == "empty" else ends[len(ends) // 2])
    loaded = events.load_run(run)
    assert loaded.damaged == []                 # reads back without an error ...
    assert not loaded.complete and not events.is_complete(run)   # ... but holds fewer epochs
    r = command("analysis.make_figures", os.path.dirname(run), "--out", os.path.join(run, "..", "figures"))
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(run, "..", "figures", "summary.csv")) as f:
        assert ",no," in f.read().splitlines()[1]


# ------------------------------------------------------------------ 6. analysis outputs


def test_precise_bn_does_not_trust_a_dangling_index(run):
    os.remove(os.path.join(run, tags.FINAL_WEIGHTS_FILE))   # evaluated from checkpoints, as without it
    for name in os.listdir(os.path.join(run, run_dir.CHECKPOINTS)):
        if name.startswith("ckpt-2."):          # the index still names ckpt-2
            os.remove(os.path.join(run, run_dir.CHECKPOINTS, name))
    r = command("analysis.precise_bn", run, "--bn_batches=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert precise_bn.read_result(run)["checkpoint"] == "ckpt-1"


@pytest.mark.parametrize("damage", ["truncated data", "missing .index", "missing data"])
def test_precise_bn_of_a_damaged_phase_end_checkpoint(run, damage):
    """The finished fixture run (2 epochs, rate drop after epoch 1) keeps ckpt-1 in phase_ends/
    and in its rotation. A damaged kept copy: --epoch=1 evaluates the rotation's; with that
    gone too, one line names the damaged file."""
    from resnet_cifar import checkpoints

    kept = os.path.join(run, run_dir.CHECKPOINTS, checkpoints.PHASE_ENDS)
    assert checkpoints.numbers_on_disk(kept) == [1]
    data_file, = glob.glob(os.path.join(kept, "ckpt-1.data-*"))
    if damage == "truncated data":
        with open(data_file, "r+b") as f:
            f.truncate(os.path.getsize(data_file) // 2)
    else:
        os.remove(os.path.join(kept, "ckpt-1.index") if damage == "missing .index" else data_file)
    r = command("analysis.precise_bn", run, "--bn_batches=2", "--epoch=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert precise_bn.read_result(run, epoch=1)["checkpoint"] == "ckpt-1"

    for name in os.listdir(os.path.join(run, run_dir.CHECKPOINTS)):
        if name.startswith("ckpt-1."):
            os.remove(os.path.join(run, run_dir.CHECKPOINTS, name))
    r = command("analysis.precise_bn", run, "--bn_batches=2", "--epoch=1", "--again")
    one_error_line(r, 1, "the checkpoint of epoch 1 does not read back whole",
                   os.path.join(run_dir.CHECKPOINTS, checkpoints.PHASE_ENDS, "ckpt-1"))


def test_precise_bn_and_equivalence_refuse_an_out_that_is_a_file(run, tmp_path):
    out = tmp_path / "out"
    out.write_text("a file\n")
    one_error_line(command("analysis.precise_bn", run, "--bn_batches=2", f"--out={out}"), 2, str(out))
    one_error_line(command("analysis.equivalence", tmp_path, f"--out={out}"), 2, str(out))
    assert out.read_text() == "a file\n"


@pytest.fixture
def disk(tmp_path):
    """A small tmpfs; skipped where mounting is not allowed."""
    with tmpfs(tmp_path / "disk", "32m") as mount:
        yield mount


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_precise_bn_on_a_full_or_read_only_disk_is_one_line_and_writes_nothing(run, disk, fault):
    target = disk / "baseline"
    shutil.copytree(run, target)
    if fault == "full":
        with open(disk / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 2**20)
                    f.flush()
            except OSError:
                pass
    else:
        assert subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True).returncode == 0
    r = command("analysis.precise_bn", target, "--bn_batches=2")
    one_error_line(r, 1, precise_bn.RESULT_FILE)
    assert not os.path.exists(target / precise_bn.RESULT_FILE)
    assert not glob.glob(str(target / "*.tmp*"))
    if fault == "full":
        os.remove(disk / "filler")
        r = command("analysis.precise_bn", target, "--bn_batches=2")      # the retry just works
        assert r.returncode == 0, r.stderr[-3000:]
        assert precise_bn.read_result(str(target))["epoch"] == 2


def test_precise_bn_labels_evaluation_on_other_data(run, tmp_path):
    data = write_binary_cifar(str(tmp_path / "data"), per_train_file=16, num_test=16)
    r = command("analysis.precise_bn", run, "--bn_batches=2", "--data_source=binary", f"--data_dir={data}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(on binary data, not the run's)" in r.stdout, r.stdout
    result = precise_bn.read_result(run, "binary")
    assert result["own_data"] is False and result["data_source"] == "binary"
    assert os.path.isfile(os.path.join(run, "precise_bn.binary.json"))
    assert precise_bn.read_result(run) is None and np.isnan(precise_bn.accuracy_at(run, 2))


def test_precise_bn_on_other_data_keeps_the_runs_own_result(run, tmp_path):
    """A run shared with its precise_bn.json, evaluated by a user on other data: the run's
    own number (what the tables report) stays as it was, byte for byte."""
    r = command("analysis.precise_bn", run, "--bn_batches=2")
    assert r.returncode == 0, r.stderr[-3000:]
    own_file = os.path.join(run, precise_bn.RESULT_FILE)
    with open(own_file, "rb") as f:
        own = f.read()
    data = write_binary_cifar(str(tmp_path / "data"), per_train_file=16, num_test=16)
    r = command("analysis.precise_bn", run, "--bn_batches=2", "--data_source=binary", f"--data_dir={data}")
    assert r.returncode == 0, r.stderr[-3000:]
    with open(own_file, "rb") as f:
        assert f.read() == own
    assert precise_bn.read_result(run, "binary")["own_data"] is False


def test_equivalence_skips_a_run_with_garbage_run_config(finished, tmp_path):
    results = tmp_path / "results"
    for seed in (0, 1):
        shutil.copytree(finished, results / "weight_decay=2e-4" / "baseline" / f"seed_{seed}")
    bad = results / "weight_decay=2e-4" / "conv_lr_scale" / "seed_0"
    shutil.copytree(finished, bad)
    (bad / tags.RUN_CONFIG_FILE).write_text("{garbage")
    r = command("analysis.equivalence", results)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"skipped {bad}" in r.stderr
    assert os.path.exists(results / "figures" / "equivalence.md")


def test_equivalence_with_only_unreadable_replays_fails_naming_them(finished, tmp_path):
    """One baseline and one replay whose run_config.json is garbage: nothing can be compared,
    which is an error (exit 1) after the note naming the skipped run, never a silent success."""
    results = tmp_path / "results"
    shutil.copytree(finished, results / "weight_decay=2e-4" / "baseline" / "seed_0")
    bad = results / "weight_decay=2e-4" / "conv_lr_scale" / "seed_0"
    shutil.copytree(finished, bad)
    (bad / tags.RUN_CONFIG_FILE).write_text("{garbage")
    r = command("analysis.equivalence", results)
    assert r.returncode == 1, r.stderr[-3000:]
    assert f"skipped {bad}" in r.stderr and "error: " in r.stderr and "nothing to compare" in r.stderr
    assert not os.path.exists(results / "figures" / "equivalence.md")


def test_two_spellings_of_one_weight_decay_are_one_point(finished, tmp_path):
    """weight_decay=2e-4/ and weight_decay=0.0002/: their runs are pooled as one point (two
    baseline seeds, so a noise-floor row of one pair), with a note; neither is dropped."""
    from analysis import equivalence

    results = tmp_path / "results"
    shutil.copytree(finished, results / "weight_decay=2e-4" / "baseline" / "seed_0")
    shutil.copytree(finished, results / "weight_decay=0.0002" / "baseline" / "seed_1")
    grid = equivalence.load_grid(str(results))
    assert list(grid) == [2e-4] and len(grid[2e-4]["baseline"]) == 2
    r = command("analysis.equivalence", results)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "is the weight decay 2e-4 of another folder" in r.stderr


# ------------------------------------------------------------------ 8. every named command runs


def named_commands():
    names = set()
    for path in [os.path.join(ROOT, "README.md")] + glob.glob(os.path.join(ROOT, "docs", "*.md")):
        with open(path) as f:
            names |= set(re.findall(r"python -m ((?:analysis|experiments|resnet_cifar)\.[a-z_]+)", f.read()))
    return sorted(names | {"analysis.grid"})


@pytest.mark.parametrize("module", named_commands())
def test_every_named_command_runs_as_one(module):
    r = command(module, "--help", timeout=120)
    assert "Traceback" not in r.stderr
    assert r.returncode == 0, r.stderr[-2000:]          # the help asked for is a success (absl's says 1)
    assert "--" in r.stdout and len(r.stdout) > 200, (module, r.stdout, r.stderr[-2000:])


@pytest.mark.parametrize("module", named_commands())
def test_every_named_command_refuses_an_unknown_flag_in_one_line(module):
    r = command(module, "--no_such_flag=1", timeout=120)
    one_error_line(r, 2, "no_such_flag")


def test_analysis_grid_draws_the_grid(finished, tmp_path):
    results = tmp_path / "results"
    for wd in ("1e-4", "2e-4"):
        shutil.copytree(finished, results / f"weight_decay={wd}" / "baseline" / "seed_0")
    r = command("analysis.grid", results)
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.exists(results / "figures" / "grid.csv")
    one_error_line(command("analysis.grid", tmp_path / "nothing"), 2, "no such folder")
    with open(results / "figures" / "grid.csv") as f:
        assert len(f.read().splitlines()) == 3


@pytest.mark.parametrize("name, typo, option", [
    ("claims", "--markdwon", "--markdown"), ("make_figures", "--outt=x", "--out"),
    ("precise_bn", "--bn_batch=3", "--bn_batches"), ("grid", "--outdir=x", "--out_dir"),
    ("equivalence", "--out-dir=x", "--out_dir")])
def test_analysis_argument_errors_are_one_line_exit_2(name, typo, option, tmp_path, capsys):
    """A misspelled option (named before the missing folder, with the closest option), an option
    prefix, and a file given as the results folder: one line `error: ...`, exit code 2."""
    import importlib

    main = importlib.import_module(f"analysis.{name}").main
    a_file = tmp_path / "a_file"
    a_file.write_text("")

    def error(argv):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), (argv, code, err)
        return err.strip()

    assert error([typo]) == f"error: unrecognized argument {typo}; did you mean {option}?"
    assert error([option[:4], str(tmp_path)]).startswith(f"error: unrecognized argument {option[:4]}")  # no prefixes
    assert error([str(a_file)]) == f"error: {a_file} is a file, not a folder"
    assert error([str(tmp_path / "nothing")]) == f"error: no such folder: {tmp_path / 'nothing'}"
    if name != "claims":                                     # the commands that write files
        assert error([str(tmp_path), f"--out={a_file}"]) == f"error: --out={a_file} is a file, not a folder"



@pytest.mark.parametrize("name", ["claims", "make_figures"])
def test_output_into_a_pipe_whose_reader_has_gone_is_quiet(name, run, tmp_path):
    """`python -m analysis.X RESULTS | head`: once the reader is gone (here before the first
    byte), the command ends with exit code 1 and nothing on stderr, not a BrokenPipeError
    traceback."""
    import subprocess
    import sys

    from tests.helpers import env

    read, write = os.pipe()
    os.close(read)
    try:
        r = subprocess.run([sys.executable, "-m", f"analysis.{name}", os.path.dirname(run)]
                           + (["--out", str(tmp_path / "figures")] if name == "make_figures" else []),
                           cwd=ROOT, env=env(2), stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr[-2000:]


# ------------------------------------------------------------------ 9. integer options at absurd sizes


HUGE = "100000000000000000000"


@pytest.mark.parametrize("module,args,needle", [
    ("experiments.run_all", ["--results_dir=x", f"--seeds={HUGE}"], "--seeds: 100000000000000000000 must be at most 10000"),
    ("experiments.run_all", ["--results_dir=x", "--seeds=10001"], "must be at most 10000"),
    ("experiments.run_all", ["--results_dir=x", f"--runs_per_gpu={HUGE}"], "--runs_per_gpu"),
    ("experiments.run_all", ["--results_dir=x", f"--max_retries={HUGE}"], "--max_retries"),
    ("analysis.precise_bn", [".", f"--epoch={HUGE}"], "--epoch"),
    ("analysis.precise_bn", [".", f"--bn_batches={HUGE}"], "--bn_batches"),
    ("experiments.benchmark", [f"--steps={HUGE}"], f"--steps={HUGE} must be at most 2147483647"),
    ("experiments.benchmark", [f"--repeats=-{HUGE}"], "--repeats"),
])
def test_integer_options_at_absurd_sizes_are_one_line(tmp_path, module, args, needle):
    """Every command's integer options refuse what no count can be, in one line, exit 2,
    before any work starts (the trainer's: tests/test_faults_train.py)."""
    r = python("-m", module, *args, log_level=2, timeout=120)
    one_error_line(r, 2, needle)


def test_every_integer_option_of_the_commands_is_bounded():
    """No argparse option of the runner and the analysis commands parses with a bare int, and
    every absl integer flag of the benchmark is bounded: the list above cannot miss a new one."""
    import inspect

    from analysis import equivalence, grid, make_figures, precise_bn as pb, record_data
    from experiments import run_all

    for module in (run_all, pb, equivalence, grid, make_figures, record_data):
        source = inspect.getsource(module)
        assert "type=int" not in source, module.__name__
    # The benchmark's absl flags in a process of their own (the trainer's share names with them).
    r = python("-c", "from absl import flags; from experiments import benchmark as b; "
               "names = [f.name for f in b.FLAGS.get_flags_for_module(b.__name__) "
               "if isinstance(f.parser, flags.IntegerParser)]; "
               "print(len(names), all(b.FLAGS[f].validators for f in names))", timeout=120)
    assert r.returncode == 0 and r.stdout.split() == [r.stdout.split()[0], "True"] and int(r.stdout.split()[0]) > 3, \
        r.stdout + r.stderr[-2000:]
