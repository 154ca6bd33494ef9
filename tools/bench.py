"""Benchmark one training step of the MNIST configuration against the machine's matmul limit.

    python3 -m tools.bench                    # ADGM, SDGM, M2 and adgm-authors; a table, then one JSON line
    python3 -m tools.bench --steps 100 --models adgm
    python3 -m tools.bench --batchnorm --models sdgm       # the models as --batchnorm trains them
    OPENBLAS_NUM_THREADS=1 python3 -m tools.bench --clock cpu   # beside other work: see --clock

For each model, train.train_step as train.py takes it for `--dataset mnist --model M --settings
paper` (every model at the paper's settings; --batchnorm adds the batch normalisation of the main
job's stabilised ADGM): its model, optimizer and batch objective (100 labeled + 100 unlabeled, 444
pixels or 784 for adgm-authors, 2×500 hidden, dim(a) = dim(z) = 100, 1 sample); the median time
of a step, split into forward, backward and optimizer; its floating-point operations, counted from
the shapes of its matrix products (recorded by wrapping autodiff.linear, where the models make all
of them, from the outside); and the time of those very products alone, back to back in the
step's order:

    efficiency = (time the step's matrix products take on their own) / (time of the step)

both medians over repeats on the same clock, so 1.0 would mean that everything else was free.
A profile of a few steps says where the rest goes. Evaluation is timed on its own (train.evaluate
over 10,000 test examples, as after each epoch), and peak memory in a separate process that loads
MNIST (when --data-dir has it) and trains on it for a few steps. A benchmark: nothing asserts.
"""
import argparse
import contextlib
import cProfile
import inspect
import json
import os
import pstats
import subprocess
import sys
import time
import types

import numpy as np

if __package__ in (None, ""):  # run as a file, python3 tools/bench.py: the modules are one folder up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if __name__ == "__main__":  # Ctrl-C: one line, from the imports on
    if os.name != "posix":  # train.py's run folders and resource's peak memory
        print("error: tools/bench.py needs a POSIX system such as Linux or macOS, as train.py does; "
              "on Windows, run it under WSL", file=sys.stderr)
        sys.exit(2)
    from cli.interrupts import exit_quietly
    exit_quietly()
import autodiff as ad  # noqa: E402
from cli import kinds, memory, options  # noqa: E402
import train  # noqa: E402

X_DIM = {"filtered": 444, "all": 784}  # MNIST's inputs under each --pixels (datasets._mnist)
N_TRAIN = 60_000  # MNIST's training images, all of them unlabeled data: α = β·N/N_l


