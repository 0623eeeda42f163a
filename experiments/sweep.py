"""A sweep of training runs on Ray: one Ray task per run of the plan (`experiments/plan.py`).

Each run is one `python -m resnet_cifar.train` subprocess started by a Ray task
(TensorFlow state is never shared between runs). Ray places the tasks by their
resources (a fraction of a GPU, or CPUs), orders runs that replay a baseline
after it (the baseline's task result is their input) and retries a task whose
worker died or whose trainer was killed by a signal; the retried trainer resumes
from its last checkpoint. The run folder's lock (`resnet_cifar.process`) keeps
two trainers out of one folder: a task whose folder is held waits for the holder.

Library code: `experiments/run_all.py` is the command line around it; the status
table it prints is `experiments/progress.py`.
"""

import ctypes
import os
import signal
import socket
import subprocess
import time
from typing import Optional, Sequence

import ray

from experiments.plan import ROOT, Run, checkpoint_epoch
from experiments.progress import Progress
from resnet_cifar import events, process

LOCK_POLL_SECONDS = 2.0
WATCH_SECONDS = 2.0
STOP_SECONDS = 60.0              # Ctrl-C: how long the runner waits for its trainers to stop


class TrainerInterrupted(RuntimeError):
    """The trainer was killed by a signal (preemption, OOM killer, node drain): Ray retries."""


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
    """The line that says why a trainer failed: its last `error: ...` line, whole (the trainer's
    own message, whose end is usually the fix), else its last line, cut to 300 characters."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    if errors:
        return errors[-1]
    line = (lines or ["(no output)"])[-1]
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
        holder = process.lock_holder(run.run_dir)
        if holder:                       # another trainer writes this folder: never start a second
            board.update.remote(run.label, state="elsewhere", holder=holder)
            time.sleep(LOCK_POLL_SECONDS)
            continue
        if events.is_done(run.run_dir):
            return _result(run, "done", node=node, seconds=time.time() - start, note="finished elsewhere")
        offset = os.path.getsize(log_path) if os.path.exists(log_path) else 0
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
        with open(log_path, "a") as log:
            proc = subprocess.Popen(run.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                    preexec_fn=_die_with(os.getpid()))
        epoch = first_epoch = checkpoint_epoch(run.run_dir)
        spawned = time.time()
        board.update.remote(run.label, state="running", node=node, pid=proc.pid,
                            epoch=epoch, since=spawned, first_epoch=epoch, epoch_time=None)
        try:
            while True:
                try:
                    code = proc.wait(timeout=WATCH_SECONDS)
                    break
                except subprocess.TimeoutExpired:
                    now = checkpoint_epoch(run.run_dir)
                    if now != epoch:
                        epoch = now
                        board.update.remote(run.label, epoch=epoch, epoch_time=time.time())
        except KeyboardInterrupt:        # ray.cancel: the runner was stopped (Ctrl-C)
            proc.terminate()             # the trainer stops between steps, its checkpoints kept
            proc.wait()
            raise
        with open(log_path, errors="replace") as f:
            f.seek(offset)
            out = f.read()
        if code == 0 and events.is_done(run.run_dir):
            trained = run.train_epochs - first_epoch          # fewer than all when it resumed
            return _result(run, "done", node=node, seconds=time.time() - start, epochs=trained,
                           epoch_seconds=(time.time() - spawned) / trained if trained > 0 else None)
        if code == 2 and process.lock_holder(run.run_dir):
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

    `address="local"` always starts a new instance: plain `ray.init()` would join whatever
    cluster RAY_ADDRESS or /tmp/ray/ray_current_cluster names (another user's, or a dead one).

    Ray turns token authentication on for a new instance unless RAY_AUTH_MODE says otherwise,
    and warns about it ("Set RAY_AUTH_MODE=disabled to opt out"): users who never asked for
    tokens are not shown that warning (the instance is private, and keeps its token).
    """
    import logging

    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    warnings = logging.getLogger("ray._private.authentication.authentication_token_setup")
    quiet = lambda record: "to opt out" not in record.getMessage()   # noqa: E731
    warnings.addFilter(quiet)
    try:
        ray.init(address="local", **kwargs)
    finally:
        warnings.removeFilter(quiet)


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


# ----------------------------------------------------------------------------- running the plan


def execute(runs: Sequence[Run], resources: dict, max_retries: int = 3, log=print,
            status_every: float = 30.0, poll: float = 1.0) -> Progress:
    """Submits every unfinished run as a Ray task and reports until all have ended."""
    done_before = [r.label for r in runs if events.is_done(r.run_dir)]
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
    try:
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
    except KeyboardInterrupt:            # Ctrl-C: each task stops its trainer, which keeps its checkpoints
        for ref in pending:
            ray.cancel(ref)
        ray.wait(list(pending), num_returns=len(pending), timeout=STOP_SECONDS)
        raise
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
