"""The settings of a run, each declared once: `TrainConfig`.

Each field carries its flag's help (`setting`); `define_flags` makes the absl flags of
`python -m resnet_cifar.train` from the fields, and `from_flags` the config from them, so a
setting added here is a flag, in --help and in run_config.json at once (docs/cli.md's table
is tested against the fields). Validation happens here, once, in `TrainConfig.validate`:
the library only ever sees a valid config, and tests and notebooks build it directly.
Defaults reproduce the post's baseline run. No TensorFlow here: a mistake in the flags is
reported before TensorFlow starts.
"""

import dataclasses
import math
import os
import re
import sys
from typing import Optional, Tuple

from resnet_cifar import cifar_data, fidelity

RESNET_SIZES = (20, 32, 44, 56, 110)   # 6n+2; any 6n+2 builds, these are the documented ones
DTYPES = ("float32", "mixed_float16", "mixed_bfloat16")
MAX_SEED = 2**31 - 1       # NumPy seeds stop at 2**32 - 1, TF's int32 seeds at 2**31 - 1
MAX_STEPS = 2**31 - 1      # a run's steps: the step count and the learning-rate schedule's boundaries stay int32
# The largest count any command takes: TensorFlow's int32 shapes and seeds, and the C ints
# that Python's clocks and timedeltas convert to, stop here.
INT_MAX = 2**31 - 1
FLOAT32_MAX = 3.4028234663852886e38   # training computes in float32: larger numbers overflow

# --conv_lr_factor: the post's hand fit, and the modes that replay a baseline run's logged
# trajectory (they need --replay_from). `optim.ConvLRFactor` computes each.
CONV_LR_FACTORS = ("piecewise", "replay", "per_layer", "per_channel")
REPLAY_FACTORS = ("replay", "per_layer", "per_channel")


@dataclasses.dataclass(frozen=True)
class OptimizerChoice:
    """One choice of --optimizer (`optim.BUILD` builds it). default_learning_rate: the base rate
    at batch 128, scaled by batch/128 like the post's 0.1. decoupled_decay: the optimizer
    decays the weights itself, so the L2 term leaves the loss; otherwise weight_decay is the
    loss's L2 coefficient, as in the post. description: one line for --help."""
    default_learning_rate: float
    decoupled_decay: bool
    description: str


# Default rates: momentum the post's; adam / adamw Kingma & Ba's and Keras' default 1e-3.
OPTIMIZERS = {
    "momentum": OptimizerChoice(fidelity.BASE_LEARNING_RATE, False, "TF1 momentum 0.9 (the post)"),
    "adam": OptimizerChoice(1e-3, False, "Adam with the L2 term in the loss"),
    "adamw": OptimizerChoice(1e-3, True, "Adam with decoupled weight decay w -= lr*weight_decay*w "
                                         "(no L2 in the loss)"),
}
DATA_SOURCES = cifar_data.SOURCES       # name -> DataSource (load, description)


def float_problem(value):
    """'' for a usable number (or None: unset), else why not: every float setting gets this check."""
    if value is None:
        return ""
    if not math.isfinite(value):
        return "must be a finite number"
    if abs(value) > FLOAT32_MAX:
        return f"is too large (training computes in float32, at most {FLOAT32_MAX:.3g})"
    return ""


class ConfigError(ValueError):
    """A bad setting; its message is one line, meant for the user."""


