"""The runner on Ray (experiments/run_all.py, plan.py, sweep.py, progress.py).

Plan and flag checks run without Ray. The sweeps run real Ray (a local instance
started once for this module, and a separate head process started by one test
on 127.0.0.1) and real training processes on tiny synthetic runs.
"""

import contextlib
import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from experiments import plan, run_all, sweep
from experiments.progress import Progress
from experiments.progress import clock as progress_clock
from resnet_cifar import config as config_lib
from resnet_cifar import checkpoints, events, process, tags
from tests.helpers import ROOT, TINY, assert_same_curves, parse

ALL_RUNS = list(plan.POST_RUNS) + ["conv_lr_scale_per_layer"]
REPLAYING = ("conv_lr_scale", "conv_lr_scale_bn098", "conv_lr_scale_per_layer")
WEIGHT_DECAYS = ("2e-4", "1e-3")
# 2 grid points x 2 runs (the baseline and a run replaying it), 2 runs at a time on 2 CPUs.
SWEEP = ["--preset=quick", "--runs=baseline,conv_lr_scale", f"--grid=weight_decay={','.join(WEIGHT_DECAYS)}",
         "--cpus_per_run=1", "--status_every=1"]


def main(argv, out=None):
    """run_all.main in this process: (exit code, stdout + stderr)."""
    out = out or io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = run_all.main(argv)
        except SystemExit as e:
            code = e.code
    return code, out.getvalue()


# ----------------------------------------------------------------------------- plan (no Ray)


def test_presets_are_the_folders_of_flagfiles_and_their_default_runs():
    found = plan.presets()
    experiments = os.path.join(ROOT, "experiments")
    folders = {name for name in os.listdir(experiments)
               if os.path.isfile(os.path.join(experiments, name, f"{plan.BASELINE}.flags"))}
    assert set(found) == folders and "full" in folders and "quick" in folders
    for folder in found.values():
        assert plan.run_names(folder)[0] == plan.BASELINE          # baselines first
        assert not any(name.startswith("_") for name in plan.run_names(folder))    # _common.flags
        assert set(plan.default_runs(folder)) <= set(plan.run_names(folder))
    # the post's four; the per-layer run is named in their optional_runs.txt
    assert plan.default_runs(found["full"]) == plan.default_runs(found["quick"]) == list(plan.POST_RUNS)
    assert "conv_lr_scale_per_layer" in plan.run_names(found["full"])
    assert plan.default_runs(found["equivalence"]) == plan.run_names(found["equivalence"])