def make_step(name, seed=0, extra=()):
    """What train.py would train for `--dataset mnist --model name` (and the options in `extra`):
    its model, optimizer and step loss (train.step_loss), with a random binary batch of the MNIST
    shapes."""
    ad.rng.reseed(seed)
    config = options.run_config(options.parse_args(["--dataset", "mnist", "--model", name, *extra]))
    B, K, D = config["batch_size"], 10, X_DIM[config["pixels"]]
    shapes = types.SimpleNamespace(x_unlabeled=np.empty((0, D), np.float32), n_classes=K, likelihood="bernoulli")
    model = train.build_model(config, shapes)
    opt = train.build_optimizer(config, model, (N_TRAIN // B) * 2 * B)
    loss = train.step_loss(config, config["beta"] * N_TRAIN / config["labels"], 1.0)
    x_l, x_u = (ad.rng.bernoulli(ad.xp.full((B, D), 0.2, dtype="float32")) for _ in range(2))
    return model, opt, loss, (x_l, ad.xp.arange(B) % K, x_u)


def sync():
    if ad.xp is not np:
        ad.xp.cuda.Stream.null.synchronize()


clock = time.perf_counter  # or time.process_time (--clock cpu)


def time_steps(model, opt, loss, batch, steps, warmup=5):
    """Median seconds of (forward, backward, optimizer) over `steps` calls of train.train_step,
    and the median of the whole step: the clock is read (after a sync) where the step zeroes the
    gradients, at the end of the loss, and before and after Adam's update."""
    marks, times = [], []

    def marked(f):
        def call(*args):
            sync()
            marks.append(clock())
            out = f(*args)
            sync()
            marks.append(clock())
            return out
        return call

    timed = types.SimpleNamespace(zero_grad=marked(opt.zero_grad), step=marked(opt.step))
    for i in range(warmup + steps):
        marks.clear()
        train.train_step(model, timed, marked(loss), batch)
        t0, _, _, t1, t2, t3 = marks  # zero_grad's start and end, the loss's, Adam's
        if i >= warmup:
            times.append((t1 - t0, t2 - t1, t3 - t2))
    t = np.array(times)
    return np.median(t, axis=0), np.median(t.sum(axis=1))


# ---------------------------------------------------------------------------------------------
# The step's matrix products: recorded from outside autodiff, then timed alone
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def recording_products(products):
    """Append to `products` the (A, B) operands of every matrix product of autodiff's linear layers,
    forward and backward, in the order they are made: ad.linear (and the gradient rule of each node
    it makes) is wrapped for the time of the block. The backward operands are those the rule
    multiplies: the gradient of each input's projection, W^T and x^T."""
    linear = ad.linear

    def recorded(inputs, weights, bias=None, activation=None):
        out = linear(inputs, weights, bias, activation)
        pairs = sorted(zip(inputs, weights), key=lambda p: p[0].data.size)  # linear's order
        flat = [x.data.reshape(-1, x.shape[-1]) for x, _ in pairs]
        products.extend((x, w.data) for x, (_, w) in zip(flat, pairs))
        rule = out._backward

        def backward(g):
            h = g * (out.data > 0) if activation == "relu" else g  # out > 0 where ReLU let the sum through
            gxs = [ad.sum_to(h, x.shape[:-1] + w.shape[-1:]).reshape(-1, w.shape[-1]) for x, w in pairs]
            products.extend((gx, w.data.T) for (x, w), gx in zip(pairs, gxs) if x.requires_grad)
            products.extend((xf.T, gx) for xf, (_, w), gx in zip(flat, pairs, gxs) if w.requires_grad)
            return rule(g)
        if rule is not None:
            out._backward = backward
        return out

    ad.linear = recorded
    try:
        yield products
    finally:
        ad.linear = linear


def step_products(model, opt, loss, batch):
    """The (A, B) operands of every matrix product of one training step, as the step ran them."""
    with recording_products([]) as products:
        train.train_step(model, opt, loss, batch)
    return products


def flops(products):
    """2·m·k·n for every product (m, k) @ (k, n), leading axes broadcast."""
    total = 0
    for a, b in products:
        out = np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1])
        total += 2 * int(np.prod(out)) * a.shape[-1]
    return total


def matmul_seconds(products, repeats=20):
    """Time of the step's products run alone, back to back in the step's order: the median of
    `repeats` runs of the whole sequence, the statistic time_steps takes of the step."""
    runs = []
    for _ in range(repeats):
        t0 = clock()
        for a, b in products:
            a @ b
        sync()
        runs.append(clock() - t0)
    return float(np.median(runs))


@contextlib.contextmanager
def concatenated_first_layers():
    """Every multi-input Linear as the plain layer W [x; a; y] + b: its inputs broadcast, tiled and
    concatenated for one product (--no-split), to measure what projecting each input apart buys."""
    split = ad.Linear.__call__

    def concatenated(self, *inputs, activation=None):
        if len(inputs) == 1:
            return split(self, *inputs, activation=activation)
        lead = np.broadcast_shapes(*(x.shape[:-1] for x in inputs))
        x = ad.concat([ad.broadcast_to(x, lead + x.shape[-1:]) for x in inputs], axis=-1)
        return ad.linear((x,), (ad.concat(self.weight, axis=0),), self.bias, activation)

    ad.Linear.__call__ = concatenated
    try:
        yield
    finally:
        ad.Linear.__call__ = split


# ---------------------------------------------------------------------------------------------
# Where the rest of the time goes, evaluation, memory
# ---------------------------------------------------------------------------------------------

