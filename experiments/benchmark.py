"""Throughput benchmark of the machine it runs on, in one run:

- the machine's dense-matmul ceiling, measured (NumPy float32 matmul, and
  `tf.matmul` under each setting below), the yardstick for everything else;
- (a) the project's train step with what a training run has per step (the
  ReproductionModel, its TensorBoard callback and the NaN check) and (b) a
  bare loop of the same ResNet-20 and batch: one `tf.function` of GradientTape,
  cross entropy and Keras SGD with momentum, called step after step (no L2, no
  scaling, no diagnostics, no Keras `fit`): images/s, achieved GFLOP/s and their
  fraction of the ceiling, and the ratio (a)/(b);
- the compute ops each step traces to, (a) and (b): on a GPU every op is a kernel
  launch, so this is what the step costs where the model itself is cheap;
- each of these with TensorFlow's oneDNN CPU kernels on and off, in float32 and
  under `--deterministic`; and (a) with other thread-pool sizes;
- the per-step host reads: (a) without the NaN check, with Keras' progress bar
  (verbose=1) and with one line per epoch (verbose=2);
- (c) the input pipeline alone.

oneDNN is fixed when TensorFlow is imported (`TF_ENABLE_ONEDNN_OPTS`), so every
setting runs in its own worker process. The workers are started together and
timed in turns (one at a time, the order reversed each round), so drifting load
on a shared machine hits all settings alike. Noise only ever slows a repeat
down: the fastest repeat is each variant's figure (as timeit takes the minimum),
the median beside it. On a GPU it also times 1, 2 and 4 concurrent training
processes on one device.

    python -m experiments.benchmark --data_source=binary --data_dir=DIR
"""

import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")      # as the package: no C++ start-up lines

from absl import app, flags  # noqa: E402

from resnet_cifar import checkpoints, cifar_data, config as config_lib  # noqa: E402  (NumPy only: TensorFlow starts in the workers)

FLAGS = flags.FLAGS
flags.DEFINE_enum("data_source", "synthetic", list(cifar_data.SOURCES), "Data for all measurements.")
flags.DEFINE_string("data_dir", None, "As for resnet_cifar.train.")
flags.DEFINE_integer("batch_size", 128, "Batch size of every measurement.")
flags.DEFINE_integer("steps", 40, "Train steps per timed repetition.")
flags.DEFINE_integer("repeats", 3, "Timed repetitions of each variant (after one warm-up).")
flags.DEFINE_integer("pipeline_batches", 400, "Batches for the input-pipeline measurement.")
flags.DEFINE_boolean("xla", False, "Also time the project's step under XLA (oneDNN on).")
flags.DEFINE_boolean("host_reads", True, "Also time the per-step host reads (progress bar, NaN check).")
flags.DEFINE_list("threads", ["2:1"], "Other intra:inter-op thread counts to time (a) with, "
                  "oneDNN on; TF's default (0:0, one intra-op thread per core) is always timed.")
flags.DEFINE_integer("matmul_size", 2048, "n of the n x n float32 matmuls that measure the ceiling.")
flags.DEFINE_string("json_out", None, "Also write the results as JSON here.")
flags.DEFINE_list("concurrency", ["1", "2", "4"], "GPU only: concurrent runs to time on one device.")
flags.DEFINE_string("worker", None, "Internal: run as the worker of this JSON setting.")
config_lib.bound_integer_flags(FLAGS, __name__)

from experiments.reference_step import bare_loop, compute_ops  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


# ----------------------------------------------------------------------------- the machine


def cpu_description():
    """(model name, cores, the ISA flags that decide TF's kernels)."""
    model, found = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    found = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, os.cpu_count(), [flag for flag in ISA_FLAGS if flag in found]


