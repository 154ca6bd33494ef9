"""Tests of train.py, the command line: short runs on moons, a small MNIST subset, the format
fixtures of SVHN and NORB, the potential and the auxiliary VAE (metrics, checkpoint, figures, last
line); a resumed run equal to a straight one; --evaluate; a one-line "error:" and no traceback for
every user mistake, an option refused where the model does not take it; a non-finite loss;
checkpoints read without unpickling; Ctrl-C.

Runs are small (--hidden 16 --latent 4 4, --subset 200 on MNIST) and go through train.main in
this process (conftest.run); a real subprocess starts where one is needed: a signal, an attempted
download, and a few refusals as the shell shows them.
"""
import itertools
import json
import math
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

import adgm
from cli import kinds, options, progress
import train
from conftest import (MNIST, MOONS, ROOT, SEMI_COLUMNS, SMALL, check_checkpoint, check_figures, check_metrics,  # noqa: F401
                      checkpoint, environment, interrupt_once, last_line, metrics, ok, one_line_error, png_size, run,
                      run_process, snapshot)


# ---------------------------------------------------------------------------------------------
# End to end, from the command line
# ---------------------------------------------------------------------------------------------

def test_mnist_subset_end_to_end(mnist_run):
    out, result = mnist_run
    rows = check_metrics(out, 2, SEMI_COLUMNS)
    assert all(float(r["lr"]) == 3e-4 for r in rows)  # the paper's rate, no decay before epoch 200
    ckpt = check_checkpoint(out, 2, result.stderr)
    config = json.loads(str(ckpt["config"]))
    assert (config["dataset"], config["model"], config["subset"], config["labels"]) == ("mnist", "adgm", 200, 10)
    check_figures(out, ["samples.png", "analogies.png", "pca_a.png", "kl_per_unit.png", "test_error.png"])
    assert png_size(out / "figures" / "samples.png")[0] >= 10 * 28  # 10 classes × 10 samples of 28×28
    error, bayes = (float(rows[-1][k]) for k in ("test_error_pct", "test_error_bayes_pct"))
    assert last_line(result) == (f"test error {error:.2f}% (Bayes classifier {bayes:.2f}%); "
                                 f"run saved in {out}")


def test_moons_end_to_end(moons_run):
    out, result = moons_run
    check_metrics(out, 2, SEMI_COLUMNS)
    check_checkpoint(out, 2, result.stderr)
    check_figures(out, ["decision_regions.png", "pca_a.png", "kl_per_unit.png", "test_error.png"])
    assert "50 batches per epoch" in result.stderr
    assert re.fullmatch(rf"test error \d+\.\d\d% \(Bayes classifier \d+\.\d\d%\); run saved in {re.escape(str(out))}",
                        last_line(result))


def test_moons_in_the_authors_setup(tmp_path):
    """--moons-setup authors trains on the authors' data and records the setup; a resume cannot
    switch it, and it takes neither another data set nor another number of labels."""
    out = tmp_path / "run"
    ok(run(*MOONS, "--moons-setup", "authors", "--epochs", 1, "--batch-size", 1000, "--out", out))
    assert json.loads((out / "config.json").read_text())["moons_setup"] == "authors"
    check_metrics(out, 1, SEMI_COLUMNS)
    assert "--moons-setup" in one_line_error(run("--resume", "--out", out, "--moons-setup", "ours"))
    assert "--dataset moons" in one_line_error(run(*MNIST, "--moons-setup", "authors", "--out", tmp_path / "m"))
    assert "6 fixed labeled points" in one_line_error(
        run(*MOONS, "--moons-setup", "authors", "--labels", 4, "--out", tmp_path / "l"))
    assert not (tmp_path / "m").exists() and not (tmp_path / "l").exists()


def test_mnist_with_the_authors_label_draw(tmp_path, data_dir):
    """--label-draw authors trains on the released code's labels and records the draw; a resume
    cannot switch it, and another data set refuses it."""
    out = tmp_path / "run"
    ok(run(*MNIST, "--label-draw", "authors", "--epochs", 1, "--data-dir", data_dir, "--out", out))
    assert json.loads((out / "config.json").read_text())["label_draw"] == "authors"
    check_metrics(out, 1, SEMI_COLUMNS)
    assert int(checkpoint(out / "checkpoint.npz")["epoch"]) == 1
    assert "--label-draw" in one_line_error(run("--resume", "--out", out, "--label-draw", "ours"))
    assert "--dataset mnist" in one_line_error(run(*MOONS, "--label-draw", "authors", "--out", tmp_path / "m"))
    assert not (tmp_path / "m").exists()


def test_eval_train_measures_the_classifier_on_the_unlabeled_training_images(tmp_path, data_dir):
    """--eval-train adds train_error_pct, the error of q(y|a,x) on the run's unlabeled images;
    it is an evaluation option, so a resume may turn it on. M2 has no a: no kl_a_ columns."""
    out = tmp_path / "run"
    ok(run(*MNIST, "--model", "m2", "--epochs", 1, "--data-dir", data_dir, "--out", out))
    ok(run("--resume", "--out", out, "--epochs", 2, "--eval-train"))
    fields, rows = metrics(out)
    assert not any(k.startswith("kl_a_") for k in fields)
    assert rows[0]["train_error_pct"] == "" and 0 <= float(rows[1]["train_error_pct"]) <= 100
    # 200 images: the error is a multiple of 0.5 %
    assert float(rows[1]["train_error_pct"]) * 2 == round(float(rows[1]["train_error_pct"]) * 2)


