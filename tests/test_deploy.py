"""The cluster recipes in deploy/, checked as far as this machine can: the SLURM script's syntax
and the commands of a dry run; the KubeRay manifest as YAML naming the image and entrypoint
that exist; the runner command lines of the README and docs/ parse; their relative links resolve."""

import glob
import os
import re
import shlex
import shutil
import subprocess

import pytest
import yaml

from experiments import plan, run_all
from tests.helpers import ROOT
SBATCH = os.path.join(ROOT, "deploy", "slurm", "sweep.sbatch")
RAYJOB = os.path.join(ROOT, "deploy", "kubernetes", "rayjob.yaml")
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def read_docs():
    """README.md and every page of docs/, one text (the commands users copy live in them)."""
    texts = []
    for path in DOCS:
        with open(path, encoding="utf-8") as f:
            texts.append(f.read())
    return "\n".join(texts)


def runner_args(words):
    """The arguments after `python -m experiments.run_all`, checked by the runner's own parser and plan."""
    assert words[:3] == ["python", "-m", "experiments.run_all"], words
    own, extra = run_all.split_extra(words[3:])
    args = run_all.make_parser().parse_args(own)
    grid = plan.parse_grid(args.grid, __import__("resnet_cifar.train").train.FLAGS)
    runs = plan.plan(args.results_dir, args.preset, run_all.run_names(args), args.seeds, grid, extra)
    return args, runs


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_sbatch_script_syntax_and_dry_run(tmp_path):
    assert subprocess.run(["bash", "-n", SBATCH]).returncode == 0
    env = dict(os.environ, DRY_RUN="1", NODES="gpu01 gpu02 gpu03", HEAD_IP="10.1.2.3", SLURM_CPUS_PER_TASK="16")
    user_args = ["--results_dir=/shared/results/wd", "--seeds=2", "--grid=weight_decay=1e-4,2e-4",
                 "--", "--data_source=synthetic"]
    r = subprocess.run(["bash", SBATCH, *user_args], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = [shlex.split(line) for line in r.stdout.splitlines()]
    assert len(lines) == 4, r.stdout
    head, *workers, runner = lines
    assert head[:6] == ["srun", "--nodes=1", "--ntasks=1", "-w", "gpu01", "ray"]
    assert head[6:8] == ["start", "--head"] and "--node-ip-address=10.1.2.3" in head and "--port=6379" in head
    assert "--num-cpus=16" in head
    for node, worker in zip(("gpu02", "gpu03"), workers):
        assert worker[4] == node and worker[5:7] == ["ray", "start"] and "--address=10.1.2.3:6379" in worker
    assert runner[:4] == ["python", "-m", "experiments.run_all", "--address=10.1.2.3:6379"]
    assert runner[4:] == user_args                      # the user's arguments, unchanged
    args, runs = runner_args(runner)
    assert args.address == "10.1.2.3:6379" and len(runs) == 2 * 2 * len(plan.POST_RUNS)


def test_rayjob_manifest_names_the_image_and_entrypoint_that_exist():
    with open(RAYJOB) as f:
        job = yaml.safe_load(f)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    import ray
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        assert f"ray=={ray.__version__}" in f.read()
    # The image is the one the README or docs/ build (docker build -t resnet-cifar .), in every pod.
    built = re.search(r"docker build -t (\S+) \.", read_docs()).group(1)
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        for container in pod["spec"]["containers"]:
            assert container["image"].split(":")[0] == built
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            assert "/runs" in mounts                   # the shared results folder, in every pod
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]}
        assert claims == {"resnet-cifar-runs"}
    # The entrypoint is the runner, on the cluster it runs in, into the shared folder.
    args, runs = runner_args(shlex.split(job["spec"]["entrypoint"]))
    assert args.address == "auto" and args.results_dir.startswith("/runs/") and runs
    assert any(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
               for g in cluster["workerGroupSpecs"])


def test_readme_runner_commands_parse():
    """Every `python -m experiments.run_all ...` line of the README and docs/ is a valid runner command."""
    text = read_docs().replace("\\\n", " ")
    commands = re.findall(r"^\s*((?:[A-Z_]+=\S+ )*python -m experiments\.run_all[^\n#]*)", text, re.M)
    assert len(commands) >= 14, commands
    for command in commands:
        words = shlex.split(command)
        while "=" in words[0]:                      # CUDA_VISIBLE_DEVICES=0,1 python -m ...
            words = words[1:]
        runner_args(words)


def test_relative_links_resolve():
    """Every relative link or image of the README and docs/ names a file or folder that exists."""
    broken = []
    for path in DOCS:
        with open(path, encoding="utf-8") as f:
            text = re.sub(r"```.*?```", "", f.read(), flags=re.S)      # no links inside code blocks
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue                                            # https:, mailto:, same-page anchors
            file = target.split("#")[0]
            if not os.path.exists(os.path.join(os.path.dirname(path), file)):
                broken.append(f"{os.path.relpath(path, ROOT)}: {target}")
    assert not broken, broken