def test_a_copied_preset_folder_runs_as_a_new_preset(tmp_path):
    """experiments/ copied with one more folder (a copy of quick): --help lists it and a run of it
    finishes, with no code change."""
    shutil.copytree(os.path.join(ROOT, "experiments"), tmp_path / "experiments",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(os.path.join(ROOT, "experiments", "quick"), tmp_path / "experiments" / "mine")
    env = dict({k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"},
               PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
    help_text = subprocess.run([sys.executable, "-m", "experiments.run_all", "--help"], cwd=tmp_path,
                               capture_output=True, text=True, env=env, timeout=120).stdout
    assert "mine: baseline, noconv_l2" in " ".join(help_text.split())
    results = tmp_path / "results"
    r = subprocess.run([sys.executable, "-m", "experiments.run_all", f"--results_dir={results}",
                        "--preset=mine", "--runs=baseline", "--", *TINY], cwd=tmp_path,
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert events.is_complete(str(results / "baseline" / "seed_0"))


def test_plan_grid_folders_order_and_dependencies(tmp_path):
    grid = [("weight_decay", ["1e-4", "5e-4"]), ("bn_decay", ["0.9", "0.99"])]
    runs = plan.plan(str(tmp_path), "quick", ALL_RUNS, 2, grid, ["--data_source=synthetic"])
    assert len(runs) == 4 * 2 * len(ALL_RUNS)
    points = {r.point for r in runs}
    assert points == {(("weight_decay", w), ("bn_decay", b)) for w in ("1e-4", "5e-4") for b in ("0.9", "0.99")}
    for r in runs:
        point = f"weight_decay={r.point[0][1]},bn_decay={r.point[1][1]}"
        assert r.run_dir == os.path.join(str(tmp_path), point, r.name, f"seed_{r.seed}")
        if r.name in REPLAYING:      # that grid point's and seed's baseline
            assert r.needs == os.path.join(str(tmp_path), point, "baseline", f"seed_{r.seed}")
        else:
            assert r.needs is None
        cfg = parse(r.command()[3:])
        assert cfg.weight_decay == float(r.point[0][1]) and cfg.seed == r.seed
        # The grid value wins over the flagfile's, for every run (conv_lr_scale_bn098 sets 0.98).
        assert cfg.bn_decay == float(r.point[1][1])
        assert cfg.replay_from == r.needs and cfg.model_dir == r.run_dir and cfg.data_source == "synthetic"
    order = [r.run_dir for r in runs]
    assert all(order.index(r.needs) < order.index(r.run_dir) for r in runs if r.needs)


def test_plan_without_grid_keeps_the_old_layout(tmp_path):
    runs = plan.plan(str(tmp_path), "full", ["baseline", "noconv_l2"], 1)
    assert [r.run_dir for r in runs] == [str(tmp_path / "baseline" / "seed_0"),
                                         str(tmp_path / "noconv_l2" / "seed_0")]
    # The full baseline is exactly the program's default run (the flagfile only documents it).
    base = parse(runs[0].command()[3:])
    assert base == config_lib.TrainConfig(model_dir=base.model_dir, verbose=0)


# name -> (conv_l2, conv_grad_scale, bn_decay, conv_lr_factor)
QUICK = {"baseline": (True, False, 0.997, "piecewise"),
         "noconv_l2": (False, False, 0.997, "piecewise"),
         "conv_lr_scale": (False, True, 0.997, "replay"),
         "conv_lr_scale_bn098": (False, True, 0.98, "replay"),
         "conv_lr_scale_per_layer": (False, True, 0.997, "per_layer")}
FULL = dict(QUICK, conv_lr_scale=(False, True, 0.997, "piecewise"),
            conv_lr_scale_bn098=(False, True, 0.98, "piecewise"))


# preset -> its runs as above, and its schedule (train_epochs, boundary_epochs, steps_per_epoch)
POST_PRESETS = {"quick": (QUICK, (6, (2.0, 4.0), 160)), "full": (FULL, (150, (50.0, 100.0), None))}


@pytest.mark.parametrize("preset", sorted(plan.presets()))
def test_flagfiles_parse_to_the_intended_runs(tmp_path, preset):
    """Every preset: its runs share one schedule, weight decay and optimizer (its _common.flags),
    the baseline keeps conv L2 unscaled, and a run replays the baseline exactly when its factor
    says so. The post's presets: each run's switches and the schedule, as intended."""
    runs = plan.plan(str(tmp_path), preset, plan.run_names(plan.presets()[preset]), 1)
    configs = {r.name: parse(r.command()[3:]) for r in runs}
    shared = {(c.train_epochs, c.boundary_epochs, c.steps_per_epoch, c.decay_rates, c.weight_decay, c.batch_size,
               c.optimizer) for c in configs.values()}
    assert len(shared) == 1, shared
    base = configs[plan.BASELINE]
    assert base.conv_l2 and not base.conv_grad_scale and base.replay_from is None
    for r in runs:
        cfg = configs[r.name]
        assert r.train_epochs == cfg.train_epochs
        assert (r.needs is not None) == (cfg.conv_grad_scale and cfg.conv_lr_factor in plan.REPLAY_FACTORS)
    if preset not in POST_PRESETS:
        return
    want, schedule = POST_PRESETS[preset]
    assert set(configs) == set(want)
    for name, cfg in configs.items():
        assert (cfg.conv_l2, cfg.conv_grad_scale, cfg.bn_decay, cfg.conv_lr_factor) == want[name], name
        assert cfg.weight_decay == 2e-4 and cfg.batch_size == 128 and cfg.decay_rates == (1.0, 0.1, 0.01)
        assert (cfg.train_epochs, cfg.boundary_epochs, cfg.steps_per_epoch) == schedule


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: --results_dir"),
    (["--grid=nosuch=1,2"], "--nosuch is not a training flag"),
    (["--grid=weight_decay"], "expected FLAG=VALUE1,VALUE2"),
    (["--grid=weight_decay=1e-4", "--grid=weight_decay=2e-4"], "given twice"),
    (["--grid=seed=1,2"], "--seed is set by the runner (use --seeds)"),
    (["--grid=weight_decay=abc"], "run weight_decay=abc/baseline/seed_0: flag --weight_decay=abc"),
    (["--seeds=0"], "argument --seeds: 0 must be positive"),
    (["--runs=baseline,nosuchrun"], "no flagfile"),
    (["--preset=quick", "--runs=conv_lr_scale"], "replays the baseline: include baseline in --runs"),
    (["--gpus=0,1"], "--gpus is gone"),
    # No option prefixes (the trainer's --seed=3 is not --seeds=3), and an unknown option is
    # reported before a missing --results_dir, with the closest option.
    (["--seed=3"], "unrecognized argument --seed=3; did you mean --seeds?"),
    (["--run=baseline"], "unrecognized argument --run=baseline; did you mean --runs?"),
    (["--results=x"], "unrecognized argument --results=x; did you mean --results_dir?"),
    # The trainer's flags before `--`: where they go.
    (["--data_source=binary"], "--data_source is a training flag: give it after `--`, which passes what "
                               "follows to every run (... -- --data_source=binary)"),
    (["--noconv_l2"], "--noconv_l2 is a training flag: give it after `--`"),
    (["--", "--seed=3"], "the runner sets --seed for each run; use --seeds=N"),
    (["--grid=bn_decay=0.9", "--", "--bn_decay=0.5"], "already a --grid flag"),
    (["--", "--train_epochs=0"], "run baseline/seed_0: --train_epochs=0 must be positive"),
    (["--", "--data_source=binary"], "run baseline/seed_0: --data_source=binary needs --data_dir"),
    (["--", "--data_source=binary", "--data_dir="], "run baseline/seed_0: --data_source=binary needs --data_dir"),
    (["--cpus_per_run=-1"], "must be positive"),
    # Every float option refuses nan and inf.
    *[([f"--{option}={value}"], f"argument --{option}: {value} is not a finite number")
      for option in ("cpus_per_run", "status_every") for value in ("nan", "inf", "-inf")],
    # A run is a plain name of the preset, never a path.
    (["--preset=quick", "--runs=../baseline"], "no flagfile ../baseline.flags"),
    (["--runs=/tmp/baseline"], "no flagfile /tmp/baseline.flags"),
    (["--preset=equivalence", "--runs=noconv_l2,baseline"], "no flagfile noconv_l2.flags"),
    (["--preset=quick", "--runs=_common"],
     "--runs: _common.flags holds flags that the runs of preset quick include; it is not a run"),
    # Grid keys and arguments after -- are the training program's own flags, not absl's.
    *[([f"--grid={flag}=true"], f"--{flag} is not a training flag")
      for flag in ("only_check_args", "helpfull", "flagfile", "verbosity", "undefok")],
    (["--", "--data_source=synthetic", "stray"], "stray after --: not a training flag"),
    (["--runs="], "--runs= names no run"),
    (["--runs=,,"], "--runs=,, names no run"),
    (["--", "--only_check_args"], "--only_check_args after --: not a training flag"),
    (["--", "--helpfull"], "--helpfull after --: not a training flag"),
    (["--grid=noconv_l2=true", "--", "--flag_noconv_l2"], "--flag_noconv_l2 is already a --grid flag"),
])
def test_bad_arguments_one_error_line_exit_2_nothing_written(tmp_path, argv, message):
    results = tmp_path / "results"
    code, out = main(([f"--results_dir={results}"] if argv else []) + argv)
    assert code == 2, out
    assert out.count("\n") == 1 and out.startswith("error: ") and message in out, out
    assert not results.exists()


def test_help_is_readable():
    code, out = main(["--help"])
    assert code == 0
    for needle in ("--results_dir", "--grid FLAG=V1,V2,...", "--address", "--runs_per_gpu", "--cpus_per_run",
                   "--seeds", "examples:", "-- TRAINING_FLAGS"):
        assert needle in out, needle
    assert "--gpus" not in out


def test_progress_eta_and_table_on_change():
    runs = [plan.Run(n, 0, (), f"/r/{n}", (), 10) for n in ("a", "b", "c")]
    lines = []
    progress = Progress(runs, [], log=lines.append, every=3600)
    now = time.time()
    # a: 4 epochs in 40 s since it started at epoch 0, so 10 s/epoch and 6 epochs (60 s) left.
    progress.update({"a/seed_0": dict(state="running", epoch=4, first_epoch=0, since=now - 40,
                                      epoch_time=now, node="10.0.0.1")})
    # Nothing finished: a whole run is 10 epochs x 10 s; b and c wait; one runs at a time.
    assert progress.eta() == pytest.approx(60 + 2 * 100, abs=1.0)
    progress.table(force=True)
    assert lines[0].startswith("3 runs: 0 done, 1 running, 2 waiting, 0 failed")
    # The time left is a duration, the ETA the clock time it ends at (here 260 s from now).
    assert re.search(r"\| time left 0:04:(19|20), ETA ((Mon|Tue|Wed|Thu|Fri|Sat|Sun) )?\d\d:\d\d$", lines[0]), lines[0]
    assert lines[0].endswith(time.strftime("%H:%M", time.localtime(now + 260))), lines[0]
    assert progress_clock(now + 2 * 86400) == time.strftime("%a %H:%M", time.localtime(now + 2 * 86400))
    assert re.match(r"  running +a/seed_0 +epoch 4/10 on 10\.0\.0\.1$", lines[1]), lines
    progress.table()                      # nothing changed (and too soon): no new lines
    assert len(lines) == 2
    progress.finish("a/seed_0", dict(label="a/seed_0", status="done", seconds=90.0, epochs=10, epoch_seconds=9.0))
    assert lines[-1] == "done     a/seed_0 (0:01:30; 10 epochs, 9 s each)"
    # A finished run's seconds per epoch is the estimate for the waiting ones: 2 x 10 epochs x 9 s.
    assert progress.eta() == pytest.approx(2 * 10 * 9, abs=1.0)


def test_progress_eta_counts_resumed_runs_by_their_epochs_left(tmp_path):
    # The campaign's case: the baseline finished before; NoConvL2 resumes at epoch 110 of 150,
    # finishes after 40 epochs of 100 s (1 hour 7 min); two runs of 150 epochs wait.
    names = ("baseline", "noconv_l2", "conv_lr_scale", "conv_lr_scale_bn098")
    runs = [plan.Run(n, 0, (), str(tmp_path / n), (), 150) for n in names]
    ckpts = tmp_path / "noconv_l2" / tags.CHECKPOINTS_DIR
    ckpts.mkdir(parents=True)
    (ckpts / checkpoints.INDEX_FILE).write_text('model_checkpoint_path: "ckpt-110"\n')
    progress = Progress(runs, ["baseline/seed_0"], log=[].append, every=3600)
    now = time.time()
    progress.update({"noconv_l2/seed_0": dict(state="running", epoch=110, first_epoch=110, since=now,
                                              epoch_time=None)})
    # Before its first epoch ends nothing is timed yet.
    assert progress.eta() is None
    progress.update({"noconv_l2/seed_0": dict(state="running", epoch=112, first_epoch=110, since=now - 200,
                                              epoch_time=now)})
    assert progress.eta() == pytest.approx((38 + 150 + 150) * 100, abs=1.0)
    progress.finish("noconv_l2/seed_0", dict(label="noconv_l2/seed_0", status="done", seconds=4000.0,
                                             epochs=40, epoch_seconds=100.0))
    progress.update({"conv_lr_scale/seed_0": dict(state="running", epoch=0, first_epoch=0, since=now,
                                                  epoch_time=None)})
    # Its 4000 s are 40 epochs, not a whole run: two runs of 150 epochs at 100 s are left.
    assert progress.eta() == pytest.approx(300 * 100, abs=1.0)


def test_error_line_is_the_trainers_own():
    text = "Epoch 1/6\nTraceback ...\nerror: loss became nan at epoch 3, step 12: training stopped\n"
    assert sweep.error_line(text) == "error: loss became nan at epoch 3, step 12: training stopped"
    assert sweep.error_line("a\nKilled\n") == "Killed"
    long_error = "error: cannot download CIFAR-10: " + "x" * 400 + "; use --data_source=binary --data_dir=PATH"
    assert sweep.error_line(f"Epoch 1/6\n{long_error}\n") == long_error          # the fix at its end kept
    assert sweep.error_line("y" * 1000) == "y" * 297 + "..."


# ----------------------------------------------------------------------------- real Ray


@pytest.fixture(scope="module")
def ray_token():
    """Ray's token authentication with a token of this test module, not ~/.ray's: a new local
    instance turns token mode on itself; processes that connect to the test's head are told."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_AUTH_MODE", raising=False)
        mp.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.delenv("RAY_ADDRESS", raising=False)
        yield


@pytest.fixture(scope="module")
def local_ray(ray_token):
    """One local Ray instance for this module: 2 CPUs, loopback, its own (short) temp dir."""
    import ray

    temp = tempfile.mkdtemp(prefix="ray")          # short: Ray's socket paths must stay < 108 chars
    sweep.start_local_ray(num_cpus=2, include_dashboard=False, _temp_dir=temp,
                          object_store_memory=80 * 2**20, logging_level="WARNING", log_to_driver=False)
    try:
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}   # loopback only
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def local_sweep(local_ray, tmp_path_factory):
    """The sweep, run once through the local Ray instance: (results folder, exit code, output)."""
    results = tmp_path_factory.mktemp("sweep") / "results"
    code, out = main([f"--results_dir={results}", *SWEEP, "--", *TINY])
    return results, code, out


def sweep_dirs(results):
    return {(wd, name): results / f"weight_decay={wd}" / name / "seed_0"
            for wd in WEIGHT_DECAYS for name in ("baseline", "conv_lr_scale")}


def test_local_sweep_grid_seeds_and_replay_order(local_sweep):
    results, code, out = local_sweep
    assert code == 0, out
    assert "4 of 4 runs finished" in out, out
    assert re.search(r"running +weight_decay=2e-4/baseline/seed_0 +epoch \d/2", out), out
    # Each run's time per epoch reaches the runner from its Ray task (the ETA is made of it).
    assert len(re.findall(r"\] done +\S+ \(\d+:\d\d:\d\d; 2 epochs, \d+ s each\)", out)) == 4, out
    for (wd, name), run_dir in sweep_dirs(results).items():
        assert events.is_complete(str(run_dir)), (run_dir, out)
        cfg = events.read_config(str(run_dir))
        assert cfg["weight_decay"] == float(wd) and cfg["seed"] == 0 and cfg["train_epochs"] == 2
        if name == "conv_lr_scale":
            baseline = results / f"weight_decay={wd}" / "baseline" / "seed_0"
            assert cfg["replay_from"] == str(baseline)
            # Ray ran it after its baseline had finished.
            assert (run_dir / tags.RUN_CONFIG_FILE).stat().st_mtime >= (baseline / tags.DONE_FILE).stat().st_mtime
    # The two grid points really trained with their own weight decay: the logged L2 term
    # at the initial state scales with it (same seed, same initial weights).
    l2 = {wd: events.read_scalars(str(sweep_dirs(results)[wd, "baseline"]), tags.EPOCH_L2_LOSS)[1][0]
          for wd in WEIGHT_DECAYS}
    assert l2["1e-3"] / l2["2e-4"] == pytest.approx(5.0, rel=0.05)


def test_rerunning_a_finished_sweep_starts_nothing(local_sweep):
    results, code, out = local_sweep
    assert code == 0, out
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*")}
    code, out = main([f"--results_dir={results}", *SWEEP, "--", *TINY])
    assert code == 0 and "all 4 runs" in out and "nothing to do" in out, out
    assert {p: p.stat().st_mtime_ns for p in results.rglob("*")} == before


def _trainer_pid(run_dir):
    """The pid of the training process writing run_dir (found by its command line), or None."""
    want = f"--model_dir={run_dir}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if want in f.read().split(b"\0"):
                    return int(pid)
        except OSError:
            continue
    return None


def _ppid(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds processes in /proc")
def test_locked_folder_waits_then_killed_worker_is_retried_with_the_same_curves(local_sweep, tmp_path):
    """A folder another process holds is not started; a worker killed mid-run is retried by Ray,
    its trainer dies with it, and the retried run resumes to the uninterrupted run's curves."""
    results, code, out = local_sweep
    assert code == 0, out
    again = tmp_path / "again"
    run_dir = again / "weight_decay=2e-4" / "baseline" / "seed_0"
    lock = process.lock(str(run_dir))                  # "another trainer" holds the folder
    outcome, printed = {}, io.StringIO()
    argv = [f"--results_dir={again}", "--preset=quick", "--runs=baseline", "--grid=weight_decay=2e-4",
            "--cpus_per_run=1", "--status_every=0.2", "--", *TINY]
    runner = threading.Thread(target=lambda: outcome.update(zip(("code", "out"), main(argv, printed))))
    runner.start()
    try:
        # Reported as running elsewhere, with the holder named; no trainer starts meanwhile.
        _wait_for(lambda: f"held by pid {os.getpid()}" in printed.getvalue(), 300, "the held folder report")
        time.sleep(sweep.LOCK_POLL_SECONDS + 1)
        assert not (run_dir / tags.RUN_CONFIG_FILE).exists()
        assert _trainer_pid(run_dir) is None
    finally:
        lock.release()
    _wait_for(lambda: plan.checkpoint_epoch(str(run_dir)) >= 1 or not runner.is_alive(), 600, "epoch 1")
    trainer = _trainer_pid(run_dir)
    assert trainer is not None, outcome
    os.kill(trainer, signal.SIGSTOP)                        # hold it mid-run while we kill its worker
    assert not events.is_complete(str(run_dir)), "the run ended before it could be interrupted"
    # Its newest checkpoint when stopped: epoch 1, or 2 when the tiny run's last epoch ended
    # between the poll above and the stop (before done.json): the retry resumes from it.
    stopped_after = plan.checkpoint_epoch(str(run_dir))
    worker = _ppid(trainer)
    os.kill(worker, signal.SIGKILL)                         # as if the node lost the worker
    os.kill(trainer, signal.SIGCONT)
    _wait_for(lambda: not _alive(trainer), 60, "the orphaned trainer to die (PR_SET_PDEATHSIG)")
    runner.join(timeout=600)
    assert not runner.is_alive()
    assert outcome["code"] == 0, outcome["out"]
    log = (run_dir / "train.log").read_text()
    assert "resuming" in log and f"after epoch {stopped_after}" in log, log[-2000:]
    assert_same_curves(run_dir, sweep_dirs(results)["2e-4", "baseline"])


def test_failed_run_prints_its_error_line_and_its_replaying_run_is_skipped(local_ray, tmp_path):
    results = tmp_path / "results"
    empty = tmp_path / "no_cifar"
    empty.mkdir()
    code, out = main([f"--results_dir={results}", "--preset=quick", "--runs=baseline,conv_lr_scale",
                      "--cpus_per_run=1", "--", *TINY, "--data_source=binary", f"--data_dir={empty}"])
    assert code == 1, out
    failed = re.search(r"failed +baseline/seed_0: exit 2: (error: .*) \(log (.*)\)", out)
    assert failed, out
    assert str(empty) in failed.group(1)                       # the trainer's own line, naming the folder
    assert failed.group(2) == str(results / "baseline" / "seed_0" / "train.log")
    assert re.search(r"skipped +conv_lr_scale/seed_0: its baseline baseline/seed_0 did not finish", out), out
    assert "0 of 2 runs finished" in out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def separate_head(log_path, cpus=2, env=None, attempts=3, gpus=0):
    """A separate Ray head process on 127.0.0.1 (its own temp dir and ports, token mode), yielding
    its address once its GCS port accepts connections; stopped afterwards by signalling its own
    process group only. Its ports are picked free, then freed for Ray to bind: another process
    (a Ray of another test) may take one in between, and that head exits at once. So a head that
    exits before it answers is started again on new ports, and the last one's log is shown."""
    for _ in range(attempts):
        temp = tempfile.mkdtemp(prefix="rayh")
        head, address = _start_head(log_path, cpus, env, temp, gpus)
        try:
            if _answers(head, address, timeout=180):
                yield address
                return
            exited = head.poll()
        finally:
            _stop_head(head, temp)
        log = log_path.read_text()[-3000:]
        assert exited is not None, f"no Ray head at {address} after 180 s; its log:\n{log}"
    raise AssertionError(f"{attempts} Ray heads exited before they answered; the last one's log:\n{log}")


def _start_head(log_path, cpus, env, temp, gpus=0):
    port = _free_port()
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    ports = {f"--{name}-port": _free_port() for name in (
        "node-manager", "object-manager", "ray-client-server", "dashboard-agent-listen",
        "dashboard-agent-grpc", "runtime-env-agent", "metrics-export", "min-worker")}
    cmd = [ray_bin, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
           f"--num-cpus={cpus}", f"--num-gpus={gpus}", "--include-dashboard=false", f"--temp-dir={temp}",
           "--disable-usage-stats", "--object-store-memory=80000000", "--max-worker-port=0",
           *(f"{k}={v}" for k, v in ports.items())]
    with open(log_path, "w") as log:
        head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, **(env or {}), RAY_AUTH_MODE="token"))
    return head, f"127.0.0.1:{port}"


