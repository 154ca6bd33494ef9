"""Two settings compared over label draws: runs of each on the same seeds (the labeled subsets),
read draw by draw. The difference on each draw, then its mean and standard deviation, is what a
comparison rests on; twins of one seed say only how exactly a run reproduces.

    python3 -m figures draws [OUT.png] "ADGM=RUN_S0,RUN_S1,RUN_S2" "M2=RUN_S0,RUN_S1,RUN_S2" [EPOCH ...]

prints, at each epoch (default 10, 20, 50), each draw's test error of both settings and their
difference B − A, the mean ± standard deviation of A, of B and of the difference, and whether
B − A has one sign on every draw and a mean larger than its standard deviation. With OUT.png it
also draws B − A per epoch, one line per draw, up to the last epoch that every run has.
"""
import json
import os

import numpy as np

from figures import plots
from figures.draw import read_test_error


def seed_of(run):
    """The seed in the run folder's config.json, or None where it names none."""
    try:
        with open(os.path.join(run, "config.json")) as f:
            return int(json.load(f)["seed"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def paired(name_a, runs_a, name_b, runs_b):
    """The draws as (seed name, run of A, run of B): one run of each per draw, in the same order,
    so that where config.json names the seeds, the two runs of a draw share theirs."""
    if len(runs_a) != len(runs_b):
        runs = f"{len(runs_a)} run" + "s" * (len(runs_a) != 1)
        raise ValueError(f"{name_a} has {runs} and {name_b} {len(runs_b)}: give one per draw, in the same order")
    draws = []
    for i, (a, b) in enumerate(zip(runs_a, runs_b)):
        seed_a, seed_b = seed_of(a), seed_of(b)
        if None not in (seed_a, seed_b) and seed_a != seed_b:
            raise ValueError(f"draw {i + 1} pairs {a} (seed {seed_a}) with {b} (seed {seed_b}): give the runs of "
                             "each draw in the same order")
        seed = seed_b if seed_a is None else seed_a
        draws.append((f"draw {i + 1}" if seed is None else f"seed {seed}", a, b))
    return draws


def at_epochs(runs, epochs):
    """{epoch: [test error of each run at that epoch, NaN where it has none]}."""
    curves = [dict(zip(*(a.tolist() for a in read_test_error(run)))) for run in runs]
    return {e: [c.get(e, np.nan) for c in curves] for e in epochs}


def mean_sd(values):
    """'m ± s' over the finite values (the sample standard deviation), or '–'."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return "–"
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v[0]:.2f}"


def verdict(d):
    """Whether the per-draw differences d (B − A) say more than the spread over draws."""
    d = np.asarray(d, float)
    if not np.isfinite(d).all() or len(d) < 2:
        return "not every draw has this epoch"
    same_sign = (d > 0).all() or (d < 0).all()
    beyond = abs(d.mean()) > d.std(ddof=1)
    if same_sign and beyond:
        return f"{'B' if d.mean() < 0 else 'A'} lower on every draw, by more than the spread"
    if same_sign:
        return f"{'B' if d.mean() < 0 else 'A'} lower on every draw, by less than the spread"
    return "the sign changes between draws"


def draw_table(name_a, runs_a, name_b, runs_b, epochs=(10, 20, 50)):
    """The Markdown table of the comparison, one row per epoch."""
    seeds = [seed for seed, _, _ in paired(name_a, runs_a, name_b, runs_b)]
    a, b = at_epochs(runs_a, epochs), at_epochs(runs_b, epochs)
    n = len(runs_a)
    head = ("| epoch | " + " | ".join(f"{seed}: {name_a} / {name_b} / B − A" for seed in seeds) +
            f" | {name_a} (A), mean ± sd | {name_b} (B), mean ± sd | B − A, mean ± sd | over the draws |")
    lines = [head, "|" + "---|" * (n + 5)]
    for e in epochs:
        d = np.subtract(b[e], a[e])
        cells = [f"{x:.2f} / {y:.2f} / {z:+.2f}" if np.isfinite(z) else "–" for x, y, z in zip(a[e], b[e], d)]
        lines.append(f"| {e} | " + " | ".join(cells) +
                     f" | {mean_sd(a[e])} | {mean_sd(b[e])} | {mean_sd(d)} | {verdict(d)} |")
    return "\n".join(lines)


def difference_figure(name_a, runs_a, name_b, runs_b):
    """B − A in test error points per epoch, one line per draw, with the level line at 0, over
    the epochs that every run has (equal epochs on every draw)."""
    draws = paired(name_a, runs_a, name_b, runs_b)
    curves = [(seed, read_test_error(a), read_test_error(b)) for seed, a, b in draws]
    last = min(int(e.max(initial=0)) for _, *pair in curves for e, _ in pair)
    if last == 0:
        raise ValueError("a run has no epoch with a test error")
    series = {}
    for seed, (ea, ya), (eb, yb) in curves:
        shared, ia, ib = np.intersect1d(ea[ea <= last], eb[eb <= last], return_indices=True)
        series[seed.upper()] = (shared, yb[ib] - ya[ia])
    series["LEVEL"] = ([1, last], [0, 0])
    return plots.line_plot(series, size=(300, 640), title=f"{name_b} - {name_a}, TEST ERROR POINTS, PER DRAW".upper(),
                           xlabel="EPOCH", ylabel=f"{name_b} - {name_a} (BELOW 0: {name_b} LOWER)".upper())
