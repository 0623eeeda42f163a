"""Test accuracy with recomputed batch-norm statistics ("precise BN"), beyond the post.

A run's logged test accuracy uses BN's moving averages of the batch statistics
(decay 0.997: a memory of about 330 steps). While the conv weights still move,
those averages lag behind them and the test accuracy is lower than the weights
deserve; this is what the post's BN 0.98 run is about. On short schedules (the
quick preset's 960 steps) the lag is a large part of the test accuracy, and it
differs between runs whose weight norms move differently (with and without conv
L2), so it can pass for a difference between the runs' weights.

For each run folder this restores the final weights of a finished run
(`final.weights.h5`, what a shared run folder keeps), else its last checkpoint, evaluates the test set
with the stored averages (which reproduces the logged value: a check that the
model, weights and data are the run's), then sets every BN layer's statistics to
the exact mean of K training batches' statistics, from the run's own augmented
training stream, and evaluates again (Wu & Johnson 2021, "Rethinking 'Batch' in
BatchNorm", arXiv:2105.07576, call this precise BN). The weights are not changed
and nothing in the checkpoints is written; the result goes to `precise_bn.json`
in the run folder, which `analysis.equivalence` adds to its table.

`--epoch=N` evaluates the checkpoint of epoch N instead: one the trainer keeps at the end
of each learning-rate phase (`checkpoints/phase_ends/`, epochs 50 and 100 of the post's
schedule), or one still in the rotation; its result goes to `precise_bn_epochN.json`.

    python -m analysis.precise_bn RESULTS_OR_RUN_DIR [...] [--epoch=N] [--bn_batches=100]
        [--data_source=binary --data_dir=DIR] [--out=DIR]

Data: the run's own `data_source` and `data_dir` (from run_config.json) unless given.
Progress: each run's three passes (test set, BN statistics, test set again) are announced as
they start, indented above its result line; a ResNet-20 run takes about two minutes on 2 CPU
cores.
"""

import glob
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np

from analysis import output
from analysis.output import percent
from resnet_cifar import checkpoints, cifar_data, events, fidelity, tags
from resnet_cifar import command_line
from resnet_cifar.command_line import ArgumentParser, not_a_folder

RESULT_FILE = tags.PRECISE_BN_FILE
DEFAULT_BN_BATCHES = 100
SEED = 12345            # of the training stream the statistics are drawn from


class EvaluationError(RuntimeError):
    """A run that cannot be evaluated; the message is one line."""


class NothingToEvaluate(EvaluationError):
    """A run folder with neither final weights nor checkpoints (e.g. a shared folder of a run
    still training elsewhere): skipped with a note when found in a results folder."""


def run_folders(paths: List[str]) -> List[Tuple[str, str]]:
    """(run folder, its name) of the run folders (those holding run_config.json) under
    each path, sorted; a path that is a run folder is itself. Names are relative to
    the path given (e.g. baseline/seed_0), or the folder's own name."""
    found = []
    for path in paths:
        if not os.path.isdir(path):
            raise EvaluationError(not_a_folder(path))
        for folder, dirs, files in os.walk(path):
            dirs.sort()
            if tags.RUN_CONFIG_FILE in files:
                name = os.path.relpath(folder, path)
                found.append((folder, os.path.basename(os.path.normpath(path)) if name == "." else name))
                dirs.clear()             # a run's sub-folders are its own
    if not found:
        raise EvaluationError(f"no run folder (with {tags.RUN_CONFIG_FILE}) under {', '.join(paths)}")
    return found


def _accuracy(forward, dataset) -> float:
    correct = total = 0
    for images, labels in dataset:
        predicted = np.argmax(forward(images).numpy(), axis=-1)
        correct += int(np.sum(predicted == labels.numpy()))
        total += len(predicted)
    return correct / total


