"""Tests of train.py, the command line: short runs from the shell on moons, a small MNIST subset,
the potential and the auxiliary VAE (metrics, checkpoint, figures, last line); a resumed run
equal to a straight one; --evaluate; a one-line "error:" and no traceback for every user
mistake; a non-finite loss; checkpoints read without unpickling; Ctrl-C.

Runs are small (--hidden 16 --latent 4 4, --subset 200 on MNIST) and go through a real
subprocess, as a user would start them; only the non-finite loss is forced in-process. No run
reaches the network: every subprocess gets an HTTP(S) proxy on a closed local port, so a
download attempt fails at once.
"""
import csv
import itertools
import json
import math
import os
import pathlib
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest

import adgm
import train

ROOT = pathlib.Path(train.__file__).resolve().parent
SMALL = ["--hidden", "16", "--latent", "4", "4", "--device", "cpu"]
MNIST = ["--dataset", "mnist", "--subset", "200", "--labels", "10", "--batch-size", "50", *SMALL]
MOONS = ["--dataset", "moons", *SMALL]
SEMI_COLUMNS = ["epoch", "seconds", "lr", "loss", "bound_labeled", "bound_unlabeled", "log_px", "kl_z", "kl_a",
                "cross_entropy", "entropy_qy", "test_error_pct", "test_error_bayes_pct", "test_bound"]
OFFLINE = "http://127.0.0.1:9"  # the discard port: nothing listens, a connection is refused at once


# ---------------------------------------------------------------------------------------------
# Helpers: running train.py, reading what it wrote
# ---------------------------------------------------------------------------------------------

def environment():
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "adgm_data", "adgm_device")}
    env.update(http_proxy=OFFLINE, https_proxy=OFFLINE, HTTP_PROXY=OFFLINE, HTTPS_PROXY=OFFLINE)
    return env


def run(*args, timeout=120):
    """train.py with `args` from the repository root, as a user would start it."""
    return subprocess.run([sys.executable, "train.py", *map(str, args)], cwd=ROOT, env=environment(),
                          capture_output=True, text=True, timeout=timeout)


def ok(result):
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


def one_line_error(result):
    """The single 'error: ...' line of a refused command (non-zero exit, no traceback)."""
    assert result.returncode not in (0, None), result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


_finished = {}


def finished_run(name, args, tmp_path_factory):
    """A run done once for the module (tests must not change its folder): (folder, result)."""
    if name not in _finished:
        out = tmp_path_factory.mktemp(name) / "run"
        _finished[name] = out, ok(run(*args, "--out", out))
    return _finished[name]


@pytest.fixture
def mnist_run(data_dir, tmp_path_factory):
    """2 epochs of the ADGM on 200 MNIST training and test images, 10 labels."""
    return finished_run("mnist", [*MNIST, "--epochs", 2, "--data-dir", data_dir], tmp_path_factory)


@pytest.fixture
def moons_run(tmp_path_factory):
    """2 epochs of the ADGM on moons, 50 batches each."""
    return finished_run("moons", [*MOONS, "--epochs", 2, "--batch-size", 200], tmp_path_factory)


def metrics(folder):
    with open(folder / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def checkpoint(path):
    """The arrays of a checkpoint, read as train.py must read them: without unpickling."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def png_size(path):
    """(width, height) of a PNG, after checking its signature, every chunk's CRC, IHDR first and
    IEND last, and that the image data inflate to `height` filtered rows of the declared width."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path}: no PNG signature"
    chunks, pos = [], 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body, (crc,) = data[pos + 8:pos + 8 + length], struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"{path}: bad CRC in {kind}"
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND", [k for k, _ in chunks]
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert width > 0 and height > 0 and interlace == 0
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color]
    assert len(raw) == height * (1 + math.ceil(width * channels * depth / 8))
    return width, height


def check_metrics(folder, epochs, columns):
    fields, rows = metrics(folder)
    assert fields == columns
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    for row in rows:
        values = [float(row[k]) for k in columns]  # every column filled in on every row
        assert all(math.isfinite(v) for v in values), row
    return rows


def check_checkpoint(folder, epochs, stderr):
    """checkpoint.npz: parameters and Adam state, the epoch, the generator, the config."""
    ckpt = checkpoint(folder / "checkpoint.npz")
    params = {k: v for k, v in ckpt.items() if k.startswith("param/")}
    assert params and any(k.startswith("adam/") for k in ckpt)
    assert all(np.all(np.isfinite(v)) for v in params.values())
    assert int(ckpt["epoch"]) == epochs
    assert json.loads(str(ckpt["rng"]))["numpy"]  # the full generator state, for an exact resume
    assert json.loads(str(ckpt["config"])) == json.loads((folder / "config.json").read_text())
    count = int(re.search(r"([\d,]+) parameters", stderr).group(1).replace(",", ""))
    assert sum(v.size for v in params.values()) == count  # all of them (no batch-norm buffers here)
    return ckpt


def check_figures(folder, names):
    found = sorted(p.name for p in (folder / "figures").glob("*.png"))
    assert set(names) <= set(found), found
    for name in found:
        png_size(folder / "figures" / name)


def last_line(result):
    return result.stdout.strip().splitlines()[-1]


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
    assert "--label-draw" in one_line_error(run("--resume", "--out", out, "--label-draw", "ours"))
    assert "--dataset mnist" in one_line_error(run(*MOONS, "--label-draw", "authors", "--out", tmp_path / "m"))
    assert not (tmp_path / "m").exists()


