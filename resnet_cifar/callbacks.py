"""Epoch-level callbacks: event files with the diagnostics, checkpoints, progress, NaN stop.

Each one stands alone: none reads what another put in `logs` or relies on another having
run (the step restarts its diagnostic sums at each epoch's first step), so their order in
the list does not matter.
"""

import math
import os
import time

import keras
import numpy as np
import tensorflow as tf

from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import summary as custom_scalar_summary

from resnet_cifar import atomic, interrupt, models, tags
from resnet_cifar.console import hms
from resnet_cifar.train_step import DIAGNOSTICS, layer_sqsum


def epoch_diagnostics(model):
    """The epoch's diagnostics, host side: tag -> per-layer values (L,) and learning_rate.

    From the step's accumulators (`model.diagnostics`, epoch means) and the weights now
    (conv_sqsum): any callback can call it at an epoch's end, in any order.
    """
    means = model.diagnostics.means()
    out = {d.tag: np.asarray(means[d.key]) for d in DIAGNOSTICS}
    out[tags.CONV_SQSUM] = np.asarray(layer_sqsum(model))
    return out, means["learning_rate"]


class EpochTensorBoard(keras.callbacks.Callback):
    """TensorBoard event files with step = epoch number, written with `tf.summary`.

    `train/` gets Keras' training metrics (epoch_loss, epoch_accuracy, epoch_l2_loss)
    and the diagnostics (mean over conv layers as `<tag>`, each layer as
    `per_layer/<tag>/<layer>`); `validation/` the test metrics. Epoch e (0-based) is
    logged at step e + 1, so that step 0 holds the initial state (weights before any
    update), as the post's curves start from it. A new run also gets a custom-scalars
    layout (`scalars_layout`) once. The epoch means go into `logs` too.
    """

    def __init__(self, model_dir):
        super().__init__()
        self.model_dir = model_dir
        self.writers = {}

    def writer(self, subdir):
        if subdir not in self.writers:
            self.writers[subdir] = tf.summary.create_file_writer(os.path.join(self.model_dir, subdir))
        return self.writers[subdir]

    def on_train_begin(self, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == 0:
            with self.writer(tags.TRAIN_DIR).as_default():
                tf.summary.experimental.write_raw_pb(
                    custom_scalar_summary.pb(scalars_layout()).SerializeToString(), step=0)
            sq = np.asarray(layer_sqsum(self.model), np.float32)
            factor = self.model.conv_factor().numpy()
            lr = float(tf.cast(self.model.optimizer.learning_rate, tf.float32).numpy())
            self._write_diagnostics(0, {tags.CONV_SQSUM: sq, tags.CONV_LR_FACTOR: factor}, lr)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        own = {d.tag for d in DIAGNOSTICS} | {tags.CONV_SQSUM, tags.LEARNING_RATE}
        for key, value in logs.items():
            if key in own:
                continue
            subdir, name = (tags.VALIDATION_DIR, key[4:]) if key.startswith("val_") else (tags.TRAIN_DIR, key)
            with self.writer(subdir).as_default():
                tf.summary.scalar(f"epoch_{name}", float(value), step=epoch + 1)
        per_layer, lr = epoch_diagnostics(self.model)
        self._write_diagnostics(epoch + 1, per_layer, lr)
        logs.update({tag: float(np.sum(v) if tag == tags.CONV_SQSUM else np.mean(v))
                     for tag, v in per_layer.items()})
        logs[tags.LEARNING_RATE] = lr
        for writer in self.writers.values():
            writer.flush()

    def on_train_end(self, logs=None):
        for writer in self.writers.values():
            writer.close()
        self.writers = {}

    def _write_diagnostics(self, step, per_layer, lr):
        """conv_sqsum (sum over layers), the other tags (mean over layers), each layer apart."""
        names = [layer.name for layer in models.conv_layers(self.model)]
        with self.writer(tags.TRAIN_DIR).as_default():
            tf.summary.scalar(tags.LEARNING_RATE, lr, step=step)
            for tag, values in per_layer.items():
                total = np.sum(values) if tag == tags.CONV_SQSUM else np.mean(values)
                tf.summary.scalar(tag, float(total), step=step)
                for name, value in zip(names, values):
                    tf.summary.scalar(tags.per_layer(tag, name), float(value), step=step)
        self.writer(tags.TRAIN_DIR).flush()


def _chart(title, *tag_names):
    return layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(
        tag=[f"^{name}$" for name in tag_names]))


