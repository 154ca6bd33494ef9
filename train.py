"""Train, evaluate, resume and draw the models of adgm.py from one command.

    python train.py --dataset mnist --labels 100            # the paper's MNIST setup (ADGM)
    python train.py --dataset moons --model m2 --epochs 10
    python train.py --resume --out runs/mnist-adgm-100-0    # continue an interrupted run
    python train.py --evaluate runs/mnist-adgm-100-0 --iw-samples 100

A run folder holds config.json, metrics.csv (one row per epoch), checkpoint.npz (parameters,
Adam and random-generator state: the initial state before epoch 1, then rewritten atomically
after every epoch) and figures/*.png (redrawn every 10 epochs and at the end). Ctrl-C, SIGTERM
and SIGHUP stop a run at once, wherever it is; --resume continues from the last saved epoch.
"""
import argparse
import contextlib
import csv
import io
import json
import math
import os
import pathlib
import signal
import sys
import tempfile
import time
import zipfile

if __name__ == "__main__":  # until main() takes over, a signal during the imports ends the program quietly
    def _early_exit(signum, frame):
        print(f"interrupted ({signal.Signals(signum).name}) before anything started", file=sys.stderr)
        sys.exit(128 + signum)
    for _signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(_signum, _early_exit)

import numpy as np

import adgm
import autodiff as ad
import datasets

# ---------------------------------------------------------------------------------------------
# Configuration: the paper's defaults per dataset (../shared/PAPER-NOTES.md §4, §6)
# ---------------------------------------------------------------------------------------------

DEFAULTS = {
    "mnist": dict(model="adgm", labels=100, epochs=1000, batch_size=100, hidden=[500, 500], latent=[100, 100],
                  lr=3e-4, lr_decay=0.75, lr_decay_every=200, beta=0.1, eval_every=1),
    "svhn": dict(model="sdgm", labels=1000, epochs=1000, batch_size=1000, hidden=[500, 500], latent=[100, 100],
                 lr=3e-4, lr_decay=0.75, lr_decay_every=200, beta=0.1, eval_every=1),
    "norb": dict(model="sdgm", labels=1000, epochs=1000, batch_size=100, hidden=[500, 500], latent=[100, 100],
                 lr=3e-4, lr_decay=0.75, lr_decay_every=200, beta=0.1, eval_every=1),
    "moons": dict(model="adgm", labels=6, epochs=10, batch_size=100, hidden=[100, 100], latent=[10, 10],
                  lr=1e-3, lr_decay=1.0, lr_decay_every=0, beta=0.1, eval_every=1),
    "potential": dict(model="avae", labels=0, epochs=50, batch_size=100, hidden=[20, 20, 20], latent=[4, 2],
                      lr=1e-3, lr_decay=1.0, lr_decay_every=0, beta=0.0, eval_every=10),
}
# The released ADGM code's settings (../shared/AUTHORS-CODE.md), the defaults of the model that
# reproduces it; every one is an option, so that M2 or the ADGM can be run with them too.
AUTHORS = dict(beta=2.0, loss_average="rows", clip_value=1.0, weight_prior=1.0, pixels="all")
MODEL_DEFAULTS = {"adgm-authors": AUTHORS, "adgm-authors-det": AUTHORS}
# Every other model's values of those options (also what a run folder from before they existed used).
COMMON = dict(loss_average="halves", clip_value=0.0, weight_prior=0.0, pixels="filtered", authors_order=False,
              moons_setup="ours", label_draw="ours", temperature_a=1.0)
MODELS = ["adgm", "sdgm", "m2", "adgm-det", "adgm-authors", "adgm-authors-det", "avae", "gauss"]
# Options that may change when a run is resumed or re-evaluated; all others must match.
VOLATILE = {"no_verify", "epochs", "device", "resume", "evaluate", "eval_every", "eval_samples", "iw_samples", "eval_images",
            "data_dir", "out"}


# The range of every numeric option; its type (and choices) come from the parser, and a float must
# also be finite. Checked before anything is loaded or created, and on every stored configuration.
# A new numeric option needs an entry here (tests/test_faults.py checks that each has one).

def at_least(low):
    return lambda v: None if v >= low else f"must be at least {low}"


def positive(v):
    return None if v > 0 else "must be positive"


def off_or_positive(v):
    return None if v >= 0 else "must be 0 (off) or positive"


RULES = {
    "labels": at_least(0), "epochs": at_least(1), "batch_size": at_least(1), "samples": at_least(1),
    "beta": at_least(0), "lr": positive, "lr_decay": positive, "lr_decay_every": off_or_positive,
    "clip": off_or_positive, "clip_value": off_or_positive, "weight_prior": off_or_positive,
    "hidden": at_least(1), "latent": at_least(1), "warmup": off_or_positive, "iw_samples": off_or_positive,
    "temperature_a": lambda v: None if 0 <= v <= 1 else "must be from 0 to 1",
    "eval_images": at_least(0), "eval_every": at_least(1), "eval_samples": at_least(1), "subset": at_least(0),
    "seed": lambda v: None if 0 <= v < 2 ** 32 else "must be from 0 to 2**32 - 1",
}
NOT_CONFIG = ("resume", "evaluate", "out", "given", "help")  # options that are not part of a run


def flags(names):
    """Configuration keys as the options a user types: 'batch_size' -> '--batch-size'."""
    return ", ".join("--" + name.replace("_", "-") for name in sorted(names))


