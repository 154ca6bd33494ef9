"""Benchmark one training step of the MNIST configuration against the machine's matmul limit.

    python bench.py                    # ADGM, SDGM and M2; a table, then one JSON line
    python bench.py --steps 100 --models adgm

For each model: the median time of a training step (batch 100 labeled + 100 unlabeled, 444
inputs, 2×500 hidden, dim(a) = dim(z) = 100, 10 classes, 1 sample), split into forward,
backward and optimizer; the floating-point operations of the step, counted from the shapes of
its matrix products; and the rate at which this machine's `@` runs those very products, timed
alone in the same run. Their ratio is the efficiency:

    efficiency = (step FLOPs / matmul rate) / step time
               = (time the step's matrix products take on their own) / (time of the step)

so 1.0 would mean that everything but the matrix products was free. Where the rest of the time
goes is attributed from a profile of a few steps (elementwise, reductions, optimizer,
bookkeeping). Peak memory is the resident set of a separate process that loads MNIST (when
--data-dir has it) and trains on it for a few steps. A benchmark, not a test: nothing asserts.
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

CONFIG = dict(x_dim=444, n_classes=10, hidden=(500, 500), a_dim=100, z_dim=100, batch=100, alpha=60.0)


def make_step(name, seed=0):
    """A model, its optimizer and a random binary batch of the MNIST shapes."""
    ad.rng.reseed(seed)
    c = CONFIG
    model = adgm.MODELS[name](c["x_dim"], c["n_classes"], c["hidden"], c["a_dim"], c["z_dim"])
    opt = ad.Adam(model.parameters(), lr=3e-4, clip=5.0)
    x_l = ad.rng.bernoulli(ad.xp.full((c["batch"], c["x_dim"]), 0.2, dtype="float32"))
    x_u = ad.rng.bernoulli(ad.xp.full((c["batch"], c["x_dim"]), 0.2, dtype="float32"))
    y_l = ad.xp.arange(c["batch"]) % c["n_classes"]
    return model, opt, (x_l, y_l, x_u)


def sync():
    if ad.xp is not np:
        ad.xp.cuda.Stream.null.synchronize()


def time_steps(model, opt, batch, steps, warmup=5):
    """Median seconds of (forward, backward, optimizer) over `steps` steps."""
    x_l, y_l, x_u = batch
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        J, _ = model.loss(ad.Tensor(x_l), y_l, ad.Tensor(x_u), CONFIG["alpha"])
        sync()
        t1 = time.perf_counter()
        J.backward()
        sync()
        t2 = time.perf_counter()
        opt.step()
        sync()
        t3 = time.perf_counter()
        if i >= warmup:
            times.append((t1 - t0, t2 - t1, t3 - t2))
    t = np.array(times)
    return np.median(t, axis=0), np.median(t.sum(axis=1))


def step_products(model, opt, batch):
    """The (A, B) operands of every matrix product of one step, forward and backward, as the
    step ran them (autodiff sends every product through `autodiff.mm`)."""
    products, original = [], ad.mm

    def recording(a, b):
        products.append((a, b))
        return original(a, b)

    ad.mm = recording
    try:
        x_l, y_l, x_u = batch
        opt.zero_grad()
        J, _ = model.loss(ad.Tensor(x_l), y_l, ad.Tensor(x_u), CONFIG["alpha"])
        J.backward()
    finally:
        ad.mm = original
    return products


def flops(products):
    """2·m·k·n for every product (m, k) @ (k, n), leading axes broadcast."""
    total = 0
    for a, b in products:
        out = np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1])
        total += 2 * int(np.prod(out)) * a.shape[-1]
    return total


def matmul_seconds(products, repeats=20):
    """Time of the step's products run alone (best of `repeats` for each)."""
    total = 0.0
    for a, b in products:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            sync()
            best = min(best, time.perf_counter() - t0)
        total += best
    return total


# Where the time outside matrix products goes, by the autodiff function it is spent in.
KINDS = {
    "matmul": {"matmul", "mm"},
    "elementwise": {"linear", "add", "sub", "mul", "div", "neg", "power", "exp", "log", "sin", "relu", "tanh", "sigmoid",
                    "_sigmoid", "softplus", "logaddexp", "bernoulli_log_prob", "sqrt", "log_softmax", "sum_to"},
    "reductions": {"reduce_sum", "mean", "logsumexp"},
    "optimizer": {"step", "zero_grad", "grad_norm"},
}


