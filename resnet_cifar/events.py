"""Read what training logged: run folders, their flags and their TensorBoard scalars.

Shared by `analysis/` (figures and the summary table) and by training itself, which
replays a baseline's logged `conv_sqsum` (`--conv_lr_factor=replay`). So this module
stays light: no flags, no matplotlib, and TensorFlow is only pulled in (by
TensorBoard's file reader) when an event file is actually read.

TF2's `tf.summary.scalar` (and Keras' TensorBoard callback) write scalars as TENSOR
summaries, so they are read with `EventAccumulator.Tensors`, never `.Scalars`, and
with no sampling (`size_guidance` 0 keeps every event). Values were logged as float32;
they come back as float64 arrays holding exactly those float32 numbers.
"""

import dataclasses
import glob
import json
import os
import pickle
import re
import zipfile
from typing import Dict, List, Optional, Tuple

import numpy as np

from resnet_cifar import config as config_lib
from resnet_cifar import fidelity, tags
from resnet_cifar.command_line import not_a_folder

Series = Tuple[np.ndarray, np.ndarray]   # (steps as int64, values as float64), by step

_SEED_DIR = re.compile(r"^seed_(\d+)$")
_SCALARS_PLUGIN = "scalars"     # tf.summary.scalar's plugin name (tensorboard.plugins.scalar)


class EventsError(ValueError):
    """A run folder or a tag is missing or unreadable; the message is one line."""


def _event_dir(run_dir: str, subdir: str) -> str:
    path = os.path.join(run_dir, subdir) if subdir else run_dir
    if not glob.glob(os.path.join(path, "*tfevents*")):
        raise EventsError(f"run {run_dir}: no event files in {path}")
    return path


def damaged_event_files(run_dir: str, subdirs=(tags.TRAIN_DIR, tags.VALIDATION_DIR)) -> List[str]:
    """One line per damaged event file of the run: 'PATH: truncated record at byte N', ...

    TensorBoard's reader stops silently at a truncated or corrupted record and keeps
    what it read; TFRecord framing carries CRCs, so reading every record finds the
    damage. Empty when every file reads to its end.
    """
    import tensorflow as tf   # only when event files are actually read, like TensorBoard's reader

    out = []
    for subdir in subdirs:
        for path in sorted(glob.glob(os.path.join(run_dir, subdir, "*tfevents*"))):
            try:
                for _ in tf.data.TFRecordDataset(path):
                    pass
            except tf.errors.OpError as e:
                text = " ".join(str(getattr(e, "message", e)).split())
                found = re.search(r"(truncated|corrupted) record at \d+", text)
                out.append(f"{path}: {found.group(0) if found else text[:200]}")
    return out


def _tensor_events(path: str) -> Dict[str, list]:
    """All tensor events of one event folder, tag -> events in reading order."""
    # Imported here: TensorBoard's reader imports TensorFlow, which takes seconds
    # and is not needed to list runs.
    from tensorboard.backend.event_processing import event_accumulator as ea

    # purge_orphaned_data=False: duplicates of a resumed run are resolved below,
    # by write time, rather than by TensorBoard's restart heuristics.
    acc = ea.EventAccumulator(path, size_guidance={ea.TENSORS: 0},
                              purge_orphaned_data=False)
    try:
        acc.Reload()
    except Exception as e:  # a truncated or corrupt file; report it on one line
        raise EventsError(f"cannot read events in {path}: {type(e).__name__}: {e}") from None
    # Scalars only: the custom-scalars layout (a string tensor) is skipped.
    return {tag: acc.Tensors(tag) for tag in acc.Tags()[ea.TENSORS]
            if acc.SummaryMetadata(tag).plugin_data.plugin_name == _SCALARS_PLUGIN}


def _to_series(events: list) -> Series:
    """Steps sorted; of several values for one step the last written wins.

    A resumed run logs some epochs twice; the later value (largest wall time; for
    equal times the one read last) belongs to the run as it continued.
    """
    from tensorboard.util import tensor_util  # same as tf.make_ndarray, no TF import

    latest = {}
    for ev in sorted(events, key=lambda e: e.wall_time):   # stable: ties keep file order
        latest[int(ev.step)] = float(np.asarray(tensor_util.make_ndarray(ev.tensor_proto)))
    steps = np.array(sorted(latest), dtype=np.int64)
    values = np.array([latest[s] for s in steps], dtype=np.float64)
    return steps, values