def scalars_layout():
    """TensorBoard's custom-scalars page: the post's curves side by side, layers apart.

    Charts select tags by regular expression; a run folder's `train/` and
    `validation/` are two runs to TensorBoard, so the accuracy chart shows the
    test accuracy (`validation/`) next to the training accuracy. Every entry of
    `train_step.DIAGNOSTICS` gets a chart and a per-layer chart.
    """
    diagnostics = {d.tag: _chart(d.title, d.tag) for d in DIAGNOSTICS}
    main = [
        _chart("test accuracy (validation) and train accuracy", tags.EPOCH_ACCURACY),
        _chart("conv_sqsum: sum of squared conv weights", tags.CONV_SQSUM),
        diagnostics.pop(tags.CONV_RELATIVE_STEP),
        _chart("loss: cross entropy (validation = test)", tags.EPOCH_LOSS),
        *diagnostics.values(),
        _chart("learning_rate (epoch mean)", tags.LEARNING_RATE),
        _chart("epoch_l2_loss: the L2 term of the objective", tags.EPOCH_L2_LOSS),
    ]
    layers = [layout_pb2.Chart(title=f"{tag} per conv layer", multiline=layout_pb2.MultilineChartContent(
        tag=[f"^{tags.per_layer(tag, '')}"])) for tag in [tags.CONV_SQSUM] + [d.tag for d in DIAGNOSTICS]]
    return layout_pb2.Layout(category=[
        layout_pb2.Category(title="The post's curves (step = epoch)", chart=main),
        layout_pb2.Category(title="Per conv layer", chart=layers, closed=True),
    ])


