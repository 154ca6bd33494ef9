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
import contextlib
import functools
import pathlib
import signal
import sys
import time
from typing import Callable, NamedTuple

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
import figures
from options import UserError, model_of, parse_args, run_config
from options import AUTHORS, COMMON  # noqa: F401  (read as train.AUTHORS, train.COMMON by tests and docs/runs scripts)
from runs import (Interrupted, Progress, complete_config, load_checkpoint, prepare_run, read_metrics, resume_hint,
                  save_checkpoint, shown, signals, summary, writable, write_config, write_metrics)

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
    batches = (PotentialSteps() if data is None else
               datasets.Batches(data, config["batch_size"], config["batch_size"], config["authors_order"]))
    opt = build_optimizer(config, model, len(batches) * (config["batch_size"] + (batches.labeled_batch if labeled else 0)))
    alpha = config["beta"] * len(data.x_unlabeled) / len(data.x_labeled) if labeled else 0.0
    return data, model, batches, opt, alpha


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
# The kinds of model (options.MODELS): network, loss call and test metrics; figures.py draws each
# ---------------------------------------------------------------------------------------------

def semi_supervised_network(config, data):
    (a_dim, z_dim), hidden, cls = config["latent"], config["hidden"], adgm.MODELS[config["model"]]
    extra = {"authors_indexing": config["authors_order"]} if issubclass(cls, adgm.ADGMAuthors) else {}
    return cls(data.x_unlabeled.shape[1], data.n_classes, hidden, a_dim, z_dim, data.likelihood,
               x_in_pa=config["x_in_pa"], batchnorm=config["batchnorm"], qy_average=config["qy_average"], **extra)


def semi_supervised_loss(model, batch, config, alpha, temperature):
    x_l, y_l, x_u = batch
    return model.loss(ad.Tensor(x_l), y_l, ad.Tensor(x_u), alpha, config["samples"], temperature,
                      config["loss_average"], config["temperature_a"])


KL_UNITS_IMAGES = 500  # test images behind the per-unit KL of a logged each epoch


def semi_supervised_metrics(model, data, config, final):
    """Test error of q(y|a,x) and of the Bayes classifier (in %), the test bound, the KL of each
    unit of a (kl_a_1, ...; Fig. 4a's measure of which units are in use), with --eval-train the
    error on the unlabeled training images, and at the end the importance-weighted
    log-likelihood when --iw-samples asks for it."""
    x_test, y_test = data.x_test, data.y_test
    preds, bayes, bounds = [], [], []
    for i in range(0, len(x_test), 500):
        p, b, u = model.evaluate(ad.xp.asarray(x_test[i:i + 500]), samples=config["eval_samples"])
        preds.append(ad.to_numpy(p)), bayes.append(ad.to_numpy(b)), bounds.append(ad.to_numpy(u))
    row = {"test_error_pct": 100 * float(np.mean(np.concatenate(preds) != y_test)),
           "test_error_bayes_pct": 100 * float(np.mean(np.concatenate(bayes) != y_test)),
           "test_bound": float(np.concatenate(bounds).mean())}
    if config["eval_train"]:
        x, y = data.x_unlabeled, data.y_unlabeled
        preds = [ad.to_numpy(model.predict(ad.xp.asarray(x[i:i + 500]), samples=config["eval_samples"]))
                 for i in range(0, len(x), 500)]
        row["train_error_pct"] = 100 * float(np.mean(np.concatenate(preds) != y))
    if model.pa_zy is not None:
        kl_a = ad.to_numpy(model.kl_per_unit(ad.xp.asarray(x_test[:KL_UNITS_IMAGES]))[0])
        row.update({f"kl_a_{i + 1}": float(f"{v:.5g}") for i, v in enumerate(kl_a)})
    if final and config["iw_samples"]:
        n = config["eval_images"] or len(x_test)
        lls = [ad.to_numpy(model.log_likelihood(ad.xp.asarray(x_test[i:i + 100]), config["iw_samples"]))
               for i in range(0, n, 100)]
        row[f"test_ll_iw{config['iw_samples']}"] = float(np.concatenate(lls)[:n].mean())
    return row


def avae_network(config, data):
    (a_dim, z_dim), hidden = config["latent"], config["hidden"]
    return adgm.AuxiliaryVAE(data.x_unlabeled.shape[1], config["layers"], hidden, a_dim, z_dim, data.likelihood,
                             config["batchnorm"])


