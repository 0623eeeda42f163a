"""Train one run of the post: `python -m resnet_cifar.train --model_dir=DIR [flags]`.

This module only parses flags (names fixed by docs/cli.md) into a
`TrainConfig` and hands it to `resnet_cifar.trainer`. Any bad flag, bad data
or diverged run ends with one line on stderr and a non-zero exit code.
"""

import copy
import dataclasses
import functools
import os
import sys

# oneDNN, TensorFlow's optimized CPU kernels, is decided when TensorFlow is imported,
# and TF turns it on by default only on CPUs with AVX512_VNNI, AVX512_BF16 or AMX. This
# model trained 2-3.5x faster with it than without (docs/speed.md), and bit-reproducibly
# under --deterministic; so it is on for every CPU, unless the user set the variable.
# Nothing imported above pulls TensorFlow in (tests/test_train_cli.py checks).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from absl import app, flags, logging

from resnet_cifar import config as config_lib
from resnet_cifar import command_line, fidelity, interrupt, runs
from resnet_cifar.command_line import fail

FLAGS = flags.FLAGS


def choices_help(registry):
    """'name: description; ...' of a registry (`cifar_data.SOURCES`, `optim.OPTIMIZERS`):
    an enum flag's help lists exactly the choices the code has, from the one list."""
    return "; ".join(f"{name}: {entry.description}" for name, entry in registry.items()) + "."


def default_rates_help(optimizers):
    """--learning_rate's help: each optimizer's default rate, from `optim.OPTIMIZERS`."""
    rates = ", ".join(f"{spec.default_learning_rate:g} for {name}" for name, spec in optimizers.items())
    return f"Base learning rate at batch 128 (scaled by batch/128); default: {rates}."


flags.DEFINE_string("model_dir", None, "Run folder: event files, checkpoints, run_config.json.")
flags.DEFINE_enum("data_source", "tfds", list(config_lib.DATA_SOURCES),
                  choices_help(config_lib.DATA_SOURCES))
flags.DEFINE_string("data_dir", None, "TFDS data folder; for binary: the cifar-10-batches-bin "
                    "folder, its parent, or the cifar-10-binary.tar.gz archive itself.")
flags.DEFINE_integer("train_epochs", fidelity.TRAIN_EPOCHS, "Total epochs.")
flags.DEFINE_integer("epochs_between_evals", 1, "Evaluate on the test set every this many epochs.")
flags.DEFINE_integer("batch_size", fidelity.BATCH_SIZE, "Global batch; the base learning rate scales as batch/128 "
                     "(0.1*batch/128 with momentum).")
flags.DEFINE_list("boundary_epochs", [f"{b:g}" for b in fidelity.BOUNDARY_EPOCHS],
                  "Learning-rate boundaries in epochs (comma list, increasing).")
flags.DEFINE_list("decay_rates", [f"{r:g}" for r in fidelity.DECAY_RATES],
                  "Multipliers of the base rate, one more than --boundary_epochs.")
flags.DEFINE_float("weight_decay", fidelity.WEIGHT_DECAY,
                   "L2 coefficient: weight_decay * sum(tf.nn.l2_loss(v)).")
flags.DEFINE_boolean("conv_l2", True, "Keep the conv kernels in the L2 sum; --noconv_l2 takes "
                     "them out (BN and dense stay in): the post's NoConvL2 run.")
flags.DEFINE_boolean("flag_noconv_l2", False, "Synonym of --noconv_l2.")
flags.DEFINE_boolean("conv_grad_scale", False, "Multiply conv-kernel gradients by the conv LR "
                     "factor (the post's ConvLRScale runs).")
flags.DEFINE_enum("conv_lr_factor", "piecewise", list(config_lib.CONV_LR_FACTORS),
                  "piecewise: the post's fit * conv_sqsum/800; replay: conv_sqsum / the "
                  "baseline's logged conv_sqsum; per_layer: the same for each conv layer; "
                  "per_channel: for each output channel (from the baseline's conv_channel_sqsum.npz).")
flags.DEFINE_string("replay_from", None, "Finished baseline run folder whose logged conv_sqsum (per_channel: its "
                    "conv_channel_sqsum.npz) is replayed.")
flags.DEFINE_float("bn_decay", fidelity.BATCH_NORM_DECAY, "Batch-norm moving-average decay.")
flags.DEFINE_integer("steps_per_epoch", None, "Steps per epoch (default: the whole training set).")
flags.DEFINE_integer("eval_steps", None, "Test batches per evaluation (default: the whole test set).")
flags.DEFINE_integer("seed", 0, "Seed of all randomness (initial weights, data order, augmentation).")
flags.DEFINE_boolean("deterministic", False, "TF op determinism and one inter-op thread: "
                     "bitwise-repeatable runs (slower).")
flags.DEFINE_enum("jit_compile", "auto", ["auto", "true", "false"],
                  "XLA-compile the train step; auto: on GPU only (it is slower on CPU), and not "
                  "with --deterministic (Keras compiles no XLA step under op determinism).")
flags.DEFINE_integer("steps_per_execution", 1, "Train steps per tf.function call.")
flags.DEFINE_enum("dtype", "float32", list(config_lib.DTYPES),
                  "float32 (faithful) or a mixed-precision policy; the conv factor stays float32.")
