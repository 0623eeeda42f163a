"""The plan of a sweep: every run (flagfile x grid point x seed), its folder and its flags.

Pure planning, no Ray: `plan` reads a preset's flagfiles, adds the grid values and
the extra flags, parses each run's whole command line with the training program's own
flags (so a bad value is reported before anything starts) and orders baselines before
the runs that replay them. `experiments/sweep.py` runs the plan on Ray.
"""

import dataclasses
import itertools
import os
import re
import sys
from typing import List, Optional, Sequence, Tuple

from resnet_cifar import tags

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
POST_RUNS = ("baseline", "noconv_l2", "conv_lr_scale", "conv_lr_scale_bn098")
# What `--runs` defaults to for each preset: its own flagfiles' runs.
PRESET_RUNS = {"full": POST_RUNS, "quick": POST_RUNS,
               "equivalence": ("baseline", "conv_lr_scale", "conv_lr_scale_per_layer",
                               "conv_lr_scale_per_channel"),
               "adam": ("baseline", "noconv_l2"), "adamw": ("baseline", "noconv_l2")}
PRESETS = {"full": HERE, "quick": os.path.join(HERE, "quick"),
           "equivalence": os.path.join(HERE, "equivalence"),
           "adam": os.path.join(HERE, "adam"), "adamw": os.path.join(HERE, "adamw")}
BASELINE = "baseline"
# Set by the runner for each run; not allowed in flagfiles' extras or grids.
RUNNER_FLAGS = ("model_dir", "seed", "replay_from", "verbose", "flagfile", "overwrite")
REPLAY_MODES = ("replay", "per_layer", "per_channel")
_CKPT = re.compile(r'^model_checkpoint_path:\s*"ckpt-(\d+)"', re.M)


class PlanError(ValueError):
    """A sweep that cannot be run as asked; the message is one line."""



@dataclasses.dataclass(frozen=True)
class Run:
    name: str                            # flagfile name: baseline, noconv_l2, ...
    seed: int
    point: Tuple[Tuple[str, str], ...]   # grid point ((flag, value), ...); () without --grid
    run_dir: str
    args: Tuple[str, ...]                # training flags: flagfile lines, grid values, extras
    train_epochs: int
    needs: Optional[str] = None          # run_dir of the baseline this run replays

    @property
    def label(self) -> str:
        return "/".join(([point_dir(self.point)] if self.point else []) + [self.name, f"seed_{self.seed}"])

    def command(self, python: str = sys.executable) -> List[str]:
        cmd = [python, "-m", "resnet_cifar.train", *self.args,
               f"--model_dir={self.run_dir}", f"--seed={self.seed}", "--verbose=2"]
        if self.needs:
            cmd.append(f"--replay_from={self.needs}")
        return cmd


def point_dir(point) -> str:
    """The folder of a grid point: `flag=value[,flag=value...]`."""
    return ",".join(f"{flag}={value}" for flag, value in point)


def parse_grid(specs: Sequence[str], known_flags) -> List[Tuple[str, List[str]]]:
    """`FLAG=v1,v2,...` strings -> [(flag, [values])]; unknown or runner-owned flags refused."""
    grid = []
    for spec in specs:
        flag, sep, values = spec.lstrip("-").partition("=")
        vals = [v.strip() for v in values.split(",")]
        if not sep or not flag or not all(vals):
            raise PlanError(f"--grid={spec}: expected FLAG=VALUE1,VALUE2,... (e.g. --grid=weight_decay=1e-4,2e-4)")
        if flag not in known_flags:
            raise PlanError(f"--grid={spec}: --{flag} is not a training flag (see python -m resnet_cifar.train --helpshort)")
        if flag in RUNNER_FLAGS or flag == "flag_noconv_l2":
            hint = " (use --seeds)" if flag == "seed" else ""
            raise PlanError(f"--grid={spec}: --{flag} is set by the runner{hint}")
        if flag in (f for f, _ in grid):
            raise PlanError(f"--grid: --{flag} given twice; put all its values in one --grid={flag}=...")
        if len(set(vals)) != len(vals):
            raise PlanError(f"--grid={spec}: a value is repeated")
        bad = [v for v in vals if "/" in v or v in (".", "..")]
        if bad:
            raise PlanError(f"--grid={spec}: {bad[0]!r} cannot be a folder name")
        grid.append((flag, vals))
    return grid


