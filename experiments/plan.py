"""The plan of a sweep: every run (flagfile x grid point x seed), its folder and its flags.

Pure planning, no Ray: `plan` reads a preset's flagfiles, adds the grid values and
the extra flags, parses each run's whole command line with the training program's own
flags (so a bad value is reported before anything starts) and orders baselines before
the runs that replay them. `experiments/sweep.py` runs the plan on Ray.
"""

import dataclasses
import decimal
import itertools
import os
import sys
from typing import List, Optional, Sequence, Tuple

from resnet_cifar import checkpoints, events, tags
from resnet_cifar.config import REPLAY_FACTORS
from resnet_cifar.runs import BASELINE, POST_RUNS

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)       # the folder holding experiments/: the repository, or site-packages
# The flags every run of a preset shares, in its folder; each run's flagfile includes it with a
# line `--flagfile=experiments/<preset>/_common.flags`. A flagfile whose name starts with "_" is
# not a run.
COMMON_FLAGS = "_common.flags"
# The runs of a preset that run only when --runs names them: one name a line, in its folder.
OPTIONAL_RUNS = "optional_runs.txt"
# Set by the runner for each run; not allowed in flagfiles' extras or grids.
RUNNER_FLAGS = ("model_dir", "seed", "replay_from", "verbose", "flagfile", "overwrite")
# One switch, three spellings (docs/cli.md): a grid over any of them sets --conv_l2 / --noconv_l2.
CONV_L2 = {"conv_l2": True, "noconv_l2": False, "flag_noconv_l2": False}   # spelling -> conv_l2 when true


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
               f"--model_dir={self.run_dir}", f"--seed={self.seed}", "--verbose=0"]
        if self.needs:
            cmd.append(f"--replay_from={self.needs}")
        return cmd


def presets() -> dict:
    """name -> folder: every folder of experiments/ holding `<run>.flags` files is a preset.

    A copied folder beside the others is a new preset; nothing else needs to change.
    """
    out = {}
    for name in sorted(os.listdir(HERE)):
        folder = os.path.join(HERE, name)
        if os.path.isdir(folder) and not name.startswith(("_", ".")) and run_names(folder):
            out[name] = folder
    return out


def run_names(folder: str) -> List[str]:
    """The runs of a preset folder: its flagfiles' names but those starting with "_" (flags the runs
    include, COMMON_FLAGS), the post's runs first in the post's order."""
    names = [n[:-len(".flags")] for n in os.listdir(folder) if n.endswith(".flags") and not n.startswith(("_", "."))]
    return sorted(names, key=lambda n: (POST_RUNS.index(n) if n in POST_RUNS else len(POST_RUNS), n))


def optional_runs(folder: str) -> List[str]:
    """The runs the preset's OPTIONAL_RUNS file names (none without one); "#" starts a comment."""
    path = os.path.join(folder, OPTIONAL_RUNS)
    try:
        with open(path) as f:
            names = [line.split("#", 1)[0].strip() for line in f]
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as e:
        raise PlanError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    names = [n for n in names if n]
    known = run_names(folder)
    for name in names:
        if name not in known:
            raise PlanError(f"{path}: {name!r} is not a run of this preset (its runs: {', '.join(known)})")
    return names


def default_runs(folder: str) -> List[str]:
    """What `--runs` defaults to: the preset's runs but those its OPTIONAL_RUNS file names."""
    optional = optional_runs(folder)
    return [n for n in run_names(folder) if n not in optional]


def point_dir(point) -> str:
    """The folder of a grid point: `flag=value[,flag=value...]`."""
    return ",".join(f"{flag}={value}" for flag, value in point)


def training_flags(known_flags) -> List[str]:
    """The training program's own flags (not absl's --only_check_args, --verbosity, ...), and
    --noconv_l2, the documented spelling of --conv_l2=false."""
    return [f.name for f in known_flags.get_flags_for_module("resnet_cifar.config")] + ["noconv_l2"]


def number_name(value: float) -> str:
    """One spelling per number, for folder names: 2e-4 and 0.0002 -> 2e-4; 0.9 -> 0.9; 1 -> 1."""
    d = decimal.Decimal(repr(value)).normalize()
    if not d.is_finite():
        return repr(value)
    sign, digits, exp = d.as_tuple()
    head = "".join(map(str, digits))
    sci = f"{'-' if sign else ''}{head[0]}{'.' + head[1:] if len(head) > 1 else ''}e{exp + len(head) - 1}"
    plain = format(d, "f")
    return plain if (abs(value) >= 1 and len(plain) <= 12) or len(plain) <= len(sci) else sci


def canonical(flag, text: str) -> str:
    """A grid value as the flag reads it, spelled one way (true/false, 2e-4, 128); else as given."""
    try:
        value = flag.parser.parse(text)
    except (ValueError, TypeError):
        return text                      # refused later, naming the run and the flag
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return number_name(value)
    if isinstance(value, int):
        return str(value)
    return text


