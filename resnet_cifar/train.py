"""Train one run of the post: `python -m resnet_cifar.train --model_dir=DIR [flags]`.

One run, read top to bottom: flags -> config -> data -> model -> run folder -> restore ->
fit -> final report. The flags are made from `TrainConfig`'s fields (`config.define_flags`).
Any bad flag, bad data or diverged run ends with one line on stderr and a non-zero exit
code. TensorFlow is imported only once the flags, the folder and the data have been
checked (in `train_and_evaluate`), so a mistake is reported in a second.

What each file holds: docs/architecture.md.
"""

import copy
import errno
import functools
import os
import re
import sys
import time
import warnings

# oneDNN, TensorFlow's optimized CPU kernels, is decided when TensorFlow is imported,
# and TF turns it on by default only on CPUs with AVX512_VNNI, AVX512_BF16 or AMX. This
# model trained 2-3.5x faster with it than without (docs/speed.md), and bit-reproducibly
# under --deterministic; so it is on for every CPU, unless the user set the variable.
# Nothing imported above pulls TensorFlow in (tests/test_train_cli.py checks).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from absl import app, flags, logging

from resnet_cifar import cifar_data, config as config_lib, process, run_dir
from resnet_cifar.config import fail

FLAGS = flags.FLAGS
config_lib.define_flags(FLAGS)
flags.adopt_module_key_flags(config_lib)      # --helpshort lists them as this command's


class TrainingError(RuntimeError):
    """The run could not go on (e.g. diverged); one line for the user."""


def main(argv):
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])} (flags are spelled --name=value)")
    try:
        config = config_lib.from_flags(FLAGS)
        # The folder is checked before anything is read or written: a finished run needs no data,
        # and a refusal comes before the data loads. `train_and_evaluate` then takes the folder's
        # lock and checks it again under the lock: the check that counts.
        if run_dir.check(config).finished:
            print(run_dir.finished_message(config), flush=True)
            return
        arrays = cifar_data.load_arrays(config.data_source, config.data_dir, config.seed)
        config_lib.steps_per_epoch_for(config, len(arrays.train_labels))
        process.check_signal()      # a signal that something swallowed: not on to TensorFlow
        train_and_evaluate(config, arrays)
    except (config_lib.ConfigError, cifar_data.DataError) as e:
        fail(str(e))
    except TrainingError as e:
        fail(str(e), code=1)


