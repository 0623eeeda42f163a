"""The container's command line, run without Docker: README/docs command -> entrypoint -> training."""

import glob
import os
import re
import shlex
import subprocess
import sys

from resnet_cifar import events, tags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = "resnet-cifar"


def doc_files():
    """README.md and the pages of docs/: where the commands users copy live."""
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def readme_docker_command(needle):
    lines = []
    for path in doc_files():
        with open(path, encoding="utf-8") as f:
            lines += [line.strip() for line in f if line.strip().startswith("docker run") and needle in line]
    assert lines, f"no 'docker run ... {needle}' line in the README or docs/"
    return lines[0]


def entrypoint_args(command, runs_dir):
    """The arguments the image's ENTRYPOINT receives, with the /runs volume mapped to runs_dir."""
    words = shlex.split(command)
    args = words[words.index(IMAGE) + 1:]
    return [re.sub(r"^(--model_dir=)/runs", rf"\g<1>{runs_dir}", a) for a in args]


def run_entrypoint(args, timeout=300):
    # The image's `python` and `tensorboard` are on PATH; here they are this interpreter's.
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, PYTHONPATH=ROOT, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    return subprocess.run(["sh", os.path.join(ROOT, "docker", "entrypoint.sh"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_dockerfile_uses_the_entrypoint_and_pinned_image():
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        text = f.read()
    assert "FROM tensorflow/tensorflow:2.21.0-gpu" in text
    assert 'ENTRYPOINT ["/usr/local/bin/resnet-cifar-entrypoint"]' in text
    assert "COPY docker/entrypoint.sh /usr/local/bin/resnet-cifar-entrypoint" in text
    assert "ENV TFDS_DATA_DIR=/data/tfds" in text


def test_readme_training_command_runs_through_the_entrypoint(tmp_path):
    """`docker run --gpus all ... IMAGE --flag_noconv_l2 --model_dir=/runs/...`, on synthetic data."""
    args = entrypoint_args(readme_docker_command("--flag_noconv_l2"), tmp_path)
    assert "--flag_noconv_l2" in args
    smoke = ["--data_source=synthetic", "--train_epochs=1", "--steps_per_epoch=2", "--eval_steps=1",
             "--batch_size=16", "--verbose=0"]
    r = run_entrypoint(args + smoke)
    assert r.returncode == 0, r.stderr[-2000:]
    model_dir = [a.split("=", 1)[1] for a in args if a.startswith("--model_dir=")][0]
    assert model_dir.startswith(str(tmp_path))
    assert events.read_config(model_dir)["conv_l2"] is False          # the switch reached the run
    steps, _ = events.read_scalars(model_dir, tags.CONV_SQSUM)
    assert list(steps) == [0, 1]


def test_entrypoint_runs_other_commands_as_given():
    r = run_entrypoint(["python", "-c", "print('hello from the image')"], timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "hello from the image"


def test_readme_tensorboard_command_goes_to_tensorboard():
    args = entrypoint_args(readme_docker_command("tensorboard --logdir"), "/tmp")
    assert args[:3] == ["tensorboard", "--logdir", "/runs"]
    r = run_entrypoint(["tensorboard", "--version_tb"], timeout=120)
    assert r.returncode == 0 and r.stdout.strip().startswith("2.21"), r.stderr[-1000:]


def test_dockerfile_refuses_a_base_image_with_python_older_than_3_11():
    """The Dockerfile's version check, as the image's shell would run it (lines joined)."""
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        text = f.read().replace("\\\n", " ")
    check = next(line for line in text.splitlines() if line.startswith("RUN python -c"))
    code = shlex.split(check[len("RUN "):])[2]
    ok = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    old = subprocess.run([sys.executable, "-c", "import sys; sys.version_info = (3, 10, 12)\n" + code],
                         capture_output=True, text=True)
    assert old.returncode == 1
    assert old.stderr.strip().startswith("resnet_cifar needs Python 3.11 or newer")
