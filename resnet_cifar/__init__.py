"""resnet_cifar: the post's experiment on L2 weight decay and batch norm, in TF2 / Keras 3.

Importing the package keeps TensorFlow's C++ log lines off the console (the oneDNN notice,
CUDA probing such as the cuInit error on a machine without a GPU): TF_CPP_MIN_LOG_LEVEL=3
unless set, and the lines TensorFlow prints while it is imported are filtered the same way
(below). TF_CPP_MIN_LOG_LEVEL=0 shows them all.

TensorFlow's C++ start-up lines kept off the console, in every process of this project.

TensorFlow 2.21 writes its start-up lines (the oneDNN notice, "Could not find cuda
drivers", CUDA plugin lines) through absl logging while `import tensorflow` runs, before
it applies TF_CPP_MIN_LOG_LEVEL, each behind "WARNING: All log messages before
absl::InitializeLog() is called are written to STDERR". `install()` (called when the
`resnet_cifar` package is imported, and by the image's .pth line for every Python process
there) makes the first `import tensorflow` run with stderr going to a temporary file;
afterwards the file's lines go to stderr, less the absl-formatted ones below
TF_CPP_MIN_LOG_LEVEL (I=0, W=1, E=2; F always stays) and absl's pre-init warning. Every
other line written meanwhile is kept, in order. TF_CPP_MIN_LOG_LEVEL unset or 0: nothing
is filtered.

The package's modules: docs/architecture.md.
"""

import contextlib
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile

_ABSL_LINE = re.compile(rb"^([IWEF])\d{4} \d\d:\d\d:\d+(\.\d+)? +\d+ [^ \]]+:\d+\] ")
_PRE_INIT = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_SEVERITY = {b"I": 0, b"W": 1, b"E": 2, b"F": 3}


def min_level():
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def is_noise(line, level):
    """Whether a line (bytes) is a C++ log line that TF_CPP_MIN_LOG_LEVEL=level hides."""
    if level <= 0:
        return False
    if line.rstrip(b"\r\n") == _PRE_INIT:
        return True
    m = _ABSL_LINE.match(line)
    return bool(m) and _SEVERITY[m.group(1)] < min(level, 3)


@contextlib.contextmanager
def filtered_stderr(level=None):
    """While inside: fd 2 goes to a temporary file; then its lines, less the noise, go to fd 2."""
    level = min_level() if level is None else level
    if level <= 0:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):     # no usable stderr: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = b"".join(line for line in held.read().splitlines(keepends=True) if not is_noise(line, level))
            while kept:
                kept = kept[os.write(2, kept):]


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the first top-level `import tensorflow` in filtered_stderr."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow" or path is not None:
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)                # once, and not for the lookup below
        spec = importlib.util.find_spec(name)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def quiet_exec_module(module):
            with filtered_stderr():
                exec_module(module)

        loader.exec_module = quiet_exec_module
        return spec


def install():
    if "tensorflow" not in sys.modules and min_level() > 0 and \
            not any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowImport())


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
install()
