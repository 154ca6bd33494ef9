"""Train, evaluate, resume and draw the models of adgm.py from one command.

    python3 train.py --dataset moons                          # a first look: 10 epochs, seconds
    python3 train.py --dataset mnist --labels 100             # the main job: the ADGM, stabilised
    python3 train.py --resume --out runs/mnist-adgm-100-0     # continue an interrupted run
    python3 train.py --evaluate runs/mnist-adgm-100-0 --iw-samples 100

A run folder holds config.json, metrics.csv (one row per epoch), checkpoint.npz (rewritten
atomically after every epoch) and figures/*.png. Ctrl-C, SIGTERM and SIGHUP stop a run at once;
--resume continues from the last saved epoch. One process at a time trains in a folder; any
failure (a full disk, too little memory) ends in one line, with the folder resumable.
"""
import contextlib
import functools
import os
import pathlib
import sys
import time

if __name__ == "__main__":
    if os.name != "posix":  # fcntl's locks and SIGHUP
        print("error: train.py needs a POSIX system such as Linux or macOS (it locks run folders with fcntl); "
              "on Windows, run it under WSL", file=sys.stderr)
        sys.exit(2)
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # its modules, also under PYTHONSAFEPATH
    from cli.interrupts import exit_quietly
    exit_quietly(" before anything started")  # until main() takes over, a signal during the imports

import autodiff as ad
import datasets
from authors import data as authors_data
from cli.checkpoints import check_same_run, complete_config, load_checkpoint, record_evaluation, resumed_metrics
from cli.kinds import kind_of, model_of
from cli import memory
from cli.memory import check_memory, does_not_fit, on_out_of_memory
from cli.options import UserError, parse_args, run_config, settings_text
from cli.progress import Progress, keep_in, say, shown, summary
from cli.runs import OUTPUT, NonFinite, Run, figure_notes, writable
from cli.signals import Interrupted, process

FIGURES_EVERY = 10  # epochs between redrawing a run's figures (and at its last epoch)


# ---------------------------------------------------------------------------------------------
# Building the data, the model and the optimizer
# ---------------------------------------------------------------------------------------------

def load_data(config):
    """The data set as host arrays (None for --dataset potential, which has none); the released
    code's half-moons and label draw come from its study, authors/data.py."""
    if config["dataset"] == "potential":
        return None
    labels = config["labels"] if kind_of(config).labeled else 0  # the avae uses no labels
    if config["moons_setup"] == "authors":
        return authors_data.half_moons(labels, config["subset"])
    # A log-likelihood of binary data is measured on binary test images (one fixed binarisation);
    # the classifiers see real-valued ones, as in the authors' evaluation.
    return datasets.load(config["dataset"], labels, seed=config["seed"], data_dir=config["data_dir"],
                         binarize_test=kind_of(config).binary_test, pixels=config["pixels"], subset=config["subset"],
                         verify=not config.get("no_verify", False),
                         draw=authors_data.labeled_subset if config["label_draw"] == "authors" else None)


def build_model(config, data):
    return kind_of(config).network(config, data)


def build(config):
    """What a run trains: its data (host arrays), model, batches, optimizer and α = β·N/N_l."""
    data = load_data(config)
    model = build_model(config, data)
    labeled = kind_of(config).labeled
    batches = datasets.PotentialSteps() if data is None else training_batches(data, config)
    opt = build_optimizer(config, model, len(batches) * (config["batch_size"] + (batches.labeled_batch if labeled else 0)))
    alpha = config["beta"] * len(data.x_unlabeled) / len(data.x_labeled) if labeled else 0.0
    return data, model, batches, opt, alpha


def training_batches(data, config):
    """An epoch's (x_l, y_l, x_u) batches, as training draws them."""
    order = authors_data.class_order(data) if config["authors_order"] else None
    return datasets.Batches(data, config["batch_size"], config["batch_size"], order)


def build_optimizer(config, model, rows_per_epoch):
    """Adam with the run's clipping and weight prior. The prior −log N(W; 0, σ²) on every weight
    matrix is divided by the rows of an epoch, as the released ADGM code divides it by n."""
    weights = [w for m in model.modules() if isinstance(m, ad.Linear) for w in m.weight if w.requires_grad]
    decay = 1.0 / (config["weight_prior"] ** 2 * rows_per_epoch) if config["weight_prior"] else 0.0
    return ad.Adam(model.parameters(), lr=config["lr"], clip=config["clip"] or None,
                   clip_value=config["clip_value"] or None, decay=decay, decayed=weights)


# ---------------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------------