def recompute_bn_statistics(model, batches) -> int:
    """Sets every BN layer's moving mean and variance to the mean over `batches` of the
    batch statistics, by training-mode forward passes (weights unchanged): with
    momentum (k-1)/k at batch k, Keras' moving-average update is a running mean."""
    from resnet_cifar import models

    layers = models.batch_norm_layers(model)
    kept = [layer.momentum for layer in layers]
    count = 0
    try:
        for count, images in enumerate(batches, start=1):
            for layer in layers:
                layer.momentum = (count - 1) / count
            model(images, training=True)
    finally:
        for layer, momentum in zip(layers, kept):
            layer.momentum = momentum
    return count


def evaluate(run_dir: str, bn_batches: int = DEFAULT_BN_BATCHES, data_source: Optional[str] = None,
             data_dir: Optional[str] = None, arrays_cache: Optional[Dict] = None,
             again: bool = False, epoch: Optional[int] = None, progress=None) -> dict:
    """{epoch, logged, stored_bn, precise_bn, bn_batches, ...} of one run (accuracies in
    [0, 1]): of its final weights, or of its checkpoint of `epoch`. A `precise_bn.json`
    (`precise_bn_epochN.json`) of the same weights (the same epoch: a finished run's final
    weights are its last checkpoint's), batches and data source is reused unless `again`.
    `progress(text)`, if given, hears each of the three passes as it starts."""
    def step(text):
        if progress is not None:
            progress(text)

    import tensorflow as tf

    try:
        config = events.read_config(run_dir)
    except events.EventsError as e:
        raise EvaluationError(str(e)) from None
    path, done = weights_to_evaluate(run_dir, epoch)
    source = data_source or config.get("data_source", "tfds")
    own_data = source == config.get("data_source", "tfds")
    other = None if own_data else source
    cached = read_result(run_dir, other, epoch)
    if (not again and cached and cached.get("epoch") == weights_epoch(path, done)
            and cached.get("bn_batches") == bn_batches and cached.get("data_source") == source):
        return dict(cached, cached=True)
    # The run's data folder goes with the run's data source only (TFDS's default otherwise).
    folder = data_dir if data_dir is not None else (config.get("data_dir") if own_data else None)
    key = (source, folder)
    cache = arrays_cache if arrays_cache is not None else {}
    if key not in cache:
        try:
            cache[key] = cifar_data.load_arrays(source, folder, seed=int(config.get("seed", 0)))
        except cifar_data.DataError as e:
            hint = "" if data_dir is not None or source == "tfds" else "; --data_dir=DIR names the data to evaluate on"
            cache[key] = EvaluationError(f"data: {e}{hint}")     # said once, not once per run
            raise EvaluationError(f"{run_dir}: {cache[key]}") from None
    if isinstance(cache[key], EvaluationError):
        raise EvaluationError(f"{run_dir}: data: the same error as above")
    arrays = cache[key]

    model, done = restore_model(run_dir, config, path, done)
    batch = int(config.get("batch_size", fidelity.BATCH_SIZE))
    test = cifar_data.test_dataset(arrays.test_images, arrays.test_labels, batch,
                                       config.get("eval_steps"))
    forward = tf.function(lambda images: model(images, training=False))
    step("1/3 the test set, BN moving averages as stored")
    stored = _accuracy(forward, test)
    train = cifar_data.train_dataset(arrays.train_images, arrays.train_labels, batch, seed=SEED)
    step(f"2/3 BN statistics from {bn_batches} training batches")
    used = recompute_bn_statistics(model, (images for images, _ in train.take(bn_batches)))
    step("3/3 the test set, recomputed BN statistics")
    precise = _accuracy(forward, test)

    try:
        steps, values = events.read_scalars(run_dir, tags.EPOCH_ACCURACY, tags.VALIDATION_DIR)
    except events.EventsError:
        steps, values = [], []
    at = [float(v) for s, v in zip(steps, values) if int(s) == done]
    for damage in events.damaged_event_files(run_dir, (tags.VALIDATION_DIR,)):
        print(f"note: damaged event file {damage}; the logged accuracy is read up to the damage",
              file=sys.stderr, flush=True)
    result = dict(epoch=done, train_epochs=int(config.get("train_epochs", done)),
                  logged=at[-1] if at else None, stored_bn=stored, precise_bn=precise, bn_batches=used,
                  data_source=source, own_data=own_data, eval_steps=config.get("eval_steps"),
                  checkpoint=os.path.basename(path))
    try:
        checkpoints.write_json(os.path.join(run_dir, result_file(other, epoch)), result)   # whole or absent
    except OSError as e:
        raise EvaluationError(f"{run_dir}: cannot write {result_file(other, epoch)}: {e.strerror or e}") from None
    return result


