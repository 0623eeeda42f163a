"""What a run does at each epoch's end, in two Keras callbacks, and the report it prints last.

- `EpochLog`: everything an epoch logs. TensorBoard event files (Keras' metrics and the
  step's diagnostics, `models.DIAGNOSTICS`), the per-channel conv sums of squares
  (conv_channel_sqsum.npz), the console (Keras' progress bar, one line per epoch, a status
  line about every minute without the bar), the stop on a non-finite loss, and signals,
  which take effect between two steps.
- `EpochCheckpoint`: the checkpoint of each epoch, never over diverged weights. `EpochLog`
  saves it between the epoch's logs and its console line, in that order: a kill leaves at
  most the logs of one epoch beyond the last checkpoint (which a resume logs again, and
  the resume check allows), and a printed epoch line means its checkpoint is on disk.
"""

import math
import os
import shlex
import time

import keras
import numpy as np
import tensorflow as tf
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import summary as custom_scalar_summary

from resnet_cifar import checkpoints, models, optim, process, tags
from resnet_cifar.models import DIAGNOSTICS
from resnet_cifar.run_dir import count, hms

STATUS_SECONDS = 60.0     # without a progress bar: a status line this often within an epoch


def epoch_diagnostics(model):
    """The epoch's diagnostics, host side: tag -> per-layer values (L,) or a global value, from
    the step's device-side accumulators (`model.diagnostics`): any callback can call it at
    an epoch's end, in any order."""
    values = model.diagnostics.means()
    return {d.tag: np.asarray(values[d.key]) for d in DIAGNOSTICS}


def diagnostic_totals(values):
    """tag -> the value of the tag itself: a per-layer value reduced over layers as its
    `Diagnostic.layers` says (conv_sqsum summed, the others averaged), a global one as it is."""
    return {d.tag: float(np.sum(values[d.tag]) if d.layers == "sum" else np.mean(values[d.tag]))
            for d in DIAGNOSTICS if d.tag in values}


