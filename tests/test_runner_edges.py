"""The runner's edges without Ray: one spelling per grid value, the conv_l2 switch in a grid, and
refusals that come before Ray starts (real `python -m experiments.run_all` processes).

The edges that need Ray (a private local instance beside another head, a dead address, a
head that wants a token, Ctrl-C) are in tests/test_run_all.py, beside its Ray fixtures.
"""

import json
import os

import pytest

from experiments import plan
from resnet_cifar import tags, train
from tests.helpers import TINY, parse, python


def planned(results, *grid, runs=("baseline", "noconv_l2"), extra=()):
    return plan.plan(str(results), "quick", list(runs), 1, plan.parse_grid([g.removeprefix("--grid=") for g in grid], train.FLAGS), list(extra))


def config(run):
    """The TrainConfig of a planned run's command."""
    return parse(run.command()[3:])


@pytest.mark.parametrize("spellings, name", [
    (["2e-4", "0.0002", "2.0e-4", "2E-04", ".0002"], "2e-4"), (["1e-3", "0.001"], "1e-3"),
    (["5e-5", "0.00005"], "5e-5"), (["0.9", "9e-1"], "0.9"), (["0.99"], "0.99"), (["0.01", "1e-2"], "0.01"),
    (["1", "1.0", "1e0"], "1"), (["0.1"], "0.1"), (["1.5e-4", "0.00015"], "1.5e-4")])
def test_two_spellings_of_one_number_are_one_grid_point_in_one_folder(tmp_path, spellings, name):
    runs = planned(tmp_path, f"--grid=weight_decay={','.join(spellings)}", runs=("baseline",))
    assert [r.run_dir for r in runs] == [str(tmp_path / f"weight_decay={name}" / "baseline" / "seed_0")]
    for spelling in spellings:                     # alone, each spelling names the same folder
        alone = planned(tmp_path, f"--grid=weight_decay={spelling}", runs=("baseline",))
        assert [r.run_dir for r in alone] == [r.run_dir for r in runs]
        assert config(alone[0]).weight_decay == float(spelling)


def test_integer_and_boolean_spellings_are_one_point(tmp_path):
    runs = planned(tmp_path, "--grid=batch_size=8,08,16", "--grid=deterministic=true,1,false",
                   runs=("baseline",))
    assert sorted(os.path.relpath(r.run_dir, tmp_path) for r in runs) == sorted(
        f"batch_size={b},deterministic={d}/baseline/seed_0" for b in (8, 16) for d in ("true", "false"))


@pytest.mark.parametrize("flag, conv_l2", [("noconv_l2", {"true": False, "false": True}),
                                           ("flag_noconv_l2", {"true": False, "false": True}),
                                           ("conv_l2", {"true": True, "false": False})])
def test_grid_over_the_conv_l2_switch_in_each_documented_spelling(tmp_path, flag, conv_l2):
    """docs/cli.md lists --noconv_l2 and --flag_noconv_l2: a grid over either is one switch, and its
    value wins over the flagfile's (noconv_l2.flags says --noconv_l2)."""
    runs = planned(tmp_path, f"--grid={flag}=true,false")
    assert len(runs) == 4
    for r in runs:
        (key, value), = r.point
        assert key == flag and r.run_dir.startswith(str(tmp_path / f"{flag}={value}"))
        assert config(r).conv_l2 == conv_l2[value], (r.label, r.args)


def run_all(results, *argv, timeout=300):
    return python("-m", "experiments.run_all", f"--results_dir={results}", "--preset=quick", "--runs=baseline",
                  *argv, timeout=timeout)


def assert_refused_before_ray(r, message):
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
    assert r.stdout == ""                           # no "Ray: 1 node(s), ..." line: Ray never started


def test_results_folder_that_is_a_file_or_read_only_is_refused_before_ray(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    assert_refused_before_ray(run_all(a_file, "--", *TINY), f"--results_dir={a_file}: {a_file} is not a folder")
    inside = a_file / "results"
    assert_refused_before_ray(run_all(inside, "--", *TINY), f"{a_file} is not a folder")
    read_only = "/proc/sys/resnet_cifar_results"     # a read-only mount, even for root
    if os.access("/proc/sys", os.W_OK):
        pytest.skip("/proc/sys is writable here")
    assert_refused_before_ray(run_all(read_only, "--", *TINY), "/proc/sys is not writable")


def test_stray_argument_after_the_separator_is_refused_before_ray(tmp_path):
    results = tmp_path / "results"
    for stray, message in (("stray", "stray after --: not a training flag"),
                           ("--only_check_args", "--only_check_args after --: not a training flag")):
        assert_refused_before_ray(run_all(results, "--", *TINY, stray), message)
    assert not results.exists()


def test_folder_holding_a_run_with_other_flags_is_refused_before_ray(tmp_path):
    results = tmp_path / "results"
    run, = planned(results, runs=("baseline",), extra=TINY)
    other = config(plan.Run(run.name, 0, (), run.run_dir, run.args + ("--weight_decay=1e-3",), 2))
    os.makedirs(run.run_dir)
    with open(os.path.join(run.run_dir, tags.RUN_CONFIG_FILE), "w") as f:
        json.dump({"config": other.to_dict()}, f)
    before = sorted(os.listdir(run.run_dir))
    assert_refused_before_ray(run_all(results, "--", *TINY),
                              "holds a run with other flags (--weight_decay: 0.001 -> 0.0002)")
    # The same with done.json: a finished run of other flags is not "finished, nothing to do".
    with open(os.path.join(run.run_dir, tags.DONE_FILE), "w") as f:
        json.dump({}, f)
    assert_refused_before_ray(run_all(results, "--", *TINY),
                              "holds a finished run with other flags (--weight_decay: 0.001 -> 0.0002)")
    assert sorted(os.listdir(run.run_dir)) == sorted(before + [tags.DONE_FILE])