def parse_grid(specs: Sequence[str], known_flags) -> List[Tuple[str, List[str]]]:
    """`FLAG=v1,v2,...` strings -> [(flag, [values])]; unknown or runner-owned flags refused.

    Values are spelled one way (2e-4 and 0.0002 are one grid point, in one folder)."""
    grid = []
    own = training_flags(known_flags)
    for spec in specs:
        flag, sep, values = spec.lstrip("-").partition("=")
        vals = [v.strip() for v in values.split(",")]
        if not sep or not flag or not all(vals):
            raise PlanError(f"--grid={spec}: expected FLAG=VALUE1,VALUE2,... (e.g. --grid=weight_decay=1e-4,2e-4)")
        if flag not in own:
            raise PlanError(f"--grid={spec}: --{flag} is not a training flag (see python -m resnet_cifar.train --helpshort)")
        if flag in RUNNER_FLAGS:
            hint = " (use --seeds)" if flag == "seed" else ""
            raise PlanError(f"--grid={spec}: --{flag} is set by the runner{hint}")
        if switch(flag) in (switch(f) for f, _ in grid):
            raise PlanError(f"--grid: --{flag} given twice; put all its values in one --grid={flag}=...")
        parser = known_flags["conv_l2" if flag in CONV_L2 else flag]
        vals = list(dict.fromkeys(canonical(parser, v) for v in vals))     # a repeated value is one point
        bad = [v for v in vals if "/" in v or v in (".", "..")]
        if bad:
            raise PlanError(f"--grid={spec}: {bad[0]!r} cannot be a folder name")
        grid.append((flag, vals))
    return grid


def switch(flag: str) -> str:
    """The flag a spelling sets: conv_l2 for --noconv_l2 and --flag_noconv_l2, else itself."""
    return "conv_l2" if flag in CONV_L2 else flag


def grid_arg(flag: str, value: str) -> str:
    """A grid value as a training flag; the conv_l2 switch in any spelling wins over the flagfile's."""
    if flag in CONV_L2 and value in ("true", "false"):
        return "--conv_l2" if (value == "true") == CONV_L2[flag] else "--noconv_l2"
    return f"--{flag}={value}"


def check_extra(extra: Sequence[str], grid, known_flags) -> None:
    """The arguments after `--`: training flags only, none of the runner's, none a grid flag."""
    own = training_flags(known_flags)
    for arg in extra:
        name = arg.lstrip("-").split("=", 1)[0]
        flag = name[2:] if name not in own and name.startswith("no") else name    # --nodeterministic
        if arg.startswith("-") and flag in RUNNER_FLAGS:
            hint = {"seed": "; use --seeds=N", "model_dir": "; use --results_dir",
                    "replay_from": "; replaying runs get their baseline's folder"}.get(flag, "")
            raise PlanError(f"{arg} after --: the runner sets --{flag} for each run{hint}")
        if not arg.startswith("-") or flag not in own:
            raise PlanError(f"{arg} after --: not a training flag (flags are spelled --name=value; "
                            "see python -m resnet_cifar.train --helpshort)")
        if switch(flag) in (switch(f) for f, _ in grid):
            raise PlanError(f"{arg} after --: --{name} is already a --grid flag")