class EpochLog(keras.callbacks.ProgbarLogger):
    """Event files with step = epoch number, the per-channel log, the console and the NaN stop.

    `train/` gets Keras' training metrics (epoch_loss, epoch_accuracy, epoch_l2_loss) and
    the diagnostics (mean over conv layers as `<tag>`, conv_sqsum summed, each layer as
    `per_layer/<tag>/<layer>`); `validation/` the test metrics. Epoch e (0-based) is
    logged at step e + 1, so that step 0 holds the initial state (weights before any
    update), as the post's curves start from it; a new run also gets a custom-scalars
    layout (`scalars_layout`) once. conv_channel_sqsum.npz gets a row per epoch (what
    `--conv_lr_factor=per_channel` replays); rows past the epoch just finished (left by a
    run killed before its checkpoint) are replaced on resume.

    The console: Keras' progress bar (as `verbose` asks), then one line per epoch, the
    numbers that matter and the time left; one callback for both, so the bar has always
    ended its line first. Without the bar (verbose 0 or 2, as in a log file), a long epoch
    also prints a status line about every `status_every` seconds: step, rate, epoch ETA.

    A non-finite loss (train or test) or conv_sqsum stops training; `diverged` is then
    (epoch, step, what, value). The loss is computed before each update, so the last step
    of an epoch can leave non-finite weights behind a finite loss, and after the last
    epoch no step follows to notice: the weights' conv_sqsum is checked too. The test loss
    can diverge alone (e.g. NaN batch-norm moving statistics).
    """

    def __init__(self, model_dir, total_epochs, checkpoint=None, status_every=STATUS_SECONDS):
        super().__init__()
        self.model_dir = model_dir
        self.checkpoint = checkpoint      # an EpochCheckpoint, saved after the logs, before the line
        self.total = total_epochs
        self.status_every = status_every
        self.channel_path = os.path.join(model_dir, tags.CHANNEL_SQSUM_FILE)
        self.writers = {}
        self.diverged = None

    def writer(self, subdir):
        if subdir not in self.writers:
            self.writers[subdir] = tf.summary.create_file_writer(os.path.join(self.model_dir, subdir))
        return self.writers[subdir]

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._start = time.time()
        self._epochs_run = 0
        if int(self.model.optimizer.iterations.numpy()) == 0:      # a new run: its initial state
            with self.writer(tags.TRAIN_DIR).as_default():
                tf.summary.experimental.write_raw_pb(
                    custom_scalar_summary.pb(scalars_layout()).SerializeToString(), step=0)
            stats = self.model.initial_stats()
            self._write_diagnostics(0, {d.tag: np.asarray(d.fn(stats)) for d in DIAGNOSTICS if d.initial})
            self.save_channels(0, fresh=True)

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        self._epoch = epoch
        self._epoch_start = self._last_status = time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        self.note_batch(self._epoch, batch, logs)
        process.raise_pending()
        now = time.monotonic()
        # ProgbarLogger.set_params keeps `verbose` and the epoch's steps (`target`), not `params`.
        if self.verbose == 1 or now - self._last_status < self.status_every:
            return
        self._last_status = now
        done, steps = batch + 1, self.target
        rate = done / max(now - self._epoch_start, 1e-9)
        of = f"/{steps}" if steps else ""
        eta = f", epoch ETA {hms((steps - done) / rate)}" if steps else ""
        print(f"  epoch {self._epoch + 1}/{self.total}: step {done}{of}, {rate:.2f} steps/s{eta}", flush=True)

    def on_test_batch_end(self, batch, logs=None):
        super().on_test_batch_end(batch, logs)
        process.raise_pending()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        metrics = dict(logs)                              # Keras' metrics: the bar, epoch_* tags
        super().on_epoch_end(epoch, metrics)
        for key, value in metrics.items():
            subdir, name = (tags.VALIDATION_DIR, key[4:]) if key.startswith("val_") else (tags.TRAIN_DIR, key)
            with self.writer(subdir).as_default():
                tf.summary.scalar(f"epoch_{name}", float(value), step=epoch + 1)
        values = epoch_diagnostics(self.model)
        self._write_diagnostics(epoch + 1, values)
        for writer in self.writers.values():
            writer.flush()
        self.save_channels(epoch + 1)
        # The epoch's diagnostics go into `logs` too: History (after every callback) keeps them for done.json.
        logs.update(diagnostic_totals(values))
        self.note_epoch(epoch, logs)
        if self.checkpoint is not None:
            self.checkpoint.set_model(self.model)
            self.checkpoint.on_epoch_end(epoch, logs)
        self._print_summary(epoch, logs)

    def note_batch(self, epoch, batch, logs):
        """A non-finite loss of a step stops training."""
        self._batch = batch + 1
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)) and self.diverged is None:
            self.diverged = (epoch + 1, batch + 1, "loss", float(loss))
            self.model.stop_training = True

    def note_epoch(self, epoch, logs):
        """A non-finite loss (train or test) or conv_sqsum at an epoch's end stops training."""
        bad = diverged(self.model, logs)
        if bad and self.diverged is None:
            self.diverged = (epoch + 1, getattr(self, "_batch", 0)) + bad
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        for writer in self.writers.values():
            writer.close()
        self.writers = {}

    def _write_diagnostics(self, step, values):
        """Each diagnostic's tag (reduced over layers as it says), and each layer apart."""
        names = [layer.name for layer in models.conv_layers(self.model)]
        with self.writer(tags.TRAIN_DIR).as_default():
            for tag, total in diagnostic_totals(values).items():
                tf.summary.scalar(tag, total, step=step)
                for name, value in zip(names, np.ravel(values[tag]) if np.ndim(values[tag]) else ()):
                    tf.summary.scalar(tags.per_layer(tag, name), float(value), step=step)
        self.writer(tags.TRAIN_DIR).flush()

    def save_channels(self, epoch, fresh=False):
        layers = models.conv_layers(self.model)
        row = {layer.name: optim.channel_sum_of_squares(layer.kernel).numpy()[None] for layer in layers}
        epochs = np.array([epoch], np.int64)
        if not fresh and os.path.exists(self.channel_path):
            with np.load(self.channel_path) as old:
                keep = old["epochs"] < epoch
                epochs = np.concatenate([old["epochs"][keep], epochs])
                row = {k: np.concatenate([old[k][keep], v]) for k, v in row.items()}
        with checkpoints.atomic_open(self.channel_path, "wb") as f:
            np.savez(f, epochs=epochs, **row)

    def _print_summary(self, epoch, logs):
        self._epochs_run += 1
        per_epoch = (time.time() - self._start) / self._epochs_run
        parts = [f"epoch {epoch + 1}/{self.total}", f"loss {logs.get('loss', math.nan):.4f}",
                 f"acc {100 * logs.get('accuracy', math.nan):.2f}%"]
        if "val_accuracy" in logs:
            parts.append(f"test acc {100 * logs['val_accuracy']:.2f}%")
        parts += [f"conv_sqsum {logs[tags.CONV_SQSUM]:.1f}", f"rel step {logs[tags.CONV_RELATIVE_STEP]:.3g}",
                  f"lr {logs[tags.LEARNING_RATE]:.3g}",
                  f"{per_epoch:.1f} s/epoch, ETA {hms(per_epoch * (self.total - epoch - 1))}"]
        print(" | ".join(parts), flush=True)