def _answers(head, address, timeout):
    """Whether the head's GCS port accepts connections before the head exits or `timeout` passes."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while head.poll() is None and time.monotonic() < deadline:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.5)
    return False


def _stop_head(head, temp):
    # Not `ray stop`: it stops every Ray on the machine. The head's own session only:
    # SIGTERM, a grace period, then SIGKILL for whatever of its group is left.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(timeout=3)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    head.wait(timeout=30)
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def ray_head(ray_token, tmp_path):
    with separate_head(tmp_path / "head.log") as address:   # the runner checks the address once, it does not wait
        yield address


def test_same_sweep_on_a_separate_ray_head(ray_head, local_sweep, tmp_path):
    local_results, code, out = local_sweep
    assert code == 0, out
    results = tmp_path / "results"
    one_point = [a for a in SWEEP if not a.startswith("--grid=")] + ["--grid=weight_decay=2e-4"]
    r = subprocess.run([sys.executable, "-m", "experiments.run_all", f"--address={ray_head}",
                        f"--results_dir={results}", *one_point, "--", *TINY],
                       cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, RAY_AUTH_MODE="token"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"results: {results} (reachable from every node at this path)" in r.stdout, r.stdout
    assert "2 of 2 runs finished" in r.stdout
    for key, run_dir in sweep_dirs(results).items():
        if key[0] != "2e-4":
            continue                                 # one grid point: baseline and its replay
        assert events.is_complete(str(run_dir)), key
        assert_same_curves(run_dir, sweep_dirs(local_results)[key])     # same runs, same numbers


def test_runner_on_a_gpu_node_gives_each_run_its_gpu_and_xla(ray_token, tmp_path):
    """What the runner does on GPUs, on a head that declares 2 (Ray takes the count as given;
    this CPU has none): each run gets a whole GPU (--runs_per_gpu=1) and 1 CPU, Ray sets
    CUDA_VISIBLE_DEVICES per run, and the trainers compile their step with XLA, as auto does
    on a GPU (forced here with --jit_compile=true, since the trainers see no GPU; without
    --deterministic, under which Keras compiles no XLA step)."""
    results = tmp_path / "results"
    tiny = [a for a in TINY if not a.startswith(("--jit_compile", "--deterministic"))] + ["--jit_compile=true"]
    with separate_head(tmp_path / "head.log", cpus=2, gpus=2) as address:
        r = subprocess.run([sys.executable, "-m", "experiments.run_all", f"--address={address}",
                            f"--results_dir={results}", "--runs=baseline,noconv_l2", "--runs_per_gpu=1",
                            "--", *tiny], cwd=ROOT, capture_output=True, text=True, timeout=900,
                           env=dict(os.environ, RAY_AUTH_MODE="token"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 GPUs; 1 GPU and 1 CPU per run" in r.stdout, r.stdout
    devices = set()
    for name in ("baseline", "noconv_l2"):
        run_dir = results / name / "seed_0"
        assert events.is_done(str(run_dir)), name
        runtime = json.loads((run_dir / tags.RUN_CONFIG_FILE).read_text())["runtime"]
        assert runtime["xla"] is True, runtime
        devices.add(runtime["CUDA_VISIBLE_DEVICES"])
    assert devices == {"0", "1"}, devices          # started together, one GPU each


def test_make_figures_on_the_grid_sweep(local_sweep, tmp_path):
    from analysis import make_figures

    results, code, out = local_sweep
    assert code == 0, out
    out = tmp_path / "figures"
    assert make_figures.main([str(results), "--out", str(out)]) == 0
    for wd in WEIGHT_DECAYS:                       # today's figures and tables, per grid point
        # (baseline and ConvLRScale: the figures about them; test_accuracy.png is about NoConvL2)
        assert (out / f"weight_decay={wd}" / "conv_lr_scale_accuracy.png").is_file()
        assert not (out / f"weight_decay={wd}" / "test_accuracy.png").exists()
        assert (out / f"weight_decay={wd}" / "summary.md").is_file()
    assert (out / "grid_test_accuracy.png").is_file() and (out / "grid_test_accuracy.svg").is_file()
    rows = [line.split(",") for line in (out / "grid.csv").read_text().splitlines()]
    assert rows[0][:3] == ["weight_decay", "run", "seeds"]
    got = {(r[0], r[1]): float(r[3]) for r in rows[1:]}
    assert len(got) == 4
    for (wd, name), run_dir in sweep_dirs(results).items():
        _, acc = events.read_scalars(str(run_dir), tags.EPOCH_ACCURACY, tags.VALIDATION_DIR)
        assert got[wd, name] == acc[-1]


def test_runner_killed_with_sigkill_takes_its_trainer_along_and_a_rerun_finishes(ray_token, tmp_path):
    """SIGKILL the runner while its trainer is mid-run: the trainer must not live on (it would
    race the re-run's trainer for the folder); the same command then resumes and finishes."""
    results = tmp_path / "results"
    run_dir = results / "baseline" / "seed_0"
    cmd = [sys.executable, "-m", "experiments.run_all", f"--results_dir={results}", "--preset=quick",
           "--runs=baseline", "--status_every=1", "--", *TINY]
    runner = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while (holder := process.lock_holder(str(run_dir))) is None:   # the trainer holds its folder
            assert runner.poll() is None and time.monotonic() < deadline, "no trainer started"
            time.sleep(0.2)
        trainer = int(re.match(r"pid (\d+) ", holder).group(1))
        os.kill(trainer, signal.SIGSTOP)                  # keep it mid-run ...
        os.kill(runner.pid, signal.SIGKILL)               # ... while its runner is killed
        runner.wait()
        os.kill(trainer, signal.SIGCONT)
        deadline = time.monotonic() + 60
        while _alive(trainer):
            assert time.monotonic() < deadline, f"trainer {trainer} outlived its killed runner"
            time.sleep(0.2)
        # Ray may retry the task once more while its orphaned instance shuts down; that
        # attempt's trainer dies with its worker too: soon nobody writes the folder.
        while (holder := process.lock_holder(str(run_dir))) is not None:
            assert time.monotonic() < deadline, f"{holder} still writes after its runner was killed"
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(runner.pid, signal.SIGKILL)         # whatever of its Ray instance is left
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert events.is_complete(str(run_dir)) and not events.load_run(str(run_dir)).damaged



# ----------------------------------------------------------------------------- Ray at the edges


def runner(results, *options, env=None, timeout=600):
    """`python -m experiments.run_all` in its own process on one tiny run, RAY_AUTH_MODE unset as for a
    user who never set it (a local instance in this process may have set it): (exit code, stdout,
    stderr, seconds)."""
    cmd = [sys.executable, "-m", "experiments.run_all", f"--results_dir={results}", "--preset=quick",
           "--runs=baseline", "--status_every=5", *options, "--", *TINY]
    start = time.monotonic()
    base = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env=dict(base, **(env or {})))
    return r.returncode, r.stdout, r.stderr, time.monotonic() - start


