"""A sweep of training runs on Ray: the plan (runs x grid points x seeds), one Ray task per run.

Each run is one `python -m resnet_cifar.train` subprocess started by a Ray task
(TensorFlow state is never shared between runs). Ray places the tasks by their
resources (a fraction of a GPU, or CPUs), orders runs that replay a baseline
after it (the baseline's task result is their input) and retries a task whose
worker died or whose trainer was killed by a signal; the retried trainer resumes
from its last checkpoint. The run folder's lock (`resnet_cifar.run_lock`) keeps
two trainers out of one folder: a task whose folder is held waits for the holder.

Library code: `experiments/run_all.py` is the command line around it.
"""

import ctypes
import dataclasses
import itertools
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import ray

from resnet_cifar import run_lock, tags

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
LOCK_POLL_SECONDS = 2.0
WATCH_SECONDS = 2.0
_CKPT = re.compile(r'^model_checkpoint_path:\s*"ckpt-(\d+)"', re.M)


class PlanError(ValueError):
    """A sweep that cannot be run as asked; the message is one line."""


class TrainerInterrupted(RuntimeError):
    """The trainer was killed by a signal (preemption, OOM killer, node drain): Ray retries."""


# ----------------------------------------------------------------------------- the plan


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


# ----------------------------------------------------------------------------- the Ray task


@ray.remote(num_cpus=0)
class Board:
    """What each task is doing, for the runner's status table: key -> fields."""

    def __init__(self):
        self.state = {}

    def update(self, key, **fields):
        self.state.setdefault(key, {}).update(fields)

    def snapshot(self):
        return self.state


