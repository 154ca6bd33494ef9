"""The figures: a run's analogues of the paper's Fig. 2-4, drawn from its model, and Fig. 5 and
the numbers quoted from learning curves, drawn from run folders' metrics.csv.

train.py calls semi_supervised_figures, avae_figures or potential_figures (kinds.KINDS) every 10
epochs and at the end, with the model in evaluation mode; they write RUN/figures/*.png. From the
command line:

    python3 -m figures fig5 OUT.png NAME=RUN_DIR ...       # Fig. 5 with the authors' numbers
    python3 -m figures table NAME=RUN_DIR ... [EPOCH ...]  # the numbers of each learning curve
    python3 -m figures gap NAME=RUN_DIR NAME=RUN_DIR       # two learning curves compared
    python3 -m figures curves OUT.png COLUMN[,COLUMN] NAME=RUN_DIR ...   # metrics.csv columns per epoch
    python3 -m figures kl-units OUT.png NAME=RUN_DIR ...   # the KL of each unit of a per epoch
    python3 -m figures screen SCREEN.csv                   # the table of a screen of options
    python3 -m figures draws [OUT.png] A=RUN,RUN B=RUN,RUN [EPOCH ...]   # two settings over label draws

The drawing itself (grids, scatter, line and bar plots) is plots.py; png.py writes the PNG files.
"""
import csv
import io
import json
import os
import sys

import numpy as np

import autodiff as ad
import datasets
from figures import plots
from figures import png

# ---------------------------------------------------------------------------------------------
# A run's figures: the analogues of the paper's Fig. 2-4 (and its learning curve)
# ---------------------------------------------------------------------------------------------

def to_images(x, data):
    """Rows of x back to images in [0, 1] for display (MNIST: the 444 kept columns into 28×28)."""
    x = np.asarray(x, dtype=np.float32)
    if data.columns is not None:
        full = np.zeros((len(x), int(np.prod(data.image_shape))), np.float32)
        full[:, data.columns] = x
        x = full
    lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    if data.likelihood == "gaussian":  # standardised pixels: stretch each image to [0, 1]
        x = (x - lo) / np.maximum(hi - lo, 1e-8)
    return np.clip(x, 0, 1).reshape(len(x), *data.image_shape)


def pca2(v):
    """The first two principal components of the rows of v (N, D); a second column of zeros
    where there is only one (D = 1, or a single row)."""
    v = v - v.mean(axis=0)
    _, _, vt = np.linalg.svd(v, full_matrices=False)
    p = v @ vt[:2].T                                                   # (N, min(2, N, D))
    return np.concatenate([p, np.zeros((len(p), 2 - p.shape[1]))], axis=1) if p.shape[1] < 2 else p