def setting(default=dataclasses.MISSING, help="", choices=None):
    """A TrainConfig field and its flag: `help` for --help, `choices` (a list, or a registry of
    name -> entry with a description) for an enum flag."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def choices_help(registry):
    return "; ".join(f"{name}: {entry.description}" for name, entry in registry.items()) + "."


def rates_help():
    rates = ", ".join(f"{c.default_learning_rate:g} for {name}" for name, c in OPTIMIZERS.items())
    return f"Base learning rate at batch 128 (scaled by batch/128); default: {rates}."


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model_dir: str = setting(help="Run folder: event files, checkpoints, run_config.json.")
    data_source: str = setting("tfds", choices_help(DATA_SOURCES), choices=DATA_SOURCES)
    data_dir: Optional[str] = setting(None, "TFDS data folder; for binary: the cifar-10-batches-bin "
                                      "folder, its parent, or the cifar-10-binary.tar.gz archive itself.")
    train_epochs: int = setting(fidelity.TRAIN_EPOCHS, "Total epochs.")
    epochs_between_evals: int = setting(1, "Evaluate on the test set every this many epochs.")
    batch_size: int = setting(fidelity.BATCH_SIZE, "Global batch; the base learning rate scales as batch/128 "
                              "(0.1*batch/128 with momentum).")
    boundary_epochs: Tuple[float, ...] = setting(fidelity.BOUNDARY_EPOCHS, "Learning-rate boundaries in "
                                                 "epochs (comma list, increasing).")
    decay_rates: Tuple[float, ...] = setting(fidelity.DECAY_RATES, "Multipliers of the base rate, one more "
                                             "than --boundary_epochs.")
    weight_decay: float = setting(fidelity.WEIGHT_DECAY, "L2 coefficient: weight_decay * sum(tf.nn.l2_loss(v)).")
    conv_l2: bool = setting(True, "Keep the conv kernels in the L2 sum; --noconv_l2 takes them out (BN and "
                            "dense stay in): the post's NoConvL2 run. --flag_noconv_l2 is a synonym.")
    conv_grad_scale: bool = setting(False, "Multiply conv-kernel gradients by the conv LR factor (the "
                                    "post's ConvLRScale runs).")
    conv_lr_factor: str = setting("piecewise", "piecewise: the post's fit * conv_sqsum/800; replay: "
                                  "conv_sqsum / the baseline's logged conv_sqsum; per_layer: the same for "
                                  "each conv layer; per_channel: for each output channel (from the "
                                  "baseline's conv_channel_sqsum.npz).", choices=CONV_LR_FACTORS)
    replay_from: Optional[str] = setting(None, "Finished baseline run folder whose logged conv_sqsum "
                                         "(per_channel: its conv_channel_sqsum.npz) is replayed.")
    bn_decay: float = setting(fidelity.BATCH_NORM_DECAY, "Batch-norm moving-average decay.")
    steps_per_epoch: Optional[int] = setting(None, "Steps per epoch (default: the whole training set).")
    eval_steps: Optional[int] = setting(None, "Test batches per evaluation (default: the whole test set).")
    seed: int = setting(0, "Seed of all randomness (initial weights, data order, augmentation).")
    deterministic: bool = setting(False, "TF op determinism and one inter-op thread: bitwise-repeatable "
                                  "runs (slower).")
    # None (the flag's auto): on for GPU (unless deterministic), off for CPU.
    jit_compile: Optional[bool] = setting(None, "XLA-compile the train step; auto: on GPU only (it is slower "
                                          "on CPU), and not with --deterministic (Keras compiles no XLA "
                                          "step under op determinism).")
    steps_per_execution: int = setting(1, "Train steps per tf.function call.")
    dtype: str = setting("float32", "float32 (faithful) or a mixed-precision policy; the conv factor stays "
                         "float32.", choices=DTYPES)
    overwrite: bool = setting(False, "Start afresh: delete the run --model_dir holds (finished or not, any "
                              "flags) and train anew.")
    verbose: int = setting(1, "Keras progress output: 0 none, 1 progress bar, 2 Keras' line per epoch (the "
                           "trainer's own line per epoch is always printed; without the bar, also a status "
                           "line about every minute of a long epoch). Not given, and the output is not a "
                           "terminal (a file, a pipe): 0, so logs hold one line per epoch and no "
                           "progress-bar escape codes.")
    # Beyond the post: depth, optimizer, its rate.
    resnet_size: int = setting(fidelity.RESNET_SIZE, "ResNet depth 6n+2 (20: the post; 32, 44, 56, 110), "
                               "n blocks per stage.")
    optimizer: str = setting("momentum", choices_help(OPTIMIZERS), choices=OPTIMIZERS)
    learning_rate: Optional[float] = setting(None, rates_help())   # None: the optimizer's default

    def __post_init__(self):
        # Normalise sequences so that configs from flags, JSON and code compare equal.
        object.__setattr__(self, "boundary_epochs", tuple(float(b) for b in self.boundary_epochs))
        object.__setattr__(self, "decay_rates", tuple(float(r) for r in self.decay_rates))
        self.validate()

    @property
    def base_learning_rate(self) -> float:
        return base_learning_rate(self.optimizer, self.learning_rate, self.batch_size)

    @property
    def phase_end_epochs(self) -> Tuple[int, ...]:
        """The checkpoints the trainer keeps beside its rotation (see phase_end_epochs)."""
        return phase_end_epochs(self.boundary_epochs, self.train_epochs)

    def validate(self):
        def fail(msg):
            raise ConfigError(msg)

        if not self.model_dir:
            fail("--model_dir is required")
        if self.data_source not in DATA_SOURCES:
            fail(f"--data_source={self.data_source!r}: choose one of {', '.join(DATA_SOURCES)}")
        if cifar_data.missing_data_dir(self.data_source, self.data_dir):
            fail(cifar_data.missing_data_dir(self.data_source, self.data_dir))
        if self.conv_lr_factor not in CONV_LR_FACTORS:
            fail(f"--conv_lr_factor={self.conv_lr_factor!r}: choose one of {', '.join(CONV_LR_FACTORS)}")
        if self.dtype not in DTYPES:
            fail(f"--dtype={self.dtype!r}: choose one of {', '.join(DTYPES)}")
        for name in ("weight_decay", "bn_decay", "learning_rate"):
            problem = float_problem(getattr(self, name))
            if problem:
                fail(f"--{name}={getattr(self, name)} {problem}")
        for name in ("boundary_epochs", "decay_rates"):
            if any(float_problem(x) for x in getattr(self, name)):
                fail(f"--{name}={_csv(getattr(self, name))} must be finite numbers, "
                     f"at most {FLOAT32_MAX:.3g} in size")
        if self.deterministic and self.jit_compile:
            # Keras compiles no XLA step while TF's op determinism is on (model_supports_jit):
            # it would train without XLA and say nothing.
            fail("--deterministic and --jit_compile=true exclude each other: Keras compiles no XLA step "
                 "under op determinism; drop one of them")
        if not 0 <= self.seed <= MAX_SEED:
            fail(f"--seed={self.seed} must be in [0, {MAX_SEED}]")
        for name in ("batch_size", "train_epochs", "epochs_between_evals", "steps_per_execution"):
            if getattr(self, name) <= 0:
                fail(f"--{name}={getattr(self, name)} must be positive")
        for name in ("steps_per_epoch", "eval_steps"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                fail(f"--{name}={value} must be positive")
        b = self.boundary_epochs
        if any(x <= 0 for x in b) or any(y <= x for x, y in zip(b, b[1:])):
            fail(f"--boundary_epochs={_csv(b)} must be positive and strictly increasing")
        if len(self.decay_rates) != len(b) + 1:
            fail(f"--decay_rates needs {len(b) + 1} values (one more than --boundary_epochs), "
                 f"got {len(self.decay_rates)}")
        if any(r < 0 for r in self.decay_rates):
            fail(f"--decay_rates={_csv(self.decay_rates)} must not be negative")
        if self.weight_decay < 0:
            fail(f"--weight_decay={self.weight_decay} must not be negative")
        if not 0.0 <= self.bn_decay < 1.0:
            fail(f"--bn_decay={self.bn_decay} must be in [0, 1)")
        if self.conv_lr_factor in REPLAY_FACTORS:
            if not self.conv_grad_scale:
                fail(f"--conv_lr_factor={self.conv_lr_factor} needs --conv_grad_scale")
            if not self.replay_from:
                fail(f"--conv_lr_factor={self.conv_lr_factor} needs --replay_from=BASELINE_DIR")
        elif self.replay_from:
            fail("--replay_from is only used with --conv_lr_factor=replay, per_layer or per_channel")
        if self.verbose not in (0, 1, 2):
            fail(f"--verbose={self.verbose}: choose 0, 1 or 2")
        if self.steps_per_epoch is not None:
            check_steps_per_execution(self, self.steps_per_epoch)
        self._validate_beyond(fail)

    def _validate_beyond(self, fail):
        """Depth, optimizer, rate; the post's piecewise fit only where it was fitted."""
        if self.resnet_size < 8 or self.resnet_size % 6 != 2:
            fail(f"--resnet_size={self.resnet_size} must be 6n+2 "
                 f"({', '.join(str(s) for s in RESNET_SIZES)}, ...)")
        if self.optimizer not in OPTIMIZERS:
            fail(f"--optimizer={self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            fail(f"--learning_rate={self.learning_rate} must be positive")
        if self.conv_grad_scale and self.conv_lr_factor == "piecewise":
            differs = [f"--{name}={_show(getattr(self, name))}" for name, post in (
                ("resnet_size", fidelity.RESNET_SIZE), ("optimizer", "momentum"),
                ("train_epochs", fidelity.TRAIN_EPOCHS), ("boundary_epochs", fidelity.BOUNDARY_EPOCHS),
                ("decay_rates", fidelity.DECAY_RATES), ("steps_per_epoch", None))
                if _show(getattr(self, name)) != _show(post)]
            if differs:
                fail(f"--conv_lr_factor=piecewise is the post's fit for ResNet-20 with momentum on the "
                     f"150-epoch schedule, not for {' '.join(differs)}: use --conv_lr_factor=replay "
                     f"--replay_from=BASELINE_DIR")

    def to_dict(self):
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- the flags, from the fields

def define_flags(flag_values):
    """One absl flag per TrainConfig field (its default, help and choices), plus --flag_noconv_l2,
    the post's spelling of --noconv_l2. Numbers are checked at parsing: floats finite and within
    float32, integers within +-INT_MAX (one line, exit 2, through `parse_absl`)."""
    from absl import flags

    for field in dataclasses.fields(TrainConfig):
        name, meta = field.name, field.metadata
        default = None if field.default is dataclasses.MISSING else field.default
        args = dict(help=meta["help"], flag_values=flag_values)
        if meta["choices"]:
            flags.DEFINE_enum(name, default, list(meta["choices"]), **args)
        elif field.type == Optional[bool]:        # jit_compile: auto (None), true, false
            flags.DEFINE_enum(name, "auto", ["auto", "true", "false"], **args)
        elif field.type is bool:
            flags.DEFINE_boolean(name, default, **args)
        elif field.type in (int, Optional[int]):
            flags.DEFINE_integer(name, default, **args)
        elif field.type in (float, Optional[float]):
            flags.DEFINE_float(name, default, **args)
            flags.register_validator(name, lambda v: not float_problem(v), "must be a finite number, at "
                                     f"most {FLOAT32_MAX:.3g} in size", flag_values=flag_values)
        elif field.type == Tuple[float, ...]:     # checked with the config; empty: a constant rate
            flags.DEFINE_list(name, [f"{x:g}" for x in default], **args)
        else:
            flags.DEFINE_string(name, default, **args)
    flags.DEFINE_boolean("flag_noconv_l2", False, "Synonym of --noconv_l2.", flag_values=flag_values)
    bound_integer_flags(flag_values, __name__)


def bound_integer_flags(flag_values, module_name):
    """absl validators: every integer flag that `module_name` defines refuses a value beyond
    +-INT_MAX at parsing (one line, exit 2, through `parse_absl`)."""
    from absl import flags

    for flag in flag_values.get_flags_for_module(module_name):
        if isinstance(flag.parser, flags.IntegerParser):
            flags.register_validator(flag.name, lambda v: v is None or abs(v) <= INT_MAX,
                                     f"must be at most {INT_MAX} in size", flag_values=flag_values)


def from_flags(f):
    """The TrainConfig of parsed flags (`define_flags`); ConfigError (one line) for a bad one."""
    if f.conv_l2 and f["conv_l2"].present and f.flag_noconv_l2:
        raise ConfigError("--conv_l2 and --flag_noconv_l2 contradict each other")
    values = {field.name: f[field.name].value for field in dataclasses.fields(TrainConfig)}
    try:
        for name in ("boundary_epochs", "decay_rates"):
            values[name] = tuple(float(x) for x in values[name])
    except ValueError as e:
        raise ConfigError(f"--boundary_epochs/--decay_rates: {e}") from None
    values.update(
        conv_l2=f.conv_l2 and not f.flag_noconv_l2,
        jit_compile={"auto": None, "true": True, "false": False}[f.jit_compile],
        # Keras' progress bar writes ANSI codes even into files: a log gets one line per epoch.
        verbose=f.verbose if f["verbose"].present or sys.stdout.isatty() else 0)
    if not values["model_dir"]:
        # The folder named after the run, as the container names it (docs/container.md).
        from resnet_cifar import runs

        named = TrainConfig(**dict(values, model_dir="unnamed"))
        name = runs.name_of(named.to_dict()) or "NAME"
        name += "_synthetic" if named.data_source == "synthetic" else ""
        name += f"_seed{named.seed}" if named.seed else ""
        raise ConfigError(f"--model_dir is required: the run's folder, e.g. --model_dir=runs/{name}")
    return TrainConfig(**values)


def fail(message, code=2):
    """Print `error: message` on stderr, on one line whatever a library's text held, and exit
    with `code`."""
    message = " ".join(str(message).split())
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _stdout_to_devnull():
    """After a BrokenPipeError: nothing more to write, and no second error when Python exits."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def parse_absl(flag_values, argv):
    """`flag_values(argv)` (absl) as the absl commands' (trainer, benchmark) `flags_parser`:
    a bad flag or flagfile is one line `error: ...` (exit code 2) instead of absl's usage dump;
    -h is --help (absl knows -? only); and --help, --helpshort, --helpfull or --helpxml exit
    with 0: absl exits 1 there, the help asked for is a success."""
    from absl import flags

    argv = [argv[0]] + ["--help" if arg == "-h" else arg for arg in argv[1:]]
    try:
        return flag_values(argv)
    except SystemExit as e:
        if e.code == 1:
            sys.exit(0)
        raise
    except BrokenPipeError:          # the help piped into `head`, which stopped reading: done
        _stdout_to_devnull()
        sys.exit(0)
    except flags.Error as e:
        # a validator's "flag --x=v: must ..." as TrainConfig says it: "--x=v must ..."
        fail(re.sub(r"^flag (--\S+): must ", r"\1 must ", str(e).splitlines()[0].removeprefix("ERROR:: ")))
    except UnicodeDecodeError as e:  # a flagfile that is not text
        names = [a.split("=", 1)[1] for a in argv if a.startswith(("--flagfile=", "-flagfile="))]
        fail(f"--flagfile={','.join(names) or '?'}: not UTF-8 text ({e.reason} at byte {e.start})")
    except OSError as e:             # a flagfile that is a folder, unreadable, ...
        fail(f"cannot read flagfile {e.filename}: {e.strerror or e}")



def phase_end_epochs(boundary_epochs, train_epochs) -> Tuple[int, ...]:
    """The last whole epoch of each learning-rate phase but the last (50 and 100 for the post)."""
    ends = {math.floor(float(b)) for b in boundary_epochs}
    return tuple(sorted(e for e in ends if 1 <= e < int(train_epochs)))


def base_learning_rate(optimizer, learning_rate=None, batch_size=fidelity.BATCH_SIZE):
    """0.1 * batch/128, as `resnet_run_loop.learning_rate_with_decay` (the optimizer's
    default rate, or --learning_rate, in place of 0.1).

    A function of the settings rather than of a TrainConfig, so that the analysis gets a
    logged run's rate from its run_config.json by the formula training used.
    """
    rate = learning_rate
    if rate is None:
        spec = OPTIMIZERS.get(optimizer)     # a run of an optimizer this code no longer has: 0.1
        rate = spec.default_learning_rate if spec else fidelity.BASE_LEARNING_RATE
    return rate * batch_size / fidelity.BATCH_DENOM


def steps_per_epoch_for(config, num_train_images):
    """Train steps per epoch of `config` on a training set of this size; refuses a batch
    larger than the data and a --steps_per_execution that would add steps."""
    if num_train_images < config.batch_size:
        raise ConfigError(f"--batch_size={config.batch_size} is larger than the "
                          f"{num_train_images} training images")
    steps_per_epoch = config.steps_per_epoch or num_train_images // config.batch_size
    check_steps_per_execution(config, steps_per_epoch)
    if config.train_epochs * steps_per_epoch > MAX_STEPS:
        raise ConfigError(f"--train_epochs={config.train_epochs} of {steps_per_epoch} steps each is "
                          f"{config.train_epochs * steps_per_epoch} steps, more than the {MAX_STEPS} a run can count")
    return steps_per_epoch


def check_steps_per_execution(config, steps_per_epoch):
    """Keras runs whole executions: one that overran an epoch would train extra steps."""
    if steps_per_epoch % config.steps_per_execution:
        divisors = [d for d in range(1, min(steps_per_epoch, 10**6) + 1) if steps_per_epoch % d == 0]
        shown = ", ".join(map(str, divisors[:8])) + (", ..." if len(divisors) > 8 else "")
        raise ConfigError(f"--steps_per_execution={config.steps_per_execution} must divide the "
                          f"{steps_per_epoch} steps of an epoch (e.g. {shown}), or epochs would "
                          "train extra steps")


def _csv(values):
    return ",".join(f"{v:g}" for v in values)


def _show(value):
    """A setting as the user spells it: 1,0.1,0.01 for sequences, else str."""
    return _csv(value) if isinstance(value, (tuple, list)) else str(value)