def test_without_address_a_private_instance_whatever_other_ray_or_address_file(ray_token, tmp_path):
    """Another Ray head runs and Ray's address file names it (or names a dead address): the runner
    without --address still starts its own instance, runs there and exits 0, without Ray's token warning."""
    import ray._private.utils

    ray_tmp = tempfile.mkdtemp(prefix="rt")       # Ray's temp root for these processes, not the machine's
    env = {"RAY_TMPDIR": ray_tmp}
    address_file = os.path.join(ray_tmp, "ray", "ray_current_cluster")
    with pytest.MonkeyPatch.context() as mp:       # the file plain ray.init() would follow
        mp.setenv("RAY_TMPDIR", ray_tmp)
        assert ray._private.utils.get_ray_address_file(None) == address_file
    cpus = os.cpu_count()
    try:
        with separate_head(tmp_path / "head.log", cpus=cpus + 3, env=env) as head:
            os.makedirs(os.path.dirname(address_file), exist_ok=True)
            for case, named in (("live", head), ("dead", f"127.0.0.1:{_free_port()}")):
                with open(address_file, "w") as f:
                    f.write(named)
                results = tmp_path / case
                code, out, err, _ = runner(results, env=env)
                assert code == 0, (case, out, err)
                assert f"Ray: 1 node(s), {cpus} CPUs" in out, (case, out)     # not the head's {cpus + 3}
                assert events.is_complete(str(results / "baseline" / "seed_0")), case
                assert "Token authentication" not in out + err and "RAY_AUTH_MODE" not in out + err, err
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_dead_or_unreachable_address_is_one_line_within_seconds(ray_token, tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="rt")
    dead = f"127.0.0.1:{_free_port()}"                # a loopback port nobody listens on
    # auto follows RAY_ADDRESS first. Without it, Ray's auto joins any Ray it finds running on
    # this machine (ps), before the address file: other instances may run here, so only
    # RAY_ADDRESS makes auto name the dead address whatever else runs.
    try:
        for address, env in ((dead, {}), (f"ray://{dead}", {}), ("auto", {"RAY_ADDRESS": dead})):
            code, out, err, seconds = runner(tmp_path / "results", f"--address={address}",
                                             env={"RAY_TMPDIR": ray_tmp, **env})
            assert code == 2, (address, out, err)
            assert err.count("\n") == 1 and err.startswith(f"error: cannot connect to Ray at {address}: "), err
            assert "Connection refused" in err and seconds < 30, (err, seconds)
            # the address typed (Ray dials loopback as this machine's IP; auto names what it found)
            assert f"nothing answers at {dead}" in err or (address == "auto" and dead.split(":")[1] in err), err
            assert out == "" and not (tmp_path / "results").exists()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_head_that_wants_a_token_is_one_line_naming_ray_auth_mode(ray_head, tmp_path):
    code, out, err, seconds = runner(tmp_path / "results", f"--address={ray_head}")   # RAY_AUTH_MODE unset
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and "token authentication refused" in err and "RAY_AUTH_MODE=token" in err, err
    assert "InvalidAuthToken" not in err and seconds < 60, (err, seconds)