def weights_to_evaluate(run_dir: str, epoch: Optional[int] = None) -> Tuple[str, Optional[int]]:
    """(path, epoch): the checkpoint of `epoch` if one is asked for; else a finished run's final
    weights, with the epoch its done.json names (the file a run folder keeps when it is shared
    without its checkpoints); else its newest checkpoint, whose epoch is read from the
    checkpoint (None here)."""
    if epoch is not None:
        return checkpoint_of_epoch(run_dir, epoch), None
    weights = os.path.join(run_dir, tags.FINAL_WEIGHTS_FILE)
    epochs = events.done_epochs(run_dir)
    if epochs is not None and os.path.isfile(weights):
        return weights, epochs
    return newest_checkpoint(run_dir), None


def weights_epoch(path: str, done: Optional[int]) -> int:
    """The epoch whose weights `path` holds: a finished run's (final weights), or the checkpoint's
    number (the trainer numbers each checkpoint by the epoch it ends)."""
    if done is not None:
        return done
    from resnet_cifar import checkpoints

    return int(os.path.basename(path)[len(checkpoints.PREFIX) + 1:])


def restore_model(run_dir: str, config: dict, path: str, epoch: Optional[int] = None):
    """(model, epoch): the run's model (its depth, BN decay and dtype from run_config.json) with
    the weights of `path`, a checkpoint prefix or a `.weights.h5` file of the epoch given."""
    import keras
    import tensorflow as tf

    from resnet_cifar import models
    from resnet_cifar.models import ReproductionModel

    keras.backend.clear_session()        # one model at a time: a results folder may hold hundreds
    keras.mixed_precision.set_dtype_policy(config.get("dtype", "float32"))
    model = models.build_resnet(int(config.get("resnet_size", fidelity.RESNET_SIZE)),
                                bn_decay=float(config.get("bn_decay", fidelity.BATCH_NORM_DECAY)),
                                model_cls=ReproductionModel)
    try:
        if path.endswith(".weights.h5"):
            model.load_weights(path)
            return model, int(epoch)
        counter = tf.Variable(0, dtype=tf.int64, trainable=False)
        status = tf.train.Checkpoint(model=model, epoch=counter).restore(path).expect_partial()
        status.assert_existing_objects_matched()
        return model, int(counter.numpy())
    except (tf.errors.OpError, AssertionError, ValueError, OSError) as e:
        raise EvaluationError(f"{run_dir}: cannot restore {os.path.basename(path)}: "
                              f"{str(e).strip().splitlines()[0]}") from None


def export_final_weights(run_dir: str) -> str:
    """Writes a finished run's `final.weights.h5` from its newest checkpoint (for runs trained by
    code that did not write it yet); returns its path."""
    from resnet_cifar.run_dir import write_final_weights

    if events.done_epochs(run_dir) is None:
        raise EvaluationError(f"{run_dir}: not finished (no readable {tags.DONE_FILE})")
    model, _ = restore_model(run_dir, events.read_config(run_dir), newest_checkpoint(run_dir))
    write_final_weights(run_dir, model)
    return os.path.join(run_dir, tags.FINAL_WEIGHTS_FILE)


