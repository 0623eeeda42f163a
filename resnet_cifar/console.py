"""What a finished run prints last: its result, where its files are, how to look at them."""

import math
import os
import shlex

from resnet_cifar import run_dir, tags

TENSORBOARD_PAGE = "http://localhost:6006/#custom_scalars"


def _number(logs, key, fmt, scale=1.0, unit=""):
    value = logs.get(key)
    if value is None or not math.isfinite(value):
        return "n/a"
    return format(scale * value, fmt) + unit


def tensorboard_command(model_dir):
    return f"tensorboard --logdir {shlex.quote(os.path.abspath(model_dir))}"


def final_report(model_dir, epochs, logs, seconds=None, last_eval_epoch=None, resumed_after=0):
    """The block printed when a run has finished, as one string of lines.

    logs: the last epoch's Keras logs (`loss`, `val_accuracy`, `conv_sqsum`, ...);
    last_eval_epoch: the epoch `val_accuracy` comes from, when not the last one;
    seconds: time spent by this process, which trained the epochs after `resumed_after`.
    """
    d = os.path.abspath(model_dir)
    took = "" if seconds is None else f" in {hms(seconds)}"
    if resumed_after:
        took = f" ({epochs - resumed_after} of them after resuming{took})"
    test_at = "" if last_eval_epoch in (None, epochs) else f"  (at epoch {last_eval_epoch})"
    rule = "-" * 72
    lines = [
        rule,
        f"finished: {epochs} epochs{took}",
        f"  test accuracy  {_number(logs, 'val_accuracy', '.2f', 100, ' %')}{test_at}",
        f"  train loss     {_number(logs, 'loss', '.4f')}  (cross entropy of the last epoch)",
        f"  conv_sqsum     {_number(logs, tags.CONV_SQSUM, '.1f')}  (sum of squared conv weights)",
        f"outputs in {d}",
        f"  event files    {os.path.join(d, tags.TRAIN_DIR)}, {os.path.join(d, tags.VALIDATION_DIR)}",
        f"  checkpoints    {os.path.join(d, run_dir.CHECKPOINTS)}",
        f"  run config     {os.path.join(d, tags.RUN_CONFIG_FILE)}",
        f"  final metrics  {os.path.join(d, tags.DONE_FILE)}",
        f"TensorBoard: {tensorboard_command(d)}",
        f"  then open {TENSORBOARD_PAGE} (the post's curves side by side)",
        rule,
    ]
    return "\n".join(lines)


def hms(seconds):
    """0:01:05 for 65 seconds."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