def read_all_scalars(run_dir: str, subdir: str = tags.TRAIN_DIR) -> Dict[str, Series]:
    """Every scalar tag of `run_dir/subdir` as tag -> (steps, values); reads the files once."""
    path = _event_dir(run_dir, subdir)
    return {tag: _to_series(events) for tag, events in _tensor_events(path).items()}


def read_scalars(run_dir: str, tag: str, subdir: str = tags.TRAIN_DIR) -> Series:
    """One scalar tag as (steps int64, values float64), sorted by step, one value per step."""
    path = _event_dir(run_dir, subdir)
    events = _tensor_events(path)
    if tag not in events:
        known = ", ".join(sorted(events)[:6]) + (", ..." if len(events) > 6 else "")
        raise EventsError(f"run {run_dir}: no tag {tag!r} in {subdir or '.'}/ "
                          f"(has: {known or 'no scalars'})")
    return _to_series(events[tag])


def is_done(run_dir: str) -> bool:
    """The trainer wrote done.json: the run finished all its epochs (the runner's and the
    trainer's test; `is_complete` also checks that the event files hold those epochs)."""
    return os.path.isfile(os.path.join(run_dir, tags.DONE_FILE))


def done_epochs(run_dir: str) -> Optional[int]:
    """The epochs a finished run's done.json names; None if it has none (or an unreadable one)."""
    try:
        with open(os.path.join(run_dir, tags.DONE_FILE)) as f:
            return int(json.load(f)["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_complete(run_dir: str, subdirs=(tags.TRAIN_DIR, tags.VALIDATION_DIR),
                scalars: Optional[Dict[str, Dict[str, Series]]] = None) -> bool:
    """True when training wrote its done-marker and the event files of `subdirs` hold the
    epochs it names: the train loss of its last epoch, the test accuracy of its last
    evaluation. An event file emptied or cut short (at a record boundary, which reads
    back without an error) thus makes a finished run incomplete.

    scalars: subdir -> tag -> series, if already read (`load_run`).
    """
    epochs = done_epochs(run_dir)
    if epochs is None:
        return False
    try:
        every = int(read_config(run_dir).get("epochs_between_evals") or 1)
    except (EventsError, ValueError, TypeError):
        every = 1
    needed = {tags.TRAIN_DIR: (tags.EPOCH_LOSS, epochs),
              tags.VALIDATION_DIR: (tags.EPOCH_ACCURACY, epochs // max(every, 1) * max(every, 1))}
    for subdir in subdirs:
        tag, epoch = needed[subdir]
        if not epoch or (subdir != tags.TRAIN_DIR and not glob.glob(os.path.join(run_dir, subdir, "*tfevents*"))):
            continue            # nothing to hold, or never logged there (no event file at all)
        if scalars is not None and subdir in scalars:
            found = scalars[subdir]
        else:
            try:
                found = read_all_scalars(run_dir, subdir)
            except EventsError:
                found = {}
        # Its key tag; else (runs made by other code) the last step of any tag.
        last = [int(s.max()) for s, _ in ([found[tag]] if tag in found else found.values()) if len(s)]
        if not last or max(last) < epoch:
            return False
    return True


def read_config(run_dir: str) -> dict:
    """The run's flag values: the "config" object of run_config.json (or the whole file)."""
    path = os.path.join(run_dir, tags.RUN_CONFIG_FILE)
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise EventsError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise EventsError(f"{path}: expected a JSON object")
    config = data.get("config", data)
    return config if isinstance(config, dict) else {}


def recorded_data(run_dir: str) -> Optional[dict]:
    """The fingerprint of the data a run trained on ("data" of run_config.json), None for a
    run that did not record it."""
    try:
        with open(os.path.join(run_dir, tags.RUN_CONFIG_FILE)) as f:
            data = json.load(f).get("data")
    except (OSError, ValueError, AttributeError):
        return None
    return data if isinstance(data, dict) else None


def _recorded_count(run_dir: str, key: str) -> Optional[int]:
    """A positive integer that training recorded at the top level of run_config.json
    (beside its "config", not a flag), None if not recorded."""
    try:
        with open(os.path.join(run_dir, tags.RUN_CONFIG_FILE)) as f:
            value = json.load(f).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def steps_per_epoch(run_dir: str) -> Optional[int]:
    """The steps per epoch a run trained with (run_config.json), None if not recorded."""
    return _recorded_count(run_dir, "steps_per_epoch")


def num_train_images(run_dir: str) -> Optional[int]:
    """The size of the training set a run trained on (run_config.json), None if not recorded."""
    return _recorded_count(run_dir, "num_train_images")


def _is_run_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, tags.RUN_CONFIG_FILE))


def _seed_key(path: str):
    match = _SEED_DIR.match(os.path.basename(path))
    return (int(match.group(1)) if match else 0, path)


def find_runs(results_dir: str) -> Dict[str, List[str]]:
    """Run folders of a results folder, grouped by name: name -> [run_dir, ...].

    `RESULTS/<name>/` is one run; `RESULTS/<name>/seed_<k>/` are seeds of one run
    (ordered by k). A folder counts as a run once it holds run_config.json. If
    `results_dir` is itself a run folder, it is the only run, named after itself.
    """
    if not os.path.isdir(results_dir):
        raise EventsError(not_a_folder(results_dir))
    if _is_run_dir(results_dir):
        return {os.path.basename(os.path.normpath(results_dir)): [results_dir]}
    runs = {}
    for name in sorted(os.listdir(results_dir)):
        folder = os.path.join(results_dir, name)
        if not os.path.isdir(folder):
            continue
        if _is_run_dir(folder):
            runs[name] = [folder]
            continue
        seeds = [os.path.join(folder, s) for s in os.listdir(folder) if _SEED_DIR.match(s)]
        seeds = sorted((s for s in seeds if _is_run_dir(s)), key=_seed_key)
        if seeds:
            runs[name] = seeds
    return runs


@dataclasses.dataclass
class Run:
    """Everything logged by one run folder, read once."""

    run_dir: str
    config: dict
    complete: bool                          # done.json, its epochs in the events, no damaged file
    scalars: Dict[str, Dict[str, Series]]   # subdir -> tag -> series
    damaged: List[str] = dataclasses.field(default_factory=list)   # damaged_event_files()

    def series(self, tag: str, subdir: str = tags.TRAIN_DIR) -> Series:
        try:
            return self.scalars[subdir][tag]
        except KeyError:
            raise EventsError(f"run {self.run_dir}: no tag {tag!r} in {subdir}/") from None

    def last(self, tag: str, subdir: str = tags.TRAIN_DIR) -> Optional[float]:
        """Value at the last logged step, or None if the tag was never logged."""
        values = self.scalars.get(subdir, {}).get(tag, (None, np.empty(0)))[1]
        return float(values[-1]) if len(values) else None


def load_run(run_dir: str, subdirs=(tags.TRAIN_DIR, tags.VALIDATION_DIR)) -> Run:
    """Read a run folder; a sub-folder without event files (a run just started) is empty.

    A damaged event file is read up to the damage; the run is then not complete, and
    `damaged` names the file.
    """
    scalars = {}
    for subdir in subdirs:
        try:
            scalars[subdir] = read_all_scalars(run_dir, subdir)
        except EventsError:
            if glob.glob(os.path.join(run_dir, subdir, "*tfevents*")):
                raise   # files exist but are unreadable: say so
            scalars[subdir] = {}
    damaged = damaged_event_files(run_dir, subdirs)
    config = read_config(run_dir)
    complete = not damaged and is_complete(run_dir, subdirs, scalars)
    return Run(run_dir=run_dir, config=config, complete=complete, scalars=scalars, damaged=damaged)



# --- per-channel conv sums of squares (beyond the post) --------------------------------

def read_channel_sqsum(run_dir: str) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """A run's per-output-channel conv sums of squares: (epochs (E,), {layer: (E, cout)}).

    Training writes them to `conv_channel_sqsum.npz` in the run folder at every
    epoch's end (epoch 0: the initial weights), one (E, cout) float32 array per conv
    layer, keyed by the layer's name: a few MB even for ResNet-110 and 150 epochs,
    where a TensorBoard tag per channel would be thousands of tags.
    """
    path = os.path.join(run_dir, tags.CHANNEL_SQSUM_FILE)
    try:
        with np.load(path) as data:
            epochs = np.asarray(data["epochs"], np.int64)
            layers = {k: np.asarray(data[k], np.float64) for k in data.files if k != "epochs"}
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        raise EventsError(f"cannot read {path}: {type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
    bad = [k for k, v in layers.items() if v.ndim != 2 or v.shape[0] != len(epochs)]
    if bad:
        raise EventsError(f"{path}: layer {bad[0]} does not have one row per epoch")
    return epochs, layers


# --- a baseline's trajectory, for the replay modes of the conv LR factor ------------------------

def load_baseline(path, train_epochs, per_channel=False, resnet_size=fidelity.RESNET_SIZE):
    """The logged conv_sqsum trajectory (total and per layer) of a finished baseline run, as an
    `optim.BaselineTrajectory`; a one-line ConfigError for a folder that cannot be replayed."""
    from resnet_cifar import optim

    if not os.path.isdir(path):
        raise config_lib.ConfigError(f"--replay_from={path}: no such run folder")
    try:
        run = load_run(path, (tags.TRAIN_DIR,))      # its config and train events, read once
    except EventsError as e:
        raise config_lib.ConfigError(f"--replay_from={path}: {e}") from None
    not_baseline = describe_non_baseline(run.config)
    if not_baseline:
        raise config_lib.ConfigError(f"--replay_from={path} is not a baseline run: it is {not_baseline}; "
                                     "replay needs a baseline (conv kernels in L2, no gradient scaling)")
    if run.damaged:
        raise config_lib.ConfigError(f"--replay_from={path}: damaged event file {run.damaged[0]}")
    if not run.complete:
        raise config_lib.ConfigError(f"--replay_from={path}: that run has not finished (no {tags.DONE_FILE}, "
                                     "or its events stop before the epoch it names); let the baseline finish first")
    depth = run.config.get("resnet_size", fidelity.RESNET_SIZE)
    if depth != resnet_size:
        raise config_lib.ConfigError(f"--replay_from={path} is a ResNet-{depth} run: this ResNet-{resnet_size} "
                                     "can only replay a baseline of its own depth (--resnet_size)")
    scalars = run.scalars[tags.TRAIN_DIR]
    if tags.CONV_SQSUM not in scalars or len(scalars[tags.CONV_SQSUM][0]) == 0:
        raise config_lib.ConfigError(f"--replay_from={path}: no {tags.CONV_SQSUM} logged in it")
    epochs, total = scalars[tags.CONV_SQSUM]
    if epochs[-1] < train_epochs:
        raise config_lib.ConfigError(
            f"--replay_from={path}: its {tags.CONV_SQSUM} ends at epoch {int(epochs[-1])}, "
            f"this run needs {train_epochs}")
    layers = tags.per_layer_series(scalars, tags.CONV_SQSUM)   # also the pre-prefix names
    per_layer = None
    if layers:
        per_layer = np.stack([np.interp(epochs, *series) for series in layers.values()], axis=1)
    trajectory = optim.BaselineTrajectory(epochs, total, per_layer, list(layers))
    if per_channel:
        trajectory.channel_epochs, trajectory.per_channel = load_channel_sqsum(path, train_epochs)
    return trajectory


def describe_non_baseline(source_config):
    """'' for a baseline run's config, else what the run is (e.g. 'NoConvL2 (--noconv_l2)')."""
    conv_l2 = source_config.get("conv_l2", True)
    scaled = source_config.get("conv_grad_scale", False)
    if conv_l2 and not scaled:
        return ""
    if scaled:
        factor = source_config.get("conv_lr_factor", "piecewise")
        kind = "ConvLRScale" if not conv_l2 else "a conv-gradient-scaled run with conv L2"
        return f"{kind} (--conv_grad_scale --conv_lr_factor={factor}" + \
            ("" if conv_l2 else " --noconv_l2") + ")"
    return "NoConvL2 (--noconv_l2: conv kernels out of L2)"


def load_channel_sqsum(path, train_epochs):
    """(epochs, {layer: (E, cout)}) of a baseline's conv_channel_sqsum.npz, for per_channel."""
    try:
        epochs, layers = read_channel_sqsum(path)
    except EventsError as e:
        raise config_lib.ConfigError(f"--replay_from={path}: --conv_lr_factor=per_channel needs its "
                                     f"{tags.CHANNEL_SQSUM_FILE} ({str(e).splitlines()[0]})") from None
    if len(epochs) == 0 or epochs[-1] < train_epochs:
        last = int(epochs[-1]) if len(epochs) else "no epoch"
        raise config_lib.ConfigError(f"--replay_from={path}: its {tags.CHANNEL_SQSUM_FILE} ends at "
                                     f"epoch {last}, this run needs {train_epochs}")
    return epochs, layers