def attribute(model, opt, batch, steps=5):
    """Seconds per step by kind, from cProfile's own-time of each function (lambdas are counted
    with the autodiff function that defines them)."""
    spans = [(fn.__code__.co_firstlineno, fn.__code__.co_firstlineno + len(inspect.getsource(fn).splitlines()), name)
             for name, fn in vars(ad).items() if inspect.isfunction(fn) and fn.__module__ == "autodiff"]
    spans += [(m.__code__.co_firstlineno, m.__code__.co_firstlineno + len(inspect.getsource(m).splitlines()), n)
              for n, m in vars(ad.Adam).items() if inspect.isfunction(m)]
    x_l, y_l, x_u = batch
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(steps):
        opt.zero_grad()
        J, _ = model.loss(ad.Tensor(x_l), y_l, ad.Tensor(x_u), CONFIG["alpha"])
        J.backward()
        opt.step()
    sync()
    profile.disable()
    by_kind = dict.fromkeys(list(KINDS) + ["bookkeeping"], 0.0)
    for (filename, line, func), (_, _, own, _, _) in pstats.Stats(profile).stats.items():
        name = func
        if filename.endswith("autodiff.py"):
            name = next((n for lo, hi, n in spans if lo <= line < hi), func)
        kind = next((k for k, names in KINDS.items() if name in names), "bookkeeping")
        by_kind[kind] += own / steps
    return by_kind


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
    p.add_argument("--models", nargs="+", default=["adgm", "sdgm", "m2"], choices=sorted(adgm.MODELS))
    p.add_argument("--steps", type=int, default=50, help="timed steps per model after 5 warm-up steps")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument("--data-dir", default=os.environ.get("ADGM_DATA", "../shared/data"),
                   help="where mnist/ is, for the peak-memory run (skipped if absent)")
    p.add_argument("--no-split", action="store_true", help="concatenate the inputs of each first layer "
                   "instead of projecting them separately (to measure what the split buys)")
    p.add_argument("--default-malloc", action="store_true", help="leave glibc's allocator as it is (see "
                   "autodiff.keep_freed_memory) to measure what keeping freed memory buys")
    args = p.parse_args()
    ad.set_device(args.device)
    if not args.default_malloc:
        ad.keep_freed_memory()
    ad.Linear.split = not args.no_split
    results = {"device": ad.device_name(), "split_first_layer": not args.no_split, "models": {}}
    print(f"{'model':10} {'step ms':>8} {'fwd':>6} {'bwd':>6} {'adam':>6} {'GFLOP':>7} {'GFLOP/s':>8} "
          f"{'matmul-only ms':>14} {'efficiency':>10} {'epoch s':>8}")
    for name in args.models:
        model, opt, batch = make_step(name)
        (fwd, bwd, optim), step = time_steps(model, opt, batch, args.steps)
        products = step_products(model, opt, batch)
        work = flops(products)
        alone = matmul_seconds(products)
        kinds = attribute(model, opt, batch)
        r = dict(step_ms=1e3 * step, forward_ms=1e3 * fwd, backward_ms=1e3 * bwd, optimizer_ms=1e3 * optim,
                 gflop=work / 1e9, matmul_gflops=work / alone / 1e9, matmul_alone_ms=1e3 * alone,
                 efficiency=alone / step, epoch_s=600 * step, parameters=int(opt.flat.size),
                 profile_ms={k: round(1e3 * v, 2) for k, v in kinds.items()})
        results["models"][name] = r
        print(f"{name:10} {r['step_ms']:8.1f} {r['forward_ms']:6.1f} {r['backward_ms']:6.1f} {r['optimizer_ms']:6.1f} "
              f"{r['gflop']:7.2f} {r['matmul_gflops']:8.1f} {r['matmul_alone_ms']:14.1f} {r['efficiency']:10.2f} "
              f"{r['epoch_s']:8.0f}")
    print("\nown time per step under the profiler, ms (profiling adds overhead to the Python parts):")
    for name, r in results["models"].items():
        print(f"  {name:10} " + "  ".join(f"{k} {v:.1f}" for k, v in r["profile_ms"].items()))
    mnist = os.path.join(args.data_dir, "mnist", "train-images-idx3-ubyte.gz")
    results["peak_rss_mb"] = peak_memory(args.data_dir, 20) if os.path.exists(mnist) else None
    results["bench_process_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak resident memory of MNIST training (load + 20 steps): "
          f"{results['peak_rss_mb'] and round(results['peak_rss_mb'])} MB")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
