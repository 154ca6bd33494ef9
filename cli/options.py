"""train.py's options: the defaults of each data set and model, what each model takes, the range
of every number, the help text and the parser. Every option is checked here, before anything is
loaded or written, and a mistake is one UserError: one line that names the option.
"""
import argparse
import math
import os

import datasets
from authors.models import SETTINGS
from cli.kinds import MODELS, ONLY_SOME, POTENTIAL, model_of

# ---------------------------------------------------------------------------------------------
# Defaults: the paper's per data set (Sec. 4 and 6 of the paper), the released code's per model
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
# The released ADGM code's settings (authors.models.SETTINGS) are the defaults of its models
# (cli.kinds.MODELS); every one is an option, so that M2 or the ADGM can be run with them too.
AUTHORS = SETTINGS
# Every other model's values of those options, and of the options a stored configuration may lack.
COMMON = dict(loss_average="halves", clip_value=0.0, weight_prior=0.0, pixels="filtered", authors_order=False,
              moons_setup="ours", label_draw="ours", temperature_a=1.0, qy_average=False, eval_train=False,
              batchnorm=False)


MODEL_DEFAULTS = {name: m.defaults for name, m in MODELS.items() if m.defaults}

# --settings: the paper's stated settings, or the stabilisers the paper names for an a that stays in
# use: batch normalisation and a KL temperature (Sec. 5; here on a's terms alone, so that T_a < 1
# trains a weighted objective, not the bound) and β at the top of its range "between 0.1 and 2"
# (Sec. 3). The ADGM on MNIST trains stabilised by default: with them it had the lower test error
# on each of three label draws at epochs 10, 20 and 50 (docs/mnist.md, the main job's settings).
PRESETS = {"paper": dict(batchnorm=False, temperature_a=1.0),  # and β: the data set's (0.1)
           "stabilised": dict(batchnorm=True, beta=2.0, temperature_a=0.01)}
PRESET_NAMES = {"paper": "the paper's settings", "stabilised": "the stabilised settings"}
STABILISED_BY_DEFAULT = {("mnist", "adgm")}  # (data set, model); every other pair: paper


def preset(settings, dataset, model):
    """The options --settings sets for a model on a data set: those the model takes (M2 has no
    --temperature-a), β from the data set's defaults under the paper's settings."""
    takes = MODELS[model].takes
    values = {"beta": DEFAULTS[dataset]["beta"], **PRESETS[settings]}
    return {k: v for k, v in values.items() if k == "beta" or k in takes}


def settings_text(config):
    """What a semi-supervised run's header says of its settings: '(the stabilised settings: β 2,
    batch normalisation, T_a 0.01)'; '' for the other kinds."""
    if MODELS[config["model"]].kind != "semi-supervised":
        return ""
    name = next((f"{PRESET_NAMES[n]}: " for n in PRESETS
                 if preset(n, config["dataset"], config["model"]).items() <= config.items()), "")
    a = f", T_a {config['temperature_a']:g}" if "temperature_a" in MODELS[config["model"]].takes else ""
    return f" ({name}β {config['beta']:g}, {'' if config['batchnorm'] else 'no '}batch normalisation{a})"


# ---------------------------------------------------------------------------------------------
# Ranges: the range of every numeric option; its type (and choices) come from the parser, and a
# float must also be finite. A new numeric option needs an entry (tests/test_faults.py checks it).
# ---------------------------------------------------------------------------------------------

def at_least(low):
    return lambda v: None if v >= low else f"must be at least {low}"


def positive(v):
    return None if v > 0 else "must be positive"


def off_or_positive(v):
    return None if v >= 0 else "must be 0 (off) or positive"


TINY_SIGMA = 1.1e-19  # σ² = 1.2e-38 is float32's smallest normal number: the prior's 1/σ² stays finite


def weight_prior(v):
    return None if v == 0 or v >= TINY_SIGMA else f"must be 0 (off) or at least {TINY_SIGMA:g} (below, SIGMA² underflows)"


RULES = {
    "labels": at_least(0), "epochs": at_least(1), "batch_size": at_least(1), "samples": at_least(1),
    "beta": at_least(0), "lr": positive, "lr_decay": positive, "lr_decay_every": off_or_positive,
    "clip": off_or_positive, "clip_value": off_or_positive, "weight_prior": weight_prior,
    "hidden": at_least(1), "latent": at_least(1), "warmup": off_or_positive, "iw_samples": off_or_positive,
    "temperature_a": lambda v: None if 0 <= v <= 1 else "must be from 0 to 1",
    "eval_images": at_least(0), "eval_every": at_least(1), "eval_samples": at_least(1), "subset": at_least(0),
    "refresh_averages": at_least(0),
    "seed": lambda v: None if 0 <= v < 2 ** 32 else "must be from 0 to 2**32 - 1",
}
NOT_CONFIG = ("resume", "evaluate", "refresh_averages", "out", "given", "help", "settings")  # options that are not part of a run
# Options that may change when a run is resumed or re-evaluated; all others must match.
VOLATILE = {"no_verify", "epochs", "device", "resume", "evaluate", "eval_every", "eval_samples", "iw_samples", "eval_images",
            "eval_train", "data_dir", "out"}