def _die_with(parent: int):
    """A preexec_fn: the child gets SIGTERM when `parent` (the task's worker) dies (Linux;
    elsewhere a no-op). A parent that died before prctl took effect is caught too."""

    def preexec():
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG = 1
        except (AttributeError, OSError):
            return
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def error_line(text: str) -> str:
    """The line that says why a trainer failed: its last `error: ...` line, else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    line = (errors or lines or ["(no output)"])[-1]
    return line if len(line) <= 300 else line[:297] + "..."


def _result(run, status, **fields):
    return dict(label=run.label, status=status, **fields)


@ray.remote(max_retries=3, retry_exceptions=[TrainerInterrupted])
def train_run(run: Run, board, *baseline):
    """Trains one run in a subprocess; returns a dict with its status (done / failed / skipped)."""
    if baseline and baseline[0]["status"] != "done":
        return _result(run, "skipped", error=f"its baseline {baseline[0]['label']} did not finish")
    node = socket.gethostname()
    os.makedirs(run.run_dir, exist_ok=True)
    log_path = os.path.join(run.run_dir, "train.log")
    start = time.time()
    while True:
        holder = run_lock.holder(run.run_dir)
        if holder:                       # another trainer writes this folder: never start a second
            board.update.remote(run.label, state="elsewhere", holder=holder)
            time.sleep(LOCK_POLL_SECONDS)
            continue
        if is_done(run.run_dir):
            return _result(run, "done", node=node, seconds=time.time() - start, note="finished elsewhere")
        offset = os.path.getsize(log_path) if os.path.exists(log_path) else 0
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
        with open(log_path, "a") as log:
            proc = subprocess.Popen(run.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                    preexec_fn=_die_with(os.getpid()))
        epoch = checkpoint_epoch(run.run_dir)
        board.update.remote(run.label, state="running", node=node, pid=proc.pid,
                            epoch=epoch, since=time.time(), first_epoch=epoch, epoch_time=None)
        while True:
            try:
                code = proc.wait(timeout=WATCH_SECONDS)
                break
            except subprocess.TimeoutExpired:
                now = checkpoint_epoch(run.run_dir)
                if now != epoch:
                    epoch = now
                    board.update.remote(run.label, epoch=epoch, epoch_time=time.time())
        with open(log_path, errors="replace") as f:
            f.seek(offset)
            out = f.read()
        if code == 0 and is_done(run.run_dir):
            return _result(run, "done", node=node, seconds=time.time() - start)
        if code == 2 and run_lock.holder(run.run_dir):
            continue                     # another trainer took the folder first: wait for it
        if code < 0 or code == 128 + signal.SIGTERM:
            sig = -code if code < 0 else signal.SIGTERM
            board.update.remote(run.label, state="retrying")
            raise TrainerInterrupted(f"trainer of {run.label} killed by {signal.Signals(sig).name} "
                                     f"at epoch {checkpoint_epoch(run.run_dir)}")
        return _result(run, "failed", node=node, exit=code, error=error_line(out),
                       log=log_path, seconds=time.time() - start)


def start_local_ray(**kwargs):
    """A new Ray instance of this machine alone, listening on the loopback address only.

    `ray.init(_node_ip_address="127.0.0.1")` swaps 127.0.0.1 for the machine's routable
    address, so that other nodes could join; a local instance needs none of that. Ray's
    switch for a local-only instance is RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (its default on
    macOS and Windows): the environment variable reaches the processes Ray starts, and the
    constant it was read into at import is set for this process. tests/test_run_all.py
    checks that the nodes are on 127.0.0.1.
    """
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(**kwargs)


# ----------------------------------------------------------------------------- results folder


@ray.remote(num_cpus=0)
def _probe(path: str, token: str, action: str):
    """On one node: write its marker file in `path`, list all markers, or remove its own."""
    prefix = f".reach-{token}-"
    own = os.path.join(path, prefix + ray.get_runtime_context().get_node_id()[:12])
    if action == "write":
        os.makedirs(path, exist_ok=True)
        with open(own, "w") as f:
            f.write(socket.gethostname())
        return os.path.basename(own)
    if action == "list":
        return sorted(n for n in os.listdir(path) if n.startswith(prefix))
    if os.path.exists(own):
        os.remove(own)


def check_shared_folder(path: str) -> Optional[str]:
    """None if every alive node sees the files the others write in `path`; else what is wrong."""
    import uuid

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On

    token = uuid.uuid4().hex[:8]
    where = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}

    def on_every_node(action):
        return ray.get([_probe.options(scheduling_strategy=On(node, soft=False)).remote(path, token, action)
                        for node in where], timeout=300)

    try:
        written = sorted(on_every_node("write"))
        seen = on_every_node("list")
        on_every_node("remove")
    except (ray.exceptions.RayError, TimeoutError) as e:
        lines = str(e).strip().splitlines()
        return f"a node cannot use it: {lines[-1] if lines else type(e).__name__}"
    for node, names in zip(where, seen):
        if names != written:
            return (f"node {where[node]} does not see the files other nodes write there: "
                    "mount one shared folder at the same path on every node")
    return None


# ----------------------------------------------------------------------------- progress


def hms(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """The status table: counts, each running run's epoch, and an overall ETA."""

    def __init__(self, runs: Sequence[Run], done_before: Sequence[str], log=print, every: float = 30.0):
        self.runs = {r.label: r for r in runs}
        self.status = {r.label: ("done" if r.label in done_before else "waiting") for r in runs}
        self.results: Dict[str, dict] = {}
        self.board: Dict[str, dict] = {}
        self.log = log
        self.every = every
        self.start = time.time()
        self._last_print = 0.0
        self._last_shown = None

    def finish(self, label: str, result: dict) -> None:
        self.results[label] = result
        self.status[label] = result["status"]
        if result["status"] == "done":
            self.log(f"done     {label} ({hms(result.get('seconds', 0))}"
                     + (f", {result['note']})" if result.get("note") else ")"))
        else:
            self.log(f"{result['status']:<8} {label}: {describe(result)}")

    def update(self, board: Dict[str, dict]) -> None:
        self.board = board
        for label, info in board.items():
            if self.status.get(label) in ("waiting", "running", "elsewhere", "retrying"):
                self.status[label] = info.get("state", "waiting")

    def counts(self) -> Dict[str, int]:
        out = dict.fromkeys(("done", "running", "waiting", "failed"), 0)
        for state in self.status.values():
            key = {"elsewhere": "running", "retrying": "running", "skipped": "failed"}.get(state, state)
            out[key] += 1
        return out

    def eta(self) -> Optional[float]:
        """Seconds left: the running runs' remaining epochs plus the waiting runs, spread over
        as many runs at once as are running now; None until some run has timed an epoch."""
        now = time.time()
        durations = [r["seconds"] for r in self.results.values() if r["status"] == "done" and "note" not in r
                     and r.get("seconds")]
        rates, left = [], []
        for label, state in self.status.items():
            info = self.board.get(label, {})
            if state != "running" or not info.get("epoch_time"):
                continue
            epochs = info["epoch"] - info["first_epoch"]
            if epochs > 0:
                rate = (info["epoch_time"] - info["since"]) / epochs
                rates.append((rate, self.runs[label].train_epochs))
                left.append(rate * (self.runs[label].train_epochs - info["epoch"])
                            - (now - info["epoch_time"]))
        if durations:
            per_run = statistics.median(durations)
        elif rates:
            per_run = statistics.median(rate * total for rate, total in rates)
        else:
            return None
        running = sum(s == "running" for s in self.status.values())
        waiting = sum(s == "waiting" for s in self.status.values())
        left_running = [max(x, 0.0) for x in left]
        # Running runs without a timed epoch yet count as a whole run.
        untimed = running - len(left_running)
        work = sum(left_running) + (untimed + waiting) * per_run
        return max(max(left_running, default=0.0), work / max(running, 1))

    def table(self, force: bool = False) -> None:
        shown = (tuple(sorted(self.status.items())),
                 tuple(sorted((k, v.get("epoch")) for k, v in self.board.items())))
        now = time.time()
        if not force and (shown == self._last_shown or now - self._last_print < self.every):
            return
        self._last_shown, self._last_print = shown, now
        c = self.counts()
        eta = self.eta()
        self.log(f"{len(self.status)} runs: {c['done']} done, {c['running']} running, {c['waiting']} waiting, "
                 f"{c['failed']} failed | elapsed {hms(now - self.start)} | "
                 + (f"ETA {hms(eta)}" if eta is not None else "ETA after the first timed epoch"))
        width = max((len(k) for k in self.status), default=0)
        for label, state in sorted(self.status.items()):
            if state not in ("running", "elsewhere", "retrying"):
                continue
            info = self.board.get(label, {})
            if state == "elsewhere":
                what = f"held by {info.get('holder')}: waiting for it"
            else:
                what = f"epoch {info.get('epoch', 0)}/{self.runs[label].train_epochs}"
                what += f" on {info['node']}" if info.get("node") else ""
                what += " (retrying)" if state == "retrying" else ""
            self.log(f"  {state:<9} {label:<{width}}  {what}")


