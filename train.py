"""Train, evaluate, resume and draw the models of adgm.py from one command.

    python train.py --dataset mnist --labels 100            # the paper's MNIST setup (ADGM)
    python train.py --dataset moons --model m2 --epochs 10
    python train.py --resume --out runs/mnist-adgm-100-0    # continue an interrupted run
    python train.py --evaluate runs/mnist-adgm-100-0 --iw-samples 100

A run folder holds config.json, metrics.csv (one row per epoch), checkpoint.npz (parameters,
Adam and random-generator state: the initial state before epoch 1, then rewritten atomically
after every epoch) and figures/*.png (redrawn every 10 epochs and at the end). Ctrl-C, SIGTERM
and SIGHUP stop a run at once, wherever it is; --resume continues from the last saved epoch.

One process at a time trains in a run folder: it holds a lock on RUN/.lock, which the system
drops when the process ends, however it ends; a second one is refused, and --evaluate, which
only reads, works on a run that is training. A model or batch that clearly cannot fit in the
machine's memory is refused before anything is allocated; running out of memory later, or a
full disk, ends in one line, with metrics.csv and checkpoint.npz agreeing on the last saved
epoch, from which --resume continues. A metrics.csv that --resume cannot use is kept as
metrics.csv.damaged, and it says so.
"""
import contextlib
import errno
import functools
import pathlib
import signal
import sys
import time

if __name__ == "__main__":  # until main() takes over, a signal during the imports ends the program quietly
    def _early_exit(signum, frame):
        print(f"interrupted ({signal.Signals(signum).name}) before anything started", file=sys.stderr)
        sys.exit(128 + signum)
    for _signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(_signum, _early_exit)

import autodiff as ad
import datasets
from cli.checkpoints import (complete_config, keep_aside, load_checkpoint, read_metrics, record_evaluation, resumed_metrics,
                         save_checkpoint, save_epoch, write_config, write_metrics)
from cli.kinds import kind_of
from cli.memory import check_memory, does_not_fit, on_out_of_memory
from cli.options import UserError, parse_args, run_config
from cli.options import AUTHORS, COMMON  # noqa: F401  (read as train.AUTHORS, train.COMMON by tests and docs/runs scripts)
from cli.progress import Progress, shown, summary
from cli.runs import Interrupted, RunLock, make_folder, prepare_run, remove_folder, signals, what_is_kept, writable

FIGURES_EVERY = 10  # epochs between redrawing a run's figures (and at its last epoch)


# ---------------------------------------------------------------------------------------------
# Building the data, the model and the optimizer
# ---------------------------------------------------------------------------------------------

def load_data(config):
    """The data set as host arrays (None for --dataset potential, which has none)."""
    if config["dataset"] == "potential":
        return None
    labels = config["labels"] if kind_of(config).labeled else 0  # the avae uses no labels
    # A log-likelihood of binary data is measured on binary test images (one fixed binarisation);
    # the classifiers see real-valued ones, as in the authors' evaluation.
    return datasets.load(config["dataset"], labels, seed=config["seed"], data_dir=config["data_dir"],
                         binarize_test=kind_of(config).binary_test, pixels=config["pixels"],
                         moons_setup=config["moons_setup"], label_draw=config["label_draw"],
                         subset=config["subset"], verify=not config.get("no_verify", False))


def build_model(config, data):
    return kind_of(config).network(config, data)


def build(config):
    """What a run trains: its data (host arrays), model, batches, optimizer and α = β·N/N_l."""
    data = load_data(config)
    model = build_model(config, data)
    labeled = kind_of(config).labeled
    batches = PotentialSteps() if data is None else training_batches(data, config)
    opt = build_optimizer(config, model, len(batches) * (config["batch_size"] + (batches.labeled_batch if labeled else 0)))
    alpha = config["beta"] * len(data.x_unlabeled) / len(data.x_labeled) if labeled else 0.0
    return data, model, batches, opt, alpha


def training_batches(data, config):
    """An epoch's (x_l, y_l, x_u) batches, as training draws them."""
    return datasets.Batches(data, config["batch_size"], config["batch_size"], config["authors_order"])


def build_optimizer(config, model, rows_per_epoch):
    """Adam with the run's clipping and weight prior. The prior −log N(W; 0, σ²) on every weight
    matrix is divided by the rows of an epoch, as the released ADGM code divides it by n."""
    weights = [w for m in model.modules() if isinstance(m, ad.Linear) for w in m.weight if w.requires_grad]
    decay = 1.0 / (config["weight_prior"] ** 2 * rows_per_epoch) if config["weight_prior"] else 0.0
    return ad.Adam(model.parameters(), lr=config["lr"], clip=config["clip"] or None,
                   clip_value=config["clip_value"] or None, decay=decay, decayed=weights)


class PotentialSteps:
    """For --dataset potential an 'epoch' is a fixed number of steps with fresh samples."""

    def __len__(self):
        return 100

    def epoch(self):
        return iter(range(len(self)))


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


class NonFinite(Exception):
    pass


