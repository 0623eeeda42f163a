"""Run the post's experiments, seeds and grids on Ray: on this machine or on a cluster.

    python -m experiments.run_all --results_dir=results/full             # this machine
    python -m experiments.run_all --preset=quick --results_dir=results/quick \\
        -- --data_source=binary --data_dir=DIR                            # 6 epochs, CPU
    python -m experiments.run_all --results_dir=/shared/wd --seeds=3 \\
        --grid=weight_decay=1e-4,2e-4,5e-4 --address=auto                 # a running Ray cluster

Each run is one `python -m resnet_cifar.train` process (flags from
experiments/<preset>/<run>.flags, then the grid values, then the arguments after
`--`), started by a Ray task into RESULTS[/<flag>=<value>,...]/<run>/seed_<k>/ with its
output in train.log there. Re-running the same command skips finished runs and
resumes interrupted ones. See `--help` and docs/sweeps.md.
"""

import argparse
import contextlib
import math
import os
import socket
import sys
import tempfile
import time

from experiments import plan as plan_lib
from experiments import progress as progress_lib
from experiments import sweep
from resnet_cifar import events
from resnet_cifar import command_line
from resnet_cifar.command_line import ArgumentParser, fail

EXAMPLES = """\
examples:
  this machine (a local Ray instance starts and stops with the command):
    python -m experiments.run_all --results_dir=results/full
  a grid of weight decays x batch sizes, 3 seeds each:
    python -m experiments.run_all --results_dir=results/wd --seeds=3 \\
        --grid=weight_decay=1e-4,2e-4,5e-4 --grid=batch_size=64,128
  a Ray cluster (ray start --head / ray start --address=HEAD:6379); RESULTS must be
  a folder every node mounts at the same path:
    python -m experiments.run_all --address=auto --results_dir=/shared/results/full

Finished runs are skipped, interrupted ones resume from their checkpoint. Runs that
replay the baseline (--conv_lr_factor=replay, per_layer or per_channel) start after their grid
point's and seed's baseline. Arguments after -- go to every run. Ctrl-C stops the running
trainers, which keep their checkpoints (exit code 130); the same command resumes them.
"""


MAX_SEEDS = 10_000          # seeds of every run: more is a typo, and planning them alone would take hours
MAX_RUNS_PER_GPU = 1_000


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def training_flags():
    """The trainer's flag names that may follow `--` (its config's fields but those the runner sets
    for each run, and the post's spellings of --noconv_l2)."""
    import dataclasses

    from resnet_cifar.config import TrainConfig

    names = {field.name for field in dataclasses.fields(TrainConfig)} - {"seed", "model_dir"}
    return names | {f"no{name}" for name in names} | {"noconv_l2", "flag_noconv_l2"}


