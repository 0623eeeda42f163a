"""The experiment runner (experiments/run_all.py): its plan, its flagfiles, and its scheduling.

Scheduling is tested with `Job.command` replaced by a tiny Python program that
logs when it starts and ends (and on which CUDA_VISIBLE_DEVICES), then writes
done.json into its run folder, or fails; no training happens in this file.
"""

import json
import os
import sys

import pytest

from experiments import run_all
from resnet_cifar import config as config_lib
from resnet_cifar import tags, train

REPLAYING = ("conv_lr_scale", "conv_lr_scale_bn098")
ALL_RUNS = list(run_all.POST_RUNS) + ["conv_lr_scale_per_layer"]


def parse(argv):
    """The training program's own flag definitions, parsed afresh from `argv`, as a TrainConfig."""
    train.FLAGS.unparse_flags()
    try:
        train.FLAGS(["train"] + list(argv))
        return train.config_from_flags()
    finally:
        train.FLAGS.unparse_flags()


def job_config(job, extra=()):
    """The TrainConfig that `job`'s real command line gives the training program."""
    cmd = job.command(list(extra))
    assert cmd[:3] == [sys.executable, "-m", "resnet_cifar.train"]
    return parse(cmd[3:])


# ----------------------------------------------------------------------------- plan


def test_flagfiles_exist_for_every_run_in_both_presets():
    for folder in run_all.PRESETS.values():
        for name in ALL_RUNS:
            assert os.path.isfile(os.path.join(folder, f"{name}.flags")), (folder, name)


def test_plan_order_and_dependencies(tmp_path):
    results = str(tmp_path)
    jobs = run_all.plan(results, "quick", ALL_RUNS, seeds=2)
    assert [(j.seed, j.name) for j in jobs] == [
        (seed, name) for seed in (0, 1)
        for name in ("baseline", "noconv_l2", "conv_lr_scale", "conv_lr_scale_bn098",
                     "conv_lr_scale_per_layer")]
    for j in jobs:
        assert j.run_dir == os.path.join(results, j.name, f"seed_{j.seed}")
        assert j.flagfile == os.path.join(run_all.PRESETS["quick"], f"{j.name}.flags")
        assert j.status == "pending"
        if j.name in REPLAYING + ("conv_lr_scale_per_layer",):
            assert j.needs == os.path.join(results, "baseline", f"seed_{j.seed}"), j   # that seed's baseline
        else:
            assert j.needs is None, j      # the quick flagfiles' comments mention replay: ignored
    # Every job that needs a baseline comes after that baseline.
    order = [j.run_dir for j in jobs]
    assert all(order.index(j.needs) < order.index(j.run_dir) for j in jobs if j.needs)


def test_full_preset_replays_only_per_layer(tmp_path):
    jobs = {j.name: j for j in run_all.plan(str(tmp_path), "full", ALL_RUNS, seeds=1)}
    assert {n for n, j in jobs.items() if j.needs} == {"conv_lr_scale_per_layer"}
    assert [j.name for j in run_all.plan(str(tmp_path), "full", ALL_RUNS, 1)][-1] == "conv_lr_scale_per_layer"
    # Without the baseline, the piecewise runs stand alone; per_layer does not.
    assert [j.name for j in run_all.plan(str(tmp_path), "full", ["conv_lr_scale"], 1)] == ["conv_lr_scale"]
    with pytest.raises(ValueError, match="include baseline"):
        run_all.plan(str(tmp_path), "full", ["conv_lr_scale_per_layer"], 1)


def test_missing_flagfile_is_an_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match=r"no flagfile .*quick/nosuchrun\.flags for run 'nosuchrun'"):
        run_all.plan(str(tmp_path), "quick", ["baseline", "nosuchrun"], 1)


@pytest.mark.parametrize("runs", [["conv_lr_scale"], ["noconv_l2", "conv_lr_scale_bn098"],
                                  ["conv_lr_scale_per_layer"]])
def test_replaying_run_without_baseline_is_an_error(tmp_path, runs):
    with pytest.raises(ValueError, match=r"replays the baseline: include baseline in --runs"):
        run_all.plan(str(tmp_path), "quick", runs, 1)


def test_replays_baseline_reads_flags_not_comments(tmp_path):
    cases = {"# uses --conv_lr_factor=replay\n--conv_grad_scale\n": False,
             "  # --conv_lr_factor=per_layer\n": False,
             "--conv_lr_factor=piecewise\n": False,
             "--conv_grad_scale\n--conv_lr_factor=replay\n": True,
             "--conv_lr_factor=per_layer\n": True}
    for i, (text, want) in enumerate(cases.items()):
        path = tmp_path / f"{i}.flags"
        path.write_text(text)
        assert run_all.replays_baseline(str(path)) is want, text