def step_loss(config, alpha, temperature):
    """loss(model, batch): the objective of a training step, its kind's loss call with α and the
    epoch's KL temperature."""
    return functools.partial(kind_of(config).loss, config=config, alpha=alpha, temperature=temperature)


def train_step(model, opt, loss, batch):
    """One training step, as train.py and bench.py take it: the gradients zeroed, the objective
    J = loss(model, batch) (see step_loss), J's gradients, Adam's update. Returns (J, stats)."""
    opt.zero_grad()
    J, stats = loss(model, batch)
    J.backward()
    opt.step()
    return J, stats


def train_epoch(model, opt, batches, config, epoch, alpha, progress):
    """One pass over the data; returns the epoch's mean of each logged term (host floats)."""
    temperature = min(1.0, (epoch - 1) / config["warmup"]) if config["warmup"] else 1.0
    loss = step_loss(config, alpha, temperature)
    sums, steps, started = None, len(batches), time.monotonic()
    first_bad = ad.xp.full((), -1)  # index of the first non-finite loss, made on the device
    for step, batch in enumerate(batches.epoch(), 1):
        J, stats = train_step(model, opt, loss, batch)
        sums = stats if sums is None else {k: sums[k] + v for k, v in stats.items()}
        first_bad = ad.xp.where((first_bad < 0) & ~ad.xp.isfinite(J.data), step, first_bad)
        if step % 50 == 0 or step == steps or not progress.shown:  # the only host syncs of the loop
            bad = int(first_bad)
            if bad >= 0:
                raise NonFinite(f"the loss became non-finite at epoch {epoch}, batch {bad}")
            progress.update(epoch, step, steps, started, float(J.data))
    return {k: float(v) / steps for k, v in sums.items()}


@contextlib.contextmanager
def own_generator(seed):
    """Evaluation draws from a generator of its own, so that how often a run is evaluated
    does not change its training (and a resumed run matches an uninterrupted one)."""
    training, ad.rng = ad.rng, ad.Random(seed)
    try:
        yield
    finally:
        ad.rng = training


@contextlib.contextmanager
def evaluating(model):
    """The model in evaluation mode (BatchNorm on its running averages), then back to training."""
    model.eval()
    try:
        yield
    finally:
        model.train()


def evaluate(model, data, config, final=False):
    """Test metrics as host floats."""
    with evaluating(model):
        return kind_of(config).metrics(model, data, config, final)


def redraw_figures(model, data, config, out, rows, epoch):
    """The run's figures in out/figures, drawn in evaluation mode, without gradients, on a
    generator of their own: drawing them does not change the training. One that cannot be drawn
    is a note (figure_notes)."""
    with own_generator((config["seed"], epoch, 1)), evaluating(model), ad.no_grad(), figure_notes(out / "figures"):
        kind_of(config).figures(model, data, config, out / "figures", rows)


# ---------------------------------------------------------------------------------------------
# A run from its first epoch (or its last checkpoint) to its last
# ---------------------------------------------------------------------------------------------