def test_svhn_and_norb_pipelines_on_the_format_fixtures(tmp_path, fixtures_dir):
    """The full datasets cannot be fetched here; their pipelines run end to end on the fixtures
    (whose checksums are not the real files', hence --no-verify)."""
    data = ["--data-dir", fixtures_dir, "--no-verify", "--epochs", 1, *SMALL]
    ok(run("--dataset", "svhn", "--labels", 10, "--batch-size", 20, *data, "--out", tmp_path / "svhn"))
    check_metrics(tmp_path / "svhn", 1, SEMI_COLUMNS)
    check_figures(tmp_path / "svhn", ["samples.png", "analogies.png", "pca_a.png", "kl_per_unit.png"])
    ok(run("--dataset", "norb", "--model", "avae", "--batch-size", 4, *data, "--out", tmp_path / "norb"))
    check_metrics(tmp_path / "norb", 1, ["epoch", "seconds", "lr", "loss", "bound", "test_bound"])
    check_figures(tmp_path / "norb", ["samples.png"])
    # without --no-verify the file is refused, and a download tried (a real process: no network)
    refused = run_process("--dataset", "svhn", "--labels", 10, "--data-dir", fixtures_dir, *SMALL,
                          "--out", tmp_path / "x", "--epochs", 1)
    assert refused.returncode != 0 and "fails its checksum" in refused.stderr
    assert not (tmp_path / "x").exists()


def test_potential_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = ok(run("--dataset", "potential", "--epochs", 1, "--device", "cpu", "--out", out))
    rows = check_metrics(out, 1, ["epoch", "seconds", "lr", "loss", "bound", "test_bound", "log_z_iw", "log_z_true"])
    check_checkpoint(out, 1, result.stderr)
    check_figures(out, ["potential.png"])
    assert float(rows[0]["log_z_true"]) == pytest.approx(train.datasets.log_z(1))
    assert re.fullmatch(rf"test_bound \S+  log_z_iw \S+  log_z_true \S+; run saved in {re.escape(str(out))}", last_line(result))


def test_auxiliary_vae_on_the_mnist_subset(tmp_path, data_dir):
    out = tmp_path / "run"
    result = ok(run(*MNIST, "--model", "avae", "--epochs", 1, "--data-dir", data_dir, "--out", out))
    rows = check_metrics(out, 1, ["epoch", "seconds", "lr", "loss", "bound", "test_bound"])
    assert float(rows[0]["test_bound"]) < 0  # a log-likelihood bound on 444 binary-ish pixels
    check_checkpoint(out, 1, result.stderr)
    assert re.fullmatch(rf"test_bound -\d+\.?\d*; run saved in {re.escape(str(out))}", last_line(result))


def test_auxiliary_vae_on_the_half_moons(tmp_path):
    """On 2-D points the avae's figure is a histogram of p(x|z)'s means beside the test points'."""
    out = tmp_path / "run"
    result = ok(run(*MOONS, "--model", "avae", "--epochs", 1, "--batch-size", 1000, "--out", out))
    check_metrics(out, 1, ["epoch", "seconds", "lr", "loss", "bound", "test_bound"])
    assert "note" not in result.stderr, result.stderr
    check_figures(out, ["samples.png"])
    assert png_size(out / "figures" / "samples.png")[0] > 2 * 200  # two 200-bin histograms side by side


@pytest.mark.parametrize("kind", ["semi-supervised", "avae"])
def test_the_importance_weighted_bound_reads_eval_images_and_gives_its_standard_error(kind):
    """--eval-images N: the importance-weighted bound of the first N test images, no more, with the
    mean and the standard error (std / sqrt(N)) of their estimates."""
    x_test = np.arange(7 * 2, dtype=np.float32).reshape(7, 2)
    seen = []

    class Model:
        pa_zy = None

        def evaluate(self, x, samples):
            return np.zeros(len(x), int), np.zeros(len(x), int), -np.ones(len(x))

        def log_likelihood(self, x, iw_samples):
            seen.append(len(x))
            return -x[:, 0]

    data = types.SimpleNamespace(x_test=x_test, y_test=np.zeros(7, int))
    config = {"iw_samples": 3, "eval_images": 5, "eval_samples": 1, "eval_train": False}
    row = kinds.KINDS[kind].metrics(Model(), data, config, True)
    values = -x_test[:5, 0]
    assert seen == [5]
    assert row["test_ll_iw3"] == pytest.approx(values.mean())
    assert row["test_ll_iw3_se"] == pytest.approx(values.std(ddof=1) / np.sqrt(5))


def test_a_long_evaluation_says_how_far_it_has_come(capsys):
    """counted: the chunks' starts, and (in a log file, every `every` seconds) how many images are
    done and the time left; nothing before the first chunk is done."""
    assert list(progress.counted(250, 100, "IW-5 bound", every=0)) == [0, 100, 200]
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("  ")[0] for line in lines] == ["IW-5 bound: 100/250 images", "IW-5 bound: 200/250 images"]
    assert all(re.fullmatch(r"IW-5 bound: \d+/250 images  \d+s  eta \d+s", line) for line in lines), lines
    assert list(progress.counted(250, 100, "IW-5 bound")) == [0, 100, 200] and not capsys.readouterr().err  # < 60 s