def check_extra(extra: Sequence[str], grid) -> None:
    for arg in extra:
        name = arg.lstrip("-").split("=", 1)[0]
        if name in RUNNER_FLAGS:
            hint = {"seed": "; use --seeds=N", "model_dir": "; use --results_dir",
                    "replay_from": "; replaying runs get their baseline's folder"}.get(name, "")
            raise PlanError(f"{arg} after --: the runner sets --{name} for each run{hint}")
        if name in (f for f, _ in grid):
            raise PlanError(f"{arg} after --: --{name} is already a --grid flag")


def flagfile_args(path: str) -> List[str]:
    """The flags of a flagfile, as absl reads them (comments dropped, nested flagfiles expanded)."""
    from absl import flags
    return flags.FlagValues().read_flags_from_files([f"--flagfile={path}"], force_gnu=False)


def plan(results_dir: str, preset: str, runs: Sequence[str], seeds: int,
         grid: Sequence[Tuple[str, List[str]]] = (), extra: Sequence[str] = ()) -> List[Run]:
    """Every run of the sweep, baselines before the runs that replay them.

    Each run's full command line is parsed by the training program's own flag
    definitions, so a bad value anywhere is reported here, before anything starts.
    """
    from absl import flags

    from resnet_cifar import config as config_lib
    from resnet_cifar import train

    folder = PRESETS[preset]
    files = {}
    for name in runs:
        path = os.path.join(folder, f"{name}.flags")
        if not os.path.isfile(path):
            raise PlanError(f"no flagfile {path} for run {name!r}")
        files[name] = flagfile_args(path)
    check_extra(extra, grid)
    points = list(itertools.product(*[[(flag, v) for v in values] for flag, values in grid]))
    out = []
    for point in points:
        for seed in range(seeds):
            base = os.path.join(results_dir, point_dir(point)) if point else results_dir
            for name in runs:
                args = tuple(files[name]) + tuple(f"--{f}={v}" for f, v in point) + tuple(extra)
                run_dir = os.path.join(base, name, f"seed_{seed}")
                probe = Run(name, seed, point, run_dir, args, 0)
                where = f"run {probe.label}"
                try:
                    train.FLAGS.unparse_flags()
                    train.FLAGS(["train", *probe.command()[3:]])
                    replays = train.FLAGS.conv_grad_scale and train.FLAGS.conv_lr_factor in REPLAY_MODES
                    needs = None
                    if replays:
                        if name == BASELINE:
                            raise PlanError(f"{where}: the baseline cannot replay itself")
                        if BASELINE not in runs:
                            raise PlanError(f"run {name!r} replays the baseline: include {BASELINE} in --runs")
                        needs = os.path.join(base, BASELINE, f"seed_{seed}")
                        train.FLAGS["replay_from"].parse(needs)
                    config = train.config_from_flags()
                except flags.Error as e:
                    raise PlanError(f"{where}: {str(e).splitlines()[0]}") from None
                except config_lib.ConfigError as e:
                    raise PlanError(f"{where}: {e}") from None
                finally:
                    train.FLAGS.unparse_flags()
                out.append(dataclasses.replace(probe, needs=needs, train_epochs=config.train_epochs))
    out.sort(key=lambda r: r.needs is not None)        # stable: baselines and independent runs first
    return out


def is_done(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, tags.DONE_FILE))


def checkpoint_epoch(run_dir: str) -> int:
    """The last completed epoch of a run: its latest checkpoint's number (0 if none)."""
    try:
        with open(os.path.join(run_dir, "checkpoints", "checkpoint")) as f:
            match = _CKPT.search(f.read())
    except OSError:
        return 0
    return int(match.group(1)) if match else 0