def test_job_command():
    job = run_all.Job("conv_lr_scale", 2, "/r/conv_lr_scale/seed_2", "/x/conv_lr_scale.flags",
                      needs="/r/baseline/seed_2")
    cmd = job.command(["--data_source=synthetic", "--steps_per_epoch=3"])
    assert cmd == [sys.executable, "-m", "resnet_cifar.train", "--flagfile=/x/conv_lr_scale.flags",
                   "--model_dir=/r/conv_lr_scale/seed_2", "--seed=2", "--verbose=2",
                   "--replay_from=/r/baseline/seed_2", "--data_source=synthetic", "--steps_per_epoch=3"]
    assert "--replay_from" not in " ".join(run_all.Job("baseline", 0, "/r/b", "/x/b.flags").command([]))


# ----------------------------------------------------------------------------- the flagfiles, as parsed


# name -> (conv_l2, conv_grad_scale, bn_decay, conv_lr_factor)
QUICK = {"baseline": (True, False, 0.997, "piecewise"),
         "noconv_l2": (False, False, 0.997, "piecewise"),
         "conv_lr_scale": (False, True, 0.997, "replay"),
         "conv_lr_scale_bn098": (False, True, 0.98, "replay"),
         "conv_lr_scale_per_layer": (False, True, 0.997, "per_layer")}
FULL = dict(QUICK, conv_lr_scale=(False, True, 0.997, "piecewise"),
            conv_lr_scale_bn098=(False, True, 0.98, "piecewise"))


@pytest.mark.parametrize("preset", ["quick", "full"])
def test_flagfiles_parse_to_the_intended_runs(tmp_path, preset):
    want = {"quick": QUICK, "full": FULL}[preset]
    extra = ["--data_source=synthetic"]              # what a user appends after `--`
    for job in run_all.plan(str(tmp_path), preset, ALL_RUNS, seeds=2):
        cfg = job_config(job, extra)
        got = (cfg.conv_l2, cfg.conv_grad_scale, cfg.bn_decay, cfg.conv_lr_factor)
        assert got == want[job.name], job.name
        assert cfg.weight_decay == 2e-4 and cfg.batch_size == 128 and cfg.decay_rates == (1.0, 0.1, 0.01)
        assert cfg.model_dir == job.run_dir and cfg.seed == job.seed and cfg.verbose == 2
        assert cfg.data_source == "synthetic" and cfg.replay_from == job.needs
        if preset == "quick":
            assert (cfg.train_epochs, cfg.boundary_epochs, cfg.steps_per_epoch) == (6, (2.0, 4.0), 160)
        else:   # the post: 150 epochs, drops at 50 and 100, whole epochs
            assert (cfg.train_epochs, cfg.boundary_epochs, cfg.steps_per_epoch) == (150, (50.0, 100.0), None)
    # The full baseline is exactly the program's default run (the flagfile only documents it).
    base = job_config(run_all.plan(str(tmp_path), "full", ["baseline"], 1)[0])
    assert base == config_lib.TrainConfig(model_dir=base.model_dir, verbose=2)


# ----------------------------------------------------------------------------- execute

FAKE = r"""
import json, os, sys, time
run_dir, outcome, log, seconds = sys.argv[1:5]

def note(event):
    with open(log, "a") as f:
        f.write(json.dumps({"dir": run_dir, "event": event, "t": time.time(),
                            "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\n")

note("start")
print("fake training of", run_dir, flush=True)
time.sleep(float(seconds))
if outcome == "ok":
    with open(os.path.join(run_dir, "done.json"), "w") as f:
        json.dump({"epochs": 1}, f)
note("end")
sys.exit(1 if outcome == "fail" else 0)
"""


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """Replaces Job.command; returns (outcomes {(name, seed): ok|fail|no_done}, read_log)."""
    outcomes = {}
    log = str(tmp_path / "jobs.log")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def command(self, extra):
        outcome = outcomes.get((self.name, self.seed), "ok")
        return [sys.executable, "-c", FAKE, self.run_dir, outcome, log, "0.3"]

    monkeypatch.setattr(run_all.Job, "command", command)

    def read_log():
        if not os.path.exists(log):
            return []
        with open(log) as f:
            return [json.loads(line) for line in f]

    return outcomes, read_log


def execute(jobs, slots):
    messages = []
    run_all.execute(jobs, ["--data_source=synthetic"], slots, log=messages.append, poll=0.02)
    return messages


def started(entries):
    return [e["dir"] for e in entries if e["event"] == "start"]


