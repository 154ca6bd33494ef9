"""Tests of what a careful user still breaks, and how train.py holds: a file of another run in the
run folder, empty paths, a terminal that is closed or goes away (the run goes on; what it could
not show is in RUN/output.txt), a lock that cannot be taken, a state called good before it is
checked, evaluations at once, small but valid options, odd environments and damaged zip members.
Each ends in one line (or a note where the run can go on), with nothing lost and nothing mixed.
Helpers as in test_faults.py.
"""
import contextlib
import errno
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import pytest

import fake_cupy
from cli import checkpoints, kinds, runs
import train
from conftest import (MOONS, ROOT, SMALL, check_figures, environment, metrics, ok, one_line_error, run, run_process,
                      snapshot)
from test_faults import QUICK, checkpoint_epoch, few_lines_error, raises


# ---------------------------------------------------------------------------------------------
# Every file of a run folder belongs to the run
# ---------------------------------------------------------------------------------------------

def test_a_checkpoint_of_another_run_is_refused_and_rows_of_other_epochs_kept_aside(moons_run, tmp_path):
    """A checkpoint.npz copied in from an M2 run: --resume and --evaluate refuse it in one line and
    change nothing. A metrics.csv whose rows are not epochs 1..N of the checkpoint (here epoch 1
    is missing) is kept aside with a note, and --resume goes on with a metrics.csv of its own; a
    config.json of an older version, without an option added since, still resumes."""
    m2, out = tmp_path / "m2", tmp_path / "run"
    ok(run(*MOONS, "--model", "m2", "--epochs", 1, "--batch-size", 200, "--out", m2))
    shutil.copytree(moons_run[0], out)
    own = (out / "checkpoint.npz").read_bytes()
    shutil.copy(m2 / "checkpoint.npz", out)
    before = snapshot(out)
    for args in (["--resume", "--out", out, "--epochs", 4], ["--evaluate", out]):
        assert one_line_error(run(*args)) == (
            f"error: {out}/checkpoint.npz is not the checkpoint of the run in {out}/config.json (--model m2 in the "
            "checkpoint, adgm in config.json): put the run's own checkpoint back, or move config.json away to go on "
            "with the checkpoint's run")
    assert snapshot(out) == before
    (out / "checkpoint.npz").write_bytes(own)
    config = json.loads((out / "config.json").read_text())
    del config["loss_average"]  # an option added after the run was made
    (out / "config.json").write_text(json.dumps(config))
    lines = (out / "metrics.csv").read_text().splitlines()
    (out / "metrics.csv").write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # the row of epoch 2 only
    notes = [line for line in ok(run("--resume", "--out", out, "--epochs", 3)).stderr.splitlines() if "note" in line]
    assert notes == [f"note: {out}/metrics.csv holds the rows of epochs 2, not those of epochs 1-2 of its checkpoint; "
                     f"it is kept as {out}/metrics.csv.aside; metrics.csv starts again at epoch 3"], notes
    assert [r["epoch"] for r in metrics(out)[1]] == ["3"] and checkpoint_epoch(out) == 3


# ---------------------------------------------------------------------------------------------
# Paths given empty
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("option", ["--evaluate", "--out", "--data-dir"])
def test_an_empty_path_is_refused(tmp_path, option):
    """"" is no folder: not the current one (--out), nor no run at all (--evaluate trained one)."""
    args = [*MOONS, "--epochs", 1, "--batch-size", 1000, "--out", tmp_path / "run", option, ""]
    result = run_process(*args, cwd=tmp_path, script=ROOT / "train.py") if option == "--out" else run(*args)
    assert one_line_error(result) == f"error: {option} is empty: give it a folder"
    assert list(tmp_path.iterdir()) == []


def test_a_tilde_the_shell_did_not_expand_is_the_home_folder(tmp_path, monkeypatch):
    """'~/runs/x', quoted in a script or a subprocess call: --out and --evaluate mean the home
    folder, as --data-dir does, not a folder named '~' in the current one."""
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir(), elsewhere.mkdir()
    monkeypatch.setenv("HOME", str(home))
    ok(run_process(*QUICK, "--epochs", 1, "--out", "~/runs/x", cwd=elsewhere, script=ROOT / "train.py"))
    assert (home / "runs" / "x" / "checkpoint.npz").is_file() and list(elsewhere.iterdir()) == []
    ok(run("--evaluate", "~/runs/x", "--device", "cpu"))
    assert (home / "runs" / "x" / "evaluations.csv").is_file()