def as_from_a_terminal():
    """In the child before exec: SIGINT at its default and not blocked, as a shell gives it. The
    test process may have inherited or set otherwise (an ignored or blocked SIGINT is inherited,
    and Python then never raises KeyboardInterrupt)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds processes in /proc")
def test_ctrl_c_on_the_runner_one_line_trainer_keeps_its_checkpoint_and_the_same_command_resumes(
        ray_token, tmp_path):
    results = tmp_path / "results"
    run_dir = results / "baseline" / "seed_0"
    longer = [a for a in TINY if not a.startswith("--train_epochs=")] + ["--train_epochs=20"]
    cmd = [sys.executable, "-m", "experiments.run_all", f"--results_dir={results}", "--preset=quick",
           "--runs=baseline", "--status_every=1", "--", *longer]
    runner_ = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, preexec_fn=as_from_a_terminal)
    try:
        _wait_for(lambda: plan.checkpoint_epoch(str(run_dir)) >= 1 or runner_.poll() is not None, 300,
                  "the first checkpoint")
        assert runner_.poll() is None, runner_.communicate()
        os.killpg(runner_.pid, signal.SIGINT)           # Ctrl-C in a terminal: the whole foreground group
        out, err = runner_.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(runner_.pid, signal.SIGKILL)       # whatever of its Ray instance is left
    assert runner_.returncode == 130, (out, err)
    assert err.count("\n") == 1 and err.startswith("error: interrupted (Ctrl-C)") and "Traceback" not in err, err
    _wait_for(lambda: process.lock_holder(str(run_dir)) is None, 60, "the trainer to stop")
    log = (run_dir / "train.log").read_text()
    assert "stopped by SIGTERM" in log and "is kept" in log, log[-2000:]     # the trainer's own clean stop
    stopped_at = plan.checkpoint_epoch(str(run_dir))
    assert stopped_at >= 1 and not events.is_complete(str(run_dir))
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    log = (run_dir / "train.log").read_text()
    assert f"after epoch {stopped_at}" in log and "resuming" in log, log[-2000:]
    assert events.is_complete(str(run_dir)) and not events.load_run(str(run_dir)).damaged
