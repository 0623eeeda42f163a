"""The door to a run folder (`--model_dir`): the checks, the lock, run_config.json, the done marker.

Nothing is written before every check has passed (`check`); the folder is then created and
locked for the run's lifetime, and checked again under the lock (`opened`). A run folder
belongs to one configuration. Re-running the same command resumes it (or says it is
finished); a different configuration is refused, naming the flags that differ.
`--overwrite` replaces whatever run the folder holds, finished or not, with a fresh one
(other files in the folder stay). Files are written atomically (temporary file + rename),
so a kill never leaves half a JSON file.

The file names are in `tags`; checkpoints are `checkpoints`, the lock and signals
`process`, and reading a run back (analysis, replay, the resume check) is `events`,
imported here only when a folder holds something to read.
"""

import contextlib
import dataclasses
import datetime
import glob
import json
import os
import platform
import shutil
import sys
import time

from resnet_cifar import cifar_data, config as config_lib
from resnet_cifar import checkpoints, process, tags

CHECKPOINTS = tags.CHECKPOINTS_DIR
MIN_FREE_BYTES = 100 * 2**20     # checkpoints (2 + phase ends, ~2.2 MB each) and event files, with margin
# Settings that do not change what a run computes: they may differ on resume.
OPERATIONAL = ("model_dir", "overwrite", "verbose", "data_dir", "steps_per_execution", "jit_compile")


@dataclasses.dataclass(frozen=True)
class RunDirState:
    finished: bool
    replace: bool = False       # --overwrite of a folder holding a run: cleared before training


def _nearest_existing(path):
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check(config, locked=False):
    """Checks the folder is usable and consistent with `config`, writing nothing.

    A refused command therefore leaves no folder behind, and the corrected command
    just works. `locked`: the caller holds the folder's lock (else a holder refuses).
    """
    d = config.model_dir
    state = _stored_run(config)
    if state.finished:            # nothing to write: a read-only mount is fine
        return state
    base = _nearest_existing(d)
    if not os.path.isdir(base) or not os.access(base, os.W_OK | os.X_OK):
        what = "not a folder" if not os.path.isdir(base) else "not writable"
        raise config_lib.ConfigError(f"--model_dir={d} is not writable ({base} is {what})")
    free = shutil.disk_usage(base).free
    if free < MIN_FREE_BYTES:
        raise config_lib.ConfigError(
            f"--model_dir={d}: only {free / 2**20:.0f} MB free on its disk, a run needs "
            f"{MIN_FREE_BYTES / 2**20:.0f} MB for checkpoints and event files")
    if not locked:
        holder = process.lock_holder(d)
        if holder is not None:
            raise config_lib.ConfigError(str(process.RunLocked(d, holder)))
    return state


def _stored_run(config):
    """What the folder holds: nothing, this run (finished or not), or another (replace)."""
    d = config.model_dir
    path = os.path.join(d, tags.RUN_CONFIG_FILE)
    if not os.path.exists(path):
        sweep = _sweep_run(d)
        if sweep:
            raise config_lib.ConfigError(
                f"--model_dir={d} holds the runs of a sweep ({sweep}); give one run's own folder")
        leftovers = [n for n in (CHECKPOINTS, tags.TRAIN_DIR, tags.DONE_FILE) if os.path.lexists(os.path.join(d, n))]
        if leftovers and not config.overwrite:
            raise config_lib.ConfigError(
                f"--model_dir={d} holds {', '.join(leftovers)} but no {tags.RUN_CONFIG_FILE}: which run "
                "they belong to is unknown; use --overwrite to start this run afresh, or another --model_dir")
        return RunDirState(finished=False, replace=bool(leftovers))
    if config.overwrite:          # whatever run is here, finished or not, same flags or not
        return RunDirState(finished=False, replace=True)
    try:
        with open(path) as f:
            old = json.load(f)["config"]
        if not isinstance(old, dict):
            raise TypeError("its config is not a JSON object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise config_lib.ConfigError(f"{path} is unreadable ({type(e).__name__}); "
                                     "use --overwrite to start this run afresh") from None
    diffs = differing_flags(old, config.to_dict())
    if diffs:
        raise config_lib.ConfigError(
            f"--model_dir={d} holds a run with other flags ({'; '.join(diffs)}); "
            "use --overwrite to replace it, or another --model_dir")
    if os.path.isfile(os.path.join(d, tags.DONE_FILE)):
        return RunDirState(finished=True)
    damage = damaged(d)
    if damage:
        raise config_lib.ConfigError(f"--model_dir={d} is damaged: {damage}; repair it, or use "
                                     "--overwrite to start this run afresh")
    return RunDirState(finished=False)