class UserError(Exception):
    """A mistake in the command line or the files it names: reported in one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other user mistake
        raise UserError(f"{message} (see --help)")


def problem_with(action, value):
    """What is wrong with `value` for the option `action` (its type, choices and RULES), or None."""
    if action.nargs == 0:  # a flag
        return None if isinstance(value, bool) else "must be true or false"
    if action.nargs is None:
        return _one_value(action, value)
    count = action.nargs if isinstance(action.nargs, int) else None  # or '+': one or more
    if not isinstance(value, list) or not value or count not in (None, len(value)):
        return f"must be {count or 'one or more'} numbers"
    return next(filter(None, (_one_value(action, v) for v in value)), None)


def _one_value(action, value):
    if action.type in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float) if action.type is float else int):
            return f"must be {'an integer' if action.type is int else 'a number'}"
        if not math.isfinite(value):
            return "must be a finite number"
    elif not (isinstance(value, str) or value is None and action.default is None):
        return "must be a string"
    if action.choices is not None and value not in action.choices:
        return f"must be one of {', '.join(map(str, action.choices))}"
    return RULES[action.dest](value) if action.dest in RULES else None


def check_options(config):
    """The first option of `config` whose value is wrong, as '--lr nan: must be positive'; or None."""
    for action in build_parser()._actions:
        if action.dest in config and action.dest not in NOT_CONFIG:
            value = config[action.dest]
            problem = problem_with(action, value)
            if problem:
                shown = " ".join(map(str, value)) if isinstance(value, list) else value
                return f"{flags([action.dest])} {shown}: {problem}"
    return None


def default_text(key):
    """The defaults of one option per dataset (and model), for --help: 'default 0.0003 on mnist,
    svhn, norb; 0.001 on moons, potential'."""
    def show(v):
        return " ".join(map(str, v)) if isinstance(v, list) else str(v)
    def grouped(table, word):
        groups = {}
        for name, values in table.items():
            if key in values:
                groups.setdefault(show(values[key]), []).append(name)
        return [f"{v} {word}{', '.join(names)}" for v, names in groups.items()]
    return "default " + "; ".join(grouped(DEFAULTS, "on ") + grouped(MODEL_DEFAULTS, "with --model "))


def build_parser():
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--dataset", choices=sorted(DEFAULTS), default="mnist", help="data set (default mnist)")
    a("--model", choices=MODELS, help="adgm, sdgm, m2, adgm-det (deterministic a, Fig. 5), adgm-authors (the ADGM "
      "of the authors' released code: q(a|x) frozen, a in the classifier only; see README), adgm-authors-det (its "
      "a = mean of q(a|x)), avae (unsupervised auxiliary VAE; on 'potential' the q(a)q(z|a) model of Sec. 4.1), "
      "gauss (potential only: plain Gaussian q). Default: adgm, sdgm on svhn/norb as in Table 2, avae on potential")
    a("--labels", type=int, help="labeled examples, balanced over classes (paper: 100 MNIST, 1000 SVHN/NORB, 6 moons); "
      + default_text("labels"))
    a("--epochs", type=int, help="epochs to train in all (paper: 1000 on MNIST; 10 on moons); " + default_text("epochs"))
    a("--batch-size", type=int, help="unlabeled examples per batch; the labeled half is as large, or all labels "
      "if fewer (paper: 100+100 MNIST/NORB, 1000+1000 SVHN); " + default_text("batch_size"))
    a("--samples", type=int, default=1, help="Monte-Carlo samples of a (and z) per example (Eq. 17). Default 1; "
      "the authors' SDGM code used 5, their ADGM script 10")
    a("--beta", type=float, help="β in α = β·N/N_l, the weight of the classification term (Eq. 12; the paper: "
      "0.1 to 2); " + default_text("beta"))
    a("--lr", type=float, help="Adam learning rate (paper 3e-4); " + default_text("lr"))
    a("--lr-decay", type=float, help="multiply the learning rate by this every --lr-decay-every epochs; "
      + default_text("lr_decay"))
    a("--lr-decay-every", type=int, help="epochs between decays (0 = never); " + default_text("lr_decay_every"))
    a("--clip", type=float, default=5.0, help="clip the global gradient norm (authors' code: 5; 0 = off)")
    a("--clip-value", type=float, help="then clip each gradient element to ±this (0 = off; adgm-authors: 1, "
      "as the released ADGM code)")
    a("--weight-prior", type=float, metavar="SIGMA", help="a N(0, SIGMA²) prior on every weight matrix, divided "
      "by the rows of an epoch (0 = off; adgm-authors: 1)")
    a("--loss-average", choices=["halves", "rows"], help="the batch objective: the mean of each half, labeled and "
      "unlabeled, added (the SDGM code; default) or the mean over all rows (the released ADGM code; adgm-authors)")
    a("--pixels", choices=["filtered", "all"], help="MNIST pixels: the 444 whose std > 0.1 (the paper; default) or "
      "all 784 (the released ADGM code; adgm-authors)")
    a("--moons-setup", choices=["ours", "authors"], help="the half-moons: ours (the paper's text: noise 0.1, a "
      "separate test set, 3 labels per class drawn by --seed; default) or the authors' loader (noise 0.2, shifted "
      "by |min|, six fixed labels at the ends and middles of the moons, test set = training set)")
    a("--label-draw", choices=["ours", "authors"], help="MNIST's labeled examples: drawn by --seed (default) or "
      "the released ADGM code's draw (RandomState(123456), data_preparation/mnist.py), their 100 labels")
    a("--authors-order", action="store_true", help="diagnostic of the released code's label leak: the unlabeled "
      "set sorted by class and never reshuffled, and (adgm-authors) its S > 1 indexing of adgmssl.py:226")
    a("--hidden", type=int, nargs="+", help="hidden layer sizes of every network (paper: 500 500); "
      + default_text("hidden"))
    a("--latent", type=int, nargs=2, metavar=("A", "Z"), help="dim(a) and dim(z) (paper: 100 100); "
      + default_text("latent"))
    a("--layers", type=int, default=1, choices=[1, 2], help="stochastic layers of the avae (Eq. 19-20)")
    a("--warmup", type=int, default=0, help="epochs over which the KL temperature rises 0->1 (paper: 200 for "
      "the avae; default 0 = none)")
    a("--temperature-a", type=float, metavar="T", help="weight of a's terms, log q(a|x) − log p(a|·), in the "
      "bound: a KL temperature on a alone (Sec. 4.3's temperature, Sec. 6's stabilisers), on top of --warmup's; "
      "1 = the bound (default); adgm and sdgm only")
    a("--batchnorm", action="store_true", help="batch normalisation in every hidden layer (the avae runs of Table 1)")
    a("--x-in-pa", action="store_true", help="p(a|z,y,x) as in Eq. 5 instead of p(a|z,y) (Sec. 3's benchmark)")
    a("--potential", type=int, default=1, choices=[1, 2, 3, 4], help="which U_k for --dataset potential")
    a("--iw-samples", type=int, default=0, help="importance samples for the test log-likelihood at the end "
      "(paper: 5000; 0 = skip)")
    a("--eval-images", type=int, default=0, help="test images for the importance-weighted bound (0 = all)")
    a("--eval-every", type=int, help="epochs between test evaluations; " + default_text("eval_every"))
    a("--eval-samples", type=int, default=1, help="samples of a averaged by the classifiers at test time "
      "(the authors averaged several; 10 costs 10x the evaluation time)")
    a("--subset", type=int, default=0, help="use only the first N training and test examples (quick checks; "
      "0 = all)")
    a("--seed", type=int, default=0, help="seed of the labeled subset, initialisation and sampling")
    a("--device", choices=["auto", "cpu", "gpu"], default=os.environ.get("ADGM_DEVICE", "auto"),
      help="auto = CuPy when it sees a GPU, else NumPy")
    a("--data-dir", help="data folder (default $ADGM_DATA, else $XDG_CACHE_HOME/adgm)")
    a("--no-verify", action="store_true", help="use data files present in --data-dir even when their checksum "
      "is not the published one (format checks still apply), e.g. the format fixtures of the tests")
    a("--out", help="run folder (default runs/<dataset>-<model>-<labels>-<seed>)")
    a("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    a("--evaluate", metavar="RUN_DIR", help="load RUN_DIR's checkpoint, print its test results and redraw "
      "its figures (skipped, with a note, where RUN_DIR cannot be written)")
    return p