def test_a_wall_clock_set_back_during_a_run_leaves_its_times_true(tmp_path, monkeypatch):
    """NTP or a hand steps the wall clock back an hour at every reading: an epoch's seconds in
    metrics.csv, and the ETAs, come from a clock that only goes forward."""
    real, readings = time.time, itertools.count(1)
    monkeypatch.setattr(time, "time", lambda: real() - 3600 * next(readings))
    result = run(*MOONS, "--epochs", "2", "--batch-size", "1000", "--out", tmp_path / "run")
    monkeypatch.undo()
    ok(result)
    seconds = [float(row["seconds"]) for row in metrics(tmp_path / "run")[1]]
    assert len(seconds) == 2 and all(0 < s < 60 for s in seconds), seconds
    assert "-" not in "".join(re.findall(r"eta +\S+", result.stderr)), result.stderr


# ---------------------------------------------------------------------------------------------
# A terminal that is closed or goes away: the run goes on, and keeps what it could not print
# ---------------------------------------------------------------------------------------------

class Gone:
    """A terminal that went away: every write fails, as on a hung-up terminal."""

    def write(self, text):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    def flush(self):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    def isatty(self):
        return True


def test_a_terminal_that_went_away_does_not_stop_the_run(tmp_path, monkeypatch):
    """Every write fails: the run trains all its epochs and exits 0, and what it would have shown
    (finished lines, not progress rewritten in place) is in RUN/output.txt; so does a --resume of
    the finished run, and an error line too."""
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "stdout", Gone())
    monkeypatch.setattr(sys, "stderr", Gone())
    assert train.main([*MOONS, "--epochs", "2", "--batch-size", "1000", "--out", str(out)]) == 0
    assert train.main(["--resume", "--out", str(out)]) == 0
    assert train.main(["--resume", "--out", str(out), "--epochs", "1"]) == 2
    monkeypatch.undo()
    lines = (out / "output.txt").read_text().splitlines()
    header = "moons adgm (the paper's settings: β 0.1, no batch normalisation, T_a 1): 1,038 parameters, 10 batches"
    assert lines[0].startswith(header) and len(lines) == 7, lines
    assert [line[:9] for line in lines[1:3]] == ["epoch 1/2", "epoch 2/2"] and " batch " not in lines[1]
    assert lines[3].startswith("test error ") and lines[3].endswith(f"; run saved in {out}")
    assert lines[4:6] == [f"{out} has trained all 2 epochs (give a larger --epochs to train more)", lines[3]]
    assert lines[6].startswith(f"error: --resume: {out} has trained 2 epochs already")
    assert [r["epoch"] for r in metrics(out)[1]] == ["1", "2"]


def test_a_closed_stderr_and_an_unwritable_stdout_do_not_stop_the_run(tmp_path):
    """As the shell starts it with 2>&- and a stdout it cannot write: exit 0, all in RUN/output.txt."""
    out, unwritable = tmp_path / "run", tmp_path / "read-only"
    unwritable.write_text("")
    with open(unwritable) as stdout:
        args = [*MOONS, "--epochs", "2", "--batch-size", "1000", "--out", out]
        done = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=environment(), stdout=stdout,
                              preexec_fn=lambda: os.close(2), timeout=120)
    assert done.returncode == 0 and unwritable.read_text() == ""
    lines = (out / "output.txt").read_text().splitlines()
    assert [line[:9] for line in lines if line.startswith("epoch ") and " batch " not in line] == ["epoch 1/2",
                                                                                                   "epoch 2/2"]
    assert lines[-1].endswith(f"; run saved in {out}") and len(metrics(out)[1]) == 2


