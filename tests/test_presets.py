"""The presets' flagfiles (experiments/<preset>/, no Ray): the flags a preset's runs share are in
its _common.flags, which each run's flagfile includes by a path from the repository root; the
planner reads them from any working folder as the trainer reads them from the repository; the
runs that are not default runs are named in optional_runs.txt; a copied preset folder is a new
preset, which reads its own _common.flags once its flagfiles name it."""

import os
import shutil

import pytest

from experiments import plan, run_all
from tests.helpers import ROOT, parse

PRESETS = plan.presets()


def flag_lines(path):
    """A flagfile's lines that are not blank or comments, as absl reads them."""
    with open(path) as f:
        return [line.strip() for line in f if not line.isspace() and not line.startswith(("#", "//"))]


def copy_experiments(tmp_path, monkeypatch):
    """experiments/ copied into tmp_path, and the planner reading the copy."""
    experiments = tmp_path / "experiments"
    shutil.copytree(os.path.join(ROOT, "experiments"), experiments, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(plan, "HERE", str(experiments))
    monkeypatch.setattr(plan, "ROOT", str(tmp_path))
    return experiments


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_run_includes_its_presets_common_flags_and_repeats_none_of_them(preset):
    folder = PRESETS[preset]
    common = flag_lines(os.path.join(folder, plan.COMMON_FLAGS))
    assert common and not any(line.startswith("--flagfile") for line in common)
    for name in plan.run_names(folder):
        lines = flag_lines(os.path.join(folder, f"{name}.flags"))
        assert lines[0] == f"--flagfile=experiments/{preset}/{plan.COMMON_FLAGS}", name
        assert not set(lines[1:]) & set(common), name        # overridden (--bn_decay=0.98), never repeated
        assert not any(line.startswith("--flagfile") for line in lines[1:]), name


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_the_planner_from_any_folder_reads_what_the_trainer_reads_in_the_repository(preset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)            # where absl alone would not find experiments/<preset>/_common.flags
    runs = plan.plan(str(tmp_path / "results"), preset, plan.run_names(PRESETS[preset]), 1)
    monkeypatch.chdir(ROOT)                # the README's form: python -m resnet_cifar.train --flagfile=...
    for r in runs:
        replay = [f"--replay_from={r.needs}"] if r.needs else []
        by_hand = parse([f"--flagfile=experiments/{preset}/{r.name}.flags", f"--model_dir={r.run_dir}",
                         f"--seed={r.seed}", "--verbose=0", *replay])
        assert parse(r.command()[3:]) == by_hand, r.name


def test_optional_runs_are_the_ones_optional_runs_txt_names(tmp_path, monkeypatch, capsys):
    for folder in PRESETS.values():
        optional = plan.optional_runs(folder)
        assert plan.default_runs(folder) == [n for n in plan.run_names(folder) if n not in optional]
    assert plan.optional_runs(PRESETS["full"]) == plan.optional_runs(PRESETS["quick"]) == ["conv_lr_scale_per_layer"]
    assert plan.optional_runs(PRESETS["equivalence"]) == []              # no optional_runs.txt: every run

    listed = copy_experiments(tmp_path, monkeypatch) / "quick" / plan.OPTIONAL_RUNS
    listed.write_text("# a comment\n\nnoconv_l2   # and another\nconv_lr_scale_per_layer\n")
    assert plan.default_runs(plan.presets()["quick"]) == ["baseline", "conv_lr_scale", "conv_lr_scale_bn098"]
    listed.write_text("conv_lr_scale_per_layr\n")                        # not a run: the runner's one line
    with pytest.raises(SystemExit) as e:
        run_all.main([f"--results_dir={tmp_path / 'results'}", "--preset=quick"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert f"error: {listed}: 'conv_lr_scale_per_layr' is not a run of this preset (its runs: baseline," in err
    assert not (tmp_path / "results").exists()


def test_a_copied_preset_reads_its_own_common_flags_once_its_flagfiles_name_them(tmp_path, monkeypatch):
    experiments = copy_experiments(tmp_path, monkeypatch)
    shutil.copytree(experiments / "quick", experiments / "mine")

    def epochs():
        return {r.name: r.train_epochs for r in plan.plan(str(tmp_path / "r"), "mine", ["baseline", "noconv_l2"], 1)}

    assert epochs() == {"baseline": 6, "noconv_l2": 6}                  # a plain copy: quick's runs
    common = experiments / "mine" / plan.COMMON_FLAGS
    common.write_text(common.read_text().replace("--train_epochs=6", "--train_epochs=8"))
    with pytest.raises(plan.PlanError, match="includes experiments/quick/_common.flags, not the _common.flags beside "
                                             "it, which differs: make that line "
                                             "--flagfile=experiments/mine/_common.flags"):
        epochs()                           # its edit would change nothing: refused, not ignored
    for flagfile in (experiments / "mine").glob("*.flags"):
        flagfile.write_text(flagfile.read_text().replace("experiments/quick/", "experiments/mine/"))
    assert epochs() == {"baseline": 8, "noconv_l2": 8}


def test_a_missing_or_circular_include_is_one_planning_error(tmp_path, monkeypatch):
    baseline = copy_experiments(tmp_path, monkeypatch) / "quick" / "baseline.flags"
    baseline.write_text("--flagfile=experiments/quick/nosuch.flags\n")
    with pytest.raises(plan.PlanError, match=r"baseline.flags: --flagfile=\S+/experiments/quick/nosuch.flags: "
                                             r"cannot read it \(No such file or directory\)"):
        plan.plan(str(tmp_path / "r"), "quick", ["baseline"], 1)
    baseline.write_text("--flagfile=experiments/quick/baseline.flags\n")
    with pytest.raises(plan.PlanError, match="includes it again"):
        plan.plan(str(tmp_path / "r"), "quick", ["baseline"], 1)