def make_parser():
    p = ArgumentParser(prog="python -m experiments.run_all", description=(
        "Run the post's experiments (seeds, grids) as Ray tasks, one training process per run. "
        "Without --address a local Ray instance runs them on this machine."),
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s --results_dir=DIR [options] [-- TRAINING_FLAGS...]", forwarded=training_flags())
    p.add_argument("--results_dir", required=True, metavar="DIR",
                   help="folder of all runs (created); on a cluster, shared by every node at this path")
    presets = plan_lib.presets()
    p.add_argument("--preset", choices=sorted(presets), default="full", metavar="NAME",
                   help="a folder of experiments/ with <run>.flags files (a copied folder is a new preset): "
                        + "; ".join(f"{name}: {', '.join(plan_lib.run_names(folder))}"
                                    for name, folder in presets.items())
                        + " (default: full, the post's 150 epochs; quick: 6 compressed epochs for CPUs)")
    p.add_argument("--runs", default=None, metavar="A,B,...",
                   help="runs (flagfile names of the preset) to do (default: the preset's runs but those "
                        f"its {plan_lib.OPTIONAL_RUNS} names, e.g. conv_lr_scale_per_layer)")
    p.add_argument("--seeds", type=command_line.integer(1, MAX_SEEDS), default=1, metavar="N",
                   help=f"seeds 0..N-1 of every run (default: 1; at most {MAX_SEEDS})")
    p.add_argument("--grid", action="append", default=[], metavar="FLAG=V1,V2,...",
                   help="a training flag's values; repeat for a cartesian product; each point goes to "
                        "RESULTS/FLAG=V[,FLAG2=V2]/<run>/seed_<k>/")
    p.add_argument("--address", default=None, metavar="ADDR",
                   help="a running Ray cluster: auto, HOST:6379, or ray://HOST:10001 "
                        "(default: start a local instance on this machine)")
    p.add_argument("--runs_per_gpu", type=command_line.integer(1, MAX_RUNS_PER_GPU), default=1, metavar="K",
                   help="on GPU nodes each run takes 1/K of a GPU (Ray sets CUDA_VISIBLE_DEVICES); default 1")
    p.add_argument("--cpus_per_run", type=positive_float, default=None, metavar="C",
                   help="CPUs each run takes (default: 1 on GPU nodes; without GPUs a whole node, "
                        "since TensorFlow uses every core)")
    p.add_argument("--max_retries", type=command_line.integer(None, 1_000), default=3, metavar="N",
                   help="Ray retries of a run whose worker died or whose trainer was killed (default: 3)")
    p.add_argument("--status_every", type=positive_float, default=30.0, metavar="SECONDS",
                   help="print the status table at most this often while only epochs change (default: 30)")
    p.add_argument("--gpus", default=None, help=argparse.SUPPRESS)
    return p


def split_extra(argv):
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def absolute_data_dir(extra):
    """A relative --data_dir after -- means the caller's folder, not each worker's."""
    return [f"--data_dir={os.path.abspath(a.split('=', 1)[1])}"
            if a.startswith("--data_dir=") and a.split("=", 1)[1] else a for a in extra]


def connect(address):
    """Ray, as asked: an existing connection, a cluster, or a new local instance."""
    import ray

    if ray.is_initialized():                        # e.g. a notebook or a test that set Ray up
        return False
    kwargs = dict(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    if not address:
        try:
            sweep.start_local_ray(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            fail(f"cannot start Ray: {first_line(e)}")
        return True
    error = None
    with tempfile.TemporaryFile("w+") as log:
        with stderr_to(log):            # Ray's client warns once a second while it retries
            problem = unreachable(address)
            if not problem:
                try:
                    ray.init(address=address, **kwargs)
                except (ConnectionError, RuntimeError, ValueError, ray.exceptions.AuthenticationError) as e:
                    error = e
        log.seek(0)
        said = log.read()
    if problem:
        fail(f"cannot connect to Ray at {address}: {problem}")
    if isinstance(error, ray.exceptions.AuthenticationError) or "InvalidAuthToken" in said:
        fail(f"cannot connect to Ray at {address}: its token authentication refused this process; "
             "set RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN or ~/.ray/auth_token)")
    if error is not None:
        fail(f"cannot connect to Ray at {address}: {first_line(error)}")
    sys.stderr.write(said)                  # whatever Ray said while it connected
    return True


def first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def unreachable(address, timeout=10.0):
    """Why nothing answers at a Ray address (a TCP connect to its host:port), else None: a dead
    address fails here in seconds, where Ray's client retries it for minutes."""
    from ray._private import services

    try:                                            # auto: RAY_ADDRESS or the last `ray start`
        hostport = (address[len("ray://"):] if address.startswith("ray://")
                    else services.canonicalize_bootstrap_address(address))
    except (OSError, ValueError) as e:
        return first_line(e)
    host, _, port = (hostport or "").rpartition(":")
    if not host or not port.isdigit():
        return None                                 # left to Ray's own parsing
    # Ray dials a loopback address as this machine's own IP: say both, the one typed first.
    typed = address[len("ray://"):] if address.startswith("ray://") else address
    where = hostport if typed == "auto" else typed
    dialed = "" if typed in ("auto", hostport) else f"; Ray dials it as {hostport}"
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except socket.timeout:
        return f"no answer from {where} within {timeout:g} s{dialed}"
    except OSError as e:
        return f"nothing answers at {where} ({e.strerror or first_line(e)}{dialed}); is the cluster up (ray status)?"
    return None


@contextlib.contextmanager
def stderr_to(file):
    """File descriptor 2 (Python's and C++'s writes alike) into `file` for a while."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(file.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def resources(runs_per_gpu, cpus_per_run):
    """Ray resources of one run, from what the cluster has; one line saying so."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    gpus = sum(n.get("GPU", 0) for n in nodes)
    cpus_max = max((n.get("CPU", 0) for n in nodes), default=0)
    if gpus:
        opts = dict(num_gpus=1.0 / runs_per_gpu, num_cpus=cpus_per_run or 1)
        how = f"{opts['num_gpus']:g} GPU and {opts['num_cpus']:g} CPU per run"
    else:
        opts = dict(num_cpus=cpus_per_run or cpus_max)
        how = f"{opts['num_cpus']:g} CPUs per run"
    if opts["num_cpus"] > cpus_max:
        fail(f"--cpus_per_run={cpus_per_run:g}: no node has more than {cpus_max:g} CPUs")
    cpus = sum(n.get("CPU", 0) for n in nodes)
    return opts, f"Ray: {len(nodes)} node(s), {cpus:g} CPUs, {gpus:g} GPUs; {how}"


def run_names(args):
    """--runs as a list; by default the preset's own runs."""
    folder = plan_lib.presets()[args.preset]
    if args.runs is None:
        return list(plan_lib.default_runs(folder))
    names = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not names:
        fail(f"--runs={args.runs} names no run: give one or more (e.g. --runs=baseline,noconv_l2), "
             "or leave --runs out for the preset's default runs")
    return names


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    own, extra = split_extra(argv)
    args = make_parser().parse_args(own)
    if args.gpus is not None:
        fail("--gpus is gone: Ray finds the GPUs and gives each run 1/--runs_per_gpu of one; "
             "to use only some, set CUDA_VISIBLE_DEVICES=0,1 before the command")
    if args.max_retries < 0:
        fail(f"--max_retries={args.max_retries} must not be negative")
    results_dir = os.path.abspath(args.results_dir)
    try:
        runs = run_names(args)
    except plan_lib.PlanError as e:
        fail(str(e))
    if not runs:
        fail("--runs is empty")

    from resnet_cifar import train            # the training flags, to check grids and extras
    try:
        grid = plan_lib.parse_grid(args.grid, train.FLAGS)
        plan = plan_lib.plan(results_dir, args.preset, runs, args.seeds, grid, absolute_data_dir(extra))
        plan_lib.check_folders(results_dir, plan)          # before Ray starts, as every refusal
    except plan_lib.PlanError as e:
        fail(str(e))
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)   # noqa: E731

    todo = [r for r in plan if not events.is_done(r.run_dir)]
    if not todo:
        log(f"all {len(plan)} runs in {results_dir} have finished; nothing to do")
        return 0

    import ray

    address = args.address or os.environ.get("RAY_ADDRESS") or None   # e.g. inside `ray job submit`
    started = connect(address)
    try:
        if address:
            problem = sweep.check_shared_folder(results_dir)
            if problem:
                fail(f"--results_dir={results_dir}: {problem}")
            log(f"results: {results_dir} (reachable from every node at this path)")
        opts, line = resources(args.runs_per_gpu, args.cpus_per_run)
        log(line)
        log(f"{len(plan)} runs, {len(plan) - len(todo)} already finished -> {results_dir}")
        progress = sweep.execute(plan, opts, max_retries=args.max_retries, log=log,
                                 status_every=args.status_every)
    finally:
        if started:
            ray.shutdown()

    bad = [(label, r) for label, r in sorted(progress.results.items()) if r["status"] != "done"]
    done = sum(s == "done" for s in progress.status.values())
    log(f"{done} of {len(plan)} runs finished in {progress_lib.hms(time.time() - progress.start)} -> {results_dir}")
    for label, r in bad:
        log(f"  {r['status']:<8} {label}: {progress_lib.describe(r)}")
    return 1 if bad else 0


def run(argv=None):
    """main() as a command: Ctrl-C is one line and exit code 130, not a traceback."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C): running trainers stop and keep their last checkpoint; "
              "the same command resumes them", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(run())
