"""Epoch-level callbacks: TensorBoard with the diagnostics, checkpoints, progress, NaN stop."""

import math
import os
import time

import keras
import numpy as np
import tensorflow as tf

from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import summary as custom_scalar_summary

from resnet_cifar import interrupt, models, tags
from resnet_cifar.console import hms
from resnet_cifar.train_step import layer_sqsum


class EpochTensorBoard(keras.callbacks.TensorBoard):
    """Keras' TensorBoard callback, with step = epoch number and the post's diagnostics.

    Keras logs epoch e (0-based) at step e; we log it at e + 1 so that step 0 can
    hold the initial state (weights before any update), as the post's curves
    start from it. Diagnostics go to the same `train/` writer as Keras' own
    tags; the epoch means are added to `logs` for the callbacks that follow.
    Two of Keras' own tags are left out, as they contradict these: its
    `epoch_learning_rate` (the rate at the epoch's end; `learning_rate` is the
    epoch mean) and `evaluation_*_vs_iterations` (step = optimizer iterations).
    A new run also gets a custom-scalars layout (`scalars_layout`) once.
    """

    def __init__(self, model_dir, per_layer_factor=False):
        super().__init__(log_dir=model_dir, histogram_freq=0, write_graph=False,
                         update_freq="epoch", profile_batch=0)
        self._per_layer_factor = per_layer_factor

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if int(self.model.optimizer.iterations.numpy()) == 0:
            self._write_layout()
            self._write_initial_state()

    def _collect_learning_rate(self, logs):
        return logs        # no `epoch_learning_rate`: `learning_rate` is written below

    def on_test_end(self, logs=None):
        self._pop_writer()  # no `evaluation_*_vs_iterations`: steps here are epochs

    def _write_layout(self):
        with self._train_writer.as_default():
            tf.summary.experimental.write_raw_pb(
                custom_scalar_summary.pb(scalars_layout(self._per_layer_factor))
                .SerializeToString(), step=0)

    def _layer_names(self):
        return [layer.name for layer in models.conv_layers(self.model)]

    def _write_initial_state(self):
        sq = np.asarray(layer_sqsum(self.model), np.float32)
        factor = self.model.conv_factor(tf.constant(sq)).numpy()
        lr = float(tf.cast(self.model.optimizer.learning_rate, tf.float32).numpy())
        self._write(0, sq, None, factor, lr)

    def _write(self, step, sqsum, rel_step, factor, lr):
        s = self.summary
        names = self._layer_names()
        with self._train_writer.as_default():
            s.scalar(tags.CONV_SQSUM, float(np.sum(sqsum)), step=step)
            s.scalar(tags.CONV_LR_FACTOR, float(np.mean(factor)), step=step)
            s.scalar(tags.LEARNING_RATE, lr, step=step)
            if rel_step is not None:
                s.scalar(tags.CONV_RELATIVE_STEP, float(np.mean(rel_step)), step=step)
            for i, name in enumerate(names):
                s.scalar(tags.per_layer(tags.CONV_SQSUM, name), float(sqsum[i]), step=step)
                if rel_step is not None:
                    s.scalar(tags.per_layer(tags.CONV_RELATIVE_STEP, name), float(rel_step[i]), step=step)
                if self._per_layer_factor:
                    s.scalar(tags.per_layer(tags.CONV_LR_FACTOR, name), float(factor[i]), step=step)
        self._train_writer.flush()

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        self.model.diagnostics.reset()

    def on_epoch_end(self, epoch, logs=None):
        means = self.model.diagnostics.means()
        sq = np.asarray(layer_sqsum(self.model))
        self._write(epoch + 1, sq, means["relative_step"], means["lr_factor"], means["learning_rate"])
        self._write_angular_update(epoch + 1, means["angular_update"])
        super().on_epoch_end(epoch + 1, logs)
        if logs is not None:      # after Keras wrote `logs`: these are in the event files once
            logs.update({tags.CONV_SQSUM: float(sq.sum()),
                         tags.CONV_RELATIVE_STEP: float(np.mean(means["relative_step"])),
                         tags.CONV_LR_FACTOR: float(np.mean(means["lr_factor"])),
                         tags.LEARNING_RATE: means["learning_rate"],
                         tags.CONV_ANGULAR_UPDATE: float(np.mean(means["angular_update"]))})
        for writer in self._writers.values():
            writer.flush()

    def _write_angular_update(self, step, angle):
        """conv_angular_update (mean over layers) and per layer: the epoch-mean angle per step."""
        with self._train_writer.as_default():
            self.summary.scalar(tags.CONV_ANGULAR_UPDATE, float(np.mean(angle)), step=step)
            for name, value in zip(self._layer_names(), angle):
                self.summary.scalar(tags.per_layer(tags.CONV_ANGULAR_UPDATE, name), float(value), step=step)