def test_the_etas_of_an_epoch_and_of_the_run_are_from_the_pace_of_this_process(capsys, monkeypatch):
    """A run resumed after epoch 4 of 10, 200 s an epoch (a clock set by hand): a quarter into
    epoch 5 the epoch has 150 s to go and the run 150 + 5·200 s; after epoch 5, 5·200 s; half into
    epoch 6, 100 + 4·200 s; after it, 4·200 s. The pace is that of the epochs this process trained."""
    now = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    shown = progress.Progress(10, start=4, every=0)
    for epoch, started, step, at, end in ((5, 1000, 25, 1050, 1200), (6, 1200, 50, 1300, 1400)):
        now[0] = at
        shown.update(epoch, step, 100, started, 1.0)
        now[0] = end
        shown.done(epoch, {"seconds": 200.0, "loss": 1.0})
    lines = capsys.readouterr().err.splitlines()
    etas = [re.search(r"eta +(\d+)s \(run (\w+)\)", line).groups() for line in lines[::2]]
    assert etas == [("150", "19m"), ("100", "15m")], lines                       # 1150 s, 900 s
    assert [line.split("run eta ")[1] for line in lines[1::2]] == ["17m", "13m"], lines  # 1000 s, 800 s


def test_a_process_first_batch_gives_no_eta(capsys, monkeypatch):
    """The first batch a process trains carries its warm-up: 4 s where later ones take 1 s. Its
    line estimates nothing (from it alone the epoch would have 396 s to go, not 99); the next does."""
    now = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    shown = progress.Progress(10, start=4, every=0)
    for step, at in ((1, 1004), (2, 1005)):
        now[0] = at
        shown.update(5, step, 100, 1000, 1.0)
    first, second = capsys.readouterr().err.splitlines()
    assert "eta from the next line" in first and not re.search(r"\d+s \(run", first), first
    assert re.search(r"eta +(\d+)s \(run", second).group(1) == str(round(5 / 2 * 98)), second


@pytest.mark.parametrize("kind", ["semi-supervised", "avae"])
def test_figures_are_drawn_in_evaluation_mode_and_the_model_trains_on_whatever_happens(monkeypatch, kind, tmp_path):
    """redraw_figures: the kind's figures see the model in evaluation mode, without gradients and
    on a generator of their own; afterwards, even when drawing fails, the model is back in training
    mode, gradients are on and the training generator is the one it was."""
    model = (adgm.ADGM(2, 2, hidden=(4,), a_dim=2, z_dim=2, batchnorm=True) if kind == "semi-supervised" else
             adgm.AuxiliaryVAE(2, 1, (4,), 2, 2, batchnorm=True))
    seen, generator = [], train.ad.rng

    def draw(model, data, config, folder, rows):
        seen.append((model.training, train.ad._grad_enabled, train.ad.rng is generator, folder))
        raise OSError("disk full")

    monkeypatch.setitem(kinds.KINDS, kind, kinds.KINDS[kind]._replace(figures=draw))
    config = {"dataset": "moons", "model": "adgm" if kind == "semi-supervised" else "avae", "seed": 0}
    with pytest.raises(OSError, match="disk full"):
        train.redraw_figures(model, None, config, tmp_path, [], 10)
    assert seen == [(False, False, False, tmp_path / "figures")]
    assert model.training and all(m.training for m in model.modules())
    assert train.ad._grad_enabled and train.ad.rng is generator


# ---------------------------------------------------------------------------------------------
# Resume and --evaluate
# ---------------------------------------------------------------------------------------------

def test_resumed_run_equals_a_straight_run(mnist_run, tmp_path, data_dir):
    """1 epoch, then --resume --epochs 2: the same rows (but the timing) and the same final state
    as 2 epochs in one go. MNIST exercises the binarisation drawn anew every epoch."""
    straight, _ = mnist_run
    out = tmp_path / "run"
    ok(run(*MNIST, "--epochs", 1, "--data-dir", data_dir, "--out", out))
    assert len(metrics(out)[1]) == 1
    ok(run(*MNIST, "--epochs", 2, "--data-dir", data_dir, "--out", out, "--resume"))
    (fields_a, rows_a), (fields_b, rows_b) = metrics(straight), metrics(out)
    assert fields_a == fields_b
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(rows_a) == drop(rows_b)  # compared as the strings in the files
    a, b = checkpoint(straight / "checkpoint.npz"), checkpoint(out / "checkpoint.npz")
    assert a.keys() == b.keys()
    for key in a:
        if key == "config":
            assert json.loads(str(a[key])) == json.loads(str(b[key]))
        else:
            assert np.array_equal(a[key], b[key]), key


def test_resume_keeps_the_stored_options_not_typed_again(mnist_run, tmp_path):
    """`--resume --out RUN` alone: the data folder, epochs and model stored with the run are used,
    not the command line's defaults (which would be 1000 epochs and the default data folder, not
    reachable offline)."""
    out = tmp_path / "run"
    shutil.copytree(mnist_run[0], out)
    result = ok(run("--resume", "--out", out))
    assert len(metrics(out)[1]) == 2
    assert last_line(result).startswith("test error ")


def test_resume_rewrites_config_json_with_its_keys_in_their_order(tmp_path):
    """A resumed run's config.json differs from the first one's only in the options that changed,
    so that a committed copy of it shows no churn: the keys keep their order."""
    out = tmp_path / "run"
    ok(run(*MOONS, "--epochs", 1, "--out", out))
    before = json.loads((out / "config.json").read_text())
    resumed = ok(run("--resume", "--out", out, "--epochs", 2))
    after = json.loads((out / "config.json").read_text())
    assert list(after) == list(before)
    assert after == {**before, "epochs": 2}
    assert resumed.stderr.splitlines()[0] == f"resuming {out} at epoch 2 of 2"  # not the header of a new run


