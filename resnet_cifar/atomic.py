"""Files that appear whole or not at all: written to a temporary file beside them, flushed
to disk, then renamed over the target. A kill or a full disk leaves the old file (or none),
never a half-written or empty one. One helper for every file this project writes itself:
run_config.json, done.json, the final weights, the checkpoint index, conv_channel_sqsum.npz, precise_bn.json,
the analysis tables and figures.
"""

import contextlib
import json
import os


@contextlib.contextmanager
def atomic_path(path: str):
    """A temporary path beside `path`, with the same ending (Keras wants `.weights.h5`), renamed
    over `path` when the block succeeds; for writers that take a path, not a file."""
    folder, name = os.path.split(path)
    stem, dot, ending = name.partition(".")          # final.weights.h5 -> final.tmp9.weights.h5
    tmp = os.path.join(folder, f"{stem}.tmp{os.getpid()}{dot}{ending}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp) and not os.path.isdir(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w"):
    """`open(path, mode)` for writing, as a temporary file renamed over `path` on success."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **({} if "b" in mode else {"newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_json(path: str, payload) -> None:
    with atomic_open(path) as f:
        json.dump(payload, f, indent=2, sort_keys=True)