def _chart(title, *tag_names):
    return layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(
        tag=[f"^{name}$" for name in tag_names]))


def scalars_layout(per_layer_factor=False):
    """TensorBoard's custom-scalars page: the post's curves side by side, layers apart.

    Charts select tags by regular expression; a run folder's `train/` and
    `validation/` are two runs to TensorBoard, so the accuracy chart shows the
    test accuracy (`validation/`) next to the training accuracy.
    """
    main = [
        _chart("test accuracy (validation) and train accuracy", tags.EPOCH_ACCURACY),
        _chart("conv_sqsum: sum of squared conv weights", tags.CONV_SQSUM),
        _chart("conv_relative_step: mean ||step|| / ||w||", tags.CONV_RELATIVE_STEP),
        _chart("loss: cross entropy (validation = test)", tags.EPOCH_LOSS),
        _chart("conv_lr_factor: factor on conv gradients", tags.CONV_LR_FACTOR),
        _chart("learning_rate (epoch mean)", tags.LEARNING_RATE),
        _chart("conv_angular_update: angle (rad) between w before and after a step",
               tags.CONV_ANGULAR_UPDATE),
        _chart("epoch_l2_loss: the L2 term of the objective", tags.EPOCH_L2_LOSS),
    ]
    layer_tags = [tags.CONV_SQSUM, tags.CONV_RELATIVE_STEP, tags.CONV_ANGULAR_UPDATE] + (
        [tags.CONV_LR_FACTOR] if per_layer_factor else [])
    layers = [layout_pb2.Chart(title=f"{tag} per conv layer", multiline=layout_pb2.MultilineChartContent(
        tag=[f"^{tags.per_layer(tag, '')}"])) for tag in layer_tags]
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
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(f, epochs=epochs, **row)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


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
        if any(_non_finite(logs, key) for key in _loss_keys(logs)) or _non_finite(logs, tags.CONV_SQSUM):
            # Never save diverged state over the last good checkpoint. The loss
            # is computed before each update, so the last step of an epoch can
            # leave NaN weights behind a finite epoch loss: check the weights too
            # (EpochTensorBoard, earlier in the list, put conv_sqsum in `logs`),
            # and the test loss (NaN batch-norm statistics leave the train loss finite).
            return
        with interrupt.deferred():
            self.epoch_variable.assign(epoch + 1)
            self.store.save(checkpoint_number=epoch + 1)


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
        # step follows to notice. EpochTensorBoard put conv_sqsum in `logs`. The test
        # loss can diverge alone (e.g. NaN batch-norm moving statistics).
        if self.where is not None:
            return
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


class EpochSummary(keras.callbacks.Callback):
    """One line per epoch: the numbers that matter and the time left.

    Put it after Keras' `ProgbarLogger` in the callback list, so that the progress
    bar has ended its line (verbose=1) before this one is printed.
    """

    def __init__(self, total_epochs, print_fn=print):
        super().__init__()
        self.total = total_epochs
        self.print_fn = print_fn

    def on_train_begin(self, logs=None):
        self._start = time.time()
        self._epochs_run = 0

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
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
        self.print_fn(" | ".join(parts), flush=True)


def _non_finite(logs, key="loss"):
    value = (logs or {}).get(key)
    return value is not None and not np.isfinite(float(value))