def train_and_evaluate(config, arrays):
    """Trains `config.train_epochs` epochs on `arrays` (`cifar_data.Arrays`) in the run folder
    `run_dir.opened` gives it (locked for the run), resuming from its newest checkpoint.
    SIGINT/SIGTERM (under `process.handlers()`, as the command runs it) raise
    `process.Interrupted` between two steps, with a `message` saying where the run stopped."""
    with process.deferred():      # no signal lands inside TF's imports, where a bare except may eat it
        import tensorflow as tf

        from resnet_cifar import callbacks, checkpoints
    setup_runtime(config)

    # The model, its optimizer and the conv factor; what the data is.
    steps_per_epoch = config_lib.steps_per_epoch_for(config, len(arrays.train_labels))
    model = build_model(config, steps_per_epoch)
    progress = callbacks.Progress(model, steps_per_epoch)
    data = cifar_data.fingerprint(arrays, config.data_source, config.data_dir)

    # Everything is checked: only now is the folder created, locked for the run, and checked
    # under the lock (another process may have written it meanwhile).
    with run_dir.opened(config) as state:
        if state.finished:
            print(run_dir.finished_message(config), flush=True)
            return
        if state.replace:
            run_dir.clear(config.model_dir)
            print(f"{config.model_dir}: starting afresh (--overwrite); the run it held is deleted", flush=True)
        try:
            # Restore: the newest checkpoint that reads back whole, and that is this run's.
            epoch_variable = tf.Variable(0, dtype=tf.int64, trainable=False)
            store = checkpoints.CheckpointStore(
                tf.train.Checkpoint(model=model, optimizer=model.optimizer, epoch=epoch_variable),
                os.path.join(config.model_dir, run_dir.CHECKPOINTS), phase_ends=config.phase_end_epochs,
                identity=run_dir.identity(config))
            progress.store = store
            try:
                restored, skipped = store.restore()
            except checkpoints.NothingReadable as e:
                raise config_lib.ConfigError(f"{e}; use --overwrite to start this run afresh") from None
            except checkpoints.ForeignCheckpoint as e:
                raise config_lib.ConfigError(f"{e}: copied from another run's folder? Use --overwrite to start "
                                             "this run afresh, or another --model_dir") from None
            # The logs must not run ahead of the checkpoint; run_config.json records this start.
            run_dir.start(config, restored, model, steps_per_epoch, len(arrays.train_labels), data)
            initial_epoch = int(epoch_variable.numpy())
            skipped_text = "".join(f"; skipped {name}: {reason}" for name, reason in skipped)
            if initial_epoch:
                print(f"resuming {config.model_dir} after epoch {initial_epoch} "
                      f"({checkpoints.name(restored)}){skipped_text}", flush=True)
            elif skipped:
                print(f"{config.model_dir}: no checkpoint to resume from{skipped_text}", flush=True)

            # The data, resumed at the step the checkpoint ends: the batches an uninterrupted run sees.
            train_ds = cifar_data.train_dataset(arrays.train_images, arrays.train_labels, config.batch_size,
                                                seed=config.seed, start_step=initial_epoch * steps_per_epoch)
            test_ds = cifar_data.test_dataset(arrays.test_images, arrays.test_labels, config.batch_size,
                                              config.eval_steps)

            # Fit: each epoch logged (event files, conv_channel_sqsum.npz), checkpointed, then printed.
            epoch_log = callbacks.EpochLog(config.model_dir, config.train_epochs,
                                           checkpoint=callbacks.EpochCheckpoint(store, epoch_variable))
            start = time.time()
            try:
                with process.deferred():         # a signal stops the run between two steps (EpochLog)
                    history = model.fit(
                        train_ds,
                        epochs=config.train_epochs,
                        initial_epoch=initial_epoch,
                        steps_per_epoch=steps_per_epoch,
                        validation_data=test_ds,
                        shuffle=False,                 # the stream is shuffled by cifar_data.train_dataset
                        validation_freq=config.epochs_between_evals,
                        verbose=config.verbose,
                        callbacks=[epoch_log],
                    )
            except checkpoints.SaveError as e:
                raise TrainingError(str(e)) from None
            except (tf.errors.ResourceExhaustedError, OSError) as e:
                raise TrainingError(out_of_space(e, store)) from None
            if epoch_log.diverged:
                epoch, step, what, value = epoch_log.diverged
                raise TrainingError(f"{what} became {value} at epoch {epoch}, step {step}: training stopped; "
                                    f"logs up to there are in {config.model_dir}")
        except process.Interrupted as e:
            e.message = progress.stopped_message(e.name)
            raise

        # Done: the final weights (to share and evaluate without checkpoints), then done.json, so a
        # finished run always has its final weights; then what it gave and where it is.
        logs = {k: float(v[-1]) for k, v in history.history.items() if v}
        process.check_signal()           # a signal that something swallowed: not finished
        run_dir.finish(config, model, logs)
        freq = config.epochs_between_evals
        print(callbacks.final_report(config.model_dir, config.train_epochs, logs, time.time() - start,
                                     last_eval_epoch=config.train_epochs // freq * freq, resumed_after=initial_epoch,
                                     steps=config.train_epochs * steps_per_epoch, bn_decay=config.bn_decay), flush=True)