def parse_args(argv):
    p = build_parser()
    args = p.parse_args(argv)
    # Which options the user typed: --resume takes only those over the stored configuration.
    for action in p._actions:
        action.default = argparse.SUPPRESS
    args.given = set(vars(p.parse_args(argv)))
    defaults = {**COMMON, **DEFAULTS[args.dataset]}
    defaults.update(MODEL_DEFAULTS.get(args.model or defaults["model"], {}))
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    problem = check_options(vars(args))
    if problem:
        raise UserError(problem)
    check_args(args)
    if args.data_dir:  # stored with the run: a resumed run may start from another directory
        args.data_dir = str(datasets.resolve_data_dir(args.data_dir))
    if args.out is None:
        setup = "-authors" if "authors" in (args.moons_setup, args.label_draw) else ""
        args.out = f"runs/{args.dataset}{setup}-{args.model}-{args.labels}-{args.seed}"
    return args


def check_args(args):
    if args.dataset == "potential" and args.model not in ("avae", "gauss"):
        raise UserError("--dataset potential takes --model avae (auxiliary q) or gauss (plain Gaussian q)")
    if args.dataset != "potential" and args.model == "gauss":
        raise UserError("--model gauss is the plain Gaussian q of --dataset potential only")
    if args.model in adgm.MODELS and args.labels < 1:
        raise UserError(f"--model {args.model} is semi-supervised: it needs --labels of at least 1")
    if args.temperature_a != 1.0 and args.model not in ("adgm", "sdgm"):
        raise UserError(f"--temperature-a weighs the terms of a stochastic a and its p(a|z,y): --model {args.model} "
                        "has none; use it with --model adgm or sdgm")
    if args.x_in_pa and args.model == "sdgm":
        raise UserError("--x-in-pa does not go with --model sdgm: the SDGM generates a before x")
    if args.dataset == "potential" and args.latent[1] != 2:
        raise UserError("--dataset potential has a 2-D z: use --latent A 2")
    if args.pixels == "all" and args.dataset != "mnist" and "pixels" in args.given:
        raise UserError("--pixels chooses MNIST's pixels; the other data sets keep all of theirs")
    if args.moons_setup == "authors" and args.dataset != "moons":
        raise UserError("--moons-setup chooses the half-moons' setup: use it with --dataset moons")
    if args.label_draw == "authors" and args.dataset != "mnist":
        raise UserError("--label-draw authors is the released ADGM code's draw of MNIST labels: "
                        "use it with --dataset mnist")
    if args.moons_setup == "authors" and args.labels != 6:
        raise UserError(f"--moons-setup authors has its 6 fixed labeled points; --labels {args.labels} does not fit")


def semi_supervised(config):
    return config["model"] in adgm.MODELS


# ---------------------------------------------------------------------------------------------
# Building the data and the model
# ---------------------------------------------------------------------------------------------