def test_the_learning_rate_falls_after_each_block_of_epochs_also_across_a_resume(tmp_path):
    """--lr-decay-every 2 --lr-decay 0.5: epochs 1-2 train at --lr, 3-4 at half of it, 5 at a
    quarter (the paper's schedule: × 0.75 after every 200 epochs), as metrics.csv's lr shows,
    with the run resumed at a block's boundary and inside a block."""
    out = tmp_path / "run"
    ok(run(*MOONS, "--batch-size", 1000, "--lr", 0.01, "--lr-decay", 0.5, "--lr-decay-every", 2, "--epochs", 2,
           "--out", out))
    ok(run("--resume", "--out", out, "--epochs", 3))
    ok(run("--resume", "--out", out, "--epochs", 5))
    assert [float(r["lr"]) for r in metrics(out)[1]] == [0.01, 0.01, 0.005, 0.005, 0.0025]


def test_alpha_weighs_the_classifier_by_beta_times_the_images_over_the_labeled_ones():
    """α = β·N/N_l (Eq. 12): N the training examples, all of them used as unlabeled data; N_l the
    labeled ones."""
    config = options.run_config(options.parse_args([*MOONS, "--labels", "6", "--beta", "0.5"]))
    data, _, _, _, alpha = train.build(config)
    assert len(data.x_labeled) == 6 and alpha == 0.5 * len(data.x_unlabeled) / 6


def test_the_kl_temperature_rises_from_0_over_the_warmup_epochs(tmp_path, monkeypatch):
    """--warmup 4: T = 0, 1/4, 2/4, 3/4 in epochs 1-4, then 1 (the warm-up of Sec. 4.3)."""
    temperatures, step_loss = [], train.step_loss

    def recorded(config, alpha, temperature):
        temperatures.append(temperature)
        return step_loss(config, alpha, temperature)
    monkeypatch.setattr(train, "step_loss", recorded)
    ok(run(*MOONS, "--batch-size", 1000, "--warmup", 4, "--epochs", 6, "--out", tmp_path / "run"))
    assert temperatures == [0, 0.25, 0.5, 0.75, 1, 1]


def test_the_logged_test_error_is_the_percentage_of_wrong_predictions():
    """metrics.csv's test errors count the predictions unlike the labels, in %, with --eval-samples
    samples of a; the test bound is the mean over the test images."""
    class Model:
        pa_zy = None

        def evaluate(self, x, samples):
            i = x[:, 0]
            samples_seen.append(samples)
            return np.where(i < 120, (i + 1) % 3, i % 3), np.where(i < 300, (i + 2) % 3, i % 3), -i
    samples_seen, x = [], np.arange(1200.0)[:, None]
    data = types.SimpleNamespace(x_test=x, y_test=np.arange(1200) % 3)
    config = dict(eval_samples=7, eval_train=False, iw_samples=0)
    row = kinds.semi_supervised_metrics(Model(), data, config, final=True)
    assert row == {"test_error_pct": 10.0, "test_error_bayes_pct": 25.0, "test_bound": -599.5}
    assert samples_seen == [7, 7, 7]  # 500 images at a time


PAPER_SETUPS = {  # Sec. 4 of the paper: what each data set trains with no option given (at --settings paper)
    "mnist": dict(model="adgm", labels=100, epochs=1000, batch_size=100, hidden=[500, 500], latent=[100, 100],
                  lr=3e-4, lr_decay=0.75, lr_decay_every=200, beta=0.1, samples=1, pixels="filtered",
                  batchnorm=False),
    "svhn": dict(model="sdgm", labels=1000, epochs=1000, batch_size=1000, hidden=[500, 500], latent=[100, 100],
                 lr=3e-4, lr_decay=0.75, lr_decay_every=200, beta=0.1, samples=1),
    "norb": dict(model="sdgm", labels=1000, epochs=1000, hidden=[500, 500], latent=[100, 100], lr=3e-4, beta=0.1),
    "moons": dict(model="adgm", labels=6, batch_size=100, hidden=[100, 100], latent=[10, 10], samples=1),
    "potential": dict(model="avae", hidden=[20, 20, 20], latent=[4, 2]),
}


@pytest.mark.parametrize("dataset", PAPER_SETUPS)
def test_each_data_set_trains_the_papers_setup_by_default(dataset):
    """The values of Sec. 4 (batches of 100 + 100 on MNIST, 1000 + 1000 on SVHN; 2×500 hidden,
    dim(a) = dim(z) = 100; Adam 3·10⁻⁴ × 0.75 every 200 of 1000 epochs; 2×100 and 10 on the moons,
    3×20 with dim(a) = 4, dim(z) = 2 on the potentials), written out here rather than read from
    options.DEFAULTS."""
    config = options.run_config(options.parse_args(["--dataset", dataset, "--settings", "paper"]))
    assert {k: config[k] for k in PAPER_SETUPS[dataset]} == PAPER_SETUPS[dataset]


def settings_of(*argv):
    config = options.run_config(options.parse_args([str(a) for a in argv]))
    return {k: config[k] for k in ("batchnorm", "beta", "temperature_a")}


STABILISED = dict(batchnorm=True, beta=2.0, temperature_a=0.01)
PAPER = dict(batchnorm=False, beta=0.1, temperature_a=1.0)


