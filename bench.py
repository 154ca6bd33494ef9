"""Benchmark one training step of the MNIST configuration against the machine's matmul limit.

    python bench.py                    # ADGM, SDGM, M2 and adgm-authors; a table, then one JSON line
    python bench.py --steps 100 --models adgm
    OPENBLAS_NUM_THREADS=1 python bench.py --clock cpu   # beside other work: see --clock

For each model: the median time of a training step (batch 100 labeled + 100 unlabeled, the
inputs train.py gives it: 444 pixels, or 784 for adgm-authors (--pixels all); 2×500 hidden,
dim(a) = dim(z) = 100, 10 classes, 1 sample), split into forward, backward and optimizer;
the floating-point operations of the step, counted from the shapes of its matrix products; and
the rate at which this machine's `@` runs those very products, timed
alone in the same run: the same operands, back to back in the step's order, nothing else in
between. Their ratio is the efficiency:

    efficiency = (step FLOPs / matmul rate) / step time
               = (time the step's matrix products take on their own) / (time of the step)

so 1.0 would mean that everything but the matrix products was free. Both times are medians over
repeats, on the same clock. Two cross-checks follow it: '(best-case)' divides instead the sum of
each product's best of 20 repeats, its operands hot in cache (the statistic of bench.py before
2026-12: a median against minima, so it understates); '(in step)' is the share of the step that
its products take where they run (each call to autodiff.mm timed inside the step).

Each model steps with the optimizer settings and batch objective train.py gives it
(adgm-authors: element clipping, the weight prior, the mean over rows). Where the rest of the
time goes is attributed from a profile of a few steps (elementwise, reductions, optimizer,
bookkeeping). Evaluation is timed on its own: one pass of model.evaluate over a
10,000-example test set in chunks of 500, as train.py makes it after each epoch. Peak memory is
the resident set of a separate process that loads MNIST (when --data-dir has it) and trains on
it for a few steps. A benchmark, not a test: nothing asserts.
"""
import argparse
import cProfile
import inspect
import json
import os
import pstats
import resource
import subprocess
import sys
import time

import numpy as np

import adgm
import autodiff as ad
import train

CONFIG = dict(n_classes=10, hidden=(500, 500), a_dim=100, z_dim=100, batch=100, alpha=60.0)
X_DIM = {"filtered": 444, "all": 784}  # MNIST's inputs under each --pixels (datasets._mnist)


def make_step(name, seed=0):
    """A model, its optimizer (train.py's settings for it), a random binary batch of the MNIST
    shapes, and the keyword arguments of its loss."""
    ad.rng.reseed(seed)
    c = CONFIG
    config = dict(train.COMMON, **train.MODEL_DEFAULTS.get(name, {}), lr=3e-4, clip=5.0)
    D = X_DIM[config["pixels"]]
    model = adgm.MODELS[name](D, c["n_classes"], c["hidden"], c["a_dim"], c["z_dim"])
    opt = train.build_optimizer(config, model, 600 * 2 * c["batch"])
    x_l = ad.rng.bernoulli(ad.xp.full((c["batch"], D), 0.2, dtype="float32"))
    x_u = ad.rng.bernoulli(ad.xp.full((c["batch"], D), 0.2, dtype="float32"))
    y_l = ad.xp.arange(c["batch"]) % c["n_classes"]
    return model, opt, (x_l, y_l, x_u, {"average": config["loss_average"]})


def sync():
    if ad.xp is not np:
        ad.xp.cuda.Stream.null.synchronize()


clock = time.perf_counter  # or time.process_time (--clock cpu)


def time_steps(model, opt, batch, steps, warmup=5):
    """Median seconds of (forward, backward, optimizer) over `steps` steps."""
    x_l, y_l, x_u, kw = batch
    times = []
    for i in range(warmup + steps):
        t0 = clock()
        opt.zero_grad()
        J, _ = model.loss(ad.Tensor(x_l), y_l, ad.Tensor(x_u), CONFIG["alpha"], **kw)
        sync()
        t1 = clock()
        J.backward()
        sync()
        t2 = clock()
        opt.step()
        sync()
        t3 = clock()
        if i >= warmup:
            times.append((t1 - t0, t2 - t1, t3 - t2))
    t = np.array(times)
    return np.median(t, axis=0), np.median(t.sum(axis=1))


