"""The new flags reach the config and run_config.json; the new flagfiles parse to their runs."""

import json
import os

import pytest

from resnet_cifar import config as config_lib
from resnet_cifar import tags
from tests.helpers import ROOT, hand_parameter_count, parse, train_cli


def test_new_flags_reach_the_config():
    cfg = parse(["--model_dir=/x", "--resnet_size=56", "--optimizer=adamw", "--learning_rate=3e-3",
                 "--weight_decay=0.1"])
    assert (cfg.resnet_size, cfg.optimizer, cfg.learning_rate) == (56, "adamw", 3e-3)
    assert cfg.base_learning_rate == pytest.approx(3e-3)
    default = parse(["--model_dir=/x"])
    assert (default.resnet_size, default.optimizer, default.learning_rate) == (20, "momentum", None)
    assert default.base_learning_rate == pytest.approx(0.1)


@pytest.mark.parametrize("name,want", [
    ("equivalence/baseline", dict(conv_l2=True, conv_grad_scale=False)),
    ("equivalence/conv_lr_scale", dict(conv_l2=False, conv_grad_scale=True, conv_lr_factor="replay")),
    ("equivalence/conv_lr_scale_per_layer", dict(conv_l2=False, conv_grad_scale=True, conv_lr_factor="per_layer")),
    ("equivalence/conv_lr_scale_per_channel", dict(conv_l2=False, conv_grad_scale=True, conv_lr_factor="per_channel")),
    ("adam/baseline", dict(optimizer="adam", weight_decay=2e-4, conv_l2=True, train_epochs=150)),
    ("adam/noconv_l2", dict(optimizer="adam", weight_decay=2e-4, conv_l2=False)),
    ("adamw/baseline", dict(optimizer="adamw", weight_decay=0.2, conv_l2=True)),
    ("adamw/noconv_l2", dict(optimizer="adamw", weight_decay=0.2, conv_l2=False)),
])
def test_flagfiles(name, want, monkeypatch):
    """As the README runs them: from the repository, whose root their --flagfile= lines start from."""
    monkeypatch.chdir(ROOT)
    extra = ["--replay_from=/b"] if want.get("conv_grad_scale") else []
    cfg = parse([f"--flagfile=experiments/{name}.flags", "--model_dir=/x"] + extra)
    for key, value in want.items():
        assert getattr(cfg, key) == value, (name, key)
    if name.startswith("equivalence/"):
        assert cfg.weight_decay == 2e-4           # not set: the grid sets it
        assert (cfg.train_epochs, cfg.steps_per_epoch, cfg.boundary_epochs) == (6, 160, (2.0, 4.0))
        # The grid's value, appended after the flagfile, wins.
        grid = parse([f"--flagfile=experiments/{name}.flags", "--model_dir=/x", "--weight_decay=5e-4"] + extra)
        assert grid.weight_decay == 5e-4


def test_cli_refuses_piecewise_beyond_the_post_in_one_line(tmp_path):
    model_dir = tmp_path / "run"
    r = train_cli(f"--model_dir={model_dir}", "--data_source=synthetic", "--resnet_size=32",
                  "--noconv_l2", "--conv_grad_scale", timeout=120)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--conv_lr_factor=replay" in err[0]
    assert "--resnet_size=32" in err[0]
    assert not model_dir.exists() or not os.listdir(model_dir)


def test_run_config_records_the_new_flags(tmp_path):
    model_dir = tmp_path / "run"
    r = train_cli(f"--model_dir={model_dir}", "--data_source=synthetic", "--resnet_size=8", "--optimizer=adam",
                  "--train_epochs=1", "--steps_per_epoch=2", "--eval_steps=1", "--batch_size=8", "--verbose=0",
                  timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(model_dir / tags.RUN_CONFIG_FILE) as f:
        saved = json.load(f)
    assert (saved["config"]["resnet_size"], saved["config"]["optimizer"]) == (8, "adam")
    assert saved["trainable_parameters"] == hand_parameter_count(8)
    from resnet_cifar import events

    epochs, layers = events.read_channel_sqsum(str(model_dir))
    assert list(epochs) == [0, 1] and len(layers) == 10
    assert tags.CONV_ANGULAR_UPDATE in sorted(events.read_all_scalars(str(model_dir)))
    assert config_lib.TrainConfig(**saved["config"]).optimizer == "adam"


def test_runs_made_before_the_new_settings_still_resume():
    from resnet_cifar import run_dir

    new = config_lib.TrainConfig(model_dir="/x").to_dict()
    old = {k: v for k, v in new.items() if k not in ("resnet_size", "optimizer", "learning_rate")}
    assert run_dir.differing_flags(old, new) == []
    deeper = dict(new, resnet_size=32)
    assert run_dir.differing_flags(old, deeper) == ["--resnet_size: None -> 32"]