def build_model(config, steps_per_epoch, baseline=None):
    """The compiled `models.ReproductionModel` of `config`: the ResNet with the post's objective
    and conv LR factor (`baseline`: a replay mode's `optim.BaselineTrajectory`, read from
    --replay_from when not given), and the optimizer on the schedule, its slots built."""
    import keras

    from resnet_cifar import models, optim

    jit_compile = use_xla(config)
    mode = config.conv_lr_factor if config.conv_grad_scale else None
    if mode in config_lib.REPLAY_FACTORS and baseline is None:
        from resnet_cifar import events      # reads the baseline's run folder back

        baseline = events.load_baseline(config.replay_from, config.train_epochs, resnet_size=config.resnet_size,
                                        per_channel=mode == "per_channel")
    keras.mixed_precision.set_dtype_policy(config.dtype)
    model = models.build_resnet(config.resnet_size, bn_decay=config.bn_decay, model_cls=models.ReproductionModel)
    # An optimizer with decoupled decay (adamw) decays the weights itself: no L2 term in the loss.
    decoupled = config_lib.OPTIMIZERS[config.optimizer].decoupled_decay
    model.configure(weight_decay=0.0 if decoupled else config.weight_decay, conv_l2=config.conv_l2,
                    steps_per_epoch=steps_per_epoch, conv_lr_factor=mode, baseline=baseline)
    decayed = {id(v) for v in model.l2_variables()}     # adamw: the L2 variable set
    optimizer = optim.for_training(config.optimizer, config.base_learning_rate, config.boundary_epochs,
                                   config.decay_rates, steps_per_epoch, config.weight_decay,
                                   model.trainable_variables,
                                   no_decay=[v for v in model.trainable_variables if id(v) not in decayed])
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        # A metric object, not the string "accuracy": Keras (TF backend, no distribution
        # strategy) builds a metric named by a string inside the first trace of the step, and
        # a variable created there makes TensorFlow trace the whole step a second time.
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=jit_compile,
        steps_per_execution=config.steps_per_execution,
    )
    return model


def setup_runtime(config):
    """Seeds; memory growth on every GPU (several runs can share one device); under
    --deterministic, op determinism and one inter-op thread. With TF's default (one per
    core), independent ops of the backward pass run concurrently and, even with op
    determinism, the gradients differ in their last bits from one evaluation to the next
    (ResNet-20 at batch 128 on 2 cores, oneDNN on or off; tests/test_train_cli.py).
    Intra-op threads (inside one op) stay TF's default."""
    import keras
    import tensorflow as tf

    if config.deterministic and tf.config.threading.get_inter_op_parallelism_threads() != 1:
        try:
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:        # TF's runtime already started in this process
            warnings.warn("--deterministic: TensorFlow started before the run, so its inter-op "
                          "threads could not be set to 1; results may differ in the last bits")
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass   # already initialized (e.g. a second run in one process)
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()


def use_xla(config):
    """XLA pays on GPUs; on CPUs it made this model slower (see docs/speed.md). Not under
    --deterministic: Keras compiles no XLA step while TF's op determinism is on."""
    import tensorflow as tf

    if config.jit_compile is not None:
        return config.jit_compile
    return bool(tf.config.list_physical_devices("GPU")) and not config.deterministic


def out_of_space(error, store):
    """One line for a full disk (event files as often as checkpoints) or exhausted memory; any
    other OSError is not ours to explain."""
    if isinstance(error, OSError) and error.errno not in (errno.ENOSPC, errno.EDQUOT):
        raise error
    text = " ".join(re.sub(r"\{\{[^}]*\}\}", "", str(getattr(error, "message", error))).split())
    text = re.sub(r"(No space left on device).*", r"\1", text)
    kept = f"checkpoint ckpt-{store.good[-1]} is kept" if store.good else "no epoch had finished"
    return (f"{type(error).__name__}: {text[:300]}; training stopped, {kept}: free space "
            "(or memory) and run the same command to resume")


def parsed_copy(argv):
    """The training flags parsed from `argv` (argv[0]: the program) on a private copy of
    FLAGS, for code that checks many command lines (the sweep runner's plan) without
    touching this process's own flags. absl errors (`flags.Error`) propagate."""
    private = copy.deepcopy(FLAGS)
    private.unparse_flags()
    private(argv)
    return private


def run():
    """The command. The signal handlers are installed here, once, from the first moment: a
    signal during flag parsing or TF's start-up stops the command as cleanly as one in
    training, and `train_and_evaluate` says where training stopped."""
    with process.handlers():
        try:
            app.run(main, flags_parser=functools.partial(config_lib.parse_absl, FLAGS))
        except process.Interrupted as e:
            print(getattr(e, "message", f"stopped by {e.name} before training started"),
                  file=sys.stderr, flush=True)
            sys.exit(e.exit_code)


if __name__ == "__main__":
    run()