# The kinds of work in a step, by the autodiff function whose own time it is.
KINDS = {
    "matmul": {"linear", "matmul"},  # the fused layers: their products, bias and ReLU
    # _elementwise makes add, mul, exp, ...; "<lambda>": the rules of those primitives, at autodiff's top level
    "elementwise": {"_elementwise", "<lambda>", "shift", "scale", "power", "_sigmoid", "bernoulli_log_prob",
                    "normal_log_prob", "normal_sample", "batch_norm", "sqrt", "log_softmax", "_accumulate"},
    "reductions": {"reduce_sum", "mean", "logsumexp", "sum_to", "<method 'reduce' of 'numpy.ufunc' objects>",
                   "_sum", "_mean"},
    "random": {"normal", "uniform", "bernoulli"},
    "optimizer": {"step", "zero_grad", "grad_norm", "<method 'fill' of 'numpy.ndarray' objects>"},
}


def _spans(namespace):
    """(first line, last line, name) of each function defined in autodiff.py in `namespace`."""
    return [(f.__code__.co_firstlineno, f.__code__.co_firstlineno + len(inspect.getsource(f).splitlines()), name)
            for name, f in vars(namespace).items()
            if inspect.isfunction(f) and f.__code__.co_filename == ad.__file__]


def attribute(model, opt, loss, batch, steps=5):
    """Seconds per step by kind, from cProfile's own-time of each function (lambdas and gradient
    rules are counted with the autodiff function that defines them)."""
    spans = _spans(ad) + _spans(ad.Adam) + _spans(ad.Random)
    profile = cProfile.Profile(clock)
    profile.enable()
    for _ in range(steps):
        train.train_step(model, opt, loss, batch)
    sync()
    profile.disable()
    by_kind = dict.fromkeys(list(KINDS) + ["bookkeeping"], 0.0)
    for (filename, line, func), (_, _, own, _, _) in pstats.Stats(profile).stats.items():
        name = func
        if filename == ad.__file__:
            name = next((n for lo, hi, n in spans if lo <= line < hi), func)
        elif func == "<lambda>":
            name = None  # a lambda elsewhere (adgm.py): bookkeeping
        kind = next((k for k, names in KINDS.items() if name in names), "bookkeeping")
        by_kind[kind] += own / steps
    return by_kind


def evaluation_seconds(model, name, n=10_000):
    """Seconds of one test-set pass as train.py makes it each epoch (train.evaluate: chunks of 500,
    one sample of a, the results copied to the host) over n random binary examples."""
    x = ad.to_numpy(ad.rng.bernoulli(ad.xp.full((n, model.x_dim), 0.2, dtype="float32")))
    config = {**options.COMMON, "dataset": "mnist", "model": name, "eval_samples": 1, "iw_samples": 0, "eval_images": 0}
    train.evaluate(model, types.SimpleNamespace(x_test=x[:500], y_test=np.zeros(500)), config)  # warm-up
    t0 = clock()
    train.evaluate(model, types.SimpleNamespace(x_test=x, y_test=np.zeros(n)), config)
    return clock() - t0


def train_on_mnist(data_dir, steps):
    """Train the ADGM on MNIST for `steps` steps as train.py does, at the paper's settings as every
    model here (what peak_memory measures)."""
    argv = ["--dataset", "mnist", "--settings", "paper", "--data-dir", data_dir]
    config = options.run_config(options.parse_args(argv))
    ad.set_device(config["device"])
    memory.keep_freed_memory()
    ad.rng.reseed(config["seed"])
    data, model, batches, opt, alpha = train.build(config)
    loss = train.step_loss(config, alpha, 1.0)
    for _, batch in zip(range(steps), batches.epoch()):
        train.train_step(model, opt, loss, batch)