def newest_checkpoint(run_dir: str) -> str:
    """The newest checkpoint that reads back whole, found as the trainer finds it (the files,
    not the index, which may name a deleted or damaged one)."""
    from resnet_cifar import checkpoints

    folder = os.path.join(run_dir, tags.CHECKPOINTS_DIR)
    try:
        numbers = checkpoints.numbers_on_disk(folder)
    except OSError as e:
        raise EvaluationError(f"{run_dir}: cannot list {folder}: {e.strerror or e}") from None
    skipped = []
    for number in numbers:
        prefix = os.path.join(folder, checkpoints.name(number))
        reason = checkpoints.unreadable_reason(prefix)
        if reason is None:
            return prefix
        skipped.append(f"{checkpoints.name(number)}: {reason}")
    if skipped:
        raise EvaluationError(f"{run_dir}: no checkpoint reads back whole ({'; '.join(skipped)})")
    raise NothingToEvaluate(f"{run_dir}: no checkpoint to evaluate")


def checkpoint_of_epoch(run_dir: str, epoch: int) -> str:
    """The checkpoint of `epoch` that reads back whole: the one kept in phase_ends/, else the
    rotation's."""
    from resnet_cifar import checkpoints

    folder = os.path.join(run_dir, tags.CHECKPOINTS_DIR)
    candidates = [os.path.join(folder, checkpoints.PHASE_ENDS, checkpoints.name(epoch)),
                  os.path.join(folder, checkpoints.name(epoch))]
    reasons = []
    for prefix in candidates:
        if glob.glob(glob.escape(prefix) + ".*"):            # its .index or any data shard
            reason = checkpoints.unreadable_reason(prefix)
            if reason is None:
                return prefix
            reasons.append(f"{os.path.relpath(prefix, run_dir)}: {reason}")
    if reasons:
        raise EvaluationError(f"{run_dir}: the checkpoint of epoch {epoch} does not read back whole "
                              f"({'; '.join(reasons)})")
    held = [checkpoints.numbers_on_disk(f) for f in (os.path.join(folder, checkpoints.PHASE_ENDS), folder)]
    kept, rotation = ["epochs " + ", ".join(map(str, sorted(n))) if n else "none" for n in held]
    raise NothingToEvaluate(f"{run_dir}: no checkpoint of epoch {epoch} ({tags.CHECKPOINTS_DIR}/"
                            f"{checkpoints.PHASE_ENDS}/ holds {kept}, the rotation {rotation})")


def result_file(other_source: Optional[str] = None, epoch: Optional[int] = None) -> str:
    """`precise_bn.json` for the run's own data; `precise_bn.<source>.json` for another data
    source, so that evaluating shared weights on other data (the official CIFAR-10 of TFDS, say)
    never replaces the number the run's tables report. `precise_bn_epochN[.<source>].json` for
    the checkpoint of epoch N."""
    stem = "precise_bn" if epoch is None else f"precise_bn_epoch{epoch}"
    return f"{stem}.json" if other_source is None else f"{stem}.{other_source}.json"


def read_result(run_dir: str, other_source: Optional[str] = None, epoch: Optional[int] = None) -> Optional[dict]:
    """A run's result on its own data (or on `other_source`), of its final weights (or of its
    checkpoint of `epoch`); None if not evaluated (or unreadable)."""
    try:
        with open(os.path.join(run_dir, result_file(other_source, epoch))) as f:
            result = json.load(f)
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) else None


def accuracy_at(run_dir: str, epoch: int) -> float:
    """The run's recomputed-BN test accuracy if `precise_bn.json` holds that epoch's, else NaN."""
    result = read_result(run_dir)
    if not result or not epoch or result.get("epoch") != epoch or not result.get("own_data", True):
        return float("nan")     # another epoch, or evaluated on other data than the run's
    return float(result["precise_bn"])


def _other_data(r: dict) -> str:
    return "" if r.get("own_data", True) else f" (on {r['data_source']} data, not the run's)"


