"""Throughput benchmark, all in one process and one run:

(a) the project's train step with every diagnostic on (ReproductionModel + its
    TensorBoard callback), (b) a plain Keras `fit` of the same ResNet-20 and batch
    (stock SGD, no L2, no scaling, no diagnostics), (a-xla) (a) under XLA, and
(c) the input pipeline alone; then the ratios (a)/(b) and (c)/(a) and the
achieved GFLOP/s from the model's counted FLOPs. (a) and (b) are timed in
alternation (a b, b a, ...), so drifting machine load hits both alike; the
fastest repeat is reported (noise only slows a repeat down), the median beside it.
On a GPU it also runs 1, 2 and 4 concurrent training processes on one device.

    python -m experiments.benchmark --data_source=binary --data_dir=DIR
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("data_source", "synthetic", ["tfds", "binary", "synthetic"], "Data for all measurements.")
flags.DEFINE_string("data_dir", None, "As for resnet_cifar.train.")
flags.DEFINE_integer("batch_size", 128, "Batch size of every measurement.")
flags.DEFINE_integer("steps", 40, "Train steps per timed repetition.")
flags.DEFINE_integer("repeats", 3, "Timed repetitions of each train variant (after one warm-up).")
flags.DEFINE_integer("pipeline_batches", 400, "Batches for the input-pipeline measurement.")
flags.DEFINE_boolean("xla", True, "Also time the project's step under XLA.")
flags.DEFINE_string("json_out", None, "Also write the results as JSON here.")
flags.DEFINE_list("concurrency", ["1", "2", "4"], "GPU only: concurrent runs to time on one device.")


def count_flops(model):
    """Forward multiply-adds x2 of convs and the dense layer, per image."""
    import keras

    flops = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            kh, kw, c_in, _ = layer.kernel.shape
            flops += 2 * h * w * c_out * kh * kw * c_in
        elif isinstance(layer, keras.layers.Dense):
            flops += 2 * layer.kernel.shape[0] * layer.kernel.shape[1]
    return flops


def plain_keras_model():
    import keras

    from resnet_cifar import models

    model = models.build_resnet20()
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], jit_compile=False)
    return model


def project_model(jit, steps_per_epoch):
    from resnet_cifar import config as config_lib
    from resnet_cifar import trainer

    cfg = config_lib.TrainConfig(model_dir="/unused", batch_size=FLAGS.batch_size, jit_compile=jit)
    return trainer.build_model(cfg, steps_per_epoch)


def time_fit(model, ds, steps, callbacks):
    start = time.perf_counter()
    model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=callbacks, shuffle=False)
    return FLAGS.batch_size * steps / (time.perf_counter() - start)


def concurrent_runs(n, data_args):
    """Images/s summed over n training processes sharing one GPU."""
    with tempfile.TemporaryDirectory() as tmp:
        steps = FLAGS.steps * 5
        cmd = [sys.executable, "-m", "resnet_cifar.train", "--train_epochs=2", f"--steps_per_epoch={steps}",
               "--eval_steps=1", "--verbose=0", f"--batch_size={FLAGS.batch_size}", *data_args]
        start = time.perf_counter()
        procs = [subprocess.Popen(cmd + [f"--model_dir={tmp}/run{i}"]) for i in range(n)]
        if any(p.wait() for p in procs):
            return float("nan")
        # Two epochs each, the first including start-up: a conservative figure.
        return n * 2 * steps * FLAGS.batch_size / (time.perf_counter() - start)


def main(argv):
    del argv
    import tensorflow as tf

    from resnet_cifar import callbacks, cifar_data, input_pipeline, trainer

    trainer.setup_devices()
    gpu = bool(tf.config.list_physical_devices("GPU"))
    arrays = cifar_data.load_arrays(FLAGS.data_source, FLAGS.data_dir)
    ds = input_pipeline.train_dataset(arrays.train_images, arrays.train_labels, FLAGS.batch_size)

    # (c) the input pipeline alone, on its own.
    it = iter(ds)
    for _ in range(20):
        next(it)
    start = time.perf_counter()
    for _ in range(FLAGS.pipeline_batches):
        next(it)
    pipeline = FLAGS.batch_size * FLAGS.pipeline_batches / (time.perf_counter() - start)
    del it

    variants = {"custom": project_model(None, FLAGS.steps), "plain": plain_keras_model()}
    if FLAGS.xla and not gpu:
        variants["custom_xla"] = project_model(True, FLAGS.steps)
    logdir = tempfile.mkdtemp()
    # The project's variants carry the callbacks a training run has (bar checkpoints).
    cbs = {name: [callbacks.EpochTensorBoard(os.path.join(logdir, name)), callbacks.StopOnNonFinite()]
           if name != "plain" else [] for name in variants}
    for name, model in variants.items():        # warm-up: tracing, first-touch allocation
        time_fit(model, ds, 3, cbs[name])
    rates = {name: [] for name in variants}
    order = list(variants)
    for _ in range(FLAGS.repeats):
        for name in order:
            rates[name].append(time_fit(variants[name], ds, FLAGS.steps, cbs[name]))
        order.reverse()                         # a, b, b, a, ...: drift cancels out
    # Noise on a shared machine only ever slows a repeat down, so the fastest repeat
    # is the best estimate of each variant's speed (as timeit takes the minimum time);
    # medians are reported beside it.
    med = {name: max(r) for name, r in rates.items()}
    medians = {name: statistics.median(r) for name, r in rates.items()}

    flops = count_flops(variants["plain"])
    train_flops = 3 * flops            # forward + backward (2x forward), the usual estimate
    results = {
        "device": "GPU" if gpu else f"CPU ({os.cpu_count()} cores)",
        "tensorflow": tf.__version__, "data_source": FLAGS.data_source, "batch_size": FLAGS.batch_size,
        "images_per_s": {**med, "input_pipeline": pipeline},
        "median_images_per_s": medians,
        "all_repeats": rates,
        "ratio_custom_over_plain": med["custom"] / med["plain"],
        "ratio_pipeline_over_custom": pipeline / med["custom"],
        "forward_mflops_per_image": flops / 1e6,
        "achieved_gflops_custom": med["custom"] * train_flops / 1e9,
    }
    if gpu:
        data_args = [f"--data_source={FLAGS.data_source}"] + ([f"--data_dir={FLAGS.data_dir}"] if FLAGS.data_dir else [])
        results["concurrent_images_per_s"] = {n: concurrent_runs(int(n), data_args) for n in FLAGS.concurrency}

    print(f"\nThroughput on {results['device']}, TF {tf.__version__}, batch {FLAGS.batch_size}, "
          f"{FLAGS.data_source} data; best of {FLAGS.repeats} x {FLAGS.steps} steps (median in brackets)")
    print("| measurement | images/s |\n|---|---|")
    labels = {"custom": "(a) project train step, all diagnostics", "plain": "(b) plain Keras fit",
              "custom_xla": "(a) with XLA (jit_compile)", "input_pipeline": "(c) input pipeline alone"}
    for name, value in results["images_per_s"].items():
        median = f" ({medians[name]:,.0f})" if name in medians else ""
        print(f"| {labels[name]} | {value:,.0f}{median} |")
    print(f"| (a)/(b) | {results['ratio_custom_over_plain']:.3f} |")
    print(f"| (c)/(a) | {results['ratio_pipeline_over_custom']:.1f} |")
    print(f"| achieved GFLOP/s of (a) (3 x {flops / 1e6:.1f} MFLOP per image) | "
          f"{results['achieved_gflops_custom']:.1f} |")
    for n, v in results.get("concurrent_images_per_s", {}).items():
        print(f"| {n} concurrent runs on one GPU, total | {v:,.0f} |")
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