def test_under_nohup_a_sighup_does_not_stop_the_run(tmp_path):
    """A process started with SIGHUP ignored (nohup) keeps ignoring it; SIGINT still stops it."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", *MOONS, "--epochs", "3", "--batch-size", "1000", "--out", out],
                            cwd=ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    try:
        while "batches per epoch" not in proc.stderr.readline():
            assert proc.poll() is None
        proc.send_signal(signal.SIGHUP)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and "interrupted" not in stderr and stdout.endswith(f"run saved in {out}\n"), stderr
    assert checkpoint_epoch(out) == 3


# ---------------------------------------------------------------------------------------------
# A lock that cannot be taken refuses the run
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("why", ["a folder", "no flock"])
def test_a_lock_that_cannot_be_taken_refuses_the_run(moons_run, tmp_path, monkeypatch, why):
    out = tmp_path / "run"
    shutil.copytree(moons_run[0], out)
    if why == "a folder":
        (out / runs.LOCK).mkdir()
        expected = f"error: cannot lock {out}: {out / runs.LOCK} cannot be opened (Is a directory); remove it if no " \
                   "other process trains there"
    else:
        monkeypatch.setattr(runs.fcntl, "flock", raises(OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))))
        expected = f"error: cannot lock {out / runs.LOCK} (No locks available), so nothing would keep a second " \
                   "process from training there: choose an --out on a file system with locks (flock)"
    before = snapshot(out)
    assert one_line_error(run("--resume", "--out", out, "--epochs", 3)) == expected
    assert {k: v for k, v in snapshot(out).items() if k.name != runs.LOCK} == before  # an empty .lock at most


# ---------------------------------------------------------------------------------------------
# A state is called good only once it is checked
# ---------------------------------------------------------------------------------------------

def test_a_diverging_run_keeps_the_last_finite_state_and_evaluate_accepts_it(tmp_path):
    """--lr 1e300 with one batch an epoch: the loss of epoch 1's one step is finite, the state
    after it is not. The run stops before saving that epoch, and --evaluate reads what it kept."""
    out = tmp_path / "run"
    result = run(*MOONS, "--subset", 100, "--batch-size", 100, "--lr", 1e300, "--epochs", 2, "--out", out)
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: the parameters or Adam's state became non-finite in epoch 1; {out}/checkpoint.npz keeps the last "
        "good state (epoch 0)") and "Warning" not in result.stderr
    assert checkpoint_epoch(out) == 0 and not (out / "metrics.csv").exists()
    assert ok(run("--evaluate", out)).stdout.startswith(f"{out} (epoch 0): test_error ")


def test_the_state_is_checked_on_the_device_with_one_sync():
    """check_finite on a GPU backend (fake_cupy): one transfer to the host whatever it finds, and
    a NaN found in the parameters, Adam's moments or BatchNorm's averages."""
    ad = train.ad
    ad.use_array_module(fake_cupy, seed=0)

    class Tiny(ad.Module):
        def __init__(self):
            self.linear, self.norm = ad.Linear(2, 3), ad.BatchNorm(3)

    for spoiled in (None, "flat", "m", "v", "running_var"):
        model = Tiny()
        opt = ad.Adam(model.parameters())
        if spoiled:
            (model.norm.running_var.data if spoiled == "running_var" else getattr(opt, spoiled))[1] = float("nan")
        with fake_cupy.record() as log, pytest.raises(runs.NonFinite) if spoiled else contextlib.nullcontext():
            runs.check_finite(model, opt, 3)
        assert [kind for kind, _, _ in log] == ["d2h"], (spoiled, log)


# ---------------------------------------------------------------------------------------------
# Evaluations at once, and a run stopped during its final evaluation (above)
# ---------------------------------------------------------------------------------------------

def _evaluations(path, n):
    for i in range(10):
        checkpoints.record_evaluation(path, 1, {"eval_samples": 1, "iw_samples": 0, "eval_images": 0}, {f"p{n}": i})


def test_evaluations_at_once_lose_no_line(tmp_path):
    """Four processes each record ten evaluations in one evaluations.csv: all forty are there."""
    import multiprocessing
    fork = multiprocessing.get_context("fork")
    writers = [fork.Process(target=_evaluations, args=(tmp_path / "evaluations.csv", n)) for n in range(4)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
    assert [writer.exitcode for writer in writers] == [0, 0, 0, 0]
    lines = (tmp_path / "evaluations.csv").read_text().splitlines()
    assert len(lines) == 41 and sorted(lines[1:]) == sorted(f"1,1,0,0,p{n},{i}" for n in range(4) for i in range(10))
    assert [p.name for p in tmp_path.iterdir()] == ["evaluations.csv"]


# ---------------------------------------------------------------------------------------------
# Small but valid options: the figures are drawn, or a note says why not
# ---------------------------------------------------------------------------------------------

def test_a_one_dimensional_a_and_five_test_images_draw_every_figure(tmp_path, fixtures_dir):
    """dim(a) = dim(z) = 1 (a PCA of a 1-D a) and 5 test images (fewer than the 10 analogies)."""
    out = tmp_path / "run"
    ok(run("--dataset", "svhn", "--data-dir", fixtures_dir, "--no-verify", "--labels", 10, "--subset", 5,
           "--batch-size", 5, "--epochs", 1, *SMALL[:2], "--latent", 1, 1, "--device", "cpu", "--out", out))
    check_figures(out, ["samples.png", "analogies.png", "pca_a.png", "kl_per_unit.png", "test_error.png"])
    assert "note" not in ok(run("--evaluate", out)).stderr


def test_a_figure_that_cannot_be_drawn_is_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(kinds.KINDS, "semi-supervised", kinds.KINDS["semi-supervised"]._replace(
        figures=raises(ValueError("too few points\nfor a figure"))))
    out = tmp_path / "run"
    note = f"note: figures in {out / 'figures'} not all drawn (ValueError: too few points for a figure)"
    assert note in ok(run(*QUICK, "--epochs", 1, "--out", out)).stderr.splitlines()
    assert checkpoint_epoch(out) == 1
    assert note in ok(run("--evaluate", out)).stderr.splitlines()


def test_batch_normalisation_over_batches_of_one_is_refused(tmp_path):
    line = one_line_error(run(*MOONS, "--batchnorm", "--batch-size", 1, "--out", tmp_path / "run"))
    assert line.startswith("error: --batchnorm normalises over a batch: --batch-size 1 gives batches of one")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# No traceback and no raw warning: odd environments, damaged zip members, the tools
# ---------------------------------------------------------------------------------------------

def test_odd_environments_get_one_line(tmp_path):
    """Started from another folder under PYTHONSAFEPATH=1 (its modules found all the same),
    PYTHONIOENCODING=ascii with a non-ASCII run folder (escaped) and PYTHONWARNINGS=error, a
    diverging run ends in its one line: no traceback, no warning."""
    out = tmp_path / "rün"
    env = {**environment(), "PYTHONSAFEPATH": "1", "PYTHONIOENCODING": "ascii", "PYTHONWARNINGS": "error"}
    result = run_process(*MOONS, "--subset", 100, "--batch-size", 100, "--lr", 1e300, "--epochs", 2, "--out", out,
                         env=env, cwd=tmp_path, script=ROOT / "train.py")
    shown = str(out).replace("ü", "\\xfc")
    assert few_lines_error(result, most=3) == (f"error: the parameters or Adam's state became non-finite in epoch 1; "
                                               f"{shown}/checkpoint.npz keeps the last good state (epoch 0)")
    assert "Warning" not in result.stderr and sorted(p.name for p in tmp_path.iterdir()) == ["rün"]


def rewrite_members(path, change):
    """Rewrite the zip archive at `path` with change(members) applied to {name: (bytes, compression)}."""
    with zipfile.ZipFile(path) as z:
        members = {i.filename: (z.read(i), i.compress_type) for i in z.infolist()}
    change(members)
    with zipfile.ZipFile(path, "w") as z:
        for name, (data, compression) in members.items():
            z.writestr(name, data, compress_type=compression)


def _garbled_deflate(path):
    """The first parameter's member deflated, then a few of its compressed bytes changed."""
    first = next(name for name in zipfile.ZipFile(path).namelist() if name.startswith("param/"))
    rewrite_members(path, lambda m: m.update({first: (m[first][0], zipfile.ZIP_DEFLATED)}))
    data = bytearray(path.read_bytes())
    info = zipfile.ZipFile(path).getinfo(first)
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    data[start + 10:start + 30] = bytes(b ^ 0x55 for b in data[start + 10:start + 30])
    path.write_bytes(bytes(data))