def avae_loss(model, batch, config, alpha, temperature):
    return model.loss(ad.Tensor(batch[2]), config["samples"], temperature)  # the unlabeled examples


def avae_metrics(model, data, config, final):
    """The test bound, or at the end the importance-weighted bound when --iw-samples asks for it."""
    x_test = data.x_test
    n = config["eval_images"] or len(x_test)
    k = config["iw_samples"] if final and config["iw_samples"] else 1
    lls = [ad.to_numpy(model.log_likelihood(ad.xp.asarray(x_test[i:i + 500]), k)) for i in range(0, n, 500)]
    return {"test_bound" if k == 1 else f"test_ll_iw{k}": float(np.concatenate(lls)[:n].mean())}


def potential_network(config, data):
    (a_dim, z_dim), hidden = config["latent"], config["hidden"]
    return adgm.PotentialModel(datasets.POTENTIALS[config["potential"]], auxiliary=config["model"] == "avae",
                               hidden=hidden, a_dim=a_dim, z_dim=z_dim)  # gauss: a plain Gaussian q(z)


def potential_loss(model, batch, config, alpha, temperature):
    return model.loss(config["batch_size"])  # fresh samples of z, no data


def potential_metrics(model, data, config, final):
    """The bound (Eq. 18) from 10⁵ samples, IW-1000 averaged over 20, and the true log Z."""
    with ad.no_grad():
        bound = np.mean([float(model.log_weights(10_000)[0].data.mean()) for _ in range(10)])
    return {"test_bound": bound, "log_z_iw": float(np.mean([float(model.log_z(1000)) for _ in range(20)])),
            "log_z_true": datasets.log_z(config["potential"])}


class Kind(NamedTuple):
    """What train.py does with one kind of model."""
    network: Callable   # (config, data) -> the model
    loss: Callable      # (model, batch, config, alpha, temperature) -> (J, stats): one step's objective
    metrics: Callable   # (model, data, config, final) -> {name: host float}: the test metrics
    figures: Callable   # (model, data, config, folder, rows): figures.py's drawing of the run
    labeled: bool       # learns from labels, with α = β·N/N_l
    binary_test: bool   # measured on binary test images (one fixed binarisation)


KINDS = {
    "semi-supervised": Kind(semi_supervised_network, semi_supervised_loss, semi_supervised_metrics,
                            figures.semi_supervised_figures, labeled=True, binary_test=False),
    "avae": Kind(avae_network, avae_loss, avae_metrics, figures.avae_figures, labeled=False, binary_test=True),
    "potential": Kind(potential_network, potential_loss, potential_metrics, figures.potential_figures,
                      labeled=False, binary_test=False),
}


def kind_of(config):
    return KINDS[model_of(config).kind]


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
    ad.set_device(args.device)
    ad.keep_freed_memory()
    out, config, start = prepare_run(args)
    rows = read_metrics(out / "metrics.csv", start)
    if start == config["epochs"]:  # a finished run: nothing to train
        print(f"{out} has trained all {start} epochs (give a larger --epochs to train more)", file=sys.stderr)
        print(f"{summary(rows)}; run saved in {out}")
        return 0
    ad.rng.reseed(config["seed"])
    data, model, batches, opt, alpha = build(config)
    progress = Progress(config["epochs"], start)
    done, last = start, config["epochs"]
    try:
        with signals.held():  # the run folder appears complete or not at all
            if args.resume:
                load_checkpoint(out / "checkpoint.npz", model, opt)
            else:  # epoch 0: --resume works from the first second on
                out.mkdir(parents=True, exist_ok=True)
                save_checkpoint(out / "checkpoint.npz", model, opt, 0, config)
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
# --evaluate and the entry point
# ---------------------------------------------------------------------------------------------

def evaluate_run(args):
    run = pathlib.Path(args.evaluate)
    epoch, stored = load_checkpoint(run / "checkpoint.npz")
    config = complete_config(stored, run_config(args), run / "checkpoint.npz")
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
    print(f"{run} (epoch {epoch}): " + "  ".join(  # the per-unit KL of a goes to the figures
        shown(k, v) if k.endswith("_pct") else f"{k} {v:.4f}" for k, v in row.items() if not k.startswith("kl_a_")))
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
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
