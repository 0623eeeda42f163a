"""What a finished run prints last: its result, where its files are, how to look at them."""

import datetime
import math
import os
import shlex

from resnet_cifar import tags

TENSORBOARD_PAGE = "http://localhost:6006/#custom_scalars"


def _number(logs, key, fmt, scale=1.0, unit=""):
    value = logs.get(key)
    if value is None or not math.isfinite(value):
        return "n/a"
    return format(scale * value, fmt) + unit


def tensorboard_command(model_dir):
    """The command that shows this run in TensorBoard. Inside the image (its entrypoint sets
    RESNET_CIFAR_CONTAINER_RUNS to the runs folder) a path of the container means nothing on
    the host: the hint is the image's own TensorBoard command, run on the host."""
    runs = os.environ.get("RESNET_CIFAR_CONTAINER_RUNS")
    if runs and os.path.abspath(model_dir).startswith(os.path.abspath(runs) + os.sep):
        return (f"docker run --rm -p 6006:6006 -v $PWD/runs:{runs} resnet-cifar tensorboard --logdir {runs} "
                f"--bind_all (on the host, in the folder you mounted at {runs})")
    return f"tensorboard --logdir {shlex.quote(os.path.abspath(model_dir))}"


BN_LAG_GAP = 0.05          # test accuracy this far below train accuracy ...
BN_LAG_MEMORIES = 10       # ... after fewer steps than this many BN memories (1 / (1 - decay))


def bn_lag_note(model_dir, logs, steps, bn_decay):
    """A line when test accuracy trails train accuracy on a run too short for BN's moving
    averages to have caught up with the weights, naming analysis.precise_bn; else ''."""
    train, test = logs.get("accuracy"), logs.get("val_accuracy")
    if None in (train, test, steps, bn_decay) or not train - test >= BN_LAG_GAP:
        return ""
    memory = 1.0 / (1.0 - bn_decay) if bn_decay < 1 else math.inf
    if steps >= BN_LAG_MEMORIES * memory:
        return ""
    return (f"note: test accuracy trails train accuracy by {100 * (train - test):.1f} points: after only "
            f"{steps} steps, BN's moving averages (decay {bn_decay:g}, a memory of ~{memory:.0f} steps) "
            f"lag the weights; `python -m analysis.precise_bn {shlex.quote(model_dir)}` evaluates "
            "with recomputed BN statistics")


def count(n, word):
    """'1 epoch', '2 epochs': n and the word, plural unless n is 1."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def final_report(model_dir, epochs, logs, seconds=None, last_eval_epoch=None, resumed_after=0,
                 steps=None, bn_decay=None):
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
        f"finished: {count(epochs, 'epoch')}{took}",
        f"  test accuracy  {_number(logs, 'val_accuracy', '.2f', 100, ' %')}{test_at}",
        f"  train loss     {_number(logs, 'loss', '.4f')}  (cross entropy of the last epoch)",
        f"  conv_sqsum     {_number(logs, tags.CONV_SQSUM, '.1f')}  (sum of squared conv weights)",
        f"outputs in {d}",
        f"  event files    {os.path.join(d, tags.TRAIN_DIR)}, {os.path.join(d, tags.VALIDATION_DIR)}",
        f"  checkpoints    {os.path.join(d, tags.CHECKPOINTS_DIR)}",
        f"  final weights  {os.path.join(d, tags.FINAL_WEIGHTS_FILE)}",
        f"  run config     {os.path.join(d, tags.RUN_CONFIG_FILE)}",
        f"  final metrics  {os.path.join(d, tags.DONE_FILE)}",
        f"TensorBoard: {tensorboard_command(d)}",
        f"  then open {TENSORBOARD_PAGE} (the post's curves side by side)",
        rule,
    ]
    note = bn_lag_note(model_dir, logs, steps, bn_decay) if last_eval_epoch in (None, epochs) else ""
    return "\n".join(lines + ([note] if note else []))


def hms(seconds):
    """0:01:05 for 65 seconds (a negative time is 0:00:00, one beyond a timedelta's range
    'more than 2 million years')."""
    seconds = max(seconds, 0)
    if seconds >= datetime.timedelta.max.total_seconds():
        return "more than 2 million years"
    return str(datetime.timedelta(seconds=round(seconds)))
