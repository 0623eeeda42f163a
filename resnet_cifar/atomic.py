"""Files that appear whole or not at all: written to a temporary file beside them, flushed
to disk, then renamed over the target. A kill or a full disk leaves the old file (or none),
never a half-written or empty one. One helper for every file this project writes itself:
run_config.json, done.json, the checkpoint index, conv_channel_sqsum.npz, precise_bn.json,
the analysis tables and figures.
"""

import contextlib
import json
import os


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w"):
    """`open(path, mode)` for writing, as a temporary file renamed over `path` on success."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp) and not os.path.isdir(tmp):
            os.remove(tmp)


def write_json(path: str, payload) -> None:
    with atomic_open(path) as f:
        json.dump(payload, f, indent=2, sort_keys=True)