def train(args):
    """Train the run of `args` from its first epoch, or from its last checkpoint with --resume.
    The run folder's life cycle (lock, saves, the one-line failures) is cli.runs.Run's; this is
    the loop. Returns the exit code."""
    ad.set_device(args.device)
    memory.keep_freed_memory()
    with Run(args) as run:
        config, out, last = run.config, run.out, run.last
        if run.finished:
            say(f"{out} has trained all {last} epochs (give a larger --epochs to train more)")
            say(f"{summary(run.saved_rows())}; run saved in {out}", stream=sys.stdout)
            return 0
        check_memory(config)
        ad.rng.reseed(config["seed"])
        with on_out_of_memory(f"out of memory before training started: {does_not_fit(config)}; nothing was written"):
            data, model, batches, opt, alpha = build(config)
        run.begin(model, opt)
        progress = Progress(last, run.start)
        say(f"{config['dataset']} {config['model']}{settings_text(config)}: "
            f"{sum(p.data.size for p in opt.params):,} parameters, "
            f"{len(batches)} batches per epoch, device {ad.device_name()}, run folder {out}")
        for epoch in run.epochs():
            if config["lr_decay_every"]:
                opt.lr = config["lr"] * config["lr_decay"] ** ((epoch - 1) // config["lr_decay_every"])
            started = time.monotonic()
            means = train_epoch(model, opt, batches, config, epoch, alpha, progress)
            row = {"epoch": epoch, "seconds": round(time.monotonic() - started, 3), "lr": opt.lr, **means}
            if epoch % config["eval_every"] == 0 or epoch == last:
                with own_generator((config["seed"], epoch)):
                    row.update(evaluate(model, data, config))
            run.save(row, model, opt)
            progress.done(epoch, row)
            if epoch % FIGURES_EVERY == 0 or epoch == last:
                redraw_figures(model, data, config, out, run.rows, epoch)
        if config["iw_samples"]:  # the final test log-likelihood, once the last checkpoint is safe
            with own_generator((config["seed"], last)):  # as --evaluate computes it
                run.rows[-1].update(evaluate(model, data, config, final=True))
            run.rewrite_metrics()
    if run.exit_code == 0:
        say(f"{summary(run.rows)}; run saved in {out}", stream=sys.stdout)
    return run.exit_code


# ---------------------------------------------------------------------------------------------
# --evaluate and the entry point
# ---------------------------------------------------------------------------------------------

def refresh_averages(model, data, config, steps, epoch):
    """Recompute BatchNorm's running averages from `steps` training batches (at most an epoch's)
    by the forward pass of a training step, which keeps them; no parameter changes. With their
    momentum of 0.1 the last 50 batches make all but 0.5 % of them."""
    with own_generator((config["seed"], epoch, 2)), ad.no_grad():
        for _, batch in zip(range(steps), training_batches(data, config).epoch()):
            kind_of(config).loss(model, batch, config, 0.0, 1.0)


def evaluate_run(args):
    """--evaluate: a run's test results from its checkpoint, recorded in RUN/evaluations.csv, and
    its figures redrawn. It only reads the run (a process may be training in it) but for those."""
    run = pathlib.Path(args.evaluate)
    epoch, stored = load_checkpoint(run / "checkpoint.npz")
    config = complete_config(stored, run_config(args), run / "checkpoint.npz")
    check_same_run(run, config)
    keep_in(run / OUTPUT)
    config.update(device=args.device, iw_samples=args.iw_samples, eval_images=args.eval_images,
                  eval_samples=args.eval_samples, **{k: getattr(args, k) for k in ("eval_train", "no_verify")
                                                     if k in args.given})
    if "eval_train" in args.given and "eval_train" not in model_of(config).takes:
        raise UserError(f"--eval-train measures a classifier; {run} trained --model {config['model']}, which has none")
    if args.data_dir:
        config["data_dir"] = args.data_dir
    if args.refresh_averages and not config["batchnorm"]:
        raise UserError(f"--refresh-averages: {run} was trained without --batchnorm; it has no averages to refresh")
    ad.set_device(config["device"])
    ad.rng.reseed(config["seed"])
    data = load_data(config)
    with on_out_of_memory(f"out of memory while evaluating {run}: {does_not_fit(config, evaluating=True)}"):
        model = build_model(config, data)
        load_checkpoint(run / "checkpoint.npz", model)
        if args.refresh_averages:
            refresh_averages(model, data, config, args.refresh_averages, epoch)
        with own_generator((config["seed"], epoch)):
            row = evaluate(model, data, config, final=True)
        row = {k: v for k, v in row.items() if not k.startswith("kl_a_")}  # the per-unit KL goes to the figures
        print(f"{run} (epoch {epoch}): " + "  ".join(shown(k, v) if k.endswith("_pct") else f"{k} {v:.4f}"
                                                     for k, v in row.items()))
        folders = (run, run / "figures") if (run / "figures").is_dir() else (run,)
        problem = next(((f, why) for f in folders if (why := writable(f))), None)
        if not problem:
            try:
                suffix = "_refreshed" if args.refresh_averages else ""
                record_evaluation(run / "evaluations.csv", epoch, config, {k + suffix: v for k, v in row.items()})
                rows, wrong = resumed_metrics(run / "metrics.csv", epoch)
                if wrong:
                    say(f"note: {run / 'metrics.csv'} {wrong}: the learning curve is not redrawn")
                redraw_figures(model, data, config, run, rows, epoch)
            except OSError as e:  # a full disk: the results above are whole, some files old
                problem = (run, e.strerror or str(e))
        if problem:  # a run one may only read: its results, printed only
            print(f"note: results not recorded, figures not redrawn: cannot write in {problem[0]} ({problem[1]})",
                  file=sys.stderr)
    return 0


def main(argv=None):
    with process():  # signals, and a terminal that cannot stop a run (cli.runs, cli.progress)
        args = None
        try:
            args = parse_args(sys.argv[1:] if argv is None else argv, __doc__)
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
        except Exception as e:  # out of memory where train and evaluate_run cannot name the sizes asked for
            if not memory.out_of_memory(e):
                raise
            print(f"error: out of memory ({e})", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