def flagfile_args(path: str, including: Tuple[str, ...] = ()) -> List[str]:
    """The flags of a flagfile as absl reads them (blank lines and lines starting with # or //
    dropped, a nested `--flagfile=PATH` line expanded in its place), but with a relative nested
    PATH read from ROOT, not from the working directory: a preset's
    `--flagfile=experiments/quick/_common.flags` is found wherever the runner starts, as absl finds
    it for `python -m resnet_cifar.train` started in the repository. A file that includes itself
    is refused (absl skips it with a warning)."""
    if os.path.realpath(path) in map(os.path.realpath, including):
        raise PlanError(f"{including[-1]} includes {path}, which includes it again")
    try:
        with open(path) as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        where = f"{including[-1]}: --flagfile={path}" if including else path
        raise PlanError(f"{where}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    args = []
    for line in lines:
        if line.isspace() or line.startswith(("#", "//")):
            continue
        if not line.startswith(("--flagfile=", "-flagfile=")):
            args.append(line.strip())
            continue
        name = os.path.expanduser(line.split("=", 1)[1].strip())
        if name:                         # absl skips an empty one
            nested = os.path.join(ROOT, name)
            check_own_copy(path, nested)
            args += flagfile_args(nested, including + (path,))
    return args


def check_own_copy(path: str, nested: str) -> None:
    """A copied preset's flagfiles include the original's _common.flags until their --flagfile=
    lines name the copy's folder: refused once the copy's own file of that name differs, whose
    edits would change nothing."""
    own = os.path.join(os.path.dirname(path), os.path.basename(nested))
    if not os.path.isfile(nested) or os.path.samefile(os.path.dirname(path), os.path.dirname(nested)):
        return                           # unreadable (said by flagfile_args), or the folder's own
    try:
        with open(own, "rb") as mine, open(nested, "rb") as theirs:
            if mine.read() == theirs.read():
                return
    except OSError:
        return                           # no such file beside it: nothing was copied
    raise PlanError(f"{path} includes {os.path.relpath(nested, ROOT)}, not the {os.path.basename(nested)} "
                    f"beside it, which differs: make that line --flagfile={os.path.relpath(own, ROOT)}")


def plan(results_dir: str, preset: str, runs: Sequence[str], seeds: int,
         grid: Sequence[Tuple[str, List[str]]] = (), extra: Sequence[str] = ()) -> List[Run]:
    """Every run of the sweep, baselines before the runs that replay them.

    Each run's full command line is parsed by the training program's own flag
    definitions, so a bad value anywhere is reported here, before anything starts.
    """
    from absl import flags

    from resnet_cifar import config as config_lib
    from resnet_cifar import train

    folder = presets()[preset]
    known = run_names(folder)
    runs = list(dict.fromkeys(runs))                  # a run named twice is one run
    files = {}
    for name in runs:
        if name not in known:                         # a plain name of the preset, never a path
            if name.startswith("_") and os.path.isfile(os.path.join(folder, f"{name}.flags")):
                raise PlanError(f"--runs: {name}.flags holds flags that the runs of preset {preset} include; "
                                f"it is not a run ({', '.join(known)})")
            raise PlanError(f"--runs: no flagfile {name}.flags in {folder} for run {name!r} "
                            f"(preset {preset}: {', '.join(known)})")
        files[name] = flagfile_args(os.path.join(folder, f"{name}.flags"))
    check_extra(extra, grid, train.FLAGS)
    points = list(itertools.product(*[[(flag, v) for v in values] for flag, values in grid]))
    out = []
    for point in points:
        for seed in range(seeds):
            base = os.path.join(results_dir, point_dir(point)) if point else results_dir
            for name in runs:
                args = tuple(files[name]) + tuple(grid_arg(f, v) for f, v in point) + tuple(extra)
                run_dir = os.path.join(base, name, f"seed_{seed}")
                probe = Run(name, seed, point, run_dir, args, 0)
                where = f"run {probe.label}"
                try:
                    parsed = train.parsed_copy(["train", *probe.command()[3:]])
                    replays = parsed.conv_grad_scale and parsed.conv_lr_factor in REPLAY_FACTORS
                    needs = None
                    if replays:
                        if name == BASELINE:
                            raise PlanError(f"{where}: the baseline cannot replay itself")
                        if BASELINE not in runs:
                            raise PlanError(f"run {name!r} replays the baseline: include {BASELINE} in --runs")
                        needs = os.path.join(base, BASELINE, f"seed_{seed}")
                        parsed["replay_from"].parse(needs)
                    config = config_lib.from_flags(parsed)
                except flags.Error as e:
                    raise PlanError(f"{where}: {str(e).splitlines()[0]}") from None
                except config_lib.ConfigError as e:
                    raise PlanError(f"{where}: {e}") from None
                out.append(dataclasses.replace(probe, needs=needs, train_epochs=config.train_epochs))
    out.sort(key=lambda r: r.needs is not None)        # stable: baselines and independent runs first
    return out


def check_folders(results_dir: str, runs: Sequence[Run]) -> None:
    """Before anything starts: the results folder can be written, and no run folder holds a run
    with other flags (the trainer's own check, `run_dir.check`; a held folder is waited for)."""
    import json

    from resnet_cifar import config as config_lib
    from resnet_cifar import run_dir
    from resnet_cifar import train

    todo = [r for r in runs if not events.is_done(r.run_dir)]
    base = results_dir
    while todo and not os.path.exists(base):
        base = os.path.dirname(base)
    if todo and (not os.path.isdir(base) or not os.access(base, os.W_OK | os.X_OK)):
        raise PlanError(f"--results_dir={results_dir}: {base} is "
                        f"{'not a folder' if not os.path.isdir(base) else 'not writable'}")
    for r in runs:
        config = config_lib.from_flags(train.parsed_copy(["train", *r.command()[3:]]))
        try:
            if r in todo:
                run_dir.check(config, locked=True)
                continue
            with open(os.path.join(r.run_dir, tags.RUN_CONFIG_FILE)) as f:
                old = json.load(f)["config"]
            diffs = run_dir.differing_flags(old, config.to_dict())
        except config_lib.ConfigError as e:
            raise PlanError(f"run {r.label}: {e}") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue                     # a finished run without a readable config: as before, finished
        if diffs:
            raise PlanError(f"run {r.label}: {r.run_dir} holds a finished run with other flags "
                            f"({'; '.join(diffs)}); use another --results_dir")


def checkpoint_epoch(run_dir: str) -> int:
    """The last completed epoch of a run: its latest checkpoint's number (0 if none)."""
    return checkpoints.indexed_number(os.path.join(run_dir, tags.CHECKPOINTS_DIR)) or 0

