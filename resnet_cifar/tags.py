"""TensorBoard tag names and run-folder layout: a contract with users and `analysis/`.

Training writes these and the analysis scripts read them; neither spells a tag
itself. See `docs/cli.md` and the README's tag table.
"""

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


def per_layer(tag: str, layer: str) -> str:
    """Per-layer tag, e.g. `conv_sqsum/conv2d_3`."""
    return f"{tag}/{layer}"


RUN_CONFIG_FILE = "run_config.json"
DONE_FILE = "done.json"            # written when a run has finished all its epochs