def test_svhn_and_norb_pipelines_on_the_format_fixtures(tmp_path, fixtures_dir):
    """The full datasets cannot be fetched here; their pipelines run end to end on the fixtures
    (whose checksums are not the real files', hence --no-verify)."""
    data = ["--data-dir", fixtures_dir, "--no-verify", "--epochs", 1, *SMALL]
    ok(run("--dataset", "svhn", "--labels", 10, "--batch-size", 20, *data, "--out", tmp_path / "svhn"))
    check_metrics(tmp_path / "svhn", 1, SEMI_COLUMNS)
    check_figures(tmp_path / "svhn", ["samples.png", "analogies.png", "pca_a.png", "kl_per_unit.png"])
    ok(run("--dataset", "norb", "--model", "avae", "--batch-size", 4, *data, "--out", tmp_path / "norb"))
    check_figures(tmp_path / "norb", ["samples.png"])
    refused = run("--dataset", "svhn", "--labels", 10, "--data-dir", fixtures_dir, *SMALL, "--out", tmp_path / "x",
                  "--epochs", 1)
    assert refused.returncode != 0 and "fails its checksum" in refused.stderr  # without --no-verify


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
    ok(run("--resume", "--out", out, "--epochs", 2))
    after = json.loads((out / "config.json").read_text())
    assert list(after) == list(before)
    assert after == {**before, "epochs": 2}


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
                     r"test_bound (-\d+\.\d+)(?:  test_ll_iw5 (\S+))?", line)
    assert m, line
    assert 0 <= float(m[1]) <= 100 and 0 <= float(m[2]) <= 100
    assert float(m[3]) == pytest.approx(float(metrics(out)[1][-1]["test_bound"]), rel=0.05)
    if iw:
        assert m[4] is not None and math.isfinite(float(m[4])) and float(m[4]) < 0
    else:
        assert m[4] is None
    unchanged = lambda snap: {k: v for k, v in snap.items() if k.parts[0] != "figures"}  # noqa: E731
    assert unchanged(snapshot(out)) == unchanged(before)  # evaluating only redraws the figures
    assert set(snapshot(out)) == set(before)


# ---------------------------------------------------------------------------------------------
# User mistakes: one line on stderr, starting with "error:", and a non-zero exit
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(train.ad._import_cupy() is not None, reason="this machine has a working CuPy")
def test_gpu_without_cupy(tmp_path):
    line = one_line_error(run(*MOONS[:-2], "--device", "gpu", "--out", tmp_path / "run"))
    assert "CuPy" in line and not (tmp_path / "run").exists()


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


@pytest.mark.parametrize("model", ["avae", "gauss"])
def test_potential_needs_a_two_dimensional_z(tmp_path, model):
    """U_k(z1, z2) is a density on R²: with more dimensions of z, exp(−U) does not decay along the
    others, is not normalisable, and log_z_iw means nothing."""
    line = one_line_error(run("--dataset", "potential", "--model", model, "--latent", 4, 4, "--epochs", 1,
                              "--device", "cpu", "--out", tmp_path / "run"))
    assert "--latent" in line


def test_missing_data_folder_fails_fast_offline(tmp_path):
    """An empty --data-dir: the download from the mirrors fails (no network) within seconds,
    and the last line says where to put the files by hand."""
    empty = tmp_path / "data"
    empty.mkdir()
    started = time.monotonic()
    result = run(*MNIST, "--epochs", 1, "--data-dir", empty, "--out", tmp_path / "run", timeout=60)
    assert time.monotonic() - started < 30
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], result.stderr
    assert str(empty / "mnist") in lines[-1] and "train-images-idx3-ubyte.gz" in lines[-1]
    assert not list((empty / "mnist").glob("*"))  # no partial download left behind


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


# ---------------------------------------------------------------------------------------------
# A non-finite loss, unpicklable checkpoints, Ctrl-C
# ---------------------------------------------------------------------------------------------

def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """On moons (100 batches an epoch) the loss turns NaN at epoch 2, batch 3: the run stops at
    the next check with an error naming both, and checkpoint.npz still holds epoch 1."""
    real, calls = adgm.SemiSupervised.loss, itertools.count(1)

    def poisoned(self, *args, **kwargs):
        J, stats = real(self, *args, **kwargs)
        return (J * float("nan"), stats) if next(calls) >= 103 else (J, stats)

    monkeypatch.setattr(adgm.SemiSupervised, "loss", poisoned)
    out = tmp_path / "run"
    code = train.main([*MOONS, "--epochs", "3", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
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


def interrupt_once(args, path, within=60):
    """Start train.py with `args`, send Ctrl-C as soon as `path` exists; (exit code, stderr)."""
    proc = subprocess.Popen([sys.executable, "train.py", *map(str, args)], cwd=ROOT, env=environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + within
        while not path.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, f"no {path.name} within {within} s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stderr = proc.communicate(timeout=60)[1]
        return proc.returncode, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ctrl_c_keeps_the_last_epoch_and_resume_continues_from_it(tmp_path):
    """Ctrl-C mid-run: exit 130, one line that names the epoch and the command that continues;
    checkpoint.npz holds the last finished epoch, and no interrupted.npz is written (nothing
    would read it)."""
    out = tmp_path / "run"
    args = [*MOONS, "--batch-size", 500, "--epochs", 1000, "--out", out]  # 20 batches an epoch
    returncode, stderr = interrupt_once(args, out / "metrics.csv")
    assert returncode == 130, stderr
    assert "Traceback" not in stderr
    m = re.search(r"interrupted \(SIGINT\) during epoch (\d+);.* continue with python3 train.py --resume --out (\S+)$",
                  stderr.strip().splitlines()[-1])
    assert m and m[2] == str(out), stderr
    assert int(checkpoint(out / "checkpoint.npz")["epoch"]) == int(m[1]) - 1 >= 1
    assert not (out / "interrupted.npz").exists()