def test_the_main_job_trains_the_stabilised_adgm_and_the_paper_settings_are_one_option_away():
    """--model adgm on MNIST: --settings stabilised unless told; the paper's stated settings with
    --settings paper; every other model and data set: the paper's; typed options go over a preset."""
    assert settings_of("--dataset", "mnist", "--labels", 100) == STABILISED
    assert settings_of("--dataset", "mnist", "--model", "adgm") == STABILISED
    assert settings_of("--dataset", "mnist", "--settings", "paper") == PAPER
    assert settings_of("--model", "sdgm") == settings_of("--model", "m2") == settings_of("--dataset", "moons") == PAPER
    assert settings_of("--model", "m2", "--settings", "stabilised") == {**STABILISED, "temperature_a": 1.0}  # no a
    assert settings_of("--beta", 0.5, "--temperature-a", 1) == {**STABILISED, "beta": 0.5, "temperature_a": 1.0}
    assert settings_of("--settings", "paper", "--batchnorm") == {**PAPER, "batchnorm": True}
    assert "settings" not in options.run_config(options.parse_args([]))  # the run keeps what they set
    with pytest.raises(options.UserError, match="^--settings stabilised is for the semi-supervised models"):
        options.parse_args(["--dataset", "potential", "--settings", "stabilised"])


def test_a_run_of_the_paper_settings_resumes_as_it_was_started(tmp_path):
    """A run folder of the paper's settings (as every MNIST ADGM run was before the main job
    trained stabilised) resumes with them when --resume is given alone; --settings stabilised
    on --resume is refused, naming what it would change."""
    from test_datasets import write_tiny_mnist
    write_tiny_mnist(tmp_path / "data")
    out, data = tmp_path / "run", ["--no-verify", "--data-dir", tmp_path / "data"]
    result = ok(run("--dataset", "mnist", "--labels", 20, "--batch-size", 50, *SMALL, "--epochs", 1,
                    "--settings", "paper", *data, "--out", out))
    assert "mnist adgm (the paper's settings: β 0.1, no batch normalisation, T_a 1): " in result.stderr
    started = json.loads((out / "config.json").read_text())
    assert {k: started[k] for k in PAPER} == PAPER
    result = ok(run("--resume", "--out", out, "--epochs", 2))
    assert "mnist adgm (the paper's settings: " in result.stderr
    assert json.loads((out / "config.json").read_text()) == {**started, "epochs": 2}
    assert len(metrics(out)[1]) == 2
    line = one_line_error(run("--resume", "--out", out, "--epochs", 3, "--settings", "stabilised"))
    assert "--batchnorm, --beta, --temperature-a" in line
    assert len(metrics(out)[1]) == 2


def test_resume_refuses_a_changed_model_option(mnist_run, tmp_path, data_dir):
    out = tmp_path / "run"
    shutil.copytree(mnist_run[0], out)
    line = one_line_error(run(*MNIST, "--model", "m2", "--epochs", 3, "--data-dir", data_dir, "--out", out,
                              "--resume"))
    assert "--model" in line and "--epochs" in line  # what differs, and what may change
    assert len(metrics(out)[1]) == 2


def test_resume_of_a_finished_run_prints_its_summary(moons_run, tmp_path):
    """--resume with the epochs already done: nothing to train, the summary of the last row."""
    out = tmp_path / "run"
    shutil.copytree(moons_run[0], out)
    result = ok(run(*MOONS, "--epochs", 2, "--batch-size", 200, "--out", out, "--resume"))
    error, bayes = (float(metrics(out)[1][-1][k]) for k in ("test_error_pct", "test_error_bayes_pct"))
    assert last_line(result) == f"test error {error:.2f}% (Bayes classifier {bayes:.2f}%); run saved in {out}"
    assert len(metrics(out)[1]) == 2


@pytest.mark.parametrize("iw", [0, 5])
def test_evaluate_prints_the_test_results(mnist_run, iw):
    out, _ = mnist_run
    before = snapshot(out)
    result = ok(run("--evaluate", out, "--device", "cpu", *(["--iw-samples", iw] if iw else [])))
    line = last_line(result)
    m = re.fullmatch(rf"{re.escape(str(out))} \(epoch 2\): test_error (\d+\.\d\d)%  test_error_bayes (\d+\.\d\d)%  "
                     r"test_bound (-\d+\.\d+)(?:  test_ll_iw5 (\S+)  test_ll_iw5_se (\S+))?", line)
    assert m, line
    assert 0 <= float(m[1]) <= 100 and 0 <= float(m[2]) <= 100
    assert float(m[3]) == pytest.approx(float(metrics(out)[1][-1]["test_bound"]), rel=0.05)
    if iw:
        assert m[4] is not None and math.isfinite(float(m[4])) and float(m[4]) < 0
        assert 0 < float(m[5]) < abs(float(m[4]))  # the standard error over the test images
    else:
        assert m[4] is None
    unchanged = lambda snap: {k: v for k, v in snap.items()  # noqa: E731
                              if k.parts[0] != "figures" and k.name != "evaluations.csv"}
    assert unchanged(snapshot(out)) == unchanged(before)  # evaluating only records and redraws
    assert set(snapshot(out)) == set(before) | {pathlib.Path("evaluations.csv")}
    lines = (out / "evaluations.csv").read_text().splitlines()
    assert lines[0] == "epoch,eval_samples,iw_samples,eval_images,metric,value" and lines.count(lines[0]) == 1
    recorded = {row.split(",")[4]: float(row.split(",")[5]) for row in lines[1:] if row.startswith(f"2,1,{iw},0,")}
    assert recorded["test_bound"] == pytest.approx(float(m[3]), abs=1e-4)  # what was printed, in full
    assert ("test_ll_iw5" in recorded) == bool(iw)
    assert not any(k.startswith("kl_a_") for k in recorded)  # what was printed, no more