def load_data(config):
    if config["dataset"] == "potential":
        return None
    datasets.VERIFY = not config.get("no_verify", False)
    labels = config["labels"] if semi_supervised(config) else 0  # the avae uses no labels
    # A log-likelihood of binary data is measured on binary test images (one fixed binarisation);
    # the classifiers see real-valued ones, as in the authors' evaluation.
    data = datasets.load(config["dataset"], labels, seed=config["seed"], data_dir=config["data_dir"],
                         binarize_test=config["model"] == "avae", pixels=config["pixels"],
                         moons_setup=config["moons_setup"], label_draw=config["label_draw"])
    if config["subset"]:
        n = config["subset"]
        data.x_unlabeled, data.y_unlabeled = data.x_unlabeled[:n], data.y_unlabeled[:n]
        data.x_test, data.y_test = data.x_test[:n], data.y_test[:n]
    return data


def build_model(config, data):
    (a_dim, z_dim), hidden = config["latent"], config["hidden"]
    if config["dataset"] == "potential":
        return adgm.PotentialModel(datasets.POTENTIALS[config["potential"]], auxiliary=config["model"] == "avae",
                                   hidden=hidden, a_dim=a_dim, z_dim=z_dim)
    D = data.x_unlabeled.shape[1]
    if config["model"] == "avae":
        return adgm.AuxiliaryVAE(D, config["layers"], hidden, a_dim, z_dim, data.likelihood, config["batchnorm"])
    extra = {"authors_indexing": config["authors_order"]} if config["model"].startswith("adgm-authors") else {}
    return adgm.MODELS[config["model"]](D, data.n_classes, hidden, a_dim, z_dim, data.likelihood,
                                        x_in_pa=config["x_in_pa"], batchnorm=config["batchnorm"], **extra)


def build_optimizer(config, model, rows_per_epoch):
    """Adam with the run's clipping and weight prior. The prior −log N(W; 0, σ²) on every weight
    matrix is divided by the rows of an epoch, as the released ADGM code divides it by n."""
    weights = [w for m in model.modules() if isinstance(m, ad.Linear) for w in m.weight if w.requires_grad]
    decay = 1.0 / (config["weight_prior"] ** 2 * rows_per_epoch) if config["weight_prior"] else 0.0
    return ad.Adam(model.parameters(), lr=config["lr"], clip=config["clip"] or None,
                   clip_value=config["clip_value"] or None, decay=decay, decayed=weights)


# ---------------------------------------------------------------------------------------------
# Checkpoints: plain arrays in an .npz (read with allow_pickle=False), written atomically
# ---------------------------------------------------------------------------------------------

