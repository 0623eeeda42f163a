"""Train and evaluate one run from a `TrainConfig`: the library behind `resnet_cifar.train`."""

import errno
import os
import re
import time
import warnings

import keras
import tensorflow as tf

from resnet_cifar import (callbacks, checkpoints, cifar_data, config as config_lib, console, conv_scaling,
                          input_pipeline, interrupt, models, optim, run_dir, tags)
from resnet_cifar.train_step import ReproductionModel


class TrainingError(RuntimeError):
    """The run could not go on (e.g. diverged); one line for the user."""


def setup_devices():
    """Memory growth on every GPU, so several runs can share one device."""
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass   # already initialized (e.g. a second run in one process)


def setup_threads(config):
    """TF's thread pools; call before TensorFlow runs its first op.

    Under `--deterministic`, one inter-op thread. With TF's default (one per core),
    independent ops of the backward pass run concurrently and, even with op
    determinism enabled, the gradients then differ in their last bits from one
    evaluation to the next (ResNet-20 at batch 128 on 2 cores, oneDNN on or off;
    tests/test_train_cli.py). Intra-op threads (inside one op) stay TF's default.
    """
    if not config.deterministic or tf.config.threading.get_inter_op_parallelism_threads() == 1:
        return
    try:
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:        # TF's runtime already started in this process
        warnings.warn("--deterministic: TensorFlow started before the run, so its inter-op "
                      "threads could not be set to 1; results may differ in the last bits")


def use_xla(config):
    """XLA pays on GPUs; on CPUs it made this model slower (see docs/speed.md). Not under
    --deterministic: Keras compiles no XLA step while TF's op determinism is on."""
    if config.jit_compile is not None:
        return config.jit_compile
    return bool(tf.config.list_physical_devices("GPU")) and not config.deterministic


def build_model(config, steps_per_epoch, baseline=None):
    """The compiled ReproductionModel for `config`."""
    keras.mixed_precision.set_dtype_policy(config.dtype)
    model = models.build_resnet(config.resnet_size, bn_decay=config.bn_decay, model_cls=ReproductionModel)
    mode = config.conv_lr_factor if config.conv_grad_scale else None
    # An optimizer with decoupled decay (adamw) decays the weights itself: no L2 term in the loss.
    decoupled = optim.OPTIMIZERS[config.optimizer].decoupled_decay
    model.configure(weight_decay=0.0 if decoupled else config.weight_decay, conv_l2=config.conv_l2,
                    conv_lr_factor=conv_scaling.for_model(mode, baseline, model),
                    steps_per_epoch=steps_per_epoch)
    schedule = optim.piecewise_by_epoch(config.base_learning_rate, config.boundary_epochs,
                                        config.decay_rates, steps_per_epoch)
    decayed = {id(v) for v in model.l2_variables()}     # adamw: the L2 variable set
    model.compile(
        optimizer=optim.make_optimizer(
            config.optimizer, schedule, weight_decay=config.weight_decay,
            no_decay=[v for v in model.trainable_variables if id(v) not in decayed]),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        # A metric object, not the string "accuracy": Keras (TF backend, no distribution
        # strategy) builds a metric named by a string inside the first trace of the step, and
        # a variable created there makes TensorFlow trace the whole step a second time.
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=use_xla(config),
        steps_per_execution=config.steps_per_execution,
    )
    model.optimizer.build(model.trainable_variables)
    return model


def run(config, arrays):
    """Trains `config.train_epochs` epochs on `arrays` (`cifar_data.Arrays`), resuming if the
    model dir holds a checkpoint.

    The run folder is checked, created and locked (`run_dir.open_run`) once the model is
    built and before anything is written; it stays locked until the run ends. Signals: under
    `interrupt.handlers()` (as `resnet_cifar.train` runs it), SIGINT/SIGTERM raise
    `interrupt.Interrupted` between two steps, with a `message` saying where the run stopped.
    """
    progress = _Progress()
    try:
        _run(config, arrays, progress)
    except interrupt.Interrupted as e:
        e.message = progress.stopped_message(e.name)
        raise


class _Progress:
    """Where a run is, for the message of an interrupted one."""

    def __init__(self):
        self.model = None
        self.steps_per_epoch = None
        self.store = None

    def stopped_message(self, signal_name):
        if self.model is None:
            return f"stopped by {signal_name} before training started"
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


