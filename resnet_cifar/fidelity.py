"""Every constant that the post or the original TensorFlow code fixes, in one place.

The source of each number is the original TF 1.11 CIFAR-10 ResNet of
tensorflow/models (`official/resnet/resnet_model.py`, `cifar10_main.py`,
`resnet_run_loop.py`) and the blog post's snippets; `docs/fidelity.md` gives the
source of each for users, and `tests/test_models.py` checks these values against
that document. Change none of them without the post. One formula lives here too,
the post's piecewise fit, so that training and the figures share its definition.
"""

# --- Model: ResNet-20 v1, CIFAR variant (resnet_model.py, cifar10_main.py) ---
RESNET_SIZE = 20                  # 6n + 2 with n = 3 blocks per stage
BLOCKS_PER_STAGE = 3
STAGE_FILTERS = (16, 32, 64)
STAGE_STRIDES = (1, 2, 2)
INITIAL_FILTERS = 16
INITIAL_KERNEL_SIZE = 3
NUM_CLASSES = 10
BATCH_NORM_DECAY = 0.997          # _BATCH_NORM_DECAY
BATCH_NORM_EPSILON = 1e-5         # _BATCH_NORM_EPSILON
NUM_CONV_KERNELS = 22             # 19 3x3 convs + 3 1x1 projection shortcuts
TRAINABLE_PARAMETERS = 272_762

# --- Data (cifar10_main.py) ---
HEIGHT = 32
WIDTH = 32
NUM_CHANNELS = 3
PADDED_SIZE = HEIGHT + 8          # resize_image_with_crop_or_pad(image, 40, 40)
NUM_TRAIN_IMAGES = 50_000
NUM_TEST_IMAGES = 10_000
LABEL_BYTES = 1
IMAGE_BYTES = HEIGHT * WIDTH * NUM_CHANNELS
RECORD_BYTES = LABEL_BYTES + IMAGE_BYTES   # 3073
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILES = ("test_batch.bin",)
BINARY_FOLDER = "cifar-10-batches-bin"
CIFAR_PAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"
ARCHIVE_NAME = "cifar-10-binary.tar.gz"        # holds BINARY_FOLDER/
ARCHIVE_URL = f"https://www.cs.toronto.edu/~kriz/{ARCHIVE_NAME}"
# The official archive's size and SHA-256, as TFDS records them for ARCHIVE_URL
# (tensorflow_datasets/url_checksums/cifar10.txt; TFDS checks its download against them).
ARCHIVE_BYTES = 170_052_171
ARCHIVE_SHA256 = "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"

# --- Objective and optimizer (resnet_run_loop.py, cifar10_main.py) ---
WEIGHT_DECAY = 2e-4               # cifar10_main: weight_decay=2e-4
MOMENTUM = 0.9                    # tf.train.MomentumOptimizer(momentum=0.9)
BASE_LEARNING_RATE = 0.1          # base_lr = .1
BATCH_DENOM = 128                 # lr = 0.1 * batch_size / 128
BATCH_SIZE = 128

# --- The post's schedule: 150 epochs at 0.1 / 0.01 / 0.001 ---
TRAIN_EPOCHS = 150
BOUNDARY_EPOCHS = (50, 100)
DECAY_RATES = (1.0, 0.1, 0.01)

# --- The post's gradient scaling ("ConvLRScale") ---
INITIAL_CONV_SQSUM = 800.0        # initial_conv2d_sqsum = 800.0
CONV_NAME = "conv2d"              # the post selects conv kernels by this name
# piecewise(e): the post's hand fit of 800 / baseline conv_sqsum(e).
# Each piece: (start epoch, value at start, slope per epoch); tf.where chain in the post.
PIECEWISE_FACTOR = (
    (0.0, 1.0, -0.05),
    (10.0, 0.5, -0.0025),
    (50.0, 0.4, 0.006),
    (100.0, 0.7, 0.001),
)
BN_DECAY_FAST = 0.98              # the fourth run's _BATCH_NORM_DECAY


def piecewise(epoch, where):
    """The post's tf.where chain over PIECEWISE_FACTOR: 1-0.05e, 0.5-0.0025(e-10),
    0.4+0.006(e-50), 0.7+0.001(e-100). `where` is tf.where or np.where, so training
    (optim) and the figures evaluate this one definition."""
    start, value, slope = PIECEWISE_FACTOR[0]
    out = value + slope * (epoch - start)
    for start, value, slope in PIECEWISE_FACTOR[1:]:
        out = where(epoch < start, out, value + slope * (epoch - start))
    return out


# --- What the post reports, as data: its claims about the four runs ---
# Numbers are the post's own words; "~" marks values read off its plots or rounded by it.
# analysis/claims.py measures each claim on a results folder and prints a verdict;
# docs/fidelity.md ("The post's claims") lists the same rows for readers.
POST_FINAL_TEST_ACCURACY = {"baseline": 91.0, "noconv_l2": 89.5}   # %, "~91%", "around 89.5%"
POST_NOCONV_LOSS_GAP_EXCESS = 0.024     # NoConvL2 (test - train loss) minus the baseline's, logits
POST_NOCONV_LOSS_GAP_EXCESS_RELATIVE = 0.07   # "an 0.024 logit or 7% larger final difference"
POST_NOCONV_TRAIN_LOSS_EXCESS = 0.025   # NoConvL2 final train loss minus the baseline's, logits
POST_PHASE1_END_EPOCH = 50              # "the first learning rate regime": epochs 1-50
POST_CLAIMS = (
    # (key, the post's claim in its own terms)
    ("baseline_final", "baseline ends at ~91% test accuracy"),
    ("noconv_final", "NoConvL2 ends at ~89.5% test accuracy"),
    ("noconv_below_baseline", "NoConvL2 ends below the baseline (89.5% vs 91%)"),
    ("noconv_train_loss", "NoConvL2's final train loss is ~0.025 worse than the baseline's"),
    ("noconv_loss_gap", "NoConvL2's final test-train loss gap is ~0.024 larger than the baseline's"),
    ("noconv_sqsum", "without conv L2 the conv weights grow much faster"),
    ("noconv_relative_step", "without conv L2 the relative step decays below the baseline's"),
    ("piecewise_fit", "piecewise(epoch) approximates 800 / the baseline's conv_sqsum"),
    ("scale_final", "ConvLRScale ends at the baseline's final accuracy"),
    ("scale_phase1", "ConvLRScale's test accuracy in epochs 1-50 is a lot worse on average"),
    ("scale_relative_step", "ConvLRScale replicates the baseline's relative step"),
    ("scale_sqsum", "ConvLRScale's conv weights grow far larger than the baseline's"),
    ("bn098_training", "BN decay 0.98 has no effect on training (train loss as ConvLRScale's)"),
    ("bn098_phase1_fix", "BN decay 0.98 improves test accuracy in epochs 1-50 over ConvLRScale"),
    ("bn098_phase1_baseline", "BN decay 0.98's test accuracy in epochs 1-50 is a little above the baseline's"),
)