# What --evaluate RUN takes: how to evaluate, and where the data is; the run is as it was trained.
EVALUATE_TAKES = {"evaluate", "refresh_averages", "device", "iw_samples", "eval_images", "eval_samples", "eval_train",
                  "data_dir", "no_verify"}


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


# ---------------------------------------------------------------------------------------------
# The parser and its help
# ---------------------------------------------------------------------------------------------

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


def build_parser(description=None):
    p = Parser(prog="train.py", description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
               usage="python3 train.py [--dataset D] [--model M] [--labels N] [--epochs N] [--out RUN] [--resume]\n"
                     "                        [--evaluate RUN] [OPTION ...]   (the options below, in four groups)")
    a = p.add_argument_group('what to train').add_argument
    a("--dataset", choices=sorted(DEFAULTS), default="mnist", help="data set (default mnist)")
    a("--model", choices=list(MODELS), help="adgm, sdgm, m2, adgm-det (deterministic a, Fig. 5), adgm-authors (the "
      "ADGM of the authors' released code: q(a|x) frozen, a in the classifier only; see README), adgm-authors-det "
      "(its a = mean of q(a|x)), avae (unsupervised auxiliary VAE; on 'potential' the q(a)q(z|a) model of Sec. 4.1), "
      "gauss (potential only: plain Gaussian q). Default: adgm, sdgm on svhn/norb as in Table 2, avae on potential")
    a("--settings", choices=sorted(PRESETS), help="the main job, --model adgm on mnist, trains 'stabilised' by "
      "default: --batchnorm --beta 2 --temperature-a 0.01, the stabilisers of Sec. 3 and 5, which keep a in use; "
      "it had a lower test error than 'paper' on each of three label draws at epochs 10, 20 and 50 (docs/mnist.md). "
      "T_a < 1 weighs a's KL terms: the run trains a weighted objective, not the bound, and its test_bound is the "
      "bound at T_a = 1. 'paper' = the paper's stated settings (β 0.1, no batch normalisation, T_a = 1), the default "
      "of every other model and data set (stabilised M2: --batchnorm --beta 2). Options typed beside it go over it")
    a("--labels", type=int, help="labeled examples, balanced over classes (paper: 100 MNIST, 1000 SVHN/NORB, 6 moons); "
      + default_text("labels"))
    a("--epochs", type=int, help="epochs to train in all (paper: 1000 on MNIST; 10 on moons); " + default_text("epochs"))
    a("--seed", type=int, default=0, help="seed of the labeled subset, initialisation and sampling")

    a = p.add_argument_group('the run folder, resuming, evaluating, the device').add_argument
    a("--out", help="run folder: new, empty or the run's own (default runs/<dataset>-<model>-<labels>-<seed>)")
    a("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    a("--evaluate", metavar="RUN_DIR", help="load RUN_DIR's checkpoint, print its test results and redraw "
      "its figures (skipped, with a note, where RUN_DIR cannot be written); it takes only --iw-samples, --eval-images, "
      "--eval-samples, --eval-train, --refresh-averages, --device, --data-dir, --no-verify")
    a("--iw-samples", type=int, default=0, help="importance samples for the test log-likelihood at the end "
      "(paper: 5000; 0 = skip)")
    a("--eval-images", type=int, default=0, help="test images for the importance-weighted bound (0 = all)")
    a("--eval-samples", type=int, default=1, help="samples of a averaged by the classifiers at test time "
      "(the authors averaged several; 10 costs 10x the evaluation time)")
    a("--eval-every", type=int, help="epochs between test evaluations; " + default_text("eval_every"))
    a("--eval-train", action="store_true", help="also measure q(y|a,x)'s error on the run's unlabeled training "
      "images at every evaluation (train_error_pct; the released ADGM code's 'valid' error: images it also "
      "trains on)")
    a("--refresh-averages", type=int, default=0, metavar="N", help="with --evaluate, first recompute the "
      "running averages of batch normalisation from N training batches (at most an epoch's), as training keeps "
      "them (for a checkpoint whose averages were kept otherwise); recorded under metric names ending in "
      "_refreshed (0 = no)")
    a("--data-dir", help="data folder (default $ADGM_DATA, else $XDG_CACHE_HOME/adgm)")
    a("--no-verify", action="store_true", help="use data files present in --data-dir even when their checksum "
      "is not the published one (format checks still apply), e.g. the format fixtures of the tests")
    a("--device", choices=["auto", "cpu", "gpu"], default=os.environ.get("ADGM_DEVICE", "auto"),
      help="auto = CuPy when it sees a GPU, else NumPy")
    a("--subset", type=int, default=0, help="use only the first N training and test examples (quick checks; "
      "0 = all)")

    a = p.add_argument_group("the paper's settings", "defaults are the paper's for each data set, but where --settings "
                             "stabilised (the main job's) sets --batchnorm and --beta").add_argument
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
    a("--hidden", type=int, nargs="+", help="hidden layer sizes of every network (paper: 500 500); "
      + default_text("hidden"))
    a("--latent", type=int, nargs=2, metavar=("A", "Z"), help="dim(a) and dim(z) (paper: 100 100); "
      + default_text("latent"))
    a("--layers", type=int, default=1, choices=[1, 2], help="stochastic layers of the avae (Eq. 19-20)")
    a("--warmup", type=int, default=0, help="epochs over which the KL temperature rises 0->1 (paper: 200 for "
      "the avae; default 0 = none)")
    a("--batchnorm", action="store_true", default=None, help="batch normalisation in every hidden layer (Table 1's avae; "
      "the authors' SDGM code, where it reaches the same error sooner)")
    a("--potential", type=int, default=1, choices=[1, 2, 3, 4], help="which U_k for --dataset potential")

    a = p.add_argument_group("studies of the authors' code, and ablations", 'see docs/authors-code.md and docs/mnist.md').add_argument
    a("--temperature-a", type=float, metavar="T", help="weight of a's terms, log q(a|x) − log p(a|·), in the "
      "bound: a KL temperature on a alone (Sec. 4.3's temperature, Sec. 5's stabilisers), on top of --warmup's; "
      "1 = the bound (default); adgm and sdgm only")
    a("--x-in-pa", action="store_true", help="p(a|z,y,x) as in Eq. 5 instead of p(a|z,y) (Sec. 3's benchmark)")
    a("--qy-average", action="store_true", help="with --samples S > 1, average q(y|a,x) over the S samples of a "
      "before the bound and the classification term use it, as the authors' SDGM code does (Eq. 17 averages "
      "the per-sample terms); adgm and sdgm only")
    a("--loss-average", choices=["halves", "rows"], help="the batch objective: the mean of each half, labeled and "
      "unlabeled, added (the SDGM code; default) or the mean over all rows (the released ADGM code; adgm-authors)")
    a("--clip-value", type=float, help="then clip each gradient element to ±this (0 = off; adgm-authors: 1, "
      "as the released ADGM code)")
    a("--weight-prior", type=float, metavar="SIGMA", help="a N(0, SIGMA²) prior on every weight matrix, divided "
      "by the rows of an epoch (0 = off; adgm-authors: 1)")
    a("--pixels", choices=["filtered", "all"], help="MNIST pixels: the 444 whose std > 0.1 (the paper's semi-"
      "supervised runs; default) or all 784 (the released ADGM code, adgm-authors; the avae, whose log-likelihood "
      "Table 1 reports on all pixels)")
    a("--label-draw", choices=["ours", "authors"], help="MNIST's labeled examples: drawn by --seed (default) or "
      "the released ADGM code's draw (RandomState(123456), data_preparation/mnist.py), their 100 labels")
    a("--moons-setup", choices=["ours", "authors"], help="the half-moons: ours (the paper's text: noise 0.1, a "
      "separate test set, 3 labels per class drawn by --seed; default) or the authors' loader (noise 0.2, shifted "
      "by |min|, six fixed labels at the ends and middles of the moons, test set = training set)")
    a("--authors-order", action="store_true", help="diagnostic of the released code's label leak: the unlabeled "
      "set sorted by class and never reshuffled, and (adgm-authors) its S > 1 indexing of adgmssl.py:226")
    return p