def peak_memory(data_dir, steps):
    """Peak resident set (MB) of a process that loads MNIST and trains the ADGM on it."""
    code = (f"import resource; from tools import bench; bench.train_on_mnist({data_dir!r}, {steps}); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return float(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, as train.py's mistakes
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def main():
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["adgm", "sdgm", "m2", "adgm-authors"], choices=sorted(n for n, m in kinds.MODELS.items() if m.kind == "semi-supervised"))
    p.add_argument("--steps", type=int, default=50, help="timed steps per model after 5 warm-up steps")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument("--data-dir", default=os.environ.get("ADGM_DATA"),
                   help="where mnist/ is, for the peak-memory run (default $ADGM_DATA; skipped if absent)")
    p.add_argument("--batchnorm", action="store_true", help="the models with batch normalisation, as "
                   "`train.py --batchnorm` trains them")
    p.add_argument("--no-split", action="store_true", help="concatenate the inputs of each first layer "
                   "instead of projecting them separately (to measure what the split buys)")
    p.add_argument("--default-malloc", action="store_true", help="leave glibc's allocator as it is (see "
                   "autodiff.keep_freed_memory) to measure what keeping freed memory buys")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="time with the wall clock, or with "
                   "this process's CPU time: with one BLAS thread (OPENBLAS_NUM_THREADS=1) on the CPU that is "
                   "what the wall clock would read with the cores to ourselves, so it stays meaningful when "
                   "other work shares them (with several threads CPU time adds them up: use wall)")
    args = p.parse_args()
    args.data_dir = args.data_dir and os.path.expanduser(args.data_dir)  # as train.py reads it
    if args.steps < 1:
        p.error(f"--steps {args.steps}: must be at least 1")
    global clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    try:
        ad.set_device(args.device)
    except ad.BackendError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if not args.default_malloc:
        memory.keep_freed_memory()
    results = {"device": ad.device_name(), "split_first_layer": not args.no_split, "batchnorm": args.batchnorm,
               "clock": args.clock,
               "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"), "models": {}}
    print(f"{'model':16} {'step ms':>8} {'fwd':>6} {'bwd':>6} {'adam':>6} {'GFLOP':>7} {'GFLOP/s':>8} "
          f"{'matmul-only ms':>14} {'efficiency':>10} {'eval s':>7} {'epoch s':>8}")
    with concatenated_first_layers() if args.no_split else contextlib.nullcontext():
        for name in args.models:
            model, opt, loss, batch = make_step(name, extra=["--settings", "paper"] + ["--batchnorm"] * args.batchnorm)
            (fwd, bwd, optim), step = time_steps(model, opt, loss, batch, args.steps)
            products = step_products(model, opt, loss, batch)
            work = flops(products)
            alone = matmul_seconds(products)
            spans = attribute(model, opt, loss, batch)
            evaluation = evaluation_seconds(model, name)
            r = dict(step_ms=1e3 * step, forward_ms=1e3 * fwd, backward_ms=1e3 * bwd, optimizer_ms=1e3 * optim,
                     gflop=work / 1e9, matmul_gflops=work / alone / 1e9, matmul_alone_ms=1e3 * alone,
                     efficiency=alone / step, evaluation_s=evaluation, epoch_s=600 * step + evaluation,
                     parameters=int(opt.flat.size), profile_ms={k: round(1e3 * v, 2) for k, v in spans.items()})
            results["models"][name] = r
            print(f"{name:16} {r['step_ms']:8.1f} {r['forward_ms']:6.1f} {r['backward_ms']:6.1f} "
                  f"{r['optimizer_ms']:6.1f} {r['gflop']:7.2f} {r['matmul_gflops']:8.1f} {r['matmul_alone_ms']:14.1f} "
                  f"{r['efficiency']:10.2f} {r['evaluation_s']:7.1f} {r['epoch_s']:8.0f}")
    print("\nepoch s = 600 steps + one evaluation (10,000 test examples)")
    print("own time per step under the profiler, ms (profiling adds overhead to the Python parts; matmul is the "
          "fused linear layers, their bias and ReLU included):")
    for name, r in results["models"].items():
        print(f"  {name:16} " + "  ".join(f"{k} {v:.1f}" for k, v in r["profile_ms"].items()))
    mnist = os.path.join(args.data_dir or "", "mnist", "train-images-idx3-ubyte.gz")
    results["peak_rss_mb"] = peak_memory(args.data_dir, 20) if args.data_dir and os.path.exists(mnist) else None
    import resource  # POSIX's: main() runs after the check at the top of this file
    results["bench_process_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak = (f"{round(results['peak_rss_mb'])} MB" if results["peak_rss_mb"] is not None else
            "not measured: give --data-dir (or $ADGM_DATA) a folder with mnist/" if not args.data_dir else
            f"not measured: no {mnist}" if not os.path.exists(mnist) else "not measured: its process failed")
    print(f"\npeak resident memory of MNIST training (load + 20 steps): {peak}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