def train_step(model, opt, batch):
    """One whole training step, as train.py makes it."""
    x_l, y_l, x_u, kw = batch
    opt.zero_grad()
    J, _ = model.loss(ad.Tensor(x_l), y_l, ad.Tensor(x_u), CONFIG["alpha"], **kw)
    J.backward()
    opt.step()


def step_products(model, opt, batch):
    """The (A, B) operands of every matrix product of one step, forward and backward, as the
    step ran them (autodiff sends every product through `autodiff.mm`)."""
    products, original = [], ad.mm

    def recording(a, b):
        products.append((a, b))
        return original(a, b)

    ad.mm = recording
    try:
        x_l, y_l, x_u, kw = batch
        opt.zero_grad()
        J, _ = model.loss(ad.Tensor(x_l), y_l, ad.Tensor(x_u), CONFIG["alpha"], **kw)
        J.backward()
    finally:
        ad.mm = original
    return products


def matmul_in_step(model, opt, batch, steps=10):
    """Median over `steps` steps of the time the step's matrix products take inside it (each
    call to autodiff.mm timed where it runs): to set beside their time alone."""
    spent, original = [0.0], ad.mm

    def timed(a, b):
        t0 = clock()
        out = original(a, b)
        sync()
        spent[0] += clock() - t0
        return out

    ad.mm, per_step = timed, []
    try:
        for _ in range(steps):
            spent[0] = 0.0
            train_step(model, opt, batch)
            per_step.append(spent[0])
    finally:
        ad.mm = original
    return float(np.median(per_step))


def flops(products):
    """2·m·k·n for every product (m, k) @ (k, n), leading axes broadcast."""
    total = 0
    for a, b in products:
        out = np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1])
        total += 2 * int(np.prod(out)) * a.shape[-1]
    return total


def matmul_seconds(products, repeats=20):
    """Time of the step's products run alone, back to back in the step's order: the median of
    `repeats` runs of the whole sequence, the statistic time_steps takes of the step. Also the
    sum of each product's best of `repeats` (what bench.py took before: minima, set against the
    step's median, so an optimistic bound)."""
    runs, best = [], [float("inf")] * len(products)
    for _ in range(repeats):
        t0 = clock()
        for i, (a, b) in enumerate(products):
            t1 = clock()
            a @ b
            sync()
            best[i] = min(best[i], clock() - t1)
        runs.append(clock() - t0)
    return float(np.median(runs)), sum(best)