# ---------------------------------------------------------------------------------------------
# User mistakes: one line on stderr, starting with "error:", and a non-zero exit
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(train.ad._import_cupy() is not None, reason="this machine has a working CuPy")
def test_gpu_without_cupy(tmp_path):
    line = one_line_error(run(*MOONS[:-2], "--device", "gpu", "--out", tmp_path / "run"))
    assert "CuPy" in line and not (tmp_path / "run").exists()


def test_off_posix_the_program_says_where_it_runs(tmp_path):
    """Locks and SIGHUP are POSIX: elsewhere one line says so, before any import can fail."""
    code = ("import os, pathlib, runpy, sys; os.name = 'nt'; "  # Python 3.9's pathlib reads os.name on import
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code, "train.py", *MOONS, "--out", str(tmp_path / "run")], cwd=ROOT,
                            env=environment(), capture_output=True, text=True, timeout=60)
    assert one_line_error(result) == ("error: train.py needs a POSIX system such as Linux or macOS (it locks run "
                                      "folders with fcntl); on Windows, run it under WSL") and result.returncode == 2
    assert not (tmp_path / "run").exists()


def test_unknown_dataset(tmp_path):
    line = one_line_error(run("--dataset", "cifar10", *SMALL, "--out", tmp_path / "run"))
    assert "cifar10" in line


def test_labels_not_a_multiple_of_the_classes(tmp_path, data_dir):
    line = one_line_error(run(*MNIST, "--labels", 7, "--data-dir", data_dir, "--out", tmp_path / "run"))
    assert "7" in line and "10 classes" in line


def test_no_labels_for_a_semi_supervised_model(tmp_path):
    """--labels 0 leaves the classifier nothing to learn from (and α = β·N/N_l undefined)."""
    line = one_line_error(run(*MOONS, "--labels", 0, "--epochs", 1, "--out", tmp_path / "run"))
    assert "--labels" in line


@pytest.mark.parametrize("model", ["m2", "adgm-det", "adgm-authors"])
def test_temperature_on_a_needs_a_stochastic_a_with_a_prior(tmp_path, model):
    line = one_line_error(run(*MOONS, "--model", model, "--temperature-a", 0.5, "--out", tmp_path / "run"))
    assert "--temperature-a" in line and model in line and not (tmp_path / "run").exists()


REFUSED = [(option, model) for option, models in [
    (["--x-in-pa"], ["sdgm", "m2", "adgm-det", "adgm-authors", "adgm-authors-det", "avae"]),
    (["--temperature-a", "0.5"], ["adgm-authors-det", "avae"]),
    (["--layers", "2"], ["adgm", "m2"])] for model in models]