def damaged(d):
    """'' if the run folder's parts have their kinds, else one line saying which does not."""
    for name, folder in ((CHECKPOINTS, True), (tags.TRAIN_DIR, True), (tags.VALIDATION_DIR, True),
                         (tags.CHANNEL_SQSUM_FILE, False)):
        path = os.path.join(d, name)
        if os.path.lexists(path) and os.path.isdir(path) != folder:
            return f"{path} is {'a file' if folder else 'a folder'}, not {'a folder' if folder else 'a file'}"
    path = os.path.join(d, tags.CHANNEL_SQSUM_FILE)
    if os.path.exists(path):
        from resnet_cifar import events

        try:
            events.read_channel_sqsum(d)
        except events.EventsError as e:
            return f"{e} (delete it to go on without the per-channel log of the epochs so far)"
    return ""


def logged_epochs(d):
    """The last epoch the train event files of the run folder hold (0: none, or unreadable)."""
    if not glob.glob(os.path.join(glob.escape(d), tags.TRAIN_DIR, "*tfevents*")):
        return 0
    from resnet_cifar import events

    try:
        run = events.load_run(d, subdirs=(tags.TRAIN_DIR,))
    except events.EventsError:
        return 0
    steps = run.scalars.get(tags.TRAIN_DIR, {}).get(tags.EPOCH_LOSS, ((),))[0]
    return int(max(steps)) if len(steps) else 0


def check_checkpoints_cover_the_logs(d, restored):
    """A run resumes from checkpoint `restored` (0: none). A kill between an epoch's logs and its
    checkpoint leaves at most one epoch logged beyond it, which the resumed run logs again; more
    means checkpoints were deleted or lost, and going on would silently redo those epochs
    (all of them, from none) over the curves already logged: refused instead."""
    logged = logged_epochs(d)
    if logged > restored + 1:
        have = f"its newest checkpoint is of epoch {restored}" if restored else "it has no checkpoint"
        raise config_lib.ConfigError(
            f"--model_dir={d} has logged {count(logged, 'epoch')} but {have}: its checkpoints were deleted or "
            f"lost; use --overwrite to start this run afresh (its logs go too), or another --model_dir")


def _sweep_run(d, depth=3):
    """The first run_config.json in a sub-folder of `d` (up to `depth` levels down), or ''."""
    if depth == 0 or not os.path.isdir(d):
        return ""
    try:
        names = sorted(os.listdir(d))
    except OSError:
        return ""
    for name in names:
        sub = os.path.join(d, name)
        if os.path.isdir(sub) and not os.path.islink(sub):
            if os.path.isfile(os.path.join(sub, tags.RUN_CONFIG_FILE)):
                return os.path.join(sub, tags.RUN_CONFIG_FILE)
            found = _sweep_run(sub, depth - 1)
            if found:
                return found
    return ""


@contextlib.contextmanager
def opened(config):
    """The run folder of `config`, checked, created and locked for the block; yields its
    `RunDirState`. The one way a run gets its folder.

    The checks run before anything is written (a finished run needs no lock, and is fine on
    a read-only mount), then again under the lock, which is the check that counts: another
    process may have written the folder meanwhile. A `ConfigError` or `DataError` in the
    block (a refusal before training), or a stop that left nothing but the lock, removes a
    folder this call created: nothing is left on disk.
    """
    state = check(config)
    if state.finished:
        yield state
        return
    d = config.model_dir
    created = not os.path.exists(d)
    try:
        lock = process.lock(d)
    except process.RunLocked as e:
        raise config_lib.ConfigError(str(e)) from None
    except IsADirectoryError:        # no process of this project takes a folder as its lock
        raise config_lib.ConfigError(f"--model_dir={d}: its lock file {process.LOCK_FILE} is a folder: "
                                     "remove that folder, then run again") from None
    except OSError as e:
        raise config_lib.ConfigError(f"--model_dir={d}: cannot take its lock {e.filename or process.LOCK_FILE} "
                                     f"({e.strerror or e})") from None
    try:
        yield check(config, locked=True)
    except BaseException as e:
        refused = isinstance(e, (config_lib.ConfigError, cifar_data.DataError))
        if created and (refused or set(os.listdir(d)) <= {process.LOCK_FILE}):
            lock.release()
            shutil.rmtree(d, ignore_errors=True)
        raise
    finally:
        lock.release()


def finished_message(config):
    return (f"{config.model_dir}: this run already finished ({count(config.train_epochs, 'epoch')}); "
            "nothing to do")


def identity(config):
    """The identity a run's checkpoints carry: its seed and a digest of the settings that change
    what it computes (not the operational ones; a setting at its default is left out, so one
    added to the code later keeps old checkpoints this run's)."""
    import hashlib

    defaults = {f.name: f.default for f in dataclasses.fields(config_lib.TrainConfig)}
    settings = {k: _norm(v) for k, v in config.to_dict().items()
                if k not in OPERATIONAL and k != "seed" and _norm(v) != _norm(defaults.get(k))}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return f"seed {config.seed}, settings {digest}"