def _chart(title, *tag_names):
    return layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(
        tag=[f"^{name}$" for name in tag_names]))


def scalars_layout():
    """TensorBoard's custom-scalars page: the post's curves side by side, layers apart.

    Charts select tags by regular expression; a run folder's `train/` and
    `validation/` are two runs to TensorBoard, so the accuracy chart shows the
    test accuracy (`validation/`) next to the training accuracy. The post's three
    curves come first (accuracy, conv_sqsum, relative step); every entry of
    `models.DIAGNOSTICS` gets a chart, and a per-layer chart if it has layers.
    """
    diagnostics = [_chart(d.title, d.tag) for d in DIAGNOSTICS]
    main = [_chart("test accuracy (validation) and train accuracy", tags.EPOCH_ACCURACY), *diagnostics[:2],
            _chart("loss: cross entropy (validation = test)", tags.EPOCH_LOSS), *diagnostics[2:],
            _chart("epoch_l2_loss: the L2 term of the objective", tags.EPOCH_L2_LOSS)]
    layers = [layout_pb2.Chart(title=f"{d.tag} per conv layer", multiline=layout_pb2.MultilineChartContent(
        tag=[f"^{tags.per_layer(d.tag, '')}"])) for d in DIAGNOSTICS if d.layers]
    return layout_pb2.Layout(category=[
        layout_pb2.Category(title="The post's curves (step = epoch)", chart=main),
        layout_pb2.Category(title="Per conv layer", chart=layers, closed=True),
    ])


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves model, optimizer accumulators and the epoch count after every epoch.

    `store` is a `checkpoints.CheckpointStore`: it writes the new checkpoint, reads
    it back, and only then updates the index and deletes older ones, so a kill or
    a full disk during a save leaves the previous checkpoint in force. A signal
    arriving during a save takes effect after it. Keras' BackupAndRestore restores
    inside `fit`, after the input pipeline exists; the trainer must know the
    epoch before it builds the (resumable) data stream, hence this callback.
    """

    def __init__(self, store, epoch_variable):
        super().__init__()
        self.store = store
        self.epoch_variable = epoch_variable

    def on_epoch_end(self, epoch, logs=None):
        if diverged(self.model, logs):
            return      # never diverged state over the last good checkpoint
        with process.deferred():
            self.epoch_variable.assign(epoch + 1)
            self.store.save(checkpoint_number=epoch + 1)


class Progress:
    """Where a run is, for the message of an interrupted one."""

    def __init__(self, model, steps_per_epoch):
        self.model = model
        self.steps_per_epoch = steps_per_epoch
        self.store = None

    def stopped_message(self, signal_name):
        # Where it stopped, counted from the last checkpoint: that is where a resume starts.
        last = self.store.good[-1] if self.store is not None and self.store.good else 0
        into = int(self.model.optimizer.iterations.numpy()) - last * self.steps_per_epoch
        if into <= 0 or into > self.steps_per_epoch:
            where = f"stopped by {signal_name} after epoch {last}" if last else f"stopped by {signal_name}"
        elif into == self.steps_per_epoch:
            where = f"stopped by {signal_name} at the end of epoch {last + 1}, before its checkpoint"
        else:
            where = f"stopped by {signal_name} in epoch {last + 1}, after step {into}/{self.steps_per_epoch}"
        if last:
            return (f"{where}; checkpoint {checkpoints.name(last)} (after epoch {last}) is kept: "
                    "the same command resumes from it")
        return f"{where}; no epoch had finished: the same command starts it again"


_DESCRIPTION = {"loss": "loss", "val_loss": "the test loss", "l2_loss": "the L2 loss",
                tags.CONV_SQSUM: f"the weights' {tags.CONV_SQSUM}"}


def _loss_keys(logs):
    """Every logged loss: train ('loss', 'l2_loss') and test ('val_loss', ...)."""
    return sorted((k for k in (logs or {}) if k.endswith("loss")), key=lambda k: (k != "loss", k))


def diverged(model, logs):
    """(what, value) of the first non-finite number at an epoch's end, else None: a loss (train or
    test) or the weights' conv_sqsum (from `logs`, else from the step's diagnostics). The loss is
    computed before each update, so the last step of an epoch can leave non-finite weights
    behind a finite loss, and the test loss can diverge alone (NaN batch-norm statistics)."""
    values = dict(logs or {})
    if tags.CONV_SQSUM not in values and hasattr(model, "diagnostics"):
        values.update(diagnostic_totals(epoch_diagnostics(model)))
    for key in _loss_keys(values) + [tags.CONV_SQSUM]:
        if _non_finite(values, key):
            return _DESCRIPTION.get(key, key), float(values[key])
    return None


def _non_finite(logs, key="loss"):
    value = (logs or {}).get(key)
    return value is not None and not np.isfinite(float(value))


# ----------------------------------------------------------------------------- the final report

TENSORBOARD_PAGE = "http://localhost:6006/#custom_scalars"


def _number(logs, key, fmt, scale=1.0, unit=""):
    value = logs.get(key)
    if value is None or not math.isfinite(value):
        return "n/a"
    return format(scale * value, fmt) + unit


def tensorboard_command(model_dir):
    """The command that shows this run in TensorBoard. Inside the image (its entrypoint sets
    RESNET_CIFAR_CONTAINER_RUNS to the runs folder) a path of the container means nothing on
    the host: the hint is the image's own TensorBoard command, run on the host."""
    runs = os.environ.get("RESNET_CIFAR_CONTAINER_RUNS")
    if runs and os.path.abspath(model_dir).startswith(os.path.abspath(runs) + os.sep):
        return (f"docker run --rm -p 6006:6006 -v $PWD/runs:{runs} resnet-cifar tensorboard --logdir {runs} "
                f"--bind_all (on the host, in the folder you mounted at {runs})")
    return f"tensorboard --logdir {shlex.quote(os.path.abspath(model_dir))}"