def to_markdown(rows: List[dict]) -> str:
    lines = ["| run | epoch | logged test accuracy | stored BN statistics | recomputed BN statistics "
             "| recomputed − stored |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        epoch = f"{r['epoch']}" + ("" if r["epoch"] == r["train_epochs"] else f" of {r['train_epochs']}")
        lines.append(f"| {r['run']}{_other_data(r)} | {epoch} | {percent(r['logged'])} | {percent(r['stored_bn'])} | "
                     f"{percent(r['precise_bn'])} | {100 * (r['precise_bn'] - r['stored_bn']):+.2f} pts |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = ArgumentParser(
        prog="python -m analysis.precise_bn",
        description="Test accuracy of runs' final weights (or last checkpoints, or --epoch's) with their "
                    "stored BN moving averages and "
                    "with BN statistics recomputed from training batches (precise BN); writes "
                    f"{RESULT_FILE} into each run folder ({result_file('SOURCE')} for another "
                    "--data_source than the run's).")
    parser.add_argument("paths", nargs="+", metavar="RESULTS_OR_RUN_DIR",
                        help="run folders, or folders to search for them (e.g. a sweep's results)")
    parser.add_argument("--epoch", type=command_line.integer(), default=None, metavar="N",
                        help="evaluate each run's checkpoint of epoch N (the trainer keeps those that end "
                             "a learning-rate phase, e.g. 50 and 100) instead of its final weights; "
                             "writes precise_bn_epochN.json")
    parser.add_argument("--bn_batches", type=command_line.integer(), default=DEFAULT_BN_BATCHES,
                        help=f"training batches the statistics are averaged over (default {DEFAULT_BN_BATCHES})")
    parser.add_argument("--data_source", choices=list(cifar_data.SOURCES), default=None,
                        help="default: each run's own")
    parser.add_argument("--data_dir", default=None, help="default: each run's own")
    parser.add_argument("--again", action="store_true",
                        help=f"evaluate runs whose {RESULT_FILE} (precise_bn_epochN.json with --epoch) "
                             "already holds this checkpoint's result")
    parser.add_argument("--out", "--out_dir", dest="out_dir", metavar="DIR", default=None,
                        help="also write precise_bn.md and precise_bn.csv here")
    args = parser.parse_args(argv)
    if args.epoch is not None and args.epoch < 1:
        parser.error(f"argument --epoch: {args.epoch} must be positive")
    if args.bn_batches < 1:
        parser.error(f"argument --bn_batches: {args.bn_batches} must be positive")
    if args.out_dir and os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        print(f"error: --out={args.out_dir} is a file, not a folder", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    rows, failed, cache = [], 0, {}
    try:
        folders = run_folders(args.paths)
    except EvaluationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    named = {os.path.normpath(p) for p in args.paths}
    for folder, name in folders:
        try:
            result = evaluate(folder, args.bn_batches, args.data_source, args.data_dir, cache, args.again,
                              args.epoch, progress=lambda text, name=name: print(f"  {name}: {text}", flush=True))
        except EvaluationError as e:
            if isinstance(e, NothingToEvaluate) and os.path.normpath(folder) not in named:
                why = ("no final weights (not finished) and no checkpoints" if args.epoch is None
                       else f"no checkpoint of epoch {args.epoch}")
                print(f"note: {name} skipped: {why}", file=sys.stderr, flush=True)   # e.g. a shared run
                continue
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        cached = result.pop("cached", False)
        row = dict(run=name, **result)
        rows.append(row)
        file = result_file(None if row["own_data"] else row["data_source"], args.epoch)
        print(f"{row['run']}{_other_data(row)}: epoch {row['epoch']}, logged {percent(row['logged'])}, stored BN "
              f"{percent(row['stored_bn'])}, recomputed BN {percent(row['precise_bn'])}"
              + (f" (from its {file}; --again to redo)" if cached else f" -> {os.path.join(folder, file)}"),
              flush=True)
    if rows:
        print(to_markdown(rows), end="")
        if args.out_dir:
            try:
                os.makedirs(args.out_dir, exist_ok=True)
                paths = output.write_table(args.out_dir, "precise_bn", to_markdown(rows), rows)
            except OSError as e:
                print(f"error: --out={args.out_dir}: cannot write there ({e.strerror or e})", file=sys.stderr)
                return 1
            for path in paths:
                print(path)
    return 1 if failed else 0


if __name__ == "__main__":
    command_line.run(main)
