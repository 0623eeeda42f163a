"""The run folder (`--model_dir`): guards before training, run_config.json, done marker.

Nothing is written before every check has passed (`check`); the folder is then
created and locked for the run's lifetime (`open_run`, `run_lock`).

A run folder belongs to one configuration. Re-running the same command resumes
it (or says it is finished); a different configuration is refused, naming the
flags that differ. `--overwrite` replaces whatever run the folder holds, finished
or not, with a fresh one (other files in the folder stay). Files are written atomically
(temporary file + rename), so a kill never leaves half a JSON file.
"""

import dataclasses
import glob
import json
import os
import shutil
import sys
import time

from resnet_cifar import config as config_lib
from resnet_cifar import atomic, console, events, provenance, run_lock, tags

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
        holder = run_lock.holder(d)
        if holder is not None:
            raise config_lib.ConfigError(str(run_lock.RunLocked(d, holder)))
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
    if events.is_done(d):
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
        try:
            events.read_channel_sqsum(d)
        except events.EventsError as e:
            return f"{e} (delete it to go on without the per-channel log of the epochs so far)"
    return ""


def logged_epochs(d):
    """The last epoch the train event files of the run folder hold (0: none, or unreadable)."""
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
            f"--model_dir={d} has logged {console.count(logged, 'epoch')} but {have}: its checkpoints were deleted or "
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


def open_run(config):
    """Creates the folder, takes its lock (one writer per run), re-checks it under the lock.

    Returns (lock, state, created): `created` when this call made the folder, so a
    refusal before training can remove it. Raises `ConfigError` (one line) if another
    process holds the folder or the folder cannot be made.
    """
    d = config.model_dir
    created = not os.path.exists(d)
    try:
        lock = run_lock.acquire(d)
    except run_lock.RunLocked as e:
        raise config_lib.ConfigError(str(e)) from None
    except IsADirectoryError:        # no process of this project takes a folder as its lock
        raise config_lib.ConfigError(f"--model_dir={d}: its lock file {run_lock.LOCK_FILE} is a folder: "
                                     "remove that folder, then run again") from None
    except OSError as e:
        raise config_lib.ConfigError(f"--model_dir={d}: cannot take its lock {e.filename or run_lock.LOCK_FILE} "
                                     f"({e.strerror or e})") from None
    try:
        state = check(config, locked=True)   # another process may have written it meanwhile
        if state.replace:
            clear(d)
    except BaseException:
        lock.release()
        if created:
            remove_created(d)
        raise
    return lock, state, created


def remove_created(d):
    """Removes a folder this process created, after a refusal: nothing is left on disk."""
    shutil.rmtree(d, ignore_errors=True)


def finished_message(config):
    return (f"{config.model_dir}: this run already finished ({console.count(config.train_epochs, 'epoch')}); "
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


def write_run_config(config, model, steps_per_epoch, num_train_images, data=None):
    """run_config.json: every setting, versions, parameter count, seed, the data's fingerprint
    (`cifar_data.fingerprint`): a figure's provenance."""
    import tensorflow as tf

    path = os.path.join(config.model_dir, tags.RUN_CONFIG_FILE)
    # Every code version that trained part of this run, oldest first: a resume from another
    # commit adds one, so a run's figures can always be traced to the code behind each epoch.
    try:
        with open(path) as f:
            sources = list(json.load(f).get("sources") or [])
    except (OSError, ValueError, AttributeError, TypeError):
        sources = []
    current = provenance.source()
    if not sources or sources[-1] != current:
        sources.append(current)
    atomic.write_json(path, {
        "config": config.to_dict(),
        "seed": config.seed,
        "trainable_parameters": int(sum(int(v.numpy().size) for v in model.trainable_variables)),
        "steps_per_epoch": steps_per_epoch,
        "num_train_images": num_train_images,
        "data": data,
        "versions": provenance.versions(),
        "devices": [d.name for d in tf.config.list_logical_devices()],
        "runtime": dict(provenance.runtime(), xla=bool(model.jit_compile)),   # the step as compiled
        "source": current,
        "sources": sources,
        "command": sys.argv,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })


def record_data(run_dir, data):
    """Adds the data's fingerprint to a run folder's run_config.json (a run trained before runs
    recorded it), nothing else changed. Refuses one that records other data."""
    path = os.path.join(run_dir, tags.RUN_CONFIG_FILE)
    with open(path) as f:
        payload = json.load(f)
    old = payload.get("data")
    if old and any(old.get(k) != data.get(k) for k in ("train", "test")):
        raise config_lib.ConfigError(f"{path} records other data ({old.get('name')}, train arrays "
                                     f"{old['train'].get('arrays_sha256', '?')[:12]}) than these")
    payload["data"] = data
    atomic.write_json(path, payload)


def mark_done(config, final_logs):
    atomic.write_json(os.path.join(config.model_dir, tags.DONE_FILE),
               {"epochs": config.train_epochs, "final": final_logs,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