BN_LAG_GAP = 0.05          # test accuracy this far below train accuracy ...
BN_LAG_MEMORIES = 10       # ... after fewer steps than this many BN memories (1 / (1 - decay))


def bn_lag_note(model_dir, logs, steps, bn_decay):
    """A line when test accuracy trails train accuracy on a run too short for BN's moving
    averages to have caught up with the weights, naming analysis.precise_bn; else ''."""
    train, test = logs.get("accuracy"), logs.get("val_accuracy")
    if None in (train, test, steps, bn_decay) or not train - test >= BN_LAG_GAP:
        return ""
    memory = 1.0 / (1.0 - bn_decay) if bn_decay < 1 else math.inf
    if steps >= BN_LAG_MEMORIES * memory:
        return ""
    return (f"note: test accuracy trails train accuracy by {100 * (train - test):.1f} points: after only "
            f"{steps} steps, BN's moving averages (decay {bn_decay:g}, a memory of ~{memory:.0f} steps) "
            f"lag the weights; `python -m analysis.precise_bn {shlex.quote(model_dir)}` evaluates "
            "with recomputed BN statistics")


def final_report(model_dir, epochs, logs, seconds=None, last_eval_epoch=None, resumed_after=0,
                 steps=None, bn_decay=None):
    """The block printed when a run has finished, as one string of lines.

    logs: the last epoch's Keras logs (`loss`, `val_accuracy`, `conv_sqsum`, ...);
    last_eval_epoch: the epoch `val_accuracy` comes from, when not the last one;
    seconds: time spent by this process, which trained the epochs after `resumed_after`.
    """
    d = os.path.abspath(model_dir)
    took = "" if seconds is None else f" in {hms(seconds)}"
    if resumed_after:
        took = f" ({epochs - resumed_after} of them after resuming{took})"
    test_at = "" if last_eval_epoch in (None, epochs) else f"  (at epoch {last_eval_epoch})"
    rule = "-" * 72
    lines = [
        rule,
        f"finished: {count(epochs, 'epoch')}{took}",
        f"  test accuracy  {_number(logs, 'val_accuracy', '.2f', 100, ' %')}{test_at}",
        f"  train loss     {_number(logs, 'loss', '.4f')}  (cross entropy of the last epoch)",
        f"  conv_sqsum     {_number(logs, tags.CONV_SQSUM, '.1f')}  (sum of squared conv weights)",
        f"outputs in {d}",
        f"  event files    {os.path.join(d, tags.TRAIN_DIR)}, {os.path.join(d, tags.VALIDATION_DIR)}",
        f"  checkpoints    {os.path.join(d, tags.CHECKPOINTS_DIR)}",
        f"  final weights  {os.path.join(d, tags.FINAL_WEIGHTS_FILE)}",
        f"  run config     {os.path.join(d, tags.RUN_CONFIG_FILE)}",
        f"  final metrics  {os.path.join(d, tags.DONE_FILE)}",
        f"TensorBoard: {tensorboard_command(d)}",
        f"  then open {TENSORBOARD_PAGE} (the post's curves side by side)",
        rule,
    ]
    note = bn_lag_note(model_dir, logs, steps, bn_decay) if last_eval_epoch in (None, epochs) else ""
    return "\n".join(lines + ([note] if note else []))
