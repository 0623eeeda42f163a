"""The container's command line, run without Docker: README/docs command -> entrypoint -> training."""

import glob
import os
import re
import shlex
import subprocess
import sys
import time

import pytest

from resnet_cifar import events, tags
from tests.helpers import ROOT, python
IMAGE = "resnet-cifar"
ENTRYPOINT = os.path.join(ROOT, "docker", "entrypoint.sh")
DOCKERFILE = os.path.join(ROOT, "Dockerfile")


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


def entrypoint_args(command):
    """The arguments the image's ENTRYPOINT receives."""
    words = shlex.split(command)
    return words[words.index(IMAGE) + 1:]


def run_entrypoint(args, timeout=300, runs_dir="/runs", path=None, env=None):
    """docker/entrypoint.sh as the image runs it; `/runs` (the default model_dir's parent) is
    runs_dir. The image's `python` and `tensorboard` are on PATH; here they are this
    interpreter's, or what `path` puts before them."""
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, PYTHONPATH=ROOT, RESNET_CIFAR_RUNS=str(runs_dir), **(env or {}),
               PATH=os.pathsep.join(([str(path)] if path else []) + [bin_dir, os.environ.get("PATH", "")]))
    return subprocess.run(["sh", ENTRYPOINT, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def fake_python(tmp_path_factory):
    """A `python` that only prints the command it was given, one argument a line."""
    folder = tmp_path_factory.mktemp("fake_bin")
    script = folder / "python"
    script.write_text('#!/bin/sh\necho python\nfor a in "$@"; do printf \'%s\\n\' "$a"; done\n')
    script.chmod(0o755)
    return folder


def command_of(args, fake_python, **kwargs):
    """What the entrypoint would run for these arguments (with the fake python)."""
    r = run_entrypoint(args, timeout=30, path=fake_python, **kwargs)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines(), r.stderr


def default_model_dir(args, fake_python):
    argv, _ = command_of(args, fake_python)
    assert argv[:3] == ["python", "-m", "resnet_cifar.train"], argv
    given = [a for a in argv if a.startswith("--model_dir=")]
    assert len(given) == 1 and argv[3] == given[0], argv       # first: a flagfile's would win
    assert argv[4:] == args                                       # the user's flags, unchanged
    return given[0].split("=", 1)[1]


@pytest.mark.parametrize("args", [[], ["--help"], ["--helpshort"], ["-h"]])
def test_no_arguments_print_the_help_and_exit_0(args):
    """`docker run IMAGE`: the image's usage and the training flags, exit code 0."""
    r = run_entrypoint(args, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "docker run --rm --gpus all" in r.stdout and "/runs/NAME" in r.stdout
    for flag in ("--model_dir", "--[no]flag_noconv_l2", "--bn_decay", "--data_source"):
        assert flag in r.stdout
    assert "Traceback" not in r.stderr


def test_dockerfile_has_no_cmd_that_would_hide_the_help():
    with open(DOCKERFILE) as f:
        cmds = [line for line in f if line.startswith("CMD")]
    assert cmds in ([], ["CMD []\n"])


@pytest.mark.parametrize("args, name", [
    (["--flag_noconv_l2"], "noconv_l2"),
    (["--noconv_l2"], "noconv_l2"),
    (["-noconv_l2"], "noconv_l2"),
    (["--conv_l2=false"], "noconv_l2"),
    (["--seed=0"], "baseline"),
    (["--data_source=synthetic", "--train_epochs=1", "--steps_per_epoch=2"], "baseline_synthetic"),
    (["--noconv_l2", "--data_source", "synthetic", "--seed=1"], "noconv_l2_synthetic_seed1"),
    (["--noconv_l2", "--data_source=binary"], "noconv_l2"),
    (["--flag_noconv_l2=false"], "baseline"),
    (["--noconv_l2", "--conv_l2"], "baseline"),
    (["--noconv_l2", "--conv_grad_scale"], "conv_lr_scale"),
    (["--noconv_l2", "--conv_grad_scale", "--bn_decay=0.98"], "conv_lr_scale_bn098"),
    (["--noconv_l2", "--conv_grad_scale", "--bn_decay", "0.980"], "conv_lr_scale_bn098"),
    (["--noconv_l2", "--bn_decay=0.9970"], "noconv_l2"),
    (["--noconv_l2", "--conv_grad_scale", "--conv_lr_factor=per_layer", "--replay_from=/runs/baseline"],
     "conv_lr_scale_per_layer"),
    (["--conv_grad_scale"], "conv_lr_scale_conv_l2"),
    (["--noconv_l2", "--conv_grad_scale", "--noconv_grad_scale"], "noconv_l2"),
    (["--optimizer=adamw", "--noconv_l2"], "adamw_noconv_l2"),
    (["--resnet_size=32"], "resnet32_baseline"),
    (["--noconv_l2", "--seed=1"], "noconv_l2_seed1"),
    (["--noconv_l2", "--seed", "2"], "noconv_l2_seed2"),
    (["--flagfile=experiments/full/conv_lr_scale_bn098.flags"], "conv_lr_scale_bn098"),
    (["--flagfile", "experiments/full/noconv_l2.flags", "--seed=3"], "noconv_l2_seed3"),
    (["--flagfile=experiments/quick/noconv_l2.flags"], "quick_noconv_l2"),
    (["--flagfile=experiments/adam/baseline.flags"], "adam_baseline"),
    (["--bn_decay=../x"], "baseline_bn_x"),                     # a plain name, whatever the flag holds
    (["--noconv_l2", "--", "--conv_grad_scale"], "noconv_l2"),   # absl stops at --
])
def test_default_model_dir_is_named_after_the_run(args, name, fake_python):
    assert default_model_dir(args, fake_python) == f"/runs/{name}"


def test_the_docs_table_of_names_is_what_the_entrypoint_does(fake_python):
    """docs/container.md, "Where a run goes": each row that is one command and one name."""
    with open(os.path.join(ROOT, "docs", "container.md")) as f:
        rows = re.findall(r"^\| `([^`|]+)` \| `([^`|]+)` \|$", f.read(), re.M)
    assert len(rows) >= 2
    for flags, name in rows + [(" ".join(["--flag_noconv_l2"]), "noconv_l2")]:
        assert default_model_dir(shlex.split(flags), fake_python) == f"/runs/{name}", flags


def test_an_explicit_model_dir_is_kept(fake_python, tmp_path):
    for args in (["--noconv_l2", "--model_dir=/runs/mine"], ["--model_dir", "/elsewhere", "--noconv_l2"],
                 ["-model_dir=/runs/x"]):
        argv, err = command_of(args, fake_python)
        assert argv == ["python", "-m", "resnet_cifar.train", *args]
        assert "named after the flags" not in err
    flagfile = tmp_path / "mine.flags"
    flagfile.write_text("--noconv_l2\n--model_dir=/runs/from_the_file\n")
    argv, _ = command_of([f"--flagfile={flagfile}"], fake_python)
    assert argv == ["python", "-m", "resnet_cifar.train", f"--flagfile={flagfile}"]


def test_the_default_is_announced_and_an_unmounted_runs_folder_warned_of(fake_python, tmp_path):
    _, err = command_of(["--flag_noconv_l2"], fake_python, runs_dir=tmp_path)
    notes = err.splitlines()
    assert f"--model_dir={tmp_path}/noconv_l2 (named after the flags" in err
    assert any("is not a mounted folder" in line and "lost when the container is removed" in line
               and "-v $PWD/runs:" in line for line in notes)
    if not glob.glob("/dev/nvidia[0-9]*") and not os.path.exists("/dev/dxg"):
        assert any("no GPU in this container" in line for line in notes)
    assert len(notes) <= 2


def test_other_commands_pass_through_unchanged(fake_python):
    for args in (["python", "-m", "experiments.run_all", "--help"],
                 ["python", "-m", "resnet_cifar.train", "--noconv_l2"]):
        argv, err = command_of(args, fake_python)
        assert argv == args and err == ""
    argv, _ = command_of(["--helpfull"], fake_python)
    assert argv == ["python", "-m", "resnet_cifar.train", "--helpfull"]


def test_readme_training_command_runs_through_the_entrypoint(tmp_path):
    """`docker run --rm --gpus all ... IMAGE --flag_noconv_l2`, on synthetic data, trains
    into /runs/noconv_l2_synthetic (here under tmp_path; real data: /runs/noconv_l2), and its
    TensorBoard hint is a command for the host, not a path inside the container."""
    command = readme_docker_command("--flag_noconv_l2")
    for option in ("--rm", "--user $(id -u):$(id -g)", "-v $PWD/runs:/runs"):
        assert option in command
    args = entrypoint_args(command)
    assert args == ["--flag_noconv_l2"]
    smoke = ["--data_source=synthetic", "--train_epochs=1", "--steps_per_epoch=2", "--eval_steps=1",
             "--batch_size=16", "--verbose=0"]
    r = run_entrypoint(args + smoke, runs_dir=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    model_dir = tmp_path / "noconv_l2_synthetic"
    assert os.listdir(tmp_path) == ["noconv_l2_synthetic"]
    hint = [line for line in r.stdout.splitlines() if line.startswith("TensorBoard: ")]
    assert hint == [f"TensorBoard: docker run --rm -p 6006:6006 -v $PWD/runs:{tmp_path} resnet-cifar "
                    f"tensorboard --logdir {tmp_path} --bind_all (on the host, in the folder you mounted "
                    f"at {tmp_path})"], r.stdout
    assert events.read_config(str(model_dir))["conv_l2"] is False          # the switch reached the run
    steps, _ = events.read_scalars(str(model_dir), tags.CONV_SQSUM)
    assert list(steps) == [0, 1]


def test_docs_commands_remove_their_containers():
    """No container (and, as the image has no VOLUME, no volume) is left behind."""
    with open(os.path.join(ROOT, "docs", "container.md")) as f:
        runs = [line for line in f if line.startswith("docker run")]
    assert runs and all(line.startswith("docker run --rm ") for line in runs), runs


def test_entrypoint_runs_other_commands_as_given():
    r = run_entrypoint(["python", "-c", "print('hello from the image')"], timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "hello from the image"


def test_readme_tensorboard_command_goes_to_tensorboard():
    args = entrypoint_args(readme_docker_command("tensorboard --logdir"))
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


# ------------------------------------------------------------------------- what the image holds

def dockerfile_instructions():
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    with open(DOCKERFILE) as f:
        lines = [line for line in f if not line.lstrip().startswith("#")]
    text = "".join(lines).replace("\\\n", " ")
    return [tuple(line.split(None, 1)) for line in text.splitlines() if line.strip()]


def requirement_names(text):
    return {re.split(r"[=<>!~\[ ;]", line.split("#")[0].strip())[0].lower()
            for line in text.splitlines() if line.split("#")[0].strip()}


def test_dockerfile_installs_the_runtime_requirements_only():
    """requirements.txt's "# Tests" part (pytest, ...) stays out of the image, which holds no tests."""
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        requirements = f.read()
    head, tests_part = requirements.split("\n# Tests\n")
    test_only = requirement_names(tests_part)
    assert {"pytest", "pytest-xdist"} <= test_only
    runs = [args for op, args in dockerfile_instructions() if op == "RUN"]
    installs = [args for args in runs if "pip install" in args]
    assert len(installs) == 2, installs
    # The requirements step: replay its filter on requirements.txt; what pip then gets.
    step = next(args for args in installs if "requirements" in args)
    sed = re.search(r"sed '([^']+)' /tmp/requirements\.txt > (\S+)", step)
    assert sed, step
    filtered = subprocess.run(["sed", sed.group(1)], input=requirements, capture_output=True,
                              text=True, check=True).stdout
    assert f"pip install -r {sed.group(2)}" in step
    assert requirement_names(filtered) == requirement_names(head)
    assert not requirement_names(filtered) & test_only
    assert "tensorflow" in requirement_names(filtered)
    # The package itself, without dependencies, and nothing else.
    package = next(args for args in installs if args is not step)
    assert "pip install --no-deps ." in package
    assert not any(name in args for args in installs for name in test_only)
    # The tests are not in the image either.
    copied = " ".join(args for op, args in dockerfile_instructions() if op in ("COPY", "ADD"))
    assert "tests" not in copied


def test_dockerfile_leaves_no_build_leftovers_and_no_volume():
    instructions = dockerfile_instructions()
    assert not [args for op, args in instructions if op == "VOLUME"]
    env = " ".join(args for op, args in instructions if op == "ENV")
    assert "PIP_NO_CACHE_DIR=1" in env
    package = next(args for op, args in instructions if op == "RUN" and "--no-deps ." in args)
    assert "rm -rf build ./*.egg-info" in package
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        ignored = f.read().split()
    for entry in ("build", "*.egg-info", "tests"):
        assert entry in ignored


def test_dockerfile_gives_any_user_a_home_and_a_quiet_console():
    env = " ".join(args for op, args in dockerfile_instructions() if op == "ENV").split()
    assert "HOME=/tmp" in env and "TF_CPP_MIN_LOG_LEVEL=3" in env
    assert any("chmod 1777 /data/tfds /runs" in args for op, args in dockerfile_instructions() if op == "RUN")


def test_prepare_cifar10_without_a_network_fails_fast_in_one_line(tmp_path):
    """The docs' download step, with every connection sent to a closed local port."""
    command = readme_docker_command("prepare-cifar10")
    assert "--rm" in command and "--user $(id -u):$(id -g)" in command
    assert entrypoint_args(command) == ["prepare-cifar10"]
    with open(DOCKERFILE) as f:
        assert "COPY docker/prepare_cifar10.py /usr/local/bin/prepare-cifar10" in f.read()
    dead = "http://127.0.0.1:9"
    env = dict(os.environ, PYTHONPATH=ROOT, TFDS_DATA_DIR=str(tmp_path / "tfds"), HTTPS_PROXY=dead,
               HTTP_PROXY=dead, https_proxy=dead, http_proxy=dead, NO_PROXY="", no_proxy="")
    start = time.monotonic()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "docker", "prepare_cifar10.py")], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - start
    assert r.returncode == 2, r.stderr[-2000:]          # the trainer's code for the same error
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prepare-cifar10: cannot download CIFAR-10"), r.stderr
    assert "in the container, mount the archive's folder: -v $PWD:/data/cifar" in lines[0], lines
    assert took < 120, took


# ------------------------------------------------------------------------- a quiet console

def python_with_quiet_tf(code, level):
    """A Python process that imports resnet_cifar first, as the image's .pth line does (m: quiet_tf)."""
    boot = "import resnet_cifar as m\n"
    return python("-c", boot + code, log_level=level)


def test_quiet_tf_drops_the_cpp_lines_below_the_level_and_keeps_the_rest():
    code = """
import os, sys
print("python before", file=sys.stderr, flush=True)
with m.filtered_stderr():
    os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n")
    os.write(2, b"I0000 00:00:1796026656.713319   27845 port.cc:153] oneDNN custom operations are on.\\n")
    os.write(2, b"W0000 00:00:1796026656.7 27845 cuda_dnn.cc:8] plugin\\n")
    os.write(2, b"E0000 00:00:1796026656.714515   27845 cuda_driver.cc:152] failed call to cuInit: 303\\n")
    os.write(2, b"a line of the program\\n")
    print("python during", file=sys.stderr)
    os.write(2, b"F0000 00:00:1796026656.1 27845 x.cc:1] fatal\\n")
print("python after", file=sys.stderr)
"""
    quiet = python_with_quiet_tf(code, 3)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr.splitlines() == ["python before", "a line of the program", "python during",
                                         "F0000 00:00:1796026656.1 27845 x.cc:1] fatal", "python after"]
    warnings_only = python_with_quiet_tf(code, 2).stderr
    assert "cuInit" in warnings_only and "port.cc" not in warnings_only and "cuda_dnn" not in warnings_only
    everything = python_with_quiet_tf(code, 0).stderr
    assert len(everything.splitlines()) == 9


def test_quiet_tf_silences_tensorflows_import_in_any_process():
    r = python_with_quiet_tf("import tensorflow as tf, sys; print(tf.__version__); "
                             "print('still here', file=sys.stderr)", 3)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith("2.21") and r.stderr.strip() == "still here", r.stderr


def test_dockerfile_installs_quiet_tf_for_every_process():
    with open(DOCKERFILE) as f:
        text = f.read()
    assert 'echo "import resnet_cifar" > "$site_dir/resnet_cifar_quiet_tf.pth"' in text


def test_check_image_script_explains_itself_and_refuses_unknown_arguments():
    """docker/check_image.sh needs an engine and root to do its work; its help and refusals do not."""
    script = os.path.join(ROOT, "docker", "check_image.sh")
    r = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--build-base" in r.stdout and r.stdout.startswith("Build the image")
    r = subprocess.run(["bash", script, "--bogus"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown argument --bogus" in r.stderr