# Where the time outside matrix products goes, by the autodiff function it is spent in.
KINDS = {
    "matmul": {"matmul", "mm"},
    # _elementwise makes add, mul, exp, ...; "<lambda>" is a lambda at the top level of autodiff.py:
    # the forward and gradient rules of those primitives (and the operators' small adapters).
    "elementwise": {"linear", "_elementwise", "<lambda>", "shift", "scale", "power", "_sigmoid", "bernoulli_log_prob",
                    "normal_log_prob", "normal_sample", "sqrt", "log_softmax", "_accumulate"},
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


def attribute(model, opt, batch, steps=5):
    """Seconds per step by kind, from cProfile's own-time of each function (lambdas are counted
    with the autodiff function that defines them)."""
    spans = _spans(ad) + _spans(ad.Adam) + _spans(ad.Random)
    profile = cProfile.Profile(clock)
    profile.enable()
    for _ in range(steps):
        train_step(model, opt, batch)
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


def evaluation_seconds(model, n=10_000, chunk=500):
    """Seconds of one test-set pass as train.py makes it each epoch: model.evaluate (one sample
    of a) over n random binary examples in chunks of 500, the results copied to the host."""
    x = ad.rng.bernoulli(ad.xp.full((n, model.x_dim), 0.2, dtype="float32"))
    model.eval()
    try:
        model.evaluate(x[:chunk], samples=1)  # warm-up
        t0 = clock()
        for i in range(0, n, chunk):
            [ad.to_numpy(out) for out in model.evaluate(x[i:i + chunk], samples=1)]
        return clock() - t0
    finally:
        model.train()


def peak_memory(data_dir, steps):
    """Peak resident set (MB) of a process that loads MNIST and trains the ADGM on it."""
    code = f"""
import resource, autodiff as ad, adgm, datasets
data = datasets.load("mnist", 100, data_dir={data_dir!r})
batches = datasets.Batches(data, 100, 100)
model = adgm.ADGM(444, 10)
opt = ad.Adam(model.parameters(), clip=5.0)
for step, (x_l, y_l, x_u) in enumerate(batches.epoch()):
    opt.zero_grad(); J, _ = model.loss(ad.Tensor(x_l), y_l, ad.Tensor(x_u), 60.0); J.backward(); opt.step()
    if step == {steps}: break
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return float(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["adgm", "sdgm", "m2", "adgm-authors"], choices=sorted(adgm.MODELS))
    p.add_argument("--steps", type=int, default=50, help="timed steps per model after 5 warm-up steps")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument("--data-dir", default=os.environ.get("ADGM_DATA", "../shared/data"),
                   help="where mnist/ is, for the peak-memory run (skipped if absent)")
    p.add_argument("--no-split", action="store_true", help="concatenate the inputs of each first layer "
                   "instead of projecting them separately (to measure what the split buys)")
    p.add_argument("--default-malloc", action="store_true", help="leave glibc's allocator as it is (see "
                   "autodiff.keep_freed_memory) to measure what keeping freed memory buys")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="time with the wall clock, or with "
                   "this process's CPU time: with one BLAS thread (OPENBLAS_NUM_THREADS=1) on the CPU that is "
                   "what the wall clock would read with the cores to ourselves, so it stays meaningful when "
                   "other work shares them (with several threads CPU time adds them up: use wall)")
    args = p.parse_args()
    global clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    ad.set_device(args.device)
    if not args.default_malloc:
        ad.keep_freed_memory()
    ad.Linear.split = not args.no_split
    results = {"device": ad.device_name(), "split_first_layer": not args.no_split, "clock": args.clock,
               "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"), "models": {}}
    print(f"{'model':16} {'step ms':>8} {'fwd':>6} {'bwd':>6} {'adam':>6} {'GFLOP':>7} {'GFLOP/s':>8} "
          f"{'matmul-only ms':>14} {'efficiency':>10} {'(best-case)':>11} {'(in step)':>9} {'eval s':>7} {'epoch s':>8}")
    for name in args.models:
        model, opt, batch = make_step(name)
        (fwd, bwd, optim), step = time_steps(model, opt, batch, args.steps)
        products = step_products(model, opt, batch)
        work = flops(products)
        alone, best = matmul_seconds(products)
        inside = matmul_in_step(model, opt, batch)
        kinds = attribute(model, opt, batch)
        evaluation = evaluation_seconds(model)
        r = dict(step_ms=1e3 * step, forward_ms=1e3 * fwd, backward_ms=1e3 * bwd, optimizer_ms=1e3 * optim,
                 gflop=work / 1e9, matmul_gflops=work / alone / 1e9, matmul_alone_ms=1e3 * alone,
                 efficiency=alone / step, matmul_best_ms=1e3 * best, efficiency_best=best / step,
                 matmul_in_step_ms=1e3 * inside, share_in_step=inside / step,
                 evaluation_s=evaluation, epoch_s=600 * step + evaluation,
                 parameters=int(opt.flat.size), profile_ms={k: round(1e3 * v, 2) for k, v in kinds.items()})
        results["models"][name] = r
        print(f"{name:16} {r['step_ms']:8.1f} {r['forward_ms']:6.1f} {r['backward_ms']:6.1f} {r['optimizer_ms']:6.1f} "
              f"{r['gflop']:7.2f} {r['matmul_gflops']:8.1f} {r['matmul_alone_ms']:14.1f} {r['efficiency']:10.2f} "
              f"{r['efficiency_best']:11.2f} {r['share_in_step']:9.2f} {r['evaluation_s']:7.1f} {r['epoch_s']:8.0f}")
    print("\nepoch s = 600 steps + one evaluation (10,000 test examples)")
    print("matrix products, ms per step: inside the step / alone, back to back (median) / sum of each one's best:")
    for name, r in results["models"].items():
        print(f"  {name:16} {r['matmul_in_step_ms']:.1f} / {r['matmul_alone_ms']:.1f} / {r['matmul_best_ms']:.1f}")
    print("own time per step under the profiler, ms (profiling adds overhead to the Python parts):")
    for name, r in results["models"].items():
        print(f"  {name:16} " + "  ".join(f"{k} {v:.1f}" for k, v in r["profile_ms"].items()))
    mnist = os.path.join(args.data_dir, "mnist", "train-images-idx3-ubyte.gz")
    results["peak_rss_mb"] = peak_memory(args.data_dir, 20) if os.path.exists(mnist) else None
    results["bench_process_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak resident memory of MNIST training (load + 20 steps): "
          f"{results['peak_rss_mb'] and round(results['peak_rss_mb'])} MB")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