MEMBERS = {
    "not an array": lambda p: rewrite_members(p, lambda m: m.update({"epoch.npy": (b"2", zipfile.ZIP_STORED)})),
    "a broken header": lambda p: rewrite_members(p, lambda m: m.update(
        {"epoch.npy": (b"\x93NUMPY\x01\x00\x10\x00{'descr': 1}    \n", zipfile.ZIP_STORED)})),
    "garbled compression": _garbled_deflate,
}


@pytest.mark.parametrize("member", MEMBERS)
def test_a_checkpoint_member_that_is_not_an_array_is_one_line(moons_run, tmp_path, member):
    out = tmp_path / "run"
    shutil.copytree(moons_run[0], out)
    MEMBERS[member](out / "checkpoint.npz")
    for args in (["--resume", "--out", out, "--epochs", 3], ["--evaluate", out]):
        line = one_line_error(run(*args))
        assert line.startswith(f"error: {out / 'checkpoint.npz'} is not a usable adgm checkpoint: its ") and \
            ("is not an array" in line or "cannot be read" in line) and "pickle" not in line, line


@pytest.mark.parametrize("argv, says", [(["--steps", "0"], "error: --steps 0: must be at least 1 (see --help)"),
                                        (["--device", "gpu"], "error: --device gpu needs CuPy")])
def test_bench_refuses_in_one_line(monkeypatch, capsys, argv, says):
    from tools import bench
    if argv[0] == "--device" and train.ad._import_cupy() is not None:
        pytest.skip("this machine has a working CuPy")
    monkeypatch.setattr(sys, "argv", ["bench.py", *argv])
    with pytest.raises(SystemExit) as exit:
        bench.main()
    err = capsys.readouterr().err.splitlines()
    assert exit.value.code == 2 and len(err) == 1 and err[0].startswith(says), err