class ChannelSqsumLog(keras.callbacks.Callback):
    """Per-output-channel conv sums of squares at every epoch's end, in one .npz file.

    What `--conv_lr_factor=per_channel` replays. Epoch 0 is the initial state.
    Rows of epochs past the one just finished (left by a run killed after this
    callback but before its checkpoint) are replaced on resume. Written
    atomically (temporary file + rename); read with `events.read_channel_sqsum`.
    """

    def __init__(self, model_dir):
        super().__init__()
        self.path = os.path.join(model_dir, tags.CHANNEL_SQSUM_FILE)

    def on_train_begin(self, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == 0:
            self._save(0, fresh=True)

    def on_epoch_end(self, epoch, logs=None):
        self._save(epoch + 1)

    def _save(self, epoch, fresh=False):
        layers = models.conv_layers(self.model)
        row = {layer.name: models.channel_sum_of_squares(layer.kernel).numpy()[None] for layer in layers}
        epochs = np.array([epoch], np.int64)
        if not fresh and os.path.exists(self.path):
            with np.load(self.path) as old:
                keep = old["epochs"] < epoch
                epochs = np.concatenate([old["epochs"][keep], epochs])
                row = {k: np.concatenate([old[k][keep], v]) for k, v in row.items()}
        with atomic.atomic_open(self.path, "wb") as f:
            np.savez(f, epochs=epochs, **row)


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
        logs = with_conv_sqsum(self.model, logs)
        if any(_non_finite(logs, key) for key in _loss_keys(logs)) or _non_finite(logs, tags.CONV_SQSUM):
            # Never save diverged state over the last good checkpoint. The loss
            # is computed before each update, so the last step of an epoch can
            # leave NaN weights behind a finite epoch loss: check the weights too,
            # and the test loss (NaN batch-norm statistics leave the train loss finite).
            return
        with interrupt.deferred():
            self.epoch_variable.assign(epoch + 1)
            self.store.save(checkpoint_number=epoch + 1)


class StopOnSignal(keras.callbacks.Callback):
    """Training runs inside `interrupt.deferred()`, so SIGINT/SIGTERM never raise in the middle
    of TensorFlow's own Python code (an exception there can crash its C++ side); the signal
    takes effect here, between two steps (or two test batches)."""

    def on_train_batch_end(self, batch, logs=None):
        interrupt.raise_pending()

    def on_test_batch_end(self, batch, logs=None):
        interrupt.raise_pending()


class StopOnNonFinite(keras.callbacks.TerminateOnNaN):
    """Keras' TerminateOnNaN, remembering where the loss went bad."""

    def __init__(self):
        super().__init__()
        self.where = None
        self.what = "loss"      # what went non-finite, for the message
        self._epoch = 0
        self._batch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_batch_end(self, batch, logs=None):
        self._batch = batch + 1
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)) and self.where is None:
            self.where = (self._epoch + 1, batch + 1, float(loss))
        super().on_batch_end(batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        # The loss is computed before each update, so the last step of an epoch can
        # leave non-finite weights behind a finite loss, and after the last epoch no
        # step follows to notice: the weights' conv_sqsum is checked too. The test
        # loss can diverge alone (e.g. NaN batch-norm moving statistics).
        if self.where is not None:
            return
        logs = with_conv_sqsum(self.model, logs)
        for key in _loss_keys(logs) + [tags.CONV_SQSUM]:
            if _non_finite(logs, key):
                self.where = (epoch + 1, self._batch, float(logs[key]))
                self.what = _DESCRIPTION.get(key, key)
                self.model.stop_training = True
                return


_DESCRIPTION = {"loss": "loss", "val_loss": "the test loss", "l2_loss": "the L2 loss",
                tags.CONV_SQSUM: f"the weights' {tags.CONV_SQSUM}"}


def _loss_keys(logs):
    """Every logged loss: train ('loss', 'l2_loss') and test ('val_loss', ...)."""
    return sorted((k for k in (logs or {}) if k.endswith("loss")), key=lambda k: (k != "loss", k))


STATUS_SECONDS = 60.0     # without a progress bar: a status line this often within an epoch


class EpochSummary(keras.callbacks.ProgbarLogger):
    """Keras' progress bar (as `verbose` asks), then one line per epoch: the numbers that
    matter and the time left. One callback for both, so the bar has always ended its line
    before the summary is printed, wherever this stands in the list (and Keras adds no
    second bar). Without the bar (verbose 0 or 2, as in a log file), a long epoch also
    prints a status line about every `status_every` seconds: step, rate and the epoch's ETA."""

    def __init__(self, total_epochs, status_every=STATUS_SECONDS):
        super().__init__()
        self.total = total_epochs
        self.status_every = status_every

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._start = time.time()
        self._epochs_run = 0

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        self._epoch = epoch
        self._epoch_start = self._last_status = time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
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

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        ours = {d.tag for d in DIAGNOSTICS} | {tags.CONV_SQSUM, tags.LEARNING_RATE}
        # The bar shows Keras' metrics only, whether or not EpochTensorBoard added the
        # diagnostics to `logs` before this runs.
        super().on_epoch_end(epoch, {k: v for k, v in logs.items() if k not in ours})
        if hasattr(self.model, "diagnostics"):
            per_layer, lr = epoch_diagnostics(self.model)
            logs.update({tags.CONV_SQSUM: float(np.sum(per_layer[tags.CONV_SQSUM])),
                         tags.CONV_RELATIVE_STEP: float(np.mean(per_layer[tags.CONV_RELATIVE_STEP])),
                         tags.LEARNING_RATE: lr})
        self._epochs_run += 1
        per_epoch = (time.time() - self._start) / self._epochs_run
        left = per_epoch * (self.total - epoch - 1)
        parts = [f"epoch {epoch + 1}/{self.total}",
                 f"loss {logs.get('loss', math.nan):.4f}",
                 f"acc {100 * logs.get('accuracy', math.nan):.2f}%"]
        if "val_accuracy" in logs:
            parts.append(f"test acc {100 * logs['val_accuracy']:.2f}%")
        if tags.CONV_SQSUM in logs:
            parts.append(f"conv_sqsum {logs[tags.CONV_SQSUM]:.1f}")
            parts.append(f"rel step {logs[tags.CONV_RELATIVE_STEP]:.3g}")
            parts.append(f"lr {logs[tags.LEARNING_RATE]:.3g}")
        parts.append(f"{per_epoch:.1f} s/epoch, ETA {hms(left)}")
        print(" | ".join(parts), flush=True)


def with_conv_sqsum(model, logs):
    """`logs` with the weights' conv_sqsum, computed from the model if it is not there."""
    logs = dict(logs or {})
    if tags.CONV_SQSUM not in logs and hasattr(model, "layers"):
        logs[tags.CONV_SQSUM] = float(np.sum(layer_sqsum(model)))
    return logs


def _non_finite(logs, key="loss"):
    value = (logs or {}).get(key)
    return value is not None and not np.isfinite(float(value))