def atomic_write(path, write):
    """write(file) into a temporary file beside `path`, then rename it into place; on any failure
    or signal the old file stays as it was and the temporary one is removed."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(path, model, opt, epoch, config):
    arrays = {"param/" + k: v for k, v in model.state_dict().items()}
    arrays.update({"adam/" + k: v for k, v in opt.state_dict().items()})
    arrays.update(epoch=np.asarray(epoch), rng=np.asarray(ad.rng.get_state()), config=np.asarray(json.dumps(config, allow_nan=False)))
    atomic_write(path, lambda f: np.savez(f, **arrays))


class Damaged(Exception):
    """What is wrong with a checkpoint, in a few words."""


def _scalar(arrays, key, kinds):
    """arrays[key] as a Python scalar, if it is a single value of one of the dtype kinds."""
    if key not in arrays:
        raise Damaged(f"it has no {key!r}")
    value = arrays[key]
    if value.shape != () or value.dtype.kind not in kinds:
        raise Damaged(f"its {key!r} is an array of shape {value.shape} and type {value.dtype}, not a single "
                      f"{'integer' if kinds == 'iu' else 'string'}")
    return value.item()


def _json(arrays, key, kind):
    try:
        value = json.loads(_scalar(arrays, key, "U"))
    except json.JSONDecodeError:
        raise Damaged(f"its {key!r} is not valid JSON") from None
    if not isinstance(value, kind):
        raise Damaged(f"its {key!r} is not a JSON {kind.__name__}")
    return value


def load_checkpoint(path, model=None, opt=None):
    """Returns (epoch, config); loads parameters and optimizer state (and the generator's) when
    given. Everything is checked before it is used: a damaged file is one UserError."""
    try:
        if not zipfile.is_zipfile(path):  # np.load would try to unpickle it: refuse it first
            raise Damaged("it is not an .npz file" + (" (it is empty)" if path.stat().st_size == 0 else ""))
        with np.load(path, allow_pickle=False) as z:
            arrays = {}
            for k in z.files:
                try:
                    arrays[k] = z[k]
                except ValueError:  # an object array: loading it would unpickle it
                    raise Damaged(f"its {k!r} holds Python objects (refused, not loaded)") from None
        epoch, config = _scalar(arrays, "epoch", "iu"), _json(arrays, "config", dict)
        if epoch < 0:
            raise Damaged(f"its epoch is {epoch}")
        params = {k[6:]: v for k, v in arrays.items() if k.startswith("param/")}
        bad = [k for k, v in params.items() if v.dtype.kind != "f" or not np.all(np.isfinite(v))]
        if not params or bad:
            raise Damaged(f"its parameter {bad[0]} is not finite" if bad else "it holds no parameters")
        if model is not None:
            model.load_state_dict(params)
        if opt is not None:
            adam = {k[5:]: v for k, v in arrays.items() if k.startswith("adam/")}
            if _scalar(arrays, "adam/t", "iu") < 0 or not all(k in adam for k in ("m", "v", "lr")):
                raise Damaged("its Adam state is incomplete")
            state = _json(arrays, "rng", dict)
            opt.load_state_dict(adam)
            ad.rng.set_state(json.dumps(state))
        return epoch, config
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path}") from None
    except Damaged as e:
        raise UserError(f"{path} is not a usable adgm checkpoint: {e}") from None
    except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:
        reason = str(e) if "pickle" not in str(e) else "it holds Python objects (refused, not loaded)"
        raise UserError(f"{path} is not a usable adgm checkpoint ({type(e).__name__}: {reason})") from None


def read_metrics(path, upto_epoch):
    """The rows of metrics.csv up to an epoch (numbers), [] if there is none."""
    try:
        with open(path, newline="") as f:
            rows = [{k: int(v) if k == "epoch" else float(v) for k, v in row.items() if v != ""}
                    for row in csv.DictReader(f)]
    except FileNotFoundError:
        return []
    except (ValueError, TypeError, csv.Error, UnicodeDecodeError) as e:
        raise UserError(f"{path} is damaged ({e}); move it away to continue without the earlier rows") from None
    return [row for row in rows if row.get("epoch", 0) <= upto_epoch]


def write_metrics(path, rows):
    fields = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def shown(key, value):
    """One metric as printed: test errors as 'test_error 3.21%', the rest to 4 digits."""
    return f"{key[:-4]} {value:.2f}%" if key.endswith("_pct") else f"{key} {value:.4g}"


def duration(seconds):
    """'42s', '17m', '3h05m', '2d04h'."""
    m, h = seconds / 60, seconds / 3600
    return (f"{seconds:.0f}s" if seconds < 90 else f"{m:.0f}m" if m < 90 else
            f"{int(h)}h{int(m % 60):02d}m" if h < 48 else f"{int(h // 24)}d{int(h % 24):02d}h")


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

class Progress:
    """One line per epoch on stderr: rewritten in place on a terminal, printed once otherwise.
    The ETA is the epoch's and the whole run's, from this session's mean epoch time."""

    def __init__(self, total_epochs, start=0, every=60.0):
        self.tty, self.total, self.every, self.last = sys.stderr.isatty(), total_epochs, every, time.time()
        self.start, self.began = start, time.time()

    def update(self, epoch, step, steps, started, loss):
        now = time.time()
        if self.tty or now - self.last > self.every:  # a plain line a minute into a log file
            self.last, elapsed = now, now - started
            eta = elapsed / max(step, 1) * (steps - step)
            finished = epoch - 1 - self.start  # epochs done in this session; else this one's pace
            per_epoch = (now - self.began - elapsed) / finished if finished else elapsed + eta
            run = duration(eta + per_epoch * (self.total - epoch))
            end = "" if self.tty else "\n"
            sys.stderr.write(f"\repoch {epoch}/{self.total}  batch {step}/{steps}  {elapsed:5.0f}s  "
                             f"eta {eta:4.0f}s (run {run})  loss {loss:9.3f}  {end}"[0 if self.tty else 1:])
            sys.stderr.flush()

    def done(self, epoch, row):
        keys = ("seconds", "loss", "test_error_pct", "test_error_bayes_pct", "test_bound", "log_z_iw")
        text = "  ".join(shown(k, row[k]) for k in keys if k in row)
        per_epoch = (time.time() - self.began) / (epoch - self.start)
        left = f"  run eta {duration(per_epoch * (self.total - epoch))}" if epoch < self.total else ""
        clear = "\r\033[K" if self.tty else ""
        sys.stderr.write(f"{clear}epoch {epoch}/{self.total}  {text}{left}\n")
        sys.stderr.flush()


class NonFinite(Exception):
    pass


def train_epoch(model, opt, batches, config, epoch, alpha, progress):
    """One pass over the data; returns the epoch's mean of each logged term (host floats)."""
    temperature = min(1.0, (epoch - 1) / config["warmup"]) if config["warmup"] else 1.0
    sums, steps, started = None, len(batches), time.time()
    first_bad = ad.xp.full((), -1)  # index of the first non-finite loss, made on the device
    for step, batch in enumerate(batches.epoch() if batches else range(steps), 1):
        opt.zero_grad()
        if config["dataset"] == "potential":
            J, stats = model.loss(config["batch_size"])
        elif config["model"] == "avae":
            J, stats = model.loss(ad.Tensor(batch[2]), config["samples"], temperature)
        else:
            x_l, y_l, x_u = batch
            J, stats = model.loss(ad.Tensor(x_l), y_l, ad.Tensor(x_u), alpha, config["samples"], temperature,
                                  config["loss_average"], config["temperature_a"])
        J.backward()
        opt.step()
        sums = stats if sums is None else {k: sums[k] + v for k, v in stats.items()}
        first_bad = ad.xp.where((first_bad < 0) & ~ad.xp.isfinite(J.data), step, first_bad)
        if step % 50 == 0 or step == steps:  # the only host syncs of the loop
            bad = int(first_bad)
            if bad >= 0:
                raise NonFinite(f"the loss became non-finite at epoch {epoch}, batch {bad}")
            progress.update(epoch, step, steps, started, float(J.data))
    return {k: float(v) / steps for k, v in sums.items()}


class PotentialSteps:
    """For --dataset potential an 'epoch' is a fixed number of steps with fresh samples."""

    def __len__(self):
        return 100

    def epoch(self):
        return iter(range(len(self)))


@contextlib.contextmanager
def own_generator(seed):
    """Evaluation draws from a generator of its own, so that how often a run is evaluated
    does not change its training (and a resumed run matches an uninterrupted one)."""
    training, ad.rng = ad.rng, ad.Random(seed)
    try:
        yield
    finally:
        ad.rng = training


def evaluate(model, data, config, final=False):
    """Test metrics as host floats (BatchNorm on its running averages)."""
    model.eval()
    try:
        return _test_metrics(model, data, config, final)
    finally:
        model.train()


def _test_metrics(model, data, config, final):
    if config["dataset"] == "potential":  # the bound (Eq. 18) from 10⁵ samples, IW-1000 averaged over 20
        with ad.no_grad():
            bound = np.mean([float(model.log_weights(10_000)[0].data.mean()) for _ in range(10)])
        return {"test_bound": bound, "log_z_iw": float(np.mean([float(model.log_z(1000)) for _ in range(20)])),
                "log_z_true": datasets.log_z(config["potential"])}
    x_test, y_test = data.x_test, data.y_test
    n = config["eval_images"] or len(x_test)
    if config["model"] == "avae":
        k = config["iw_samples"] if final and config["iw_samples"] else 1
        lls = [ad.to_numpy(model.log_likelihood(ad.xp.asarray(x_test[i:i + 500]), k)) for i in range(0, n, 500)]
        return {"test_bound" if k == 1 else f"test_ll_iw{k}": float(np.concatenate(lls)[:n].mean())}
    preds, bayes, bounds = [], [], []
    for i in range(0, len(x_test), 500):
        p, b, u = model.evaluate(ad.xp.asarray(x_test[i:i + 500]), samples=config["eval_samples"])
        preds.append(ad.to_numpy(p)), bayes.append(ad.to_numpy(b)), bounds.append(ad.to_numpy(u))
    row = {"test_error_pct": 100 * float(np.mean(np.concatenate(preds) != y_test)),
           "test_error_bayes_pct": 100 * float(np.mean(np.concatenate(bayes) != y_test)),
           "test_bound": float(np.concatenate(bounds).mean())}
    if final and config["iw_samples"]:
        lls = [ad.to_numpy(model.log_likelihood(ad.xp.asarray(x_test[i:i + 100]), config["iw_samples"]))
               for i in range(0, n, 100)]
        row[f"test_ll_iw{config['iw_samples']}"] = float(np.concatenate(lls)[:n].mean())
    return row


# ---------------------------------------------------------------------------------------------
# The run folder: checked before anything is loaded, created only once the data and the model
# are ready (an input error leaves nothing behind), then saved after every epoch
# ---------------------------------------------------------------------------------------------

class Interrupted(Exception):
    """Ctrl-C, SIGTERM or SIGHUP, raised where the program is (see `signals`)."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Signals:
    """SIGINT, SIGTERM and SIGHUP all raise Interrupted, except inside `held()`: a block that
    must finish (an epoch's metrics and checkpoint) runs to its end, and the signal follows."""

    def __init__(self):
        self.holding, self.pending, self.stopping = False, None, False

    def install(self):
        self.holding, self.pending, self.stopping = False, None, False
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self.handle)

    def handle(self, signum, frame):
        if self.stopping:  # a second Ctrl-C while the first is handled: already on the way out
            return
        if self.holding:
            self.pending = self.pending or signum
            return
        self.stopping = True
        raise Interrupted(signum)

    @contextlib.contextmanager
    def held(self):
        self.holding = True
        try:
            yield
        finally:
            self.holding, pending, self.pending = False, self.pending, None
        if pending and not self.stopping:
            self.stopping = True
            raise Interrupted(pending)


signals = Signals()


def writable(folder):
    """None if a file can be created in `folder`, else why not. The test writes a real file:
    permission bits say nothing for root, and a read-only mount shows only when written."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".adgm-write-test-", dir=folder)
        os.close(fd)
        os.remove(probe)
        return None
    except OSError as e:
        return e.strerror or str(e)


def check_out(out):
    """--out must be a folder we can write in, or a path we can create one at."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    above = out
    while not above.exists():  # the nearest existing folder above it must take the new folder
        above = above.parent
    if not above.is_dir():
        raise UserError(f"--out {out} cannot be created: {above} is a file, not a folder")
    problem = writable(above)
    if problem:
        raise UserError(f"--out {out}: cannot write in {above} ({problem})")


def read_config(path):
    """config.json as a dict, None if there is none; UserError if it is damaged."""
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"{path} is damaged (not valid JSON: {e})") from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is damaged (a JSON {type(config).__name__}, not an object of options)")
    return config