def describe(result: dict) -> str:
    parts = []
    if result.get("exit") is not None:
        parts.append(f"exit {result['exit']}")
    parts.append(result.get("error", ""))
    text = ": ".join(p for p in parts if p)
    return text + (f" (log {result['log']})" if result.get("log") else "")


def execute(runs: Sequence[Run], resources: dict, max_retries: int = 3, log=print,
            status_every: float = 30.0, poll: float = 1.0) -> Progress:
    """Submits every unfinished run as a Ray task and reports until all have ended."""
    done_before = [r.label for r in runs if is_done(r.run_dir)]
    progress = Progress(runs, done_before, log=log, every=status_every)
    board = Board.remote()
    refs, by_dir = {}, {}
    for run in runs:                                   # baselines first (plan order)
        if run.label in done_before:
            continue
        deps = [by_dir[run.needs]] if run.needs in by_dir else []
        ref = train_run.options(**resources, max_retries=max_retries,
                                name=f"train {run.label}").remote(run, board, *deps)
        refs[ref] = run
        by_dir[run.run_dir] = ref
    progress.table(force=True)
    pending = dict(refs)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=poll)
        for ref in sorted(ready, key=lambda r: pending[r].needs is not None):
            run = pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as e:
                result = _failure(run, e, progress)
            progress.finish(run.label, result)
        progress.update(ray.get(board.snapshot.remote()))
        progress.table(force=bool(ready))
    return progress


def _failure(run: Run, error: Exception, progress: Progress) -> dict:
    """A task that raised (retries used up, worker lost, or its baseline's task failed)."""
    if run.needs:
        base = next((r for r in progress.runs.values() if r.run_dir == run.needs), None)
        if base is not None and progress.status.get(base.label) in ("failed", "skipped"):
            return _result(run, "skipped", error=f"its baseline {base.label} did not finish")
    cause = getattr(error, "cause", None)
    if isinstance(cause, TrainerInterrupted):
        text = f"{cause} (retries used up)"
    else:
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        text = f"{type(error).__name__}: {lines[-1] if lines else ''}"
    return _result(run, "failed", error=text, log=os.path.join(run.run_dir, "train.log"))