@pytest.mark.parametrize("option, model", REFUSED, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_an_option_the_model_does_not_take_is_refused(tmp_path, option, model):
    line = one_line_error(run(*MOONS, "--model", model, *option, "--epochs", 1, "--out", tmp_path / "run"))
    assert line.startswith(f"error: {option[0]} ") and f"--model {model} does not take it" in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option", [["--batchnorm"], ["--authors-order"], ["--layers", "2"], ["--x-in-pa"]])
def test_the_potential_takes_no_option_of_a_model_of_data(tmp_path, option):
    line = one_line_error(run("--dataset", "potential", *option, "--epochs", 1, "--out", tmp_path / "run"))
    assert line.startswith(f"error: {option[0]} ") and "--dataset potential does not take it" in line, line


@pytest.mark.parametrize("argv, says", [
    (["--dataset", "moons", "--potential", "3"], "^--potential 3 chooses U_k for --dataset potential; --dataset moons"),
    (["--model", "sdgm", "--qy-average"], "^--qy-average .* with --samples 1 it changes nothing"),
])
def test_an_option_that_would_change_nothing_is_refused(argv, says):
    with pytest.raises(options.UserError, match=says):
        options.parse_args(argv)
    options.parse_args(["--dataset", "potential", "--potential", "3"])  # where they apply, they are taken
    options.parse_args(["--model", "sdgm", "--qy-average", "--samples", "2"])


@pytest.mark.parametrize("model", ["adgm-authors", "adgm-authors-det"])
@pytest.mark.parametrize("dataset", ["svhn", "norb"])
def test_the_released_codes_adgm_trains_mnist_and_the_moons_only(dataset, model):
    """The released ADGM code has a Bernoulli p(x|y,z) and no setup for SVHN or NORB: refused
    there, pointing to the paper's ADGM."""
    with pytest.raises(options.UserError, match=f"^--model {model} is the released ADGM code, .*--model adgm$"):
        options.parse_args(["--dataset", dataset, "--model", model])
    options.parse_args(["--dataset", dataset, "--model", "adgm"])


def test_every_model_has_one_record_and_every_option_it_takes_applies():
    """kinds.MODELS is the one table of models: --model offers exactly its names, each kind is
    one of kinds.KINDS, and each option it lists is one that only some models take."""
    parser = {a.dest: a for a in options.build_parser()._actions}
    assert list(parser["model"].choices) == list(kinds.MODELS)
    for name, model in kinds.MODELS.items():
        assert model.kind in kinds.KINDS, name
        assert set(model.takes) <= set(kinds.ONLY_SOME), name
        assert issubclass(model.cls, adgm.SemiSupervised) == (model.kind == "semi-supervised"), name
    for key, (_, off) in kinds.ONLY_SOME.items():
        assert off == options.COMMON.get(key, parser[key].default), key  # refused only when set


@pytest.mark.parametrize("args, says", [
    (["--model", "m2", "--x-in-pa"], "--x-in-pa"),        # an option the model does not take
    (["--lr", "nan"], "--lr nan: must be a finite number"),  # a value out of range
    (["--labels", "7"], "10 classes"),                     # a data error, once MNIST is read
    (["--evaluate", "{tmp}"], "no checkpoint"),            # a run folder without its checkpoint
])
def test_refusals_from_the_shell_are_one_line(tmp_path, data_dir, args, says):
    """As a user sees them: a real process, one 'error:' line on stderr, no traceback, exit 2."""
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    dataset = ["--dataset", "moons"] if "--model" in args else ["--dataset", "mnist", "--data-dir", data_dir]
    training = [*dataset, *SMALL, "--epochs", 1, "--out", tmp_path / "run"] if "--evaluate" not in args else []
    result = run_process(*training, *args)
    assert says in one_line_error(result) and result.returncode == 2 and result.stdout == ""
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("model", ["avae", "gauss"])
def test_potential_needs_a_two_dimensional_z(tmp_path, model):
    """U_k(z1, z2) is a density on R²: with more dimensions of z, exp(−U) does not decay along the
    others, is not normalisable, and log_z_iw means nothing."""
    line = one_line_error(run("--dataset", "potential", "--model", model, "--latent", 4, 4, "--epochs", 1,
                              "--device", "cpu", "--out", tmp_path / "run"))
    assert "--latent" in line


GARBAGE = {"bytes": lambda good: b"this is not an npz file\n" * 40, "truncated": lambda good: good[:len(good) // 2],
           "empty": lambda good: b""}


@pytest.mark.parametrize("mode", ["resume", "evaluate"])
@pytest.mark.parametrize("content", GARBAGE)
def test_corrupted_checkpoint(moons_run, tmp_path, content, mode):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(moons_run[0] / "config.json", out)
    (out / "checkpoint.npz").write_bytes(GARBAGE[content]((moons_run[0] / "checkpoint.npz").read_bytes()))
    args = ["--resume", "--out", out, *MOONS, "--epochs", 3] if mode == "resume" else ["--evaluate", out]
    line = one_line_error(run(*args))
    assert str(out / "checkpoint.npz") in line


def test_evaluate_with_refreshed_averages(tmp_path, moons_run):
    """--refresh-averages N: the BatchNorm averages recomputed from N training batches before the
    evaluation, the same each time, the checkpoint untouched, the numbers recorded under names of
    their own; refused without --evaluate and for a run without batch normalisation."""
    out = tmp_path / "run"
    ok(run(*MOONS, "--batchnorm", "--epochs", 1, "--batch-size", 200, "--out", out))
    weights = (out / "checkpoint.npz").read_bytes()
    plain = last_line(ok(run("--evaluate", out)))
    refreshed = [last_line(ok(run("--evaluate", out, "--refresh-averages", 20))) for _ in range(2)]
    assert refreshed[0] == refreshed[1] != plain
    assert (out / "checkpoint.npz").read_bytes() == weights
    names = [row.split(",")[4] for row in (out / "evaluations.csv").read_text().splitlines()[1:]]
    assert names.count("test_bound") == 1 and names.count("test_bound_refreshed") == 2
    assert {n for n in names if not n.endswith("_refreshed")} == {n[:-len("_refreshed")] for n in names
                                                                  if n.endswith("_refreshed")}
    assert one_line_error(run(*MOONS, "--epochs", 1, "--refresh-averages", 5, "--out", tmp_path / "x")).startswith(
        "error: --refresh-averages recomputes")
    assert one_line_error(run("--evaluate", moons_run[0], "--refresh-averages", 5)) == (
        f"error: --refresh-averages: {moons_run[0]} was trained without --batchnorm; it has no averages to refresh")


def test_evaluate_takes_only_how_to_evaluate(tmp_path, moons_run):
    """--evaluate RUN evaluates the run as it was trained: an option of the run (or of training) is
    refused in one line rather than ignored; --eval-train adds the training images' error."""
    for given in (["--lr", "0.1"], ["--dataset", "mnist"], ["--epochs", "5"], ["--settings", "paper"],
                  ["--out", "x", "--resume"], ["--subset", "50"]):
        with pytest.raises(options.UserError, match=f"^--evaluate r evaluates the run as it was trained: it does "
                                                    f"not take {', '.join(g for g in given if g.startswith('--'))} "
                                                    r"\(only --data-dir, --device, --eval-images,"):
            options.parse_args(["--evaluate", "r", *given])
    options.parse_args(["--evaluate", "r", "--device", "cpu", "--iw-samples", "5", "--eval-images", "10",
                        "--eval-samples", "2", "--eval-train", "--no-verify", "--refresh-averages", "3"])
    out = tmp_path / "run"
    shutil.copytree(moons_run[0], out)
    assert "train_error" not in last_line(ok(run("--evaluate", out)))
    assert "  train_error " in last_line(ok(run("--evaluate", out, "--eval-train")))


def test_evaluate_a_folder_without_checkpoint(tmp_path):
    line = one_line_error(run("--evaluate", tmp_path))
    assert "no checkpoint" in line


def test_resume_without_checkpoint(tmp_path):
    line = one_line_error(run(*MOONS, "--out", tmp_path, "--resume"))
    assert "no checkpoint" in line


def test_output_folder_of_another_configuration(mnist_run, data_dir):
    out, _ = mnist_run
    before = snapshot(out)
    line = one_line_error(run(*MNIST, "--epochs", 2, "--lr", 1e-3, "--data-dir", data_dir, "--out", out))
    assert "different configuration" in line and str(out) in line
    assert snapshot(out) == before


def test_finished_run_folder_is_not_reused_without_resume(mnist_run, data_dir):
    out, _ = mnist_run
    before = snapshot(out)
    line = one_line_error(run(*MNIST, "--epochs", 2, "--data-dir", data_dir, "--out", out))
    assert "--resume" in line and str(out) in line
    assert snapshot(out) == before


def test_a_new_run_is_not_scattered_among_files_that_are_not_a_runs(tmp_path):
    """--out ~, or --out runs meaning runs/new: refused, with nothing written. A folder holding
    only what a run leaves (a metrics.csv kept aside, figures, output.txt) and hidden files is
    the run's own, and a new run starts there."""
    home = tmp_path / "home"
    for folder in ("notes", "runs/a", "runs/b"):
        (home / folder).mkdir(parents=True)
    for name in ("thesis.tex", "todo.txt", ".bashrc"):
        (home / name).write_text("mine\n")
    before = snapshot(home)
    line = one_line_error(run(*MOONS, "--epochs", 1, "--out", home))
    assert line == (f"error: --out {home} holds files that are not a run's (notes, runs, thesis.tex and 1 more): "
                    "a new run needs a new or empty folder (or its own, to start it over)")
    assert snapshot(home) == before and sorted(p.name for p in home.iterdir()) == [".bashrc", "notes", "runs",
                                                                                   "thesis.tex", "todo.txt"]
    own = tmp_path / "own"
    (own / "figures").mkdir(parents=True)
    for name in ("metrics.csv.aside", "output.txt", ".DS_Store", "figures/samples.png"):
        (own / name).write_text("")
    ok(run(*MOONS, "--epochs", 1, "--batch-size", 1000, "--out", own))
    assert (own / "checkpoint.npz").exists()


# ---------------------------------------------------------------------------------------------
# A non-finite loss, unpicklable checkpoints, Ctrl-C
# ---------------------------------------------------------------------------------------------

def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """On moons (100 batches an epoch) the loss turns NaN at epoch 2, batch 3: the run stops at
    the next check with an error naming both, and checkpoint.npz still holds epoch 1."""
    real, calls = adgm.SemiSupervised.loss, itertools.count(1)

    def poisoned(self, *args, **kwargs):
        J, stats = real(self, *args, **kwargs)
        return (J * float("nan"), stats) if next(calls) >= 103 else (J, stats)

    monkeypatch.setattr(adgm.SemiSupervised, "loss", poisoned)
    out = tmp_path / "run"
    result = run(*MOONS, "--epochs", 3, "--out", out)
    err = result.stderr.strip().splitlines()
    assert result.returncode != 0
    assert err[-1].startswith("error: ") and "epoch 2, batch 3" in err[-1] and "(epoch 1)" in err[-1], err
    ckpt = checkpoint(out / "checkpoint.npz")
    assert int(ckpt["epoch"]) == 1
    assert all(np.all(np.isfinite(v)) for k, v in ckpt.items() if k.startswith(("param/", "adam/")))
    assert [r["epoch"] for r in metrics(out)[1]] == ["1"]


class Payload:
    """Unpickling this creates `marker`: proof that a checkpoint was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("mode", ["resume", "evaluate"])
def test_checkpoint_with_an_object_array_is_refused_unread(moons_run, tmp_path, mode):
    out, marker = tmp_path / "run", tmp_path / "unpickled"
    shutil.copytree(moons_run[0], out)
    arrays = checkpoint(out / "checkpoint.npz")
    arrays["param/evil"] = np.array([Payload(marker)], dtype=object)
    with open(out / "checkpoint.npz", "wb") as f:
        np.savez(f, **arrays)  # allow_pickle defaults to True when saving
    args = ["--resume", "--out", out, *MOONS, "--epochs", 3] if mode == "resume" else ["--evaluate", out]
    line = one_line_error(run(*args))
    assert str(out / "checkpoint.npz") in line
    assert not marker.exists()


def test_ctrl_c_keeps_the_last_epoch_and_resume_continues_from_it(tmp_path):
    """Ctrl-C mid-run: exit 130, one line that names the epoch and the command that continues;
    checkpoint.npz holds the last finished epoch, and no interrupted.npz is written (nothing
    would read it). The command is pasted into a shell as printed, whatever the folder's name."""
    out = tmp_path / "Bob's run $1"
    args = [*MOONS, "--batch-size", 500, "--epochs", 1000, "--out", out]  # 20 batches an epoch
    returncode, stderr = interrupt_once(args, out / "metrics.csv")
    assert returncode == 130, stderr
    assert "Traceback" not in stderr
    m = re.search(r"interrupted \(SIGINT\) during epoch (\d+);.* continue with (python3 train.py .*)$",
                  stderr.strip().splitlines()[-1])
    assert m and shlex.split(m[2]) == ["python3", "train.py", "--resume", "--out", str(out)], stderr
    assert int(checkpoint(out / "checkpoint.npz")["epoch"]) == int(m[1]) - 1 >= 1
    assert not (out / "interrupted.npz").exists()