def parse_args(argv, description=None):
    """The command line as an argparse namespace with every default filled in and checked, and
    `given`: the options the user typed."""
    p = build_parser(description)
    args = p.parse_args(argv)
    # Which options the user typed: --resume takes only those over the stored configuration.
    for action in p._actions:
        action.default = argparse.SUPPRESS
    args.given = set(vars(p.parse_args(argv)))
    if args.evaluate and args.given - EVALUATE_TAKES:
        raise UserError(f"--evaluate {args.evaluate} evaluates the run as it was trained: it does not take "
                        f"{flags(args.given - EVALUATE_TAKES)} (only {flags(EVALUATE_TAKES - {'evaluate'})})")
    defaults = {**COMMON, **DEFAULTS[args.dataset]}
    model = args.model or defaults["model"]
    defaults.update(MODEL_DEFAULTS.get(model, {}))
    args.settings = args.settings or ("stabilised" if (args.dataset, model) in STABILISED_BY_DEFAULT else "paper")
    if args.settings == "stabilised" and MODELS[model].kind != "semi-supervised":
        raise UserError(f"--settings stabilised is for the semi-supervised models; --model {model} on "
                        f"--dataset {args.dataset} takes --settings paper")
    if args.settings == "stabilised" or "settings" in args.given:  # else each model's own defaults (adgm-authors')
        chosen = preset(args.settings, args.dataset, model)
        defaults.update(chosen)
        if "settings" in args.given:  # typed: --resume checks them against the run's
            args.given |= set(chosen)
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    problem = check_options(vars(args))
    if problem:
        raise UserError(problem)
    for key in ("out", "evaluate", "data_dir"):  # a path given as "" would mean the current folder, or none
        if getattr(args, key) is not None and not getattr(args, key).strip():
            raise UserError(f"{flags([key])} is empty: give it a folder")
    check_args(args)
    for key in ("out", "evaluate"):  # '~/runs/x' quoted in a script: the home folder, as --data-dir's
        if getattr(args, key) is not None:
            setattr(args, key, os.path.expanduser(getattr(args, key)))
    if args.data_dir:  # stored with the run: a resumed run may start from another directory
        args.data_dir = str(datasets.resolve_data_dir(args.data_dir))
    if args.out is None:
        setup = "-authors" if "authors" in (args.moons_setup, args.label_draw) else ""
        args.out = f"runs/{args.dataset}{setup}-{args.model}-{args.labels}-{args.seed}"
    return args