def _run(config, arrays, progress):
    setup_threads(config)
    setup_devices()
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()

    steps_per_epoch = config_lib.steps_per_epoch_for(config, len(arrays.train_labels))
    baseline = None
    if config.conv_grad_scale and config.conv_lr_factor in config_lib.REPLAY_FACTORS:
        baseline = conv_scaling.load_baseline(config.replay_from, config.train_epochs,
                                 per_channel=config.conv_lr_factor == "per_channel", resnet_size=config.resnet_size)
    model = build_model(config, steps_per_epoch, baseline)
    progress.model, progress.steps_per_epoch = model, steps_per_epoch

    # Everything is checked: only now is the folder created, locked for the run, and checked
    # under the lock (the one check that counts: another process may have written it).
    lock, state, created = run_dir.open_run(config)
    try:
        if state.finished:
            print(run_dir.finished_message(config), flush=True)
            return
        if state.replace:
            print(f"{config.model_dir}: starting afresh (--overwrite); the run it held is deleted", flush=True)
        try:
            _train(config, arrays, progress, model, steps_per_epoch)
        except checkpoints.NothingReadable as e:
            raise config_lib.ConfigError(f"{e}; use --overwrite to start this run afresh") from None
    except (config_lib.ConfigError, cifar_data.DataError):
        if created:
            lock.release()
            run_dir.remove_created(config.model_dir)
        raise
    finally:
        lock.release()


def _train(config, arrays, progress, model, steps_per_epoch):
    epoch_variable = tf.Variable(0, dtype=tf.int64, trainable=False)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer, epoch=epoch_variable)
    store = checkpoints.CheckpointStore(checkpoint, os.path.join(config.model_dir, run_dir.CHECKPOINTS),
                                        phase_ends=config.phase_end_epochs, identity=run_dir.identity(config))
    progress.store = store
    try:
        restored, skipped = store.restore()
    except checkpoints.ForeignCheckpoint as e:
        raise config_lib.ConfigError(f"{e}: copied from another run's folder? Use --overwrite to start "
                                     "this run afresh, or another --model_dir") from None
    run_dir.check_checkpoints_cover_the_logs(config.model_dir, restored)
    initial_epoch = int(epoch_variable.numpy())
    skipped_text = "".join(f"; skipped {name}: {reason}" for name, reason in skipped)
    if initial_epoch:
        print(f"resuming {config.model_dir} after epoch {initial_epoch} "
                 f"({checkpoints.name(restored)}){skipped_text}", flush=True)
    elif skipped:
        print(f"{config.model_dir}: no checkpoint to resume from{skipped_text}", flush=True)

    run_dir.write_run_config(config, model, steps_per_epoch, len(arrays.train_labels),
                             data=cifar_data.fingerprint(arrays, config.data_source, config.data_dir))

    train_ds = input_pipeline.train_dataset(arrays.train_images, arrays.train_labels, config.batch_size,
                                            seed=config.seed, start_step=initial_epoch * steps_per_epoch)
    test_ds = input_pipeline.test_dataset(arrays.test_images, arrays.test_labels, config.batch_size,
                                          config.eval_steps)
    nan_stop = callbacks.StopOnNonFinite()
    start = time.time()
    try:
        with interrupt.deferred():         # a signal stops the run between two steps (StopOnSignal)
            history = model.fit(
                train_ds,
                epochs=config.train_epochs,
                initial_epoch=initial_epoch,
                steps_per_epoch=steps_per_epoch,
                validation_data=test_ds,
                shuffle=False,                 # the stream is shuffled by input_pipeline
                validation_freq=config.epochs_between_evals,
                verbose=config.verbose,
                callbacks=[                # in any order: none depends on another
                    callbacks.EpochTensorBoard(config.model_dir),
                    callbacks.ChannelSqsumLog(config.model_dir),
                    callbacks.EpochCheckpoint(store, epoch_variable),
                    nan_stop,
                    callbacks.EpochSummary(config.train_epochs),
                    callbacks.StopOnSignal(),
                ],
            )
    except checkpoints.SaveError as e:
        raise TrainingError(str(e)) from None
    except (tf.errors.ResourceExhaustedError, OSError) as e:
        # A full disk hits the event files as often as the checkpoints (or memory ran out).
        if isinstance(e, OSError) and e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        text = " ".join(re.sub(r"\{\{[^}]*\}\}", "", str(getattr(e, "message", e))).split())
        text = re.sub(r"(No space left on device).*", r"\1", text)
        kept = (f"checkpoint {checkpoints.name(store.good[-1])} is kept" if store.good
                else "no epoch had finished")
        raise TrainingError(f"{type(e).__name__}: {text[:300]}; training stopped, {kept}: free space "
                            "(or memory) and run the same command to resume") from None
    if nan_stop.where is not None:
        epoch, step, loss = nan_stop.where
        raise TrainingError(f"{nan_stop.what} became {loss} at epoch {epoch}, step {step}: training stopped; "
                            f"logs up to there are in {config.model_dir}")
    logs = {k: float(v[-1]) for k, v in history.history.items() if v}
    interrupt.check()           # a signal that something swallowed: not finished
    # The weights alone (to share and evaluate without checkpoints), then done.json: a
    # finished run always has its final weights.
    models.save_weights(model, os.path.join(config.model_dir, tags.FINAL_WEIGHTS_FILE))
    run_dir.mark_done(config, logs)
    freq = config.epochs_between_evals
    print(console.final_report(config.model_dir, config.train_epochs, logs, time.time() - start,
                               last_eval_epoch=config.train_epochs // freq * freq,
                               resumed_after=initial_epoch, steps=config.train_epochs * steps_per_epoch,
                               bn_decay=config.bn_decay), flush=True)