flags.DEFINE_boolean("overwrite", False, "Start afresh: delete the run --model_dir holds (finished or not, "
                     "any flags) and train anew.")
flags.DEFINE_integer("verbose", 1, "Keras progress output: 0 none, 1 progress bar, 2 Keras' line per epoch "
                     "(the trainer's own line per epoch is always printed; without the bar, also a status "
                     "line about every minute of a long epoch). Not given, and the output is not a terminal "
                     "(a file, a pipe): 0, so logs hold one line per epoch and no progress-bar escape codes.")
# Beyond the post: depth and optimizer.
flags.DEFINE_integer("resnet_size", fidelity.RESNET_SIZE,
                     "ResNet depth 6n+2 (20: the post; 32, 44, 56, 110), n blocks per stage.")
flags.DEFINE_enum("optimizer", "momentum", list(config_lib.OPTIMIZERS),
                  choices_help(config_lib.OPTIMIZERS))
flags.DEFINE_float("learning_rate", None, default_rates_help(config_lib.OPTIMIZERS))

# Every number flag refuses nan, inf and what float32 cannot hold, at parsing: one line, exit 2.
for _flag in FLAGS.get_flags_for_module(__name__):
    if isinstance(_flag.parser, flags.FloatParser):
        flags.register_validator(_flag.name, lambda v: not config_lib.float_problem(v),
                                 f"must be a finite number, at most {config_lib.FLOAT32_MAX:.3g} in size")
# (--boundary_epochs and --decay_rates, lists of numbers, get the same check in TrainConfig.)
# Every integer flag refuses what no count of steps, epochs or images can be.
command_line.bound_integer_flags(FLAGS, __name__)


def config_from_flags(f=FLAGS):
    if f.conv_l2 and f["conv_l2"].present and f.flag_noconv_l2:
        raise config_lib.ConfigError("--conv_l2 and --flag_noconv_l2 contradict each other")
    try:
        boundaries = tuple(float(b) for b in f.boundary_epochs)
        rates = tuple(float(r) for r in f.decay_rates)
    except ValueError as e:
        raise config_lib.ConfigError(f"--boundary_epochs/--decay_rates: {e}") from None
    # Flags named like a TrainConfig field carry over as they are; the rest are mapped here.
    special = dict(
        boundary_epochs=boundaries,
        decay_rates=rates,
        conv_l2=f.conv_l2 and not f.flag_noconv_l2,
        jit_compile={"auto": None, "true": True, "false": False}[f.jit_compile],
        # Keras' progress bar writes ANSI codes even into files: a log gets one line per epoch.
        verbose=f.verbose if f["verbose"].present or sys.stdout.isatty() else 0,
    )
    same = {field.name: f[field.name].value for field in dataclasses.fields(config_lib.TrainConfig)
            if field.name not in special}
    if not same["model_dir"]:
        # The folder named after the run, as the container names it (docs/container.md).
        named = config_lib.TrainConfig(**dict(same, model_dir="unnamed"), **special)
        name = runs.name_of(named.to_dict()) or "NAME"
        name += "_synthetic" if named.data_source == "synthetic" else ""
        name += f"_seed{named.seed}" if named.seed else ""
        raise config_lib.ConfigError(f"--model_dir is required: the run's folder, e.g. --model_dir=runs/{name}")
    return config_lib.TrainConfig(**same, **special)


def parsed_copy(argv):
    """The training flags parsed from `argv` (argv[0]: the program) on a private copy of
    FLAGS, for code that checks many command lines (the sweep runner's plan) without
    touching this process's own flags. absl errors (`flags.Error`) propagate."""
    private = copy.deepcopy(FLAGS)
    private.unparse_flags()
    private(argv)
    return private


def main(argv):
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])} (flags are spelled --name=value)")
    try:
        config = config_from_flags()
    except config_lib.ConfigError as e:
        fail(str(e))

    # Checks that need no TensorFlow come first: a mistake is reported in a second,
    # before TF's start-up lines, and before anything is written (the run folder is
    # created, and locked, only once the run can start).
    from resnet_cifar import cifar_data, run_dir

    try:
        if run_dir.check(config).finished:
            print(run_dir.finished_message(config), flush=True)
            return
        arrays = cifar_data.load_arrays(config.data_source, config.data_dir, config.seed)
        config_lib.steps_per_epoch_for(config, len(arrays.train_labels))
    except (config_lib.ConfigError, cifar_data.DataError) as e:
        fail(str(e))

    interrupt.check()
    with interrupt.deferred():      # no signal lands inside TF's imports, where a bare except may eat it
        from resnet_cifar import trainer
    try:
        trainer.run(config, arrays)
    except (config_lib.ConfigError, cifar_data.DataError) as e:
        fail(str(e))
    except trainer.TrainingError as e:
        fail(str(e), code=1)


def run():
    """The command. The signal handlers are installed here, once, from the first moment: a
    signal during flag parsing or TF's start-up stops the command as cleanly as one in
    training, and `trainer` says where training stopped (`Interrupted.message`)."""
    with interrupt.handlers():
        try:
            app.run(main, flags_parser=functools.partial(command_line.parse_absl, FLAGS))
        except interrupt.Interrupted as e:
            print(getattr(e, "message", f"stopped by {e.name} before training started"),
                  file=sys.stderr, flush=True)
            sys.exit(e.exit_code)


if __name__ == "__main__":
    run()