def matmul_gflops(matmul, a, b, repeats=5):
    """Best GFLOP/s of `matmul(a, b)` (n x n, 2 n^3 FLOPs) over `repeats` timings."""
    n = a.shape[0]
    matmul(a, b)                    # warm-up
    best = min(_timed(matmul, a, b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(matmul, a, b):
    start = time.perf_counter()
    matmul(a, b)
    return time.perf_counter() - start


def numpy_matmul_gflops(n):
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    return matmul_gflops(np.matmul, a, b)


# ----------------------------------------------------------------------------- one worker


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


def project_model(jit, steps_per_epoch):
    from resnet_cifar import train

    cfg = config_lib.TrainConfig(model_dir="/unused", batch_size=FLAGS.batch_size, jit_compile=jit)
    return train.build_model(cfg, steps_per_epoch)


def worker(setting):
    """Builds this setting's variants, then times one repeat of each per line on stdin."""
    # Keras' progress output goes to a file (as `run_all` sends it to train.log);
    # results go to the parent on the original stdout.
    results_out = os.fdopen(os.dup(1), "w")
    log = open(os.path.join(tempfile.mkdtemp(), "progress.log"), "w")
    os.dup2(log.fileno(), 1)
    sys.stdout = log

    import numpy as np
    import tensorflow as tf

    from resnet_cifar import callbacks, run_dir, train

    intra, inter = setting.get("threads", (0, 0))
    tf.config.threading.set_intra_op_parallelism_threads(intra)
    tf.config.threading.set_inter_op_parallelism_threads(inter)
    # --deterministic as a training run has it: op determinism and its thread setting.
    deterministic = setting.get("deterministic", False)
    train.setup_runtime(config_lib.TrainConfig(model_dir="/unused", deterministic=deterministic))
    arrays = cifar_data.load_arrays(FLAGS.data_source, FLAGS.data_dir)
    ds = cifar_data.train_dataset(arrays.train_images, arrays.train_labels, FLAGS.batch_size)
    info = {"onednn": run_dir.onednn_enabled(), "gpu": bool(tf.config.list_physical_devices("GPU")),
            "tensorflow": tf.__version__, "threads": [tf.config.threading.get_intra_op_parallelism_threads(),
                                                      tf.config.threading.get_inter_op_parallelism_threads()]}
    rng = np.random.default_rng(0)
    a, b = (tf.constant(rng.standard_normal((FLAGS.matmul_size,) * 2, dtype=np.float32)) for _ in range(2))
    tf_matmul = lambda: matmul_gflops(lambda x, y: tf.matmul(x, y).numpy(), a, b)  # noqa: E731

    if setting.get("pipeline"):
        it = iter(ds)
        for _ in range(20):
            next(it)
        start = time.perf_counter()
        for _ in range(FLAGS.pipeline_batches):
            next(it)
        info["input_pipeline"] = FLAGS.batch_size * FLAGS.pipeline_batches / (time.perf_counter() - start)
        del it

    logdir = tempfile.mkdtemp()
    custom = project_model(None, FLAGS.steps)
    per_step = lambda: [callbacks.EpochLog(logdir, 1)]  # noqa: E731
    # name -> (model, callbacks, verbose). The project's variants share one model.
    variants = {"custom": (custom, per_step(), 0)}
    bare = None
    for name in setting["variants"]:
        if name == "plain":
            bare, info["bare_compute_ops"] = bare_loop(FLAGS.batch_size)
            bare_iterator = iter(ds.repeat())
        elif name in ("custom_verbose1", "custom_verbose2"):
            variants[name] = (custom, per_step(), int(name[-1]))
        elif name == "custom_xla":
            variants[name] = (project_model(True, FLAGS.steps), per_step(), 0)
    info["forward_flops_per_image"] = count_flops(custom)
    spec = (tf.TensorSpec([FLAGS.batch_size, 32, 32, 3], tf.float32), tf.TensorSpec([FLAGS.batch_size], tf.int32))
    info["project_compute_ops"] = compute_ops(tf.function(custom.train_step).get_concrete_function(spec))

    def time_fit(name, steps):
        start = time.perf_counter()
        if name == "plain":
            bare(bare_iterator, steps)
        else:
            model, cbs, verbose = variants[name]
            model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=verbose, callbacks=cbs, shuffle=False)
        return FLAGS.batch_size * steps / (time.perf_counter() - start)

    order = list(variants) + (["plain"] if bare else [])
    for name in order:                    # warm-up: tracing, first-touch allocation
        time_fit(name, 3)
    print(json.dumps(info), file=results_out, flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        # The ceiling too is timed in every turn: at a quiet moment it is highest.
        rates = {"tf_matmul_gflops": tf_matmul(), **{name: time_fit(name, FLAGS.steps) for name in order}}
        order.reverse()
        print(json.dumps(rates), file=results_out, flush=True)


# ----------------------------------------------------------------------------- the parent


def settings():
    """name -> worker setting. oneDNN is the environment; the rest is the worker's."""
    base = ["plain"]
    out = {
        "float32, oneDNN off": dict(env="0", variants=base),
        "float32, oneDNN on": dict(env="1", variants=base + (["custom_xla"] if FLAGS.xla else [])
                                   + (["custom_verbose1", "custom_verbose2"]
                                      if FLAGS.host_reads else []), pipeline=True),
        "deterministic, oneDNN off": dict(env="0", variants=[], deterministic=True),
        "deterministic, oneDNN on": dict(env="1", variants=[], deterministic=True),
    }
    for spec in FLAGS.threads:
        intra, inter = (int(x) for x in spec.split(":"))
        out[f"float32, oneDNN on, threads {intra}:{inter}"] = dict(env="1", variants=[], threads=(intra, inter))
    return out


def start_worker(setting):
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=setting["env"],
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    args = [f"--data_source={FLAGS.data_source}", f"--batch_size={FLAGS.batch_size}", f"--steps={FLAGS.steps}",
            f"--pipeline_batches={FLAGS.pipeline_batches}", f"--matmul_size={FLAGS.matmul_size}",
            f"--worker={json.dumps(setting)}"] + ([f"--data_dir={FLAGS.data_dir}"] if FLAGS.data_dir else [])
    return subprocess.Popen([sys.executable, "-m", "experiments.benchmark", *args], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def read_result(name, proc):
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"error: the worker of '{name}' died (exit code {proc.wait()})")
    return json.loads(line)


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
    if FLAGS.worker:
        return worker(json.loads(FLAGS.worker))
    model, cores, isa = cpu_description()
    numpy_ceiling = numpy_matmul_gflops(FLAGS.matmul_size)

    specs = settings()
    procs = {name: start_worker(spec) for name, spec in specs.items()}
    info = {name: read_result(name, proc) for name, proc in procs.items()}
    rates = {name: {} for name in specs}
    numpy_gflops = [numpy_ceiling]
    order = list(specs)
    for repeat in range(FLAGS.repeats):
        print(f"repeat {repeat + 1}/{FLAGS.repeats}", file=sys.stderr, flush=True)
        numpy_gflops.append(numpy_matmul_gflops(FLAGS.matmul_size))
        for name in order:                 # one worker at a time
            procs[name].stdin.write("go\n")
            procs[name].stdin.flush()
            for variant, rate in read_result(name, procs[name]).items():
                rates[name].setdefault(variant, []).append(rate)
        order.reverse()
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()

    first = info[order[0]]
    train_flops = 3 * first["forward_flops_per_image"]   # forward + backward (2x forward), the usual estimate
    for name in specs:
        info[name]["tf_matmul_gflops"] = max(rates[name].pop("tf_matmul_gflops"))
    numpy_ceiling = max(numpy_gflops)
    ceiling = max([numpy_ceiling] + [i["tf_matmul_gflops"] for i in info.values()])
    best = {s: {v: max(r) for v, r in rs.items()} for s, rs in rates.items()}
    median = {s: {v: statistics.median(r) for v, r in rs.items()} for s, rs in rates.items()}
    results = {
        "cpu": model, "cores": cores, "isa": isa, "tensorflow": first["tensorflow"], "gpu": first["gpu"],
        "data_source": FLAGS.data_source, "batch_size": FLAGS.batch_size,
        "steps": FLAGS.steps, "repeats": FLAGS.repeats,
        "train_mflop_per_image": train_flops / 1e6,
        "ceiling_gflops": ceiling, "numpy_matmul_gflops": numpy_ceiling,
        "workers": info, "images_per_s_best": best, "images_per_s_median": median, "all_repeats": rates,
    }
    if first["gpu"]:
        data_args = [f"--data_source={FLAGS.data_source}"] + ([f"--data_dir={FLAGS.data_dir}"] if FLAGS.data_dir else [])
        results["concurrent_images_per_s"] = {n: concurrent_runs(int(n), data_args) for n in FLAGS.concurrency}
    report(results)
    if FLAGS.json_out:
        checkpoints.write_json(FLAGS.json_out, results)


def report(r):
    best, median = r["images_per_s_best"], r["images_per_s_median"]
    gflops = lambda images: images * r["train_mflop_per_image"] / 1e3  # noqa: E731
    cell = lambda s, v: f"{best[s][v]:,.0f} ({median[s][v]:,.0f})"      # noqa: E731
    share = lambda s, v: f"{gflops(best[s][v]):.1f} ({gflops(best[s][v]) / r['ceiling_gflops']:.0%})"  # noqa: E731
    print(f"\nCPU: {r['cpu']}, {r['cores']} cores, {' '.join(r['isa']) or 'none of ' + ' '.join(ISA_FLAGS)}; "
          f"TensorFlow {r['tensorflow']}; batch {r['batch_size']}, {r['data_source']} data")
    print(f"Dense-matmul ceiling {r['ceiling_gflops']:.0f} GFLOP/s (float32 {FLAGS.matmul_size}^3, best of every turn: "
          f"NumPy {r['numpy_matmul_gflops']:.0f}, "
          + ", ".join(f"tf.matmul {s} {i['tf_matmul_gflops']:.0f}" for s, i in r["workers"].items()
                      if "threads" not in s) + ")")
    print(f"Train step = 3 x forward = {r['train_mflop_per_image']:.0f} MFLOP per image. "
          f"Images/s: best of {r['repeats']} x {r['steps']} steps (median in brackets).\n")
    ops = r["workers"]["float32, oneDNN on"]
    if "bare_compute_ops" in ops:
        print(f"Compute ops per traced step: (a) {ops['project_compute_ops']:,}, (b) {ops['bare_compute_ops']:,}, "
              f"(a)/(b) {ops['project_compute_ops'] / ops['bare_compute_ops']:.3f}\n")
    print("| setting | oneDNN | threads | (a) project step | (b) bare tf.function loop | (a)/(b) | (a) GFLOP/s (of ceiling) "
          "| (b) GFLOP/s (of ceiling) |\n|---|---|---|---|---|---|---|---|")
    for s in best:
        threads = ":".join(str(t) for t in r["workers"][s]["threads"])
        if "plain" in best[s]:
            ratio = f"{best[s]['custom'] / best[s]['plain']:.3f}"
            plain = (cell(s, "plain"), ratio, share(s, "plain"))
        else:
            plain = ("-", "-", "-")
        print(f"| {s} | {r['workers'][s]['onednn']} | {threads} | {cell(s, 'custom')} | {plain[0]} | {plain[1]} "
              f"| {share(s, 'custom')} | {plain[2]} |")
    for kind in ("float32", "deterministic"):
        on, off = best.get(f"{kind}, oneDNN on"), best.get(f"{kind}, oneDNN off")
        if on and off:
            both = " ".join(f"({k}) {on[v] / off[v]:.2f}x" for k, v in (("a", "custom"), ("b", "plain"))
                            if v in on and v in off)
            print(f"\noneDNN on / off, {kind}: {both}", end="")
    print("\n\n| (a), float32, oneDNN on, variant | images/s | vs (a) |\n|---|---|---|")
    ref = "float32, oneDNN on"
    labels = {"custom": "as in training: EpochLog (event files, NaN check), verbose=0",
              "custom_verbose1": "with Keras' progress bar (verbose=1)",
              "custom_verbose2": "with one line per epoch (verbose=2)",
              "custom_xla": "XLA (jit_compile)"}
    for v, label in labels.items():
        if v in best[ref]:
            print(f"| {label} | {cell(ref, v)} | {best[ref][v] / best[ref]['custom']:.3f} |")
    for s in best:
        if "threads" in s:
            print(f"| intra:inter-op threads {s.rsplit(' ', 1)[1]} (default 0:0) | {cell(s, 'custom')} "
                  f"| {best[s]['custom'] / best[ref]['custom']:.3f} |")
    pipeline = r["workers"][ref].get("input_pipeline")
    if pipeline:
        print(f"\n(c) input pipeline alone: {pipeline:,.0f} images/s, "
              f"{pipeline / best[ref]['custom']:.0f}x what (a) consumes")
    for n, v in r.get("concurrent_images_per_s", {}).items():
        print(f"{n} concurrent runs on one GPU, total: {v:,.0f} images/s")


if __name__ == "__main__":
    app.run(main, flags_parser=functools.partial(config_lib.parse_absl, FLAGS))
