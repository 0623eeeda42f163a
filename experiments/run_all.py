"""Run the post's experiments into one results folder, skipping finished runs.

    python -m experiments.run_all --results_dir=results/full            # the post, 150 epochs
    python -m experiments.run_all --preset=quick --results_dir=results/quick \
        -- --data_source=binary --data_dir=DIR                           # 6 epochs, CPU
    python -m experiments.run_all --seeds=3 --gpus=0,1 --runs_per_gpu=2 ...

Each run is `python -m resnet_cifar.train --flagfile=experiments/<preset>/<run>.flags`
into RESULTS/<run>/seed_<k>, with its output in train.log there. Re-running the
same command skips runs that finished and resumes interrupted ones (the training
program resumes from its last checkpoint). Runs that replay the baseline
(`--conv_lr_factor=replay` or `per_layer`) start after that seed's baseline.
Arguments after `--` go to every run.
"""

import dataclasses
import os
import subprocess
import sys
import time
from typing import List, Optional

from absl import app, flags

from resnet_cifar import tags

HERE = os.path.dirname(os.path.abspath(__file__))
POST_RUNS = ("baseline", "noconv_l2", "conv_lr_scale", "conv_lr_scale_bn098")
PRESETS = {"full": HERE, "quick": os.path.join(HERE, "quick")}
BASELINE = "baseline"

FLAGS = flags.FLAGS
flags.DEFINE_string("results_dir", None, "Folder for all runs (created).")
flags.DEFINE_enum("preset", "full", list(PRESETS), "full: the post's 150 epochs; quick: 6 epochs for CPUs.")
flags.DEFINE_list("runs", list(POST_RUNS), "Runs (flagfile names) to do; e.g. add conv_lr_scale_per_layer.")
flags.DEFINE_integer("seeds", 1, "Seeds per run: 0..seeds-1.")
flags.DEFINE_list("gpus", [], "GPU ids to spread runs over (CUDA_VISIBLE_DEVICES); empty: no pinning.")
flags.DEFINE_integer("runs_per_gpu", 1, "Concurrent runs per GPU (or in total without --gpus).")


@dataclasses.dataclass
class Job:
    name: str
    seed: int
    run_dir: str
    flagfile: str
    needs: Optional[str] = None          # run dir that must finish first (replayed baseline)
    status: str = "pending"              # pending, running, done, failed, skipped

    def command(self, extra):
        cmd = [sys.executable, "-m", "resnet_cifar.train", f"--flagfile={self.flagfile}",
               f"--model_dir={self.run_dir}", f"--seed={self.seed}", "--verbose=2"]
        if self.needs:
            cmd.append(f"--replay_from={self.needs}")
        return cmd + list(extra)


def replays_baseline(flagfile):
    """True if the flagfile sets --conv_lr_factor=replay or per_layer (comments ignored)."""
    with open(flagfile) as f:
        lines = [line.strip() for line in f if not line.lstrip().startswith(("#", "//"))]
    return any(line in (f"--conv_lr_factor={mode}" for mode in ("replay", "per_layer")) for line in lines)


def plan(results_dir, preset, runs, seeds) -> List[Job]:
    """The jobs, in dependency order; a missing flagfile is an error naming it."""
    folder = PRESETS[preset]
    jobs = []
    for seed in range(seeds):
        for name in runs:
            flagfile = os.path.join(folder, f"{name}.flags")
            if not os.path.isfile(flagfile):
                raise ValueError(f"no flagfile {flagfile} for run {name!r}")
            needs = None
            if name != BASELINE and replays_baseline(flagfile):
                if BASELINE not in runs:
                    raise ValueError(f"run {name!r} replays the baseline: include {BASELINE} in --runs")
                needs = run_dir(results_dir, BASELINE, seed)
            jobs.append(Job(name, seed, run_dir(results_dir, name, seed), flagfile, needs))
    jobs.sort(key=lambda j: (j.seed, j.needs is not None))  # per seed: baselines and independents first
    return jobs


def run_dir(results_dir, name, seed):
    return os.path.join(results_dir, name, f"seed_{seed}")


def is_done(path):
    return os.path.isfile(os.path.join(path, tags.DONE_FILE))


def execute(jobs, extra, slots, log=print, poll=1.0):
    """Runs jobs on `slots` (a list of CUDA_VISIBLE_DEVICES values or None), at most one per slot."""
    for job in jobs:
        if is_done(job.run_dir):
            job.status = "done"
            log(f"skip {job.name} seed {job.seed}: finished ({job.run_dir})")
    running = {}                                            # slot index -> (job, process, log file)
    while True:
        for i, (job, proc, logf) in list(running.items()):
            code = proc.poll()
            if code is None:
                continue
            logf.close()
            job.status = "done" if code == 0 and is_done(job.run_dir) else "failed"
            log(f"{job.status} {job.name} seed {job.seed} (exit {code}; log {job.run_dir}/train.log)")
            del running[i]
        for job in jobs:
            if job.status == "pending" and job.needs and _status_of(jobs, job.needs) == "failed":
                job.status = "skipped"
                log(f"skip {job.name} seed {job.seed}: its baseline failed")
        ready = [j for j in jobs if j.status == "pending" and (not j.needs or is_done(j.needs))]
        free = [i for i in range(len(slots)) if i not in running]
        for i, job in zip(free, ready):
            os.makedirs(job.run_dir, exist_ok=True)
            logf = open(os.path.join(job.run_dir, "train.log"), "a")
            env = dict(os.environ)
            if slots[i] is not None:
                env["CUDA_VISIBLE_DEVICES"] = slots[i]
            proc = subprocess.Popen(job.command(extra), stdout=logf, stderr=subprocess.STDOUT, env=env)
            job.status = "running"
            running[i] = (job, proc, logf)
            where = f" on GPU {slots[i]}" if slots[i] is not None else ""
            log(f"start {job.name} seed {job.seed}{where}: {job.run_dir}")
        if not running:                  # nothing running and nothing could start: done
            for job in jobs:
                if job.status == "pending":
                    job.status = "skipped"
                    log(f"skip {job.name} seed {job.seed}: {job.needs} did not finish")
            break
        time.sleep(poll)
    return jobs


def _status_of(jobs, path):
    for j in jobs:
        if j.run_dir == path:
            return j.status
    return "done" if is_done(path) else "failed"


def main(argv):
    extra = argv[1:]
    if not FLAGS.results_dir:
        sys.exit("error: --results_dir is required")
    if FLAGS.seeds < 1 or FLAGS.runs_per_gpu < 1:
        sys.exit("error: --seeds and --runs_per_gpu must be positive")
    try:
        jobs = plan(FLAGS.results_dir, FLAGS.preset, FLAGS.runs, FLAGS.seeds)
    except ValueError as e:
        sys.exit(f"error: {e}")
    slots = [g for g in FLAGS.gpus for _ in range(FLAGS.runs_per_gpu)] or [None] * FLAGS.runs_per_gpu
    execute(jobs, extra, slots, log=lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True))
    bad = [j for j in jobs if j.status != "done"]
    print(f"{len(jobs) - len(bad)} of {len(jobs)} runs finished in {FLAGS.results_dir}"
          + (f"; not finished: {', '.join(f'{j.name}/seed_{j.seed}' for j in bad)}" if bad else ""))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    app.run(main)