def run_config(args):
    """The configuration of a run: every option but those that only say what to do with it."""
    return {k: v for k, v in vars(args).items() if k not in NOT_CONFIG}


def check_args(args):
    """The combinations of options that cannot work together, each refused in one line."""
    kind = MODELS[args.model].kind
    if args.dataset == "potential" and kind == "semi-supervised":
        raise UserError("--dataset potential takes --model avae (auxiliary q) or gauss (plain Gaussian q)")
    if args.dataset != "potential" and kind == "potential":
        raise UserError(f"--model {args.model} is the plain Gaussian q of --dataset potential only")
    model = model_of(vars(args))
    for key, (does, off) in ONLY_SOME.items():
        if getattr(args, key) != off and key not in model.takes:
            if model is POTENTIAL:
                raise UserError(f"{flags([key])} {does}; --dataset potential does not take it")
            takers = " or ".join(name for name, m in MODELS.items() if key in m.takes)
            raise UserError(f"{flags([key])} {does}; --model {args.model} does not take it (use it with --model {takers})")
    if kind == "semi-supervised" and args.labels < 1:
        raise UserError(f"--model {args.model} is semi-supervised: it needs --labels of at least 1")
    if args.dataset == "potential" and args.latent[1] != 2:
        raise UserError("--dataset potential has a 2-D z: use --latent A 2")
    if args.pixels == "all" and args.dataset != "mnist" and "pixels" in args.given:
        raise UserError("--pixels chooses MNIST's pixels; the other data sets keep all of theirs")
    if "potential" in args.given and args.dataset != "potential":
        raise UserError(f"--potential {args.potential} chooses U_k for --dataset potential; "
                        f"--dataset {args.dataset} does not take it")
    if args.qy_average and args.samples == 1:
        raise UserError("--qy-average averages q(y|a,x) over the --samples S samples of a: with --samples 1 "
                        "it changes nothing; give --samples S of at least 2")
    if args.moons_setup == "authors" and args.dataset != "moons":
        raise UserError("--moons-setup chooses the half-moons' setup: use it with --dataset moons")
    if args.model.startswith("adgm-authors") and args.dataset not in ("mnist", "moons"):
        raise UserError(f"--model {args.model} is the released ADGM code, written for MNIST (studied here on the "
                        f"half-moons too); for the paper's ADGM on --dataset {args.dataset} use --model adgm")
    if args.label_draw == "authors" and args.dataset != "mnist":
        raise UserError("--label-draw authors is the released ADGM code's draw of MNIST labels: "
                        "use it with --dataset mnist")
    if args.refresh_averages and not args.evaluate:
        raise UserError("--refresh-averages recomputes a checkpoint's averages before --evaluate RUN_DIR: "
                        "use it with --evaluate")
    if args.batchnorm and args.batch_size < 2:
        raise UserError(f"--batchnorm normalises over a batch: --batch-size {args.batch_size} gives batches of "
                        "one, whose variance is 0; use a --batch-size of at least 2")
    if args.moons_setup == "authors" and args.labels != 6:
        raise UserError(f"--moons-setup authors has its 6 fixed labeled points; --labels {args.labels} does not fit")
