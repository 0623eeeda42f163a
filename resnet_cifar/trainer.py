"""Train and evaluate one run from a `TrainConfig`: the library behind `resnet_cifar.train`."""

import dataclasses
import os
import warnings

import keras
import numpy as np
import tensorflow as tf

from resnet_cifar import (callbacks, cifar_data, config as config_lib, conv_scaling, events, fidelity,
                          input_pipeline, models, optim, run_dir, tags)
from resnet_cifar.train_step import ReproductionModel


class TrainingError(RuntimeError):
    """The run could not go on (e.g. diverged); one line for the user."""


@dataclasses.dataclass
class RunResult:
    status: str                 # "finished", "already_finished"
    epochs: int
    logs: dict
    model: keras.Model = None


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
    """XLA pays on GPUs; on CPUs it made this model slower (see README, Speed)."""
    if config.jit_compile is not None:
        return config.jit_compile
    return bool(tf.config.list_physical_devices("GPU"))


def load_baseline(path, train_epochs):
    """The logged conv_sqsum trajectory (total and per layer) of a finished baseline run."""
    if not os.path.isdir(path):
        raise config_lib.ConfigError(f"--replay_from={path}: no such run folder")
    if not events.is_complete(path):
        raise config_lib.ConfigError(f"--replay_from={path}: that run has not finished "
                                     f"(no {tags.DONE_FILE}); let the baseline finish first")
    try:
        scalars = events.read_all_scalars(path)
    except events.EventsError as e:
        raise config_lib.ConfigError(f"--replay_from={path}: {e}") from None
    if tags.CONV_SQSUM not in scalars or len(scalars[tags.CONV_SQSUM][0]) == 0:
        raise config_lib.ConfigError(f"--replay_from={path}: no {tags.CONV_SQSUM} logged in it")
    epochs, total = scalars[tags.CONV_SQSUM]
    if epochs[-1] < train_epochs:
        raise config_lib.ConfigError(
            f"--replay_from={path}: its {tags.CONV_SQSUM} ends at epoch {int(epochs[-1])}, "
            f"this run needs {train_epochs}")
    prefix = tags.per_layer(tags.CONV_SQSUM, "")
    names = [n[len(prefix):] for n in scalars if n.startswith(prefix)]
    per_layer = None
    if names:
        per_layer = np.stack([np.interp(epochs, *scalars[prefix + n]) for n in names], axis=1)
    return conv_scaling.BaselineTrajectory(epochs, total, per_layer, names)


def build_model(config, steps_per_epoch, baseline=None):
    """The compiled ReproductionModel for `config`."""
    keras.mixed_precision.set_dtype_policy(config.dtype)
    model = models.build_resnet20(bn_decay=config.bn_decay, model_cls=ReproductionModel)
    mode = config.conv_lr_factor if config.conv_grad_scale else None
    if mode == "per_layer":
        names = [layer.name for layer in models.conv_layers(model)]
        try:
            baseline = baseline.aligned(names)      # columns in the model's layer order
        except (AttributeError, TypeError, ValueError):
            raise config_lib.ConfigError(
                "--conv_lr_factor=per_layer: the baseline run lacks per-layer "
                f"{tags.CONV_SQSUM}/<layer> curves for the 22 conv layers") from None
    model.configure(weight_decay=config.weight_decay, conv_l2=config.conv_l2,
                    conv_lr_factor=conv_scaling.ConvLRFactor(mode, baseline),
                    steps_per_epoch=steps_per_epoch)
    schedule = optim.PiecewiseByEpoch(config.base_learning_rate, config.boundary_epochs,
                                      config.decay_rates, steps_per_epoch)
    model.compile(
        optimizer=optim.TF1Momentum(schedule, momentum=fidelity.MOMENTUM),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=use_xla(config),
        steps_per_execution=config.steps_per_execution,
    )
    model.optimizer.build(model.trainable_variables)
    return model


def run(config, arrays=None, print_fn=print):
    """Trains `config.train_epochs` epochs (resuming if the model dir holds a checkpoint).

    arrays: the data as `cifar_data.Arrays`, if already loaded; else loaded here.
    """
    setup_threads(config)
    setup_devices()
    state = run_dir.prepare(config)          # guards, run_config check, resume/no-op decision
    if state.finished:
        print_fn(run_dir.finished_message(config), flush=True)
        return RunResult("already_finished", config.train_epochs, {})

    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()

    if arrays is None:
        arrays = cifar_data.load_arrays(config.data_source, config.data_dir, config.seed)
    steps_per_epoch = config.steps_per_epoch or len(arrays.train_labels) // config.batch_size
    baseline = None
    if config.conv_grad_scale and config.conv_lr_factor in ("replay", "per_layer"):
        baseline = load_baseline(config.replay_from, config.train_epochs)
    model = build_model(config, steps_per_epoch, baseline)

    epoch_variable = tf.Variable(0, dtype=tf.int64, trainable=False)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer, epoch=epoch_variable)
    manager = tf.train.CheckpointManager(checkpoint, os.path.join(config.model_dir, run_dir.CHECKPOINTS),
                                         max_to_keep=2)
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    initial_epoch = int(epoch_variable.numpy())
    if initial_epoch:
        print_fn(f"resuming {config.model_dir} after epoch {initial_epoch} "
                 f"({os.path.basename(manager.latest_checkpoint)})", flush=True)

    run_dir.write_run_config(config, model, steps_per_epoch, len(arrays.train_labels))

    train_ds = input_pipeline.train_dataset(arrays.train_images, arrays.train_labels, config.batch_size,
                                            seed=config.seed, start_step=initial_epoch * steps_per_epoch)
    test_ds = input_pipeline.test_dataset(arrays.test_images, arrays.test_labels, config.batch_size,
                                          config.eval_steps)
    nan_stop = callbacks.StopOnNonFinite()
    history = model.fit(
        train_ds,
        epochs=config.train_epochs,
        initial_epoch=initial_epoch,
        steps_per_epoch=steps_per_epoch,
        validation_data=test_ds,
        shuffle=False,                 # the stream is shuffled by input_pipeline
        validation_freq=config.epochs_between_evals,
        verbose=config.verbose,
        callbacks=[
            callbacks.EpochTensorBoard(config.model_dir,
                                       per_layer_factor=config.conv_lr_factor == "per_layer"),
            callbacks.EpochCheckpoint(manager, epoch_variable),
            nan_stop,
            callbacks.EpochSummary(config.train_epochs, print_fn),
        ],
    )
    if nan_stop.where is not None:
        epoch, step, loss = nan_stop.where
        raise TrainingError(f"{nan_stop.what} became {loss} at epoch {epoch}, step {step}: training stopped; "
                            f"logs up to there are in {config.model_dir}")
    logs = {k: float(v[-1]) for k, v in history.history.items() if v}
    run_dir.mark_done(config, logs)
    return RunResult("finished", config.train_epochs, logs, model)

