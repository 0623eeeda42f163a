"""Where a run ran: library versions, the CPU and TensorFlow's thread and oneDNN settings,
and the git commit of the code. run_config.json records them, so every figure can be
traced to its code and machine.
"""

import os
import platform


def versions():
    import keras
    import numpy
    import tensorflow as tf
    from importlib import metadata

    out = {"python": platform.python_version(), "tensorflow": tf.__version__,
           "keras": keras.__version__, "numpy": numpy.__version__}
    for package in ("tensorflow-datasets", "absl-py", "tensorboard"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return out


def onednn_enabled():
    """Whether this process's TensorFlow runs oneDNN kernels (fixed when TF was imported)."""
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:          # a TF build without this module: unknown
        return None
    return bool(_pywrap_util_port.IsMklEnabled())


def cpu_model():
    """The CPU's model name (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def runtime():
    """The settings a run's speed (and last bits) depend on: oneDNN, thread pools, and the GPUs
    it was given (a runner's share of a node: Ray sets CUDA_VISIBLE_DEVICES)."""
    import tensorflow as tf

    return {"onednn": onednn_enabled(),
            "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),   # 0: TF's default
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
            "cpu": cpu_model(), "cpu_count": os.cpu_count()}


def source():
    """The code a run was trained with: the git commit of this package's checkout, and whether
    tracked files differed from it (None for an installed copy, which has no git checkout)."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args):
        try:
            out = subprocess.run(["git", "-C", here, *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}