def train_epoch(model, opt, batches, config, epoch, alpha, progress):
    """One pass over the data; returns the epoch's mean of each logged term (host floats)."""
    temperature = min(1.0, (epoch - 1) / config["warmup"]) if config["warmup"] else 1.0
    loss = step_loss(config, alpha, temperature)
    sums, steps, started = None, len(batches), time.time()
    first_bad = ad.xp.full((), -1)  # index of the first non-finite loss, made on the device
    for step, batch in enumerate(batches.epoch(), 1):
        J, stats = train_step(model, opt, loss, batch)
        sums = stats if sums is None else {k: sums[k] + v for k, v in stats.items()}
        first_bad = ad.xp.where((first_bad < 0) & ~ad.xp.isfinite(J.data), step, first_bad)
        if step % 50 == 0 or step == steps:  # the only host syncs of the loop
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
    generator of their own: drawing them does not change the training."""
    with own_generator((config["seed"], epoch, 1)), evaluating(model), ad.no_grad():
        kind_of(config).figures(model, data, config, out / "figures", rows)


# ---------------------------------------------------------------------------------------------
# A run from its first epoch (or its last checkpoint) to its last
# ---------------------------------------------------------------------------------------------

def train(args):
    """Train the run of `args` from its first epoch, or from its last checkpoint with --resume,
    holding the run folder's lock throughout (runs.RunLock). Returns the exit code."""
    ad.set_device(args.device)
    ad.keep_freed_memory()
    with RunLock(pathlib.Path(args.out)) as lock:
        with signals.held():  # a folder that exists is locked before anything in it is read
            lock.take()
        out, config, start = prepare_run(args)
        if start == config["epochs"]:  # a finished run: nothing to train
            print(f"{out} has trained all {start} epochs (give a larger --epochs to train more)", file=sys.stderr)
            print(f"{summary(read_metrics(out / 'metrics.csv', start))}; run saved in {out}")
            return 0
        check_memory(config)
        return train_epochs(out, config, start, args.resume, lock)


def train_epochs(out, config, start, resume, lock):
    """Epochs start + 1 to the last of the run in `out`, and the final evaluation. A failure ends
    in one line that says what the folder keeps: it is always a state that --resume continues."""
    rows, lost = resumed_metrics(out / "metrics.csv", start) if resume else ([], None)
    ad.rng.reseed(config["seed"])
    with on_out_of_memory(f"out of memory before training started: {does_not_fit(config)}; nothing was written"):
        data, model, batches, opt, alpha = build(config)
    progress = Progress(config["epochs"], start)
    done, last = (start if resume else None), config["epochs"]  # done: the last epoch saved
    epoch, created = start + 1, None
    try:
        with signals.held():  # the run folder appears complete or not at all
            if resume:
                load_checkpoint(out / "checkpoint.npz", model, opt)
                if lost:
                    print(f"note: {keep_aside(out / 'metrics.csv', start, lost)}", file=sys.stderr)
            else:  # epoch 0: --resume works from the first second on
                created = make_folder(out)
                lock.take()
                if (out / "checkpoint.npz").exists():  # started by another process meanwhile
                    raise UserError(f"{out} already holds this run; add --resume to continue it, or choose "
                                    "another --out")
                save_checkpoint(out / "checkpoint.npz", model, opt, 0, config)
                done = 0
            write_config(out / "config.json", config)
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
            with signals.held():  # the epoch is saved whole: metrics.csv and checkpoint.npz agree on it
                save_epoch(out, rows + [row], model, opt, epoch, config)
                rows.append(row)
                done = epoch
            progress.done(epoch, row)
            if epoch % FIGURES_EVERY == 0 or epoch == last:
                try:
                    redraw_figures(model, data, config, out, rows, epoch)
                except OSError as e:  # the file it names may be a temporary one: name the folder
                    raise OSError(e.errno, e.strerror, str(out / "figures")) from None
        if config["iw_samples"]:  # the final test log-likelihood, once the last checkpoint is safe
            with own_generator((config["seed"], last)):  # as --evaluate computes it
                rows[-1].update(evaluate(model, data, config, final=True))
            write_metrics(out / "metrics.csv", rows)
    except NonFinite as e:
        raise UserError(f"{e}; {out}/checkpoint.npz keeps the last good state (epoch {done})") from None
    except Interrupted as e:
        if done is None:  # before the new run's folder was made: main says so
            raise
        message = (f"during epoch {done + 1}; {what_is_kept(out, done, last)}" if done < last else
                   f"after all {last} epochs were saved in {out} (--evaluate {out} redoes the final evaluation)")
        clear = "\r\033[K" if sys.stderr.isatty() else ""  # the progress line
        print(f"{clear}interrupted ({e}) {message}", file=sys.stderr)
        return 128 + e.signum
    except OSError as e:  # a file of the run could not be written: a full disk, most often
        failure = f"cannot write {e.filename or out} ({e.strerror or e})"
        then = " once there is space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        nothing = f"nothing was saved: run the command again{then}"
    except Exception as e:
        if not ad.out_of_memory(e):
            raise
        when = ("before training started" if done is None else f"in epoch {epoch}" if done < last else
                "after the last epoch was saved")
        failure = f"out of memory {when}: {does_not_fit(config)}"
        then, nothing = " once more memory is free", "nothing was written"
    else:
        print(f"{summary(rows)}; run saved in {out}")
        return 0
    if done is None:  # a new run that saved nothing leaves no folder behind
        lock.release()
        remove_folder(out, created)
        raise UserError(f"{failure}; {nothing}")
    raise UserError(f"{failure}; {what_is_kept(out, done, last)}{then}")


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
    config.update(device=args.device, iw_samples=args.iw_samples, eval_images=args.eval_images,
                  eval_samples=args.eval_samples)
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
                redraw_figures(model, data, config, run, read_metrics(run / "metrics.csv", epoch), epoch)
            except OSError as e:  # a full disk: the results above are whole, some files old
                problem = (run, e.strerror or str(e))
        if problem:  # a run one may only read: its results, printed only
            print(f"note: results not recorded, figures not redrawn: cannot write in {problem[0]} ({problem[1]})",
                  file=sys.stderr)
    return 0


def main(argv=None):
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    signals.install()
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
        if not ad.out_of_memory(e):
            raise
        print(f"error: out of memory ({e})", file=sys.stderr)
        return 2
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
