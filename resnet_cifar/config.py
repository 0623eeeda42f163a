"""The one configuration object of a run.

Flags become a `TrainConfig` at the entry point (`resnet_cifar/train.py`); the
library only ever sees this object, so tests and notebooks build it directly.
Defaults reproduce the post's baseline run.
"""

import dataclasses
import math
from typing import Optional, Tuple

from resnet_cifar import cifar_data, fidelity, optim
from resnet_cifar.runs import CONV_LR_FACTORS, REPLAY_FACTORS  # noqa: F401  (the factor modes, with the runs)

# The registries themselves (the same dicts), so a source or optimizer added there is valid here.
DATA_SOURCES = cifar_data.SOURCES       # name -> DataSource
OPTIMIZERS = optim.OPTIMIZERS           # name -> OptimizerSpec
RESNET_SIZES = (20, 32, 44, 56, 110)   # 6n+2; any 6n+2 builds, these are the documented ones
DTYPES = ("float32", "mixed_float16", "mixed_bfloat16")
MAX_SEED = 2**31 - 1       # NumPy seeds stop at 2**32 - 1, TF's int32 seeds at 2**31 - 1
MAX_STEPS = 2**31 - 1      # a run's steps: the step count and the learning-rate schedule's boundaries stay int32


FLOAT32_MAX = 3.4028234663852886e38   # training computes in float32: larger numbers overflow


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


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model_dir: str
    data_source: str = "tfds"
    data_dir: Optional[str] = None
    train_epochs: int = fidelity.TRAIN_EPOCHS
    epochs_between_evals: int = 1
    batch_size: int = fidelity.BATCH_SIZE
    boundary_epochs: Tuple[float, ...] = fidelity.BOUNDARY_EPOCHS
    decay_rates: Tuple[float, ...] = fidelity.DECAY_RATES
    weight_decay: float = fidelity.WEIGHT_DECAY
    conv_l2: bool = True
    conv_grad_scale: bool = False
    conv_lr_factor: str = "piecewise"
    replay_from: Optional[str] = None
    bn_decay: float = fidelity.BATCH_NORM_DECAY
    steps_per_epoch: Optional[int] = None
    eval_steps: Optional[int] = None
    seed: int = 0
    deterministic: bool = False
    jit_compile: Optional[bool] = None      # None: on for GPU (unless deterministic), off for CPU
    steps_per_execution: int = 1
    dtype: str = "float32"
    overwrite: bool = False
    verbose: int = 1                        # Keras progress output: 0, 1 (bar), 2 (line)
    # Beyond the post: depth, optimizer, its rate.
    resnet_size: int = fidelity.RESNET_SIZE  # 6n+2
    optimizer: str = "momentum"             # a name in optim.OPTIMIZERS; momentum (TF1) is the post's
    learning_rate: Optional[float] = None   # base rate at batch 128; None: the optimizer's default

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