def test_error_curve(folder, rows):
    """test_error.png: the test error of both classifiers per epoch, from metrics.csv's rows."""
    curve = {}
    for key, name in (("test_error_pct", "Q(Y|A,X)"), ("test_error_bayes_pct", "BAYES")):
        points = [(int(r["epoch"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        if points:
            curve[name] = tuple(np.array(c) for c in zip(*points))
    if curve:  # from 0, so that the noise of an epoch does not look like a cliff
        top = max(float(np.nanmax(y)) for _, y in curve.values())
        png.write_png(folder / "test_error.png", plots.line_plot(
            curve, ylim=(0.0, 1.05 * top if np.isfinite(top) and top > 0 else 1.0), title="TEST ERROR",
            xlabel="EPOCH", ylabel="TEST ERROR %"))


def semi_supervised_figures(model, data, config, folder, rows):
    """The learning curve; on the half-moons the decision regions with the labeled points marked
    (Fig. 2c), on images samples per class (Fig. 3b) and analogies (Fig. 3a); a 2-D PCA of a
    coloured by class (Fig. 2d, 4b) and the KL of each unit of a and z (Fig. 4a)."""
    test_error_curve(folder, rows)
    x_test = data.x_test[:2000]
    if data.image_shape is None:  # moons
        lo, hi = data.x_test.min(axis=0) - 0.5, data.x_test.max(axis=0) + 0.5
        gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 150), np.linspace(hi[1], lo[1], 150))
        grid = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.float32)
        regions = ad.to_numpy(model.predict(ad.xp.asarray(grid))).reshape(150, 150)
        points = np.concatenate([x_test, data.x_labeled])
        labels = np.concatenate([data.y_test[:2000], data.y_labeled])
        marked = np.arange(len(x_test), len(points))
        png.write_png(folder / "decision_regions.png", plots.scatter(
            points, labels, background=regions, extent=(lo[0], hi[0], lo[1], hi[1]), marked=marked,
            title="DECISION REGIONS", caption="DOTS: TEST POINTS, COLOUR = TRUE CLASS. BIG: THE LABELED ONES. "
            "BACKGROUND: PREDICTED CLASS"))
    else:
        K, n = data.n_classes, 10
        y = np.repeat(np.arange(K), n)
        z = ad.rng.normal((K * n, model.z_dim), model.dtype)
        x = ad.to_numpy(model.generate(ad.xp.asarray(y), z))
        png.write_png(folder / "samples.png", plots.image_grid(to_images(x, data), K, n))
        n = min(n, len(x_test))  # analogies of the first 10 test images, or of all there are
        _, z = model.encode(ad.xp.asarray(x_test[:n]))
        z = ad.xp.repeat(z, K, axis=0)
        x = ad.to_numpy(model.generate(ad.xp.tile(ad.xp.arange(K), n), z))
        originals = to_images(x_test[:n], data)
        grid = np.concatenate([originals[:, None], to_images(x, data).reshape(n, K, *originals.shape[1:])], 1)
        png.write_png(folder / "analogies.png", plots.image_grid(grid.reshape(-1, *originals.shape[1:]), n, K + 1))
    a, _ = model.encode(ad.xp.asarray(x_test))
    if a is not None:  # M2 has no a
        png.write_png(folder / "pca_a.png", plots.scatter(
            pca2(ad.to_numpy(a)), data.y_test[:2000], title="PCA OF A",
            caption="MEANS OF Q(A|X) ON TEST IMAGES, FIRST TWO PRINCIPAL COMPONENTS. COLOUR = TRUE CLASS"))
    kl_a, kl_z = model.kl_per_unit(ad.xp.asarray(x_test[:500]))
    panels = [plots.bar_plot(ad.to_numpy(kl_z), sort=True, title="KL PER UNIT OF Z, NATS, SORTED")]
    if kl_a is not None:
        panels.insert(0, plots.bar_plot(ad.to_numpy(kl_a), sort=True, title="KL PER UNIT OF A, NATS, SORTED"))
    png.write_png(folder / "kl_per_unit.png", plots.stack_vertical(panels))


def avae_figures(model, data, config, folder, rows):
    """Means of p(x|z) with z ~ N(0, I): on images a grid of them, on the half-moons their
    histogram beside the test points'."""
    test_error_curve(folder, rows)
    if data.image_shape is None:  # moons
        x = ad.to_numpy(model.generate(ad.rng.normal((2000, model.z_dim), model.dtype)))
        lo, hi = data.x_test.min(axis=0) - 0.5, data.x_test.max(axis=0) + 0.5
        extent = (lo[0], hi[0], lo[1], hi[1])
        png.write_png(folder / "samples.png", plots.side_by_side(
            [plots.density(plots.histogram2d(data.x_test[:2000], extent, 200), title="TEST POINTS"),
             plots.density(plots.histogram2d(x, extent, 200), title="MEANS OF P(X|Z)")]))
        return
    x = ad.to_numpy(model.generate(ad.rng.normal((100, model.z_dim), model.dtype)))
    png.write_png(folder / "samples.png", plots.image_grid(to_images(x, data), 10, 10))


def potential_figures(model, data, config, folder, rows):
    """exp(−U_k) beside a histogram of samples from q(z) (Fig. 2a, 2b)."""
    k, box = config["potential"], 4.0
    g = np.linspace(-box, box, 200)
    z1, z2 = np.meshgrid(g, g[::-1])
    true = np.exp(-datasets.POTENTIALS[k](z1, z2, ops=datasets.NUMPY_OPS))
    samples = ad.to_numpy(model.sample(20000))
    hist = plots.histogram2d(samples[:, [0, 1]], (-box, box, -box, box), 200)
    png.write_png(folder / "potential.png", plots.side_by_side(
        [plots.density(true, title=f"EXP(-U{k})"), plots.density(hist, title="SAMPLES OF Q(Z)")]))


# ---------------------------------------------------------------------------------------------
# Fig. 5 from run folders: python3 -m figures fig5 OUT.png NAME=RUN_DIR ...
# ---------------------------------------------------------------------------------------------

def _series(pairs):
    """([epochs], [values]) from [(epoch, value), ...]."""
    return [e for e, _ in pairs], [v for _, v in pairs]


# The authors' own numbers (docs/authors-code.md): the test error (%) that the log of their
# 10-sample ADGM run records (100 samples of a at test time), and their output/train.png's 1-sample
# curves, read off by pixel position (grid lines every 1 %, the epoch tick labels; about ±0.2 %;
# a point hidden under another curve or above 19 % is left out).
AUTHORS_FIG5 = {
    "THEIRS: ADGM 10 MC, LOG": ([10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 150, 200, 300, 500, 1000],
                                [17.3, 14.8, 12.7, 14.0, 14.6, 13.3, 11.9, 7.9, 6.6, 5.4, 2.7, 1.6, 1.6, 1.2, 1.2]),
    "THEIRS: ADGM 1 MC, FIG.": _series([
        (20, 17.4), (30, 14.8), (40, 13.1), (50, 11.3), (60, 9.8), (70, 10.6), (80, 9.4),
        (90, 10.1), (100, 8.9), (110, 8.2), (120, 7.5), (130, 6.8), (140, 6.6), (150, 6.5),
        (160, 6.1), (170, 6.2), (180, 6.1), (190, 5.6), (200, 5.2), (250, 4.7), (300, 4.2),
        (350, 4.1), (400, 3.6), (450, 3.5), (500, 3.4), (550, 3.4), (600, 3.1), (650, 3.1),
        (700, 3.0), (750, 3.1), (800, 3.0), (850, 3.0), (900, 2.8), (950, 2.8), (1000, 2.8),
        (1050, 2.8), (1100, 2.8), (1150, 2.8), (1200, 2.7), (1250, 2.6)]),
    "THEIRS: M2, FIG.": _series([
        (50, 18.3), (60, 17.1), (70, 16.0), (80, 15.5), (90, 14.4), (100, 13.9), (110, 13.5),
        (120, 12.9), (130, 12.4), (140, 13.1), (150, 12.0), (160, 11.5), (170, 11.2), (180, 10.7),
        (190, 10.3), (200, 9.7), (250, 9.4), (350, 8.8), (400, 8.5), (450, 8.4), (550, 8.2),
        (600, 8.1), (650, 8.0), (700, 7.8), (750, 8.0), (800, 7.8), (850, 8.1), (900, 7.8),
        (950, 7.8), (1000, 7.7), (1050, 7.7), (1100, 7.6), (1150, 7.7), (1200, 7.8), (1250, 7.7)]),
    "THEIRS: ADGM DET. A, FIG.": _series([
        (30, 18.8), (40, 18.2), (50, 17.4), (60, 16.1), (70, 15.1), (80, 14.4), (90, 13.2),
        (100, 12.8), (110, 12.1), (120, 11.8), (130, 11.1), (140, 11.8), (150, 11.3), (160, 11.3),
        (170, 10.9), (180, 10.9), (190, 10.5), (200, 9.9), (250, 8.8), (300, 9.0), (350, 8.9),
        (400, 8.3), (450, 8.2), (500, 8.2), (550, 8.0), (600, 7.7), (650, 7.8), (700, 7.7),
        (750, 7.8), (800, 7.7), (850, 7.6), (900, 7.4), (950, 7.5), (1000, 7.4), (1050, 7.6),
        (1100, 7.4), (1150, 7.3), (1200, 7.3), (1250, 7.2)]),
}


def read_rows(run):
    """A run folder's metrics.csv (or the file itself) as one dict per epoch, in epoch order (the
    last row of an epoch logged twice wins), each cell a number, empty cells left out: the one
    reader of metrics.csv under the figures. A last line without its line end, cut short (a copy
    taken while the file was written), is left out: train.py ends every line it writes."""
    path = os.path.join(run, "metrics.csv") if os.path.isdir(run) else run
    with open(path, newline="") as f:
        text = f.read()
    try:
        rows = [{k: int(v) if k == "epoch" else float(v) for k, v in r.items() if k and v not in (None, "")}
                for r in csv.DictReader(io.StringIO(text[:text.rfind("\n") + 1]))]
    except (ValueError, csv.Error) as e:
        raise ValueError(f"{path}: {e}") from None
    if any("epoch" not in r for r in rows):
        raise ValueError(f"{path}: a row without an epoch")
    return sorted({r["epoch"]: r for r in rows}.values(), key=lambda r: r["epoch"])


def column(rows, name):
    """(epochs, values) of one column over the rows that hold it."""
    held = [r for r in rows if name in r]
    return np.array([r["epoch"] for r in held], dtype=int), np.array([r[name] for r in held], dtype=float)


def learning_curve(run):
    """The epochs with a test error: (epochs, test error %, the Bayes classifier's error % (NaN where
    not logged), seconds of each epoch)."""
    rows = [r for r in read_rows(run) if "test_error_pct" in r]
    get = lambda name: np.array([r.get(name, np.nan) for r in rows], dtype=float)  # noqa: E731
    return (np.array([r["epoch"] for r in rows], dtype=int), get("test_error_pct"), get("test_error_bayes_pct"),
            get("seconds"))


def read_test_error(run):
    """(epochs, test error in %) from a run folder's metrics.csv (or the file itself)."""
    return learning_curve(run)[:2]


SUMMARY_EPOCHS = (10, 20, 50, 100, 200)


def summary_header(at=SUMMARY_EPOCHS):
    """The head of curve_summary's rows."""
    return (f"| run | epochs | test error at epoch {' / '.join(map(str, at))} / last | best | Bayes classifier, last | "
            "first below 20% / 15% / 10% / 5%, epoch (wall minutes) |\n|---|---|---|---|---|---|")


def curve_summary(name, run, at=SUMMARY_EPOCHS, below=(20, 15, 10, 5)):
    """One Markdown row of the numbers README quotes from a learning curve: the test error at the
    epochs `at` and at the last, the best and its epoch, the Bayes classifier's last error, and
    the first epoch below each of `below` percent with the wall minutes to it (the sum of the
    epochs' `seconds`). '–' where the run has not got there."""
    epochs, error, bayes, seconds = learning_curve(run)
    if len(epochs) == 0:
        raise ValueError(f"{run}: no epoch with a test error")
    minutes = np.cumsum(np.nan_to_num(seconds)) / 60
    value = {e: v for e, v in zip(epochs.tolist(), error.tolist())}
    cells = [f"{value[e]:.1f}" if e in value else "–" for e in at] + [f"{error[-1]:.1f}%"]
    best = int(np.argmin(error))
    first = []
    for level in below:
        hit = np.flatnonzero(error < level)
        first.append(f"{epochs[hit[0]]} ({minutes[hit[0]]:.0f})" if len(hit) else "–")
    return (f"| {name} | {epochs[-1]} | {' / '.join(cells)} | {error[best]:.1f}% (epoch {epochs[best]}) | "
            f"{bayes[-1]:.1f}% | {' / '.join(first)} |")


def curve_gap(name_a, run_a, name_b, run_b, first=None, last=None):
    """One line comparing two learning curves over the epochs both logged (from `first` to `last`):
    at how many A's test error is the lower, level (equal to 0.01 %, one test image in 10 000) or
    the higher, the mean of B - A in points, and the mean and largest |B - A|."""
    (ea, ya), (eb, yb) = read_test_error(run_a), read_test_error(run_b)
    shared = np.intersect1d(ea, eb)
    shared = shared[(shared >= (first or 1)) & (shared <= (last or shared.max(initial=0)))]
    if len(shared) == 0:
        raise ValueError(f"{run_a} and {run_b}: no epoch in common in that range")
    a, b = ya[np.searchsorted(ea, shared)], yb[np.searchsorted(eb, shared)]
    d = np.round(b - a, 2)
    return (f"{name_a} against {name_b}, epochs {shared[0]}-{shared[-1]} ({len(shared)} epochs): "
            f"{name_a} lower at {(d > 0).sum()}, level at {(d == 0).sum()}, higher at {(d < 0).sum()}; "
            f"mean {name_b} - {name_a} {d.mean():.2f} points, mean |difference| {np.abs(d).mean():.2f}, "
            f"at most {np.abs(d).max():.2f}")


def figure5(runs, max_epoch=None):
    """The analogue of Fig. 5: test error per epoch on a log scale for runs = {name: folder},
    with the authors' numbers up to max_epoch (default: the longest run, at least 200) as markers."""
    series = {name: read_test_error(run) for name, run in runs.items()}
    empty = next((runs[name] for name, (x, _) in series.items() if len(x) == 0), None)
    if empty:
        raise ValueError(f"{empty}: no epoch with a test error")
    last = max_epoch or max([200] + [int(x.max()) for x, _ in series.values() if len(x)])
    points = {name: (np.array(x)[np.array(x) <= last], np.array(y)[np.array(x) <= last])
              for name, (x, y) in AUTHORS_FIG5.items()}
    return plots.line_plot(series, size=(360, 640), logy=True, title=runs_title(runs, "TEST ERROR %"),
                           points=points, xlabel="EPOCH", ylabel="TEST ERROR % (LOG SCALE)")


def runs_title(runs, what):
    """'MNIST, 100 LABELS: what' when every run folder's config.json names the same data set and
    labels, else `what` alone."""
    setups = set()
    for run in runs.values():
        try:
            with open(os.path.join(run, "config.json")) as f:
                config = json.load(f)
            setups.add((str(config["dataset"]).upper(), int(config.get("labels") or 0)))
        except (OSError, ValueError, KeyError, TypeError):
            return what
    if len(setups) != 1:
        return what
    (dataset, labels), = setups
    return f"{dataset}, {labels} LABELS: {what}" if labels else f"{dataset}: {what}"


# ---------------------------------------------------------------------------------------------
# More from run folders: any logged column per epoch, the per-unit KL of a, the screen's table
# ---------------------------------------------------------------------------------------------

def read_columns(run, names):
    """{name: (epochs, values)} of metrics.csv's columns `names`, each over the rows that hold it."""
    rows = read_rows(run)
    out = {name: column(rows, name) for name in names}
    missing = [name for name, (epochs, _) in out.items() if len(epochs) == 0]
    if missing:
        raise ValueError(f"{run} has no column {missing[0]}")
    return out


def curves(runs, columns, logy=False, title=None, first=1):
    """Columns of metrics.csv per epoch for runs = {name: folder}, one line per run and column
    (e.g. test_error_pct beside train_error_pct), from epoch `first` on."""
    series = {}
    for name, run in runs.items():
        for column, (x, y) in read_columns(run, columns).items():
            if not (x >= first).any():
                raise ValueError(f"{run} has no {column} from epoch {first} on (its last is {x.max()})")
            series[f"{name} {column.replace('_pct', ' %').replace('_', ' ')}".upper()] = (x[x >= first], y[x >= first])
    return plots.line_plot(series, size=(360, 640), logy=logy, title=title or runs_title(runs, "PER EPOCH"),
                           xlabel="EPOCH", ylabel=", ".join(c.replace("_pct", " %").replace("_", " ") for c in columns))


def kl_units(runs, top=0.5):
    """The per-unit KL of a (kl_a_1, ...) against the epoch for runs = {name: folder}: one heat map
    per run, units down (sorted by their KL at the last epoch), epochs across, brightest = `top`
    nats or more, so that a unit in use stands out and a collapsed a is dark."""
    panels = []
    for name, run in runs.items():
        rows = [r for r in read_rows(run) if "kl_a_1" in r]
        if not rows:
            raise ValueError(f"{run} has no per-unit KL of a (kl_a_1, ...)")
        units = sorted((k for k in rows[0] if k.startswith("kl_a_")), key=lambda k: int(k[5:]))
        kl = np.array([[r.get(k, np.nan) for r in rows] for k in units])            # (units, epochs)
        kl = kl[np.argsort(-kl[:, -1])]
        active = int((kl[:, -1] > 0.1).sum())
        big = np.repeat(np.repeat(kl, 3, axis=0), max(1, 600 // kl.shape[1]), axis=1)
        img = plots.density(big, top=top, title=f"{name}: KL(A) PER UNIT, EPOCHS {rows[0]['epoch']}-"
                            f"{rows[-1]['epoch']}, {active} > 0.1 NATS".upper())
        panels.append(img)
    return plots.stack_vertical(panels)


SCREEN_KEYS = ("test_error_pct", "kl_a", "kl_z", "entropy_qy", "seconds")


def screen_table(path, at=10):
    """The screen's table from its CSV (one row per run and epoch: run, command, epoch and
    SCREEN_KEYS): per run, the test error at epoch `at` and its best, KL(a) at epoch 1 and `at`,
    KL(z) and the entropy of q(y|a,x) at `at`, the median seconds of an epoch. A run that stopped
    before `at` is shown at its last epoch, and its name says which."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    missing = [k for k in ("run", "command", "epoch", *SCREEN_KEYS) if k not in (reader.fieldnames or ())]
    if missing:
        raise ValueError(f"{path} is not a screen's CSV: it has no column {', '.join(missing)}")
    lines = [f"| run | command | test error % at {at} (best) | KL(a) nats, epoch 1 → {at} | KL(z) at {at} | "
             f"H[q(y\\|a,x)] at {at} | s/epoch |", "|---|---|---|---|---|---|---|"]  # \\| : Markdown's | in a cell
    for run in dict.fromkeys(r["run"] for r in rows):
        mine = [r for r in rows if r["run"] == run and int(r["epoch"]) <= at]
        if not mine:  # no epoch up to `at`
            continue
        last, first = mine[-1], mine[0]
        v = lambda r, k: float(r[k])  # noqa: E731
        best = min(v(r, "test_error_pct") for r in mine)
        short = f" (stopped at epoch {last['epoch']})" if int(last["epoch"]) < at else ""
        lines.append(f"| {run}{short} | `{first['command']}` | {v(last, 'test_error_pct'):.1f} ({best:.1f}) | "
                     f"{v(first, 'kl_a'):.2f} → {v(last, 'kl_a'):.2f} | {v(last, 'kl_z'):.1f} | "
                     f"{v(last, 'entropy_qy'):.3f} | {np.median([v(r, 'seconds') for r in mine]):.0f} |")
    return "\n".join(lines)


COMMANDS = {  # each command's arguments, and what it gives
    "fig5": ("OUT.png NAME=RUN_DIR [NAME=RUN_DIR ...]", ""),
    "table": ("NAME=RUN_DIR [NAME=RUN_DIR ...] [EPOCH ...]", "README's rows of each curve"),
    "gap": ("NAME=RUN_DIR NAME=RUN_DIR [FIRST_EPOCH LAST_EPOCH]", "two curves compared"),
    "curves": ("OUT.png COLUMN[,COLUMN] NAME=RUN_DIR ... [--from EPOCH]", "metrics.csv columns per epoch"),
    "kl-units": ("OUT.png NAME=RUN_DIR ...", "the KL of each unit of a per epoch"),
    "screen": ("SCREEN.csv", "the table of a screen of options"),
    "draws": ("[OUT.png] A=RUN,RUN,... B=RUN,RUN,... [EPOCH ...]", "two settings over label draws"),
}
USAGE = "\n".join(f"{'usage:' if i == 0 else '':6} python3 -m figures {command} {args}" + (f"   ({what})" if what else "")
                  for i, (command, (args, what)) in enumerate(COMMANDS.items()))


class Usage(Exception):
    """A command line that names no command, or not its arguments: what is wrong, in one line."""


def main(argv):
    """python3 -m figures COMMAND ...: 0 when done, 2 with one line on a mistake."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__.split("\n\n")[0] + "\n\n" + USAGE)
        return 0 if argv else 2
    try:
        if argv[0] not in COMMANDS:
            raise Usage(f"no command {argv[0]!r}: one of {', '.join(COMMANDS)} (python3 -m figures --help)")
        try:
            return _run(argv[0], argv[1:])
        except Usage as e:
            raise Usage(f"{e}; usage: python3 -m figures {argv[0]} {COMMANDS[argv[0]][0]}") from None
    except BrokenPipeError:  # the reader stopped (| head): what it read is all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        print(f"error: {e.filename}: {e.strerror}" if e.filename and e.strerror else f"error: {e}", file=sys.stderr)
    except (Usage, KeyError, ValueError, csv.Error) as e:
        print(f"error: {e}", file=sys.stderr)
    return 2


def _runs_and_epochs(args, epochs=True):
    """The NAME=RUN_DIR arguments as (name, run) pairs, and the epochs after them where the
    command takes epochs."""
    first_other = next((i for i, a in enumerate(args) if "=" not in a), len(args))
    named, rest = args[:first_other], args[first_other:]
    if not named:
        raise Usage("give the runs first, as NAME=RUN_DIR" if args else "no NAME=RUN_DIR")
    for a in rest:
        if "=" in a:
            raise Usage(f"{a!r} comes after {rest[0]!r}: give the runs first")
        if not (epochs and a.isdigit() and int(a) > 0):
            raise Usage(f"{a!r} is not NAME=RUN_DIR{' nor an epoch' if epochs else ''}")
    # NAME=~/runs/x: the shell leaves a ~ after '=' as it is; it is the home folder here
    return [(name, ",".join(os.path.expanduser(r) for r in run.split(","))) for name, run in
            (a.split("=", 1) for a in named)], tuple(map(int, rest))


def _png(path):
    if not path.endswith(".png"):
        raise Usage(f"{path!r}: the figure is written as a PNG file, OUT.png")
    return path


def _run(command, args):
    if command in ("curves", "kl-units", "screen"):
        return _more(command, args)
    if command == "draws":
        return _draws(args)
    out, args = (_png(args[0]) if args else None, args[1:]) if command == "fig5" else (None, args)
    runs, epochs = _runs_and_epochs(args, epochs=command != "fig5")
    if command == "gap":
        if len(runs) != 2 or len(epochs) not in (0, 2):
            raise Usage(f"two runs and none or two epochs, not {len(runs)} and {len(epochs)}")
        print(curve_gap(*runs[0], *runs[1], *epochs))
    elif command == "fig5":
        png.write_png(out, figure5(dict(runs)))
        print(f"wrote {out}")
    else:
        at = epochs or SUMMARY_EPOCHS
        print("\n".join([summary_header(at)] + [curve_summary(name, run, at) for name, run in runs]))
    return 0


def _draws(args):
    """python3 -m figures draws [OUT.png] A=RUN,RUN,... B=RUN,RUN,... [EPOCH ...] (figures/draws.py)."""
    from figures.draws import difference_figure, draw_table
    out, args = (_png(args[0]), args[1:]) if args and "=" not in args[0] and not args[0].isdigit() else (None, args)
    runs, epochs = _runs_and_epochs(args)
    if len(runs) != 2:
        raise Usage(f"two settings, A=RUN,RUN,... and B=RUN,RUN,..., not {len(runs)}")
    (a, runs_a), (b, runs_b) = ((name, runs.split(",")) for name, runs in runs)
    print(draw_table(a, runs_a, b, runs_b, epochs or (10, 20, 50)))
    if out:
        png.write_png(out, difference_figure(a, runs_a, b, runs_b))
        print(f"wrote {out}")
    return 0


def _more(command, args):
    """The commands curves, kl-units and screen."""
    if command == "screen":
        if len(args) != 1:
            raise Usage(f"one SCREEN.csv, not {len(args)} arguments")
        print(screen_table(args[0]))
        return 0
    first = 1
    if command == "curves" and "--from" in args:
        if args.index("--from") != len(args) - 2 or not args[-1].isdigit():
            raise Usage("--from EPOCH comes last")
        args, first = args[:-2], int(args[-1])
    if not args:
        raise Usage("no OUT.png")
    out, rest = _png(args[0]), args[1:]
    columns = None
    if command == "curves":
        if not rest or "=" in rest[0]:
            raise Usage("no COLUMN[,COLUMN] before the runs")
        columns, rest = rest[0].split(","), rest[1:]
    runs = dict(_runs_and_epochs(rest, epochs=False)[0])
    image = kl_units(runs) if command == "kl-units" else curves(runs, columns, first=first)
    png.write_png(out, image)
    print(f"wrote {out}")
    return 0