def complete_config(stored, config, path):
    """A stored configuration with every option `config` has: runs from before an option existed
    get COMMON's value of it (what they used); any other missing option is damage."""
    stored = {**stored, **{k: v for k, v in COMMON.items() if k not in stored}}  # the stored order kept
    missing = [k for k in config if k not in stored]
    problem = f"lacks {flags(missing)}" if missing else check_options(stored)
    if problem:
        raise UserError(f"{path} is not a usable adgm checkpoint: its configuration {'has ' * (not missing)}{problem}")
    return stored


def prepare_run(args):
    """(run folder, configuration, first epoch to train), after every check that needs no data:
    the folder can be written, and it does not hold another run. Nothing is created yet."""
    out = pathlib.Path(args.out)
    config = {k: v for k, v in vars(args).items() if k not in ("resume", "evaluate", "out", "given")}
    if args.resume:
        if not (out / "checkpoint.npz").exists():
            raise UserError(f"--resume: no checkpoint in {out}" + (
                "; it holds no finished epoch: run the command again without --resume to start it"
                if (out / "config.json").exists() else ""))
        start, previous = load_checkpoint(out / "checkpoint.npz")
        previous = complete_config(previous, config, out / "checkpoint.npz")
        clash = [k for k in args.given - VOLATILE if k in previous and previous[k] != config[k]]
        if clash:
            raise UserError(f"--resume: {out} was started with other values of {flags(clash)}; only "
                            f"{flags(VOLATILE - {'out', 'resume', 'evaluate'})} may change")
        previous.update({k: config[k] for k in VOLATILE & args.given if k in config})
        if previous["epochs"] < start:
            raise UserError(f"--resume: {out} has trained {start} epochs already; --epochs "
                            f"{previous['epochs']} would train none (give more than {start} to continue)")
        check_out(out)
        return out, previous, start
    stored = read_config(out / "config.json") if out.is_dir() else None
    if stored is not None and {k: v for k, v in stored.items() if k not in VOLATILE} != \
            {k: v for k, v in config.items() if k not in VOLATILE}:
        raise UserError(f"{out} holds a run with a different configuration; choose another --out or --resume it")
    if (out / "checkpoint.npz").exists():
        raise UserError(f"{out} already holds this run; add --resume to continue it, or choose another --out")
    check_out(out)
    return out, config, 0