def differing_flags(old, new):
    """['--flag: old -> new', ...] over the settings that change what a run computes."""
    out = []
    defaults = {f.name: f.default for f in dataclasses.fields(config_lib.TrainConfig)}
    for key in sorted(set(old) | set(new)):
        if key in OPERATIONAL:
            continue
        if key not in old and key in defaults and _norm(new.get(key)) == _norm(defaults[key]):
            continue    # a setting added after that run was made, at its default: same run
        a, b = _norm(old.get(key)), _norm(new.get(key))
        if a != b:
            out.append(f"--{key}: {a} -> {b}")
    return out


def _norm(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def clear(d):
    """Removes what a run wrote (and only that) from its folder, whatever kind each part is;
    with it the precise-BN results of its weights, which a new run of the same length would
    otherwise pass for its own."""
    others = [os.path.basename(p) for pattern in (tags.PRECISE_BN_OTHER, tags.PRECISE_BN_EPOCHS)
              for p in glob.glob(os.path.join(glob.escape(d), pattern))]
    for name in (tags.TRAIN_DIR, tags.VALIDATION_DIR, CHECKPOINTS, tags.RUN_CONFIG_FILE, tags.DONE_FILE,
                 tags.CHANNEL_SQSUM_FILE, tags.FINAL_WEIGHTS_FILE, tags.PRECISE_BN_FILE, *others):
        path = os.path.join(d, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)


def start(config, restored, model, steps_per_epoch, num_train_images, data):
    """A run starts (restored: 0) or resumes from checkpoint `restored`: its logs must not run
    ahead of that checkpoint (`check_checkpoints_cover_the_logs`), then run_config.json records
    it. Nothing is written before the check: a refused resume leaves the folder as it was."""
    check_checkpoints_cover_the_logs(config.model_dir, restored)
    write_run_config(config, model, steps_per_epoch, num_train_images, data)


def write_run_config(config, model, steps_per_epoch, num_train_images, data=None):
    """run_config.json: every setting, versions, parameter count, seed, the data's fingerprint
    (`cifar_data.fingerprint`): a figure's """
    import tensorflow as tf

    path = os.path.join(config.model_dir, tags.RUN_CONFIG_FILE)
    # Every code version that trained part of this run, oldest first: a resume from another
    # commit adds one, so a run's figures can always be traced to the code behind each epoch.
    try:
        with open(path) as f:
            sources = list(json.load(f).get("sources") or [])
    except (OSError, ValueError, AttributeError, TypeError):
        sources = []
    current = source()
    if not sources or sources[-1] != current:
        sources.append(current)
    checkpoints.write_json(path, {
        "config": config.to_dict(),
        "seed": config.seed,
        "trainable_parameters": int(sum(int(v.numpy().size) for v in model.trainable_variables)),
        "steps_per_epoch": steps_per_epoch,
        "num_train_images": num_train_images,
        "data": data,
        "versions": versions(),
        "devices": [d.name for d in tf.config.list_logical_devices()],
        "runtime": dict(runtime(), xla=bool(model.jit_compile)),   # the step as compiled
        "source": current,
        "sources": sources,
        "command": sys.argv,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })


def write_final_weights(folder, model):
    """A run's weights alone, as a Keras `.weights.h5` file, written atomically: `save_weights`
    of a compiled model also stores the optimizer's slots (twice the size); a plain Model over
    the same layers has none, and its file loads into any model `models.build_resnet` builds
    of the same depth."""
    import keras

    with checkpoints.atomic_path(os.path.join(folder, tags.FINAL_WEIGHTS_FILE)) as tmp:
        keras.Model(model.inputs, model.outputs).save_weights(tmp)


def finish(config, model, final_logs):
    """The end of a run: its final weights (to share and evaluate without checkpoints), then
    done.json, so a finished run always has its final weights."""
    write_final_weights(config.model_dir, model)
    checkpoints.write_json(os.path.join(config.model_dir, tags.DONE_FILE),
                           {"epochs": config.train_epochs, "final": final_logs,
                            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


# ----------------------------------------------------------------------------- provenance

# Where a run ran: library versions, the CPU and TensorFlow's thread and oneDNN settings,
# and the git commit of the code. run_config.json records them, so every figure can be
# traced to its code and machine.

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


# ----------------------------------------------------------------------------- console words

def count(n, word):
    """'1 epoch', '2 epochs': n and the word, plural unless n is 1."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def hms(seconds):
    """0:01:05 for 65 seconds (a negative time is 0:00:00, one beyond a timedelta's range
    'more than 2 million years')."""
    seconds = max(seconds, 0)
    if seconds >= datetime.timedelta.max.total_seconds():
        return "more than 2 million years"
    return str(datetime.timedelta(seconds=round(seconds)))
