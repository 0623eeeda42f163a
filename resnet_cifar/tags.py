"""TensorBoard tag names and run-folder layout: a contract with users and `analysis/`.

Training writes these and the analysis scripts read them; neither spells a tag
itself. See `docs/cli.md` and the README's tag table.
"""

from typing import Dict, Iterable, Mapping, TypeVar

T = TypeVar("T")

# Sub-folders of --model_dir, as Keras' TensorBoard callback makes them.
TRAIN_DIR = "train"
VALIDATION_DIR = "validation"

# Keras' own per-epoch tags (written under both folders).
EPOCH_LOSS = "epoch_loss"          # mean cross entropy (the L2 term is logged apart)
EPOCH_ACCURACY = "epoch_accuracy"
EPOCH_L2_LOSS = "epoch_l2_loss"    # weight_decay * sum(l2_loss) actually in the objective

# Diagnostics of the train step, written to the train folder, step = epoch number
# (0 = the initial state, before any update).
CONV_SQSUM = "conv_sqsum"                    # sum of squares of the 22 conv kernels
CONV_RELATIVE_STEP = "conv_relative_step"    # mean over conv layers of ||dw||/||w||, epoch mean
CONV_LR_FACTOR = "conv_lr_factor"            # factor applied to conv grads, epoch mean
LEARNING_RATE = "learning_rate"              # optimizer learning rate, epoch mean
CONV_ANGULAR_UPDATE = "conv_angular_update"  # mean over conv layers of angle(w_before, w_after), epoch mean


# Per-layer values of the diagnostics live under their own prefix, so that TensorBoard
# shows each main tag above as one card and groups the 22 layers' curves apart.
PER_LAYER_PREFIX = "per_layer"


def per_layer(tag: str, layer: str) -> str:
    """Per-layer tag, e.g. `per_layer/conv_sqsum/conv2d_3`."""
    return f"{PER_LAYER_PREFIX}/{tag}/{layer}"


def per_layer_tags(names: Iterable[str], tag: str) -> Dict[str, str]:
    """layer -> tag name, for the per-layer tags of `tag` among `names`, sorted by layer.

    Reads this version's `per_layer/<tag>/<layer>` and the earlier `<tag>/<layer>`
    (runs logged before the prefix existed); where both exist the new name wins.
    """
    new, old = f"{PER_LAYER_PREFIX}/{tag}/", f"{tag}/"
    found = {}
    for name in names:
        if name.startswith(new):
            found[name[len(new):]] = name
        elif name.startswith(old):
            found.setdefault(name[len(old):], name)
    return {layer: found[layer] for layer in sorted(found)}


def per_layer_series(scalars: Mapping[str, T], tag: str) -> Dict[str, T]:
    """layer -> value of `scalars` (keyed by tag name) for the per-layer tags of `tag`."""
    return {layer: scalars[name] for layer, name in per_layer_tags(scalars, tag).items()}


RUN_CONFIG_FILE = "run_config.json"
CHECKPOINTS_DIR = "checkpoints"    # a run folder's checkpoints (the last two epochs', phase ends)
DONE_FILE = "done.json"            # written when a run has finished all its epochs
CHANNEL_SQSUM_FILE = "conv_channel_sqsum.npz"   # per-output-channel conv sums of squares by epoch
FINAL_WEIGHTS_FILE = "final.weights.h5"         # the finished model's weights (Keras), about 1 MB
PRECISE_BN_FILE = "precise_bn.json"    # analysis.precise_bn's result on the run's data;
PRECISE_BN_OTHER = "precise_bn.*.json"  # and on other data sources (glob)
PRECISE_BN_EPOCHS = "precise_bn_epoch*.json"  # of a kept checkpoint's epoch (--epoch), any data (glob)