def max_concurrent(entries):
    level, peak = 0, 0
    for e in sorted(entries, key=lambda e: (e["t"], e["event"] == "start")):   # ends before starts on ties
        level += 1 if e["event"] == "start" else -1
        peak = max(peak, level)
    return peak


def write_done(path):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, tags.DONE_FILE), "w") as f:
        f.write("{}")


def test_finished_runs_are_skipped_and_unfinished_ones_resumed(tmp_path, fake):
    _, read_log = fake
    results = str(tmp_path / "results")
    jobs = run_all.plan(results, "quick", list(run_all.POST_RUNS), 1)
    by_name = {j.name: j for j in jobs}
    write_done(by_name["baseline"].run_dir)
    # noconv_l2 was interrupted: it has a log (and would have checkpoints) but no done.json.
    os.makedirs(by_name["noconv_l2"].run_dir)
    with open(os.path.join(by_name["noconv_l2"].run_dir, "train.log"), "w") as f:
        f.write("epoch 1/6 | ...\n")
    messages = execute(jobs, [None])
    assert by_name["baseline"].run_dir not in started(read_log())
    assert any(m.startswith("skip baseline seed 0: finished") for m in messages), messages
    assert sorted(started(read_log())) == sorted(j.run_dir for j in jobs if j.name != "baseline")
    assert {j.name: j.status for j in jobs} == dict.fromkeys(run_all.POST_RUNS, "done")
    with open(os.path.join(by_name["noconv_l2"].run_dir, "train.log")) as f:
        text = f.read()
    assert text.startswith("epoch 1/6 | ...\n") and "fake training of" in text   # appended, not replaced


def test_failed_baseline_skips_only_its_replaying_runs(tmp_path, fake):
    outcomes, read_log = fake
    outcomes["baseline", 0] = "fail"
    results = str(tmp_path / "results")
    jobs = run_all.plan(results, "quick", ALL_RUNS, 2)
    messages = execute(jobs, [None, None])
    status = {(j.name, j.seed): j.status for j in jobs}
    assert status == {("baseline", 0): "failed", ("noconv_l2", 0): "done",
                      ("conv_lr_scale", 0): "skipped", ("conv_lr_scale_bn098", 0): "skipped",
                      ("conv_lr_scale_per_layer", 0): "skipped",
                      **{(name, 1): "done" for name in ALL_RUNS}}
    assert not any("seed_0" in d and "conv_lr_scale" in d for d in started(read_log()))
    assert any(m.startswith("failed baseline seed 0 (exit 1") for m in messages), messages
    assert sum(m.startswith("skip ") and "seed 0" in m for m in messages) == 3, messages


def test_run_that_exits_0_without_done_json_counts_as_failed(tmp_path, fake):
    outcomes, _ = fake
    outcomes["baseline", 0] = "no_done"
    jobs = run_all.plan(str(tmp_path), "quick", ["baseline", "conv_lr_scale"], 1)
    execute(jobs, [None])
    assert [j.status for j in jobs] == ["failed", "skipped"]


def test_replaying_runs_start_after_their_baseline_ends(tmp_path, fake):
    _, read_log = fake
    jobs = run_all.plan(str(tmp_path), "quick", ALL_RUNS, 2)
    execute(jobs, ["0", "1", "2"])
    entries = read_log()
    when = {(e["dir"], e["event"]): e["t"] for e in entries}
    for j in jobs:
        assert j.status == "done"
        if j.needs:
            assert when[j.run_dir, "start"] >= when[j.needs, "end"], j.name


@pytest.mark.parametrize("slots", [[None], ["0", "1"], ["0", "0", "1", "1"]])
def test_concurrency_and_gpu_pinning(tmp_path, fake, slots):
    _, read_log = fake
    jobs = run_all.plan(str(tmp_path), "quick", ["baseline", "noconv_l2"], 4)   # 8 independent jobs
    execute(jobs, slots)
    entries = read_log()
    assert all(j.status == "done" for j in jobs)
    assert sorted(started(entries)) == sorted(j.run_dir for j in jobs)       # each started once
    peak = max_concurrent(entries)
    assert peak <= len(slots), peak
    if len(slots) > 1:
        assert peak >= 2, peak      # they do run side by side
    gpus = [e["gpu"] for e in entries if e["event"] == "start"]
    if slots == [None]:
        assert set(gpus) == {None}                      # no pinning without --gpus
    else:
        assert set(gpus) == set(slots)
        # Never more jobs on one GPU than it has slots.
        for gpu in set(slots):
            mine = [e for e in entries if e["gpu"] == gpu]
            assert max_concurrent(mine) <= slots.count(gpu), gpu