def summary(rows):
    last = rows[-1] if rows else {}
    if "test_error_pct" in last:
        return f"test error {last['test_error_pct']:.2f}% (Bayes classifier {last['test_error_bayes_pct']:.2f}%)"
    return "  ".join(f"{k} {v:.4g}" for k, v in last.items() if k.startswith(("test_", "log_z")))


def resume_hint(out):
    return f"python3 train.py --resume --out {out}"


FIGURES_EVERY = 10  # epochs between redrawing a run's figures (and at its last epoch)


def train(args):
    ad.set_device(args.device)
    ad.keep_freed_memory()
    out, config, start = prepare_run(args)
    rows = read_metrics(out / "metrics.csv", start)
    if start == config["epochs"]:  # a finished run: nothing to train
        print(f"{out} has trained all {start} epochs (give a larger --epochs to train more)", file=sys.stderr)
        print(f"{summary(rows)}; run saved in {out}")
        return 0
    ad.rng.reseed(config["seed"])
    data = load_data(config)
    model = build_model(config, data)
    batches = (PotentialSteps() if data is None else
               datasets.Batches(data, config["batch_size"], config["batch_size"], config["authors_order"]))
    labeled_rows = batches.labeled_batch if data is not None and semi_supervised(config) else 0
    opt = build_optimizer(config, model, len(batches) * (config["batch_size"] + labeled_rows))
    alpha = config["beta"] * len(data.x_unlabeled) / len(data.x_labeled) if data is not None and semi_supervised(config) else 0.0
    progress = Progress(config["epochs"], start)
    done, last = start, config["epochs"]
    try:
        with signals.held():  # the run folder appears complete or not at all
            if args.resume:
                load_checkpoint(out / "checkpoint.npz", model, opt)
            else:  # epoch 0: --resume works from the first second on
                out.mkdir(parents=True, exist_ok=True)
                save_checkpoint(out / "checkpoint.npz", model, opt, 0, config)
            atomic_write(out / "config.json", lambda f: f.write(json.dumps(config, indent=2, allow_nan=False).encode()))
        print(f"{config['dataset']} {config['model']}: {sum(p.data.size for p in opt.params):,} parameters, "
              f"{len(batches)} batches per epoch, device {ad.device_name()}, run folder {out}", file=sys.stderr)
        for epoch in range(start + 1, last + 1):
            if config["lr_decay_every"]:
                opt.lr = config["lr"] * config["lr_decay"] ** ((epoch - 1) // config["lr_decay_every"])
            started = time.time()
            row = {"epoch": epoch}
            means = train_epoch(model, opt, batches, config, epoch, alpha, progress)
            row.update(seconds=round(time.time() - started, 3), lr=opt.lr, **means)
            if epoch % config["eval_every"] == 0 or epoch == last:
                with own_generator((config["seed"], epoch)):
                    row.update(evaluate(model, data, config))
            with signals.held():  # the epoch is saved whole; metrics first (rows past the checkpoint are dropped on resume)
                write_metrics(out / "metrics.csv", rows + [row])
                save_checkpoint(out / "checkpoint.npz", model, opt, epoch, config)
                rows.append(row)
                done = epoch
            progress.done(epoch, row)
            if epoch % FIGURES_EVERY == 0 or epoch == last:
                redraw_figures(model, data, config, out, rows, epoch)
        if config["iw_samples"]:  # the final test log-likelihood, once the last checkpoint is safe
            with own_generator((config["seed"], last)):  # as --evaluate computes it
                rows[-1].update(evaluate(model, data, config, final=True))
            write_metrics(out / "metrics.csv", rows)
    except NonFinite as e:
        raise UserError(f"{e}; {out}/checkpoint.npz keeps the last good state (epoch {done})") from None
    except Interrupted as e:
        if done < last:
            kept = f"epochs 1-{done}" if done else "the initial state"
            message = f"during epoch {done + 1}; {out} keeps {kept}: continue with {resume_hint(out)}"
        else:
            message = f"after all {last} epochs were saved in {out} (--evaluate {out} redoes the final evaluation)"
        clear = "\r\033[K" if sys.stderr.isatty() else ""  # the progress line
        print(f"{clear}interrupted ({e}) {message}", file=sys.stderr)
        return 128 + e.signum
    print(f"{summary(rows)}; run saved in {out}")
    return 0


# ---------------------------------------------------------------------------------------------
# Figures: the analogues of the paper's Fig. 2-5 (figures.py draws them)
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
    v = v - v.mean(axis=0)
    _, _, vt = np.linalg.svd(v, full_matrices=False)
    return v @ vt[:2].T


def redraw_figures(model, data, config, out, rows, epoch):
    """draw_figures on a generator of its own: drawing them does not change the training."""
    with own_generator((config["seed"], epoch, 1)):
        draw_figures(model, data, config, out, rows)


def draw_figures(model, data, config, out, rows):
    import figures
    folder = out / "figures"
    epochs = [int(r["epoch"]) for r in rows]
    if config["dataset"] == "potential":
        k, box = config["potential"], 4.0
        g = np.linspace(-box, box, 200)
        z1, z2 = np.meshgrid(g, g[::-1])
        true = np.exp(-datasets.POTENTIALS[k](z1, z2, ops=datasets.NUMPY_OPS))
        samples = ad.to_numpy(model.sample(20000))
        hist = figures.histogram2d(samples[:, [0, 1]], (-box, box, -box, box), 200)
        figures.write_png(folder / "potential.png", figures.side_by_side(
            [figures.density(true, title=f"EXP(-U{k})"), figures.density(hist, title="SAMPLES OF Q(Z)")]))
        return
    with ad.no_grad():
        model.eval()
        curve = {}
        for key, name in (("test_error_pct", "Q(Y|A,X)"), ("test_error_bayes_pct", "BAYES")):
            points = [(int(r["epoch"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
            if points:
                curve[name] = tuple(np.array(c) for c in zip(*points))
        if curve:
            figures.write_png(folder / "test_error.png", figures.line_plot(curve, title="TEST ERROR %"))
        if config["model"] == "avae":  # samples from p(x|z) with z ~ N(0, I)
            x = ad.to_numpy(model.generate(ad.rng.normal((100, model.z_dim), model.dtype)))
            figures.write_png(folder / "samples.png", figures.image_grid(to_images(x, data), 10, 10))
            model.train()
            return
        x_test = data.x_test[:2000]
        if data.image_shape is None:  # moons: decision regions with the labeled points marked (Fig. 2c)
            lo, hi = data.x_test.min(axis=0) - 0.5, data.x_test.max(axis=0) + 0.5
            gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 150), np.linspace(hi[1], lo[1], 150))
            grid = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.float32)
            regions = ad.to_numpy(model.predict(ad.xp.asarray(grid))).reshape(150, 150)
            points = np.concatenate([x_test, data.x_labeled])
            labels = np.concatenate([data.y_test[:2000], data.y_labeled])
            marked = np.arange(len(x_test), len(points))
            figures.write_png(folder / "decision_regions.png", figures.scatter(
                points, labels, background=regions, extent=(lo[0], hi[0], lo[1], hi[1]), marked=marked,
                title="DECISION REGIONS"))
        else:  # samples per class (Fig. 3b) and analogies (Fig. 3a)
            K, n = data.n_classes, 10
            y = np.repeat(np.arange(K), n)
            z = ad.rng.normal((K * n, model.z_dim), model.dtype)
            x = ad.to_numpy(model.generate(ad.xp.asarray(y), z))
            figures.write_png(folder / "samples.png", figures.image_grid(to_images(x, data), K, n))
            _, z = model.encode(ad.xp.asarray(x_test[:n]))
            z = ad.xp.repeat(z, K, axis=0)
            x = ad.to_numpy(model.generate(ad.xp.tile(ad.xp.arange(K), n), z))
            originals = to_images(x_test[:n], data)
            grid = np.concatenate([originals[:, None], to_images(x, data).reshape(n, K, *originals.shape[1:])], 1)
            figures.write_png(folder / "analogies.png", figures.image_grid(grid.reshape(-1, *originals.shape[1:]), n, K + 1))
        a, _ = model.encode(ad.xp.asarray(x_test))
        if a is not None:  # 2-D PCA of the auxiliary variable, coloured by class (Fig. 2d, 4b)
            figures.write_png(folder / "pca_a.png", figures.scatter(pca2(ad.to_numpy(a)), data.y_test[:2000],
                                                                    title="PCA OF A"))
        kl_a, kl_z = model.kl_per_unit(ad.xp.asarray(x_test[:500]))
        panels = [figures.bar_plot(ad.to_numpy(kl_z), sort=True, title="KL PER UNIT OF Z")]
        if kl_a is not None:
            panels.insert(0, figures.bar_plot(ad.to_numpy(kl_a), sort=True, title="KL PER UNIT OF A"))
        figures.write_png(folder / "kl_per_unit.png", figures.stack_vertical(panels))
        model.train()


# ---------------------------------------------------------------------------------------------
# --evaluate and the entry point
# ---------------------------------------------------------------------------------------------

def evaluate_run(args):
    run = pathlib.Path(args.evaluate)
    epoch, stored = load_checkpoint(run / "checkpoint.npz")
    config = complete_config(stored, {k: v for k, v in vars(args).items() if k not in ("resume", "evaluate", "out", "given")},
                             run / "checkpoint.npz")
    config.update(device=args.device, iw_samples=args.iw_samples, eval_images=args.eval_images,
                  eval_samples=args.eval_samples)
    if args.data_dir:
        config["data_dir"] = args.data_dir
    ad.set_device(config["device"])
    ad.rng.reseed(config["seed"])
    data = load_data(config)
    model = build_model(config, data)
    load_checkpoint(run / "checkpoint.npz", model)
    with own_generator((config["seed"], epoch)):
        row = evaluate(model, data, config, final=True)
    print(f"{run} (epoch {epoch}): " + "  ".join(
        shown(k, v) if k.endswith("_pct") else f"{k} {v:.4f}" for k, v in row.items()))
    folder = run / "figures" if (run / "figures").is_dir() else run
    problem = writable(folder)
    if problem:  # a run one may only read: its results, without new figures
        print(f"note: figures not redrawn: cannot write in {folder} ({problem})", file=sys.stderr)
    else:
        redraw_figures(model, data, config, run, read_metrics(run / "metrics.csv", epoch), epoch)
    return 0


def main(argv=None):
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    signals.install()
    args = None
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        return evaluate_run(args) if args.evaluate else train(args)
    except (UserError, datasets.DataError, ad.BackendError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the disk filled up, a folder went away: what and where, in one line
        print(f"error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        return 2
    except Interrupted as e:  # before a run folder was made, or during --evaluate: nothing to keep
        what = f"while evaluating {args.evaluate}" if args and args.evaluate else \
            "before training started; nothing was written"
        print(f"interrupted ({e}) {what}", file=sys.stderr)
        return 128 + e.signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
