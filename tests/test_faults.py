"""Tests of how train.py fails: every bad input, damaged file, unwritable folder, signal, lack of
memory or disk and missing network ends with a non-zero exit and a line or two, no traceback;
nothing on disk is damaged or mixed, and no run folder is left behind by an input error.
test_hostile.py goes on with what a careful user still breaks.

Read-only folders are made so that they hold for root too: a read-only bind mount in a private
mount namespace when running as root (permission bits do not stop root), the permission bits
otherwise. What needs the network, a signal or a mount runs train.py as a real process
(conftest.run_process), with a proxy on a closed local port, so no download reaches the network;
the rest runs it in this process (conftest.run).
"""
import errno
import gzip
import itertools
import json
import os
import pathlib
import shutil
import signal
import socketserver
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import adgm
import fake_cupy
from cli import checkpoints, interrupts, kinds, memory, options, runs, signals
import train
from conftest import (MNIST, MOONS, ROOT, check_figures, checkpoint, environment, metrics, ok, one_line_error,
                      run, run_process, snapshot)

LABELS = "t10k-labels-idx1-ubyte.gz"


# ---------------------------------------------------------------------------------------------
# Helpers: read-only folders (for root too), a stalled network, a signal at a chosen moment
# ---------------------------------------------------------------------------------------------

def _can_bind_mount(folder):
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            'mount --bind -o ro "$0" "$0" && ! touch "$0/probe" 2>/dev/null', str(folder)],
                           capture_output=True)
    return probe.returncode == 0


@pytest.fixture
def read_only(tmp_path):
    """read_only(folders, *args): train.py with `args`, the folders read-only for it."""
    restore = []
    if os.geteuid() == 0 and not _can_bind_mount(tmp_path):
        pytest.skip("root without the right to make a read-only bind mount (unshare --mount)")

    def start(folders, *args, **kw):
        folders = [pathlib.Path(f) for f in folders]
        if os.geteuid() != 0:
            for f in folders:
                for d in [f, *(p for p in f.rglob("*") if p.is_dir())]:
                    restore.append((d, d.stat().st_mode))
                    d.chmod(d.stat().st_mode & 0o555)
            return run(*args)
        mounts = " && ".join(f'mount --bind -o ro "{f}" "{f}"' for f in folders)
        command = [shutil.which("unshare"), "--mount", "--propagation", "private", "sh", "-c",
                   f'{mounts} && exec "$0" "$@"', sys.executable, "train.py", *map(str, args)]
        return subprocess.run(command, cwd=ROOT, env=environment(), capture_output=True, text=True,
                              timeout=kw.get("timeout", 120))
    yield start
    for d, mode in reversed(restore):
        d.chmod(mode)


def few_lines_error(result, most=5):
    """A refused command: non-zero exit, no traceback, at most `most` lines, the last 'error: '."""
    assert result.returncode not in (0, None), result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert 1 <= len(lines) <= most and lines[-1].startswith("error: "), result.stderr
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], result.stderr
    return lines[-1]


@pytest.fixture
def mnist_copy(tmp_path, data_dir):
    """A data folder of our own: a copy of the real MNIST files under tmp/data."""
    folder = tmp_path / "data" / "mnist"
    shutil.copytree(data_dir / "mnist", folder)
    return folder


# ---------------------------------------------------------------------------------------------
# The data folder
# ---------------------------------------------------------------------------------------------

def test_a_data_dir_that_does_not_exist_is_refused_not_created(tmp_path):
    missing = tmp_path / "nonexistent"
    line = one_line_error(run(*MNIST, "--epochs", 1, "--data-dir", missing, "--out", tmp_path / "run"))
    assert "--data-dir" in line and str(missing) in line and "does not exist" in line
    assert not missing.exists() and not (tmp_path / "run").exists()


def test_a_data_dir_pointing_at_the_mnist_folder_itself_says_so(tmp_path, mnist_copy):
    line = one_line_error(run(*MNIST, "--epochs", 1, "--data-dir", mnist_copy, "--out", tmp_path / "run"))
    assert "mnist folder itself" in line and line.endswith(f"the folder that holds it, {mnist_copy.parent}")
    assert not (mnist_copy / "mnist").exists() and not (tmp_path / "run").exists()


def test_offline_the_error_says_how_to_point_at_local_files(tmp_path):
    """No network: within seconds a few lines (one download attempt per mirror, then no more),
    the last one naming the files, the folder, --data-dir and $ADGM_DATA; no partial download."""
    empty = tmp_path / "data"
    empty.mkdir()
    started = time.monotonic()
    result = run_process(*MNIST, "--epochs", 1, "--data-dir", empty, "--out", tmp_path / "run", timeout=60)
    assert time.monotonic() - started < 30
    line = few_lines_error(result, most=4)
    assert "--data-dir" in line and "$ADGM_DATA" in line and "no mirror could be reached" in line
    assert all(name in line for name in ("train-images-idx3-ubyte.gz", LABELS)) and str(empty / "mnist") in line
    assert list((empty / "mnist").iterdir()) == [] and not (tmp_path / "run").exists()


def test_a_corrupt_local_file_is_reported_as_corrupt_offline(tmp_path, mnist_copy):
    bad = gzip.compress(b"not the labels")
    (mnist_copy / LABELS).write_bytes(bad)
    line = few_lines_error(run_process(*MNIST, "--epochs", 1, "--data-dir", mnist_copy.parent, "--out", tmp_path / "run"))
    assert f"{mnist_copy / LABELS} fails its checksum" in line
    assert line.index("fails its checksum") < line.index("no mirror could be reached")
    assert (mnist_copy / LABELS).read_bytes() == bad  # left as it was


@pytest.mark.parametrize("fault", ["missing", "corrupt"])
def test_a_read_only_data_folder_with_a_bad_file(tmp_path, mnist_copy, read_only, fault):
    """The normal case of a shared data folder: no download can go there; the error says why."""
    if fault == "missing":
        (mnist_copy / LABELS).unlink()
    else:
        (mnist_copy / LABELS).write_bytes(b"garbage")
    before = snapshot(mnist_copy)
    line = few_lines_error(read_only([mnist_copy.parent], *MNIST, "--epochs", 1, "--data-dir", mnist_copy.parent,
                                     "--out", tmp_path / "run"))
    assert LABELS in line and "cannot be written" in line and "--data-dir" in line
    assert (f"{mnist_copy / LABELS} fails its checksum" in line) == (fault == "corrupt")
    assert snapshot(mnist_copy) == before and not (tmp_path / "run").exists()


def test_a_relative_data_dir_is_stored_absolute_and_resume_works_from_elsewhere(tmp_path, data_dir):
    out = tmp_path / "run"
    relative = os.path.relpath(data_dir, ROOT)
    ok(run(*MNIST, "--epochs", 1, "--data-dir", relative, "--out", out))
    stored = json.loads((out / "config.json").read_text())["data_dir"]
    assert os.path.isabs(stored) and stored == os.path.abspath(os.path.join(ROOT, relative))  # links kept
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ok(run_process("--resume", "--out", out, "--epochs", 2, cwd=elsewhere, script=ROOT / "train.py"))
    assert len(metrics(out)[1]) == 2 and list(elsewhere.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# The run folder: a file, a read-only folder, no orphans
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["a file", "below a file"])
def test_out_that_is_a_file_or_below_one(tmp_path, where):
    (tmp_path / "file").write_text("mine")
    out = tmp_path / "file" if where == "a file" else tmp_path / "file" / "run"
    line = one_line_error(run(*MOONS, "--epochs", 1, "--out", out))
    assert "--out" in line and "is a file" in line
    assert (tmp_path / "file").read_text() == "mine"


def test_a_new_run_in_a_read_only_folder_is_refused_at_once(tmp_path, read_only):
    folder = tmp_path / "ro"
    folder.mkdir()
    for out in (folder, folder / "run"):  # the folder itself, or a new one inside it
        line = one_line_error(read_only([folder], *MNIST, "--epochs", 1, "--out", out))
        assert "--out" in line and "cannot write" in line
    assert list(folder.iterdir()) == []


def test_resume_of_a_read_only_run_is_refused_before_training(moons_run, tmp_path, read_only):
    out = tmp_path / "run"
    shutil.copytree(moons_run[0], out)
    before = snapshot(out)
    result = read_only([out], "--resume", "--out", out, "--epochs", 3)
    line = one_line_error(result)
    assert "cannot write" in line and str(out) in line
    assert "epoch 3" not in result.stderr and snapshot(out) == before


def test_evaluate_works_on_a_read_only_run_without_redrawing_figures(moons_run, tmp_path, read_only):
    out = tmp_path / "run"
    shutil.copytree(moons_run[0], out)
    before = snapshot(out)
    result = read_only([out], "--evaluate", out, "--device", "cpu")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout.strip().startswith(f"{out} (epoch 2): test_error ")
    why = "Read-only file system" if os.geteuid() == 0 else "Permission denied"
    assert result.stderr.strip().splitlines() == [
        f"note: results not recorded, figures not redrawn: cannot write in {out} ({why})"]
    assert snapshot(out) == before


@pytest.mark.parametrize("mistake", ["labels", "batch size", "missing data", "seed"])
def test_an_input_error_leaves_no_run_folder(tmp_path, mistake):
    out = tmp_path / "runs" / "run"
    args = {"labels": [*MNIST, "--labels", 7], "batch size": [*MOONS, "--batch-size", 20000],
            "missing data": [*MNIST, "--data-dir", tmp_path], "seed": [*MOONS, "--seed", -1]}[mistake]
    start = run_process if mistake == "missing data" else run  # a download is tried: a process of its own
    few_lines_error(start(*args, "--epochs", 1, "--out", out))
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# Checkpoints and the final evaluation, damaged run folders
# ---------------------------------------------------------------------------------------------

def test_the_last_epoch_is_saved_before_the_final_evaluation(tmp_path, monkeypatch, capsys):
    """A signal (or any failure) during the final importance-weighted evaluation loses nothing:
    checkpoint.npz and metrics.csv already hold the last epoch."""
    import adgm

    def interrupted(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the signal arrives here
        raise AssertionError("no signal")

    monkeypatch.setattr(adgm.SemiSupervised, "log_likelihood", interrupted)
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)  # pytest's handler, or SIG_IGN in a background job
    code = train.main([*MOONS, "--epochs", "1", "--iw-samples", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and err[-1] == (f"interrupted (SIGINT) after all 1 epochs were saved in {out}; the final "
                                       f"evaluation was not done: python3 train.py --resume --out {out} does it"), err
    assert int(checkpoint(out / "checkpoint.npz")["epoch"]) == 1
    assert [r["epoch"] for r in metrics(out)[1]] == ["1"]
    assert signal.getsignal(signal.SIGINT) is before  # main() put the caller's handler back
    monkeypatch.undo()  # the command it names does the evaluation, and then the run is finished
    result = ok(run("--resume", "--out", out))
    assert result.stderr.startswith(f"resuming {out}: all 1 epochs are trained, but not the final evaluation "
                                    "(--iw-samples 2); doing it now\n"), result.stderr
    assert [r["epoch"] for r in metrics(out)[1]] == ["1"] and float(metrics(out)[1][0]["test_ll_iw2"]) < 0
    assert "has trained all 1 epochs" in ok(run("--resume", "--out", out)).stderr


def damage(folder, change):
    """Rewrite folder/checkpoint.npz with change(arrays) applied (a valid npz, bad content)."""
    arrays = checkpoint(folder / "checkpoint.npz")
    change(arrays)
    with open(folder / "checkpoint.npz", "wb") as f:
        np.savez(f, **arrays)


def _without(key):
    def change(arrays):
        config = json.loads(str(arrays["config"]))
        del config[key]
        arrays["config"] = np.asarray(json.dumps(config))
    return change


DAMAGE = {
    "vector epoch": lambda a: a.update(epoch=a["epoch"].reshape(1).repeat(2)),
    "vector adam/t": lambda a: a.update({"adam/t": a["adam/t"].reshape(1).repeat(2)}),
    "rng of the wrong type": lambda a: a.update(rng=a["adam/t"]),
    "rng of the wrong content": lambda a: a.update(rng=np.asarray('{"seed": 0, "numpy": 3}')),
    "config as a list": lambda a: a.update(config=np.asarray("[1, 2]")),
    "missing config key": _without("model"),
    "all-NaN parameters": lambda a: [a.update({k: a[k] * float("nan")}) for k in list(a) if k.startswith("param/")],
    "NaN first moment": lambda a: a.update({"adam/m": a["adam/m"] * np.nan}),
    "negative second moment": lambda a: a.update({"adam/v": -1 - a["adam/v"]}),
    "a moment of the wrong shape": lambda a: a.update({"adam/m": a["adam/m"][:5]}),
    "negative learning rate": lambda a: a.update({"adam/lr": -a["adam/lr"]}),
    "NaN learning rate": lambda a: a.update({"adam/lr": a["adam/lr"] * np.nan}),
    "negative step count": lambda a: a.update({"adam/t": -a["adam/t"]}),
}


# Adam's state and the generator's: --evaluate reads neither
TRAINING_STATE = ("vector adam/t", "rng of the wrong type", "rng of the wrong content", "NaN first moment",
                  "negative second moment", "a moment of the wrong shape", "negative learning rate",
                  "NaN learning rate", "negative step count")


@pytest.mark.parametrize("kind, mode", [(kind, mode) for kind in DAMAGE for mode in ("resume", "evaluate")
                                        if mode == "resume" or kind not in TRAINING_STATE])
def test_a_damaged_checkpoint_is_one_line(moons_run, tmp_path, kind, mode):
    out = tmp_path / "run"
    shutil.copytree(moons_run[0], out)
    damage(out, DAMAGE[kind])
    before = snapshot(out)
    args = ["--resume", "--out", out, "--epochs", 3] if mode == "resume" else ["--evaluate", out]
    line = one_line_error(run(*args))
    assert line.startswith(f"error: {out / 'checkpoint.npz'} is not a usable adgm checkpoint") and "pickle" not in line
    assert snapshot(out) == before


def test_a_file_that_is_not_an_npz_is_refused_without_numpys_advice(moons_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(moons_run[0], out)
    (out / "checkpoint.npz").write_bytes(b"this is not an npz file\n" * 40)
    for args in (["--resume", "--out", out, "--epochs", 3], ["--evaluate", out]):
        line = one_line_error(run(*args))
        assert "not an .npz file" in line and "pickle" not in line


@pytest.mark.parametrize("content", ["missing", "garbled", "a list"])
def test_resume_with_a_missing_or_damaged_config_json_restores_it(moons_run, tmp_path, content):
    """--resume takes the configuration from checkpoint.npz (it matches the parameters) and
    rewrites config.json from it; a new run refuses a folder with a damaged config.json."""
    out = tmp_path / "run"
    shutil.copytree(moons_run[0], out)
    good = json.loads((out / "config.json").read_text())
    if content == "missing":
        (out / "config.json").unlink()
    else:
        (out / "config.json").write_text("{not json" if content == "garbled" else "[1, 2]")
        (tmp_path / "other").mkdir()
        shutil.copy(out / "config.json", tmp_path / "other")
        line = one_line_error(run(*MOONS, "--epochs", 2, "--batch-size", 200, "--out", tmp_path / "other"))
        assert str(tmp_path / "other" / "config.json") in line and "damaged" in line
    ok(run("--resume", "--out", out, "--epochs", 3))
    assert json.loads((out / "config.json").read_text()) == {**good, "epochs": 3}
    assert len(metrics(out)[1]) == 3


def test_resume_with_fewer_epochs_than_done_says_so(moons_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(moons_run[0], out)
    before = snapshot(out)
    line = one_line_error(run("--resume", "--out", out, "--epochs", 1))
    assert "2 epochs" in line and "--epochs 1" in line
    assert snapshot(out) == before


# ---------------------------------------------------------------------------------------------
# Signals at any point: data loading, the first epoch, --evaluate
# ---------------------------------------------------------------------------------------------

class Stalled(socketserver.ThreadingTCPServer):
    """A proxy that accepts connections and never answers: a download that hangs."""
    daemon_threads, allow_reuse_address = True, True

    def __init__(self):
        self.hold = threading.Event()
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                outer.hold.wait(60)
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.hold.set()
        self.shutdown()
        self.server_close()


def start_and_signal(args, when, signum, env=None):
    """Start train.py, send `signum` once a stderr line contains `when`; (exit code, stderr lines)."""
    proc = subprocess.Popen([sys.executable, "train.py", *map(str, args)], cwd=ROOT, env=env or environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if when in line:
                proc.send_signal(signum)
                break
        rest = proc.communicate(timeout=60)[1]
        return proc.returncode, lines + rest.strip().splitlines()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]


@pytest.fixture
def stalled_network():
    server = Stalled()
    env = environment()
    proxy = f"http://127.0.0.1:{server.server_address[1]}"
    env.update(http_proxy=proxy, https_proxy=proxy, HTTP_PROXY=proxy, HTTPS_PROXY=proxy)
    yield env
    server.close()


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: s.name)
def test_before_a_program_handles_signals_one_is_one_line(capsys, signum):
    """cli.interrupts.exit_quietly, which train.py, python3 -m figures and tools/bench.py install
    before their imports: a signal ends the program with one line; nohup's SIGHUP stays ignored."""
    before = {s: signal.getsignal(s) for s in SIGNALS}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        interrupts.exit_quietly(" while drawing")
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        interrupts.exit_quietly(" while drawing")
        with pytest.raises(SystemExit) as stopped:
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler runs at once: never reached
        assert stopped.value.code == 128 + signum
        assert capsys.readouterr().err == f"interrupted ({signum.name}) while drawing\n"
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_where_there_is_no_sighup_the_others_are_still_one_line(capsys, monkeypatch):
    """Windows has no SIGHUP, and `python3 -m figures` runs there: exit_quietly installs what the
    platform has."""
    before = {s: signal.getsignal(s) for s in SIGNALS}
    try:
        monkeypatch.delattr(signal, "SIGHUP")
        interrupts.exit_quietly(" while drawing")
        with pytest.raises(SystemExit) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        assert stopped.value.code == 128 + signal.SIGTERM
        assert capsys.readouterr().err == "interrupted (SIGTERM) while drawing\n"
    finally:
        monkeypatch.undo()
        for s, handler in before.items():
            signal.signal(s, handler)


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: s.name)
def test_a_signal_while_loading_the_data(tmp_path, stalled_network, signum):
    empty = tmp_path / "data"
    empty.mkdir()
    out = tmp_path / "run"
    code, lines = start_and_signal([*MNIST, "--data-dir", empty, "--out", out], "downloading", signum,
                                   stalled_network)
    assert code == 128 + signum and not any("Traceback" in line for line in lines), lines
    assert lines[-1] == f"interrupted ({signum.name}) before training started; nothing was written"
    assert len(lines) <= 3 and not out.exists() and list((empty / "mnist").iterdir()) == []


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: s.name)
def test_a_signal_during_evaluate(mnist_run, tmp_path, stalled_network, signum):
    out, _ = mnist_run
    before = snapshot(out)
    empty = tmp_path / "data"
    empty.mkdir()
    code, lines = start_and_signal(["--evaluate", out, "--data-dir", empty, "--device", "cpu"], "downloading",
                                   signum, stalled_network)
    assert code == 128 + signum and not any("Traceback" in line for line in lines), lines
    assert lines[-1] == f"interrupted ({signum.name}) while evaluating {out}" and len(lines) <= 3
    assert snapshot(out) == before


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: s.name)
def test_a_signal_in_the_first_epoch_and_the_one_command_that_continues(tmp_path, signum):
    out = tmp_path / "run"
    args = [*MOONS, "--batch-size", 10, "--epochs", 1000, "--out", out]  # 1000 batches an epoch
    code, lines = start_and_signal(args, "batches per epoch", signum)
    assert code == 128 + signum and not any("Traceback" in line for line in lines), lines
    expected = f"interrupted ({signum.name}) during epoch 1; {out} keeps the initial state: continue with "
    assert lines[-1] == expected + f"python3 train.py --resume --out {out}", lines
    assert int(checkpoint(out / "checkpoint.npz")["epoch"]) == 0 and not (out / "interrupted.npz").exists()
    if signum == signal.SIGINT:  # the command it names continues the run (the same for every signal)
        command = lines[-1].split("continue with python3 train.py ")[1].split()
        ok(run(*command, "--epochs", 1))
        assert [r["epoch"] for r in metrics(out)[1]] == ["1"]



def test_a_signal_during_a_save_waits_for_it_and_a_second_one_is_ignored():
    """Inside held() (an epoch's metrics and checkpoint) a signal is raised only once the block
    is done; while the first is handled, a second Ctrl-C cannot cut the handling short."""
    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
    try:
        signals.signals.install()
        finished = False
        with pytest.raises(signals.Interrupted, match="SIGTERM"):
            with signals.signals.held():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.1)
                finished = True
        assert finished
        os.kill(os.getpid(), signal.SIGINT)  # no exception: the run is already stopping
        time.sleep(0.1)
    finally:
        for signum, handler in zip((signal.SIGINT, signal.SIGTERM, signal.SIGHUP), previous):
            signal.signal(signum, handler)

# ---------------------------------------------------------------------------------------------
# Every option checked before anything is loaded or created
# ---------------------------------------------------------------------------------------------

BAD_OPTIONS = [("--seed", "-1"), ("--lr", "nan"), ("--lr", "inf"), ("--beta", "nan"), ("--clip", "nan"),
               ("--clip", "-1"), ("--lr-decay", "nan"), ("--beta", "-1"), ("--warmup", "-3"), ("--subset", "-5"),
               ("--eval-samples", "0"), ("--eval-images", "-5"), ("--iw-samples", "-1"), ("--lr-decay", "0"),
               ("--lr-decay-every", "-1"), ("--clip-value", "inf"), ("--weight-prior", "-1"), ("--hidden", "0"),
               ("--latent", "4 0"), ("--seed", str(2 ** 40)), ("--weight-prior", "1e-200")]


@pytest.mark.parametrize("option, value", BAD_OPTIONS)
def test_a_bad_value_is_refused_at_once_naming_the_option(tmp_path, option, value):
    out = tmp_path / "run"
    started = time.monotonic()
    line = one_line_error(run(*MNIST, "--epochs", 1, "--data-dir", tmp_path / "nowhere", option, *value.split(),
                              "--out", out))
    assert line.startswith(f"error: {option} ") and "must be" in line, line
    assert not out.exists() and time.monotonic() - started < 20  # refused before any data is read


def test_every_numeric_option_has_a_range():
    """RULES is the one table of ranges: an option added without an entry fails here."""
    numeric = {a.dest for a in options.build_parser()._actions if a.type in (int, float) and a.choices is None}
    assert numeric - set(options.RULES) == set() and set(options.RULES) <= numeric


@pytest.mark.parametrize("key, value", [("lr", "nan"), ("epochs", 2.5), ("hidden", [16, -1]), ("model", "m3"),
                                        ("x_in_pa", "yes"), ("data_dir", 7),
                                        ("moons_setup", "theirs"), ("label_draw", 3), ("clip_value", -1.0)])
def test_a_stored_configuration_with_a_bad_value_is_one_line(moons_run, tmp_path, key, value):
    """A hand-edited or damaged configuration in a checkpoint: refused, naming the option."""
    out = tmp_path / "run"
    shutil.copytree(moons_run[0], out)

    def change(arrays):
        config = json.loads(str(arrays["config"]))
        config[key] = float(value) if value == "nan" else value
        arrays["config"] = np.asarray(json.dumps(config))
    damage(out, change)
    for args in (["--resume", "--out", out, "--epochs", 3], ["--evaluate", out]):
        line = one_line_error(run(*args))
        assert f"its configuration has --{key.replace('_', '-')} " in line and str(out) in line


# ---------------------------------------------------------------------------------------------
# Help, progress, figures, units
# ---------------------------------------------------------------------------------------------

def help_of(option):
    """The help text of one option in `train.py --help`, on one line."""
    text = ok(run("--help")).stdout
    lines = text[text.index("\n  " + option + " "):].splitlines()[1:]
    block = [lines[0]] + list(itertools.takewhile(lambda line: not line.startswith("  --"), lines[1:]))
    return " ".join(" ".join(block).split())


@pytest.mark.parametrize("option, key", [("--lr-decay", "lr_decay"), ("--eval-every", "eval_every"),
                                         ("--hidden", "hidden"), ("--latent", "latent"), ("--lr", "lr"),
                                         ("--epochs", "epochs")])
def test_help_shows_the_default_of_every_dataset(option, key):
    text = help_of(option).split("; default ", 1)[1]
    for dataset, values in options.DEFAULTS.items():
        value = values[key]
        shown = " ".join(map(str, value)) if isinstance(value, list) else str(value)
        assert f"{shown} on " in text and dataset in text.split(f"{shown} on ")[1].split(";")[0], (dataset, text)


def test_progress_shows_the_whole_runs_eta_and_one_unit_for_test_error(tmp_path):
    out = tmp_path / "run"
    result = ok(run(*MOONS, "--epochs", 2, "--batch-size", 500, "--out", out))
    lines = result.stderr.splitlines()
    epoch_lines = [line for line in lines if line.startswith("epoch ") and " batch " not in line]
    assert len(epoch_lines) == 2 and " run eta " in epoch_lines[0] and " run eta " not in epoch_lines[1]
    first = next(i for i, line in enumerate(lines) if line.startswith("epoch "))  # in a log file, a line
    assert lines[first].startswith("epoch 1/2  batch 1/")                         # after the first batch
    rows = metrics(out)[1]
    for line, row in zip(epoch_lines, rows):  # the same number, in percent, on screen and in metrics.csv
        assert f"test_error {float(row['test_error_pct']):.2f}%" in line, (line, row)
    assert f"test error {float(rows[-1]['test_error_pct']):.2f}%" in result.stdout


def test_figures_are_drawn_every_ten_epochs_and_at_the_end(tmp_path, monkeypatch):
    """A run stopped at epoch 10-19 of 1000 has its figures: they are drawn every 10 epochs
    during training, and at the last epoch."""
    drawn, draw = [], train.redraw_figures

    def spy(model, data, config, out, rows, epoch):
        drawn.append((epoch, len(rows)))
        draw(model, data, config, out, rows, epoch)

    monkeypatch.setattr(train, "redraw_figures", spy)
    out = tmp_path / "run"
    ok(run(*MOONS, "--batch-size", 1000, "--epochs", 11, "--out", out))  # 10 batches an epoch
    assert drawn == [(10, 10), (11, 11)]
    check_figures(out, ["decision_regions.png", "pca_a.png", "kl_per_unit.png", "test_error.png"])


# ---------------------------------------------------------------------------------------------
# One process per run folder
# ---------------------------------------------------------------------------------------------

def checkpoint_epoch(out):
    return int(checkpoint(out / "checkpoint.npz")["epoch"])


def test_a_run_trains_in_one_process_and_a_killed_one_leaves_no_lock(tmp_path):
    """While a process trains in a folder, a second one is refused in one line, fresh or resumed,
    and the first trains on; --evaluate still reads it. Killed with SIGKILL, the first process
    leaves its lock file behind, and the next --resume trains on regardless."""
    out = tmp_path / "run"
    with open(tmp_path / "first.err", "w") as err:
        first = subprocess.Popen([sys.executable, "train.py", *MOONS, "--epochs", "1000", "--out", str(out)], cwd=ROOT,
                                 env=environment(), stdout=subprocess.DEVNULL, stderr=err, text=True)
    try:
        deadline = time.monotonic() + 60
        while "batches per epoch" not in (tmp_path / "first.err").read_text():  # epoch 0 saved, lock taken
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.err").read_text()
            time.sleep(0.05)
        for args in (["--resume", "--out", out], [*MOONS, "--epochs", 1000, "--out", out]):
            line = one_line_error(run(*args))
            assert line == f"error: another process is training in {out}; wait for it to end, or stop it first", line
        assert ok(run("--evaluate", out, "--device", "cpu")).stdout.startswith(f"{out} (epoch ")
        seen = checkpoint_epoch(out)
        while checkpoint_epoch(out) < seen + 1:  # the first process trains on
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.err").read_text()
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert (out / runs.LOCK).exists()  # left by the killed process, held by none
    epoch = checkpoint_epoch(out)
    ok(run("--resume", "--out", out, "--epochs", epoch + 1))
    assert [int(r["epoch"]) for r in metrics(out)[1]] == list(range(1, epoch + 2))
    assert not (out / runs.LOCK).exists()


# ---------------------------------------------------------------------------------------------
# Out of memory, on the CPU (NumPy) and on a GPU (CuPy, as fake_cupy raises it)
# ---------------------------------------------------------------------------------------------

def test_a_model_too_large_for_the_machine_is_refused_before_anything_is_allocated(tmp_path):
    """As a user sees it (a real process): one line with the sizes asked for and the estimate."""
    out = tmp_path / "runs" / "run"
    started = time.monotonic()
    line = one_line_error(run_process(*MOONS, "--hidden", 300000, 300000, "--out", out))
    assert line.startswith("error: the model does not fit in memory: --hidden 300000 300000, --latent 4 4, "
                           "--batch-size 100 and --samples 1 need at least 4.3 TB"), line
    assert "this machine has" in line and not (tmp_path / "runs").exists() and time.monotonic() - started < 20
    line = one_line_error(run(*MOONS, "--hidden", 50, "--batch-size", 10000, "--samples", 10 ** 6, "--out", out))
    assert line.startswith("error: the batch does not fit in memory: --hidden 50, --latent 4 4, --batch-size 10000 "
                           "and --samples 1000000 need at least 4.0 TB (4.0 TB for one step's activations)"), line
    assert not (tmp_path / "runs").exists()


BUILDS = [("moons", model) for model in kinds.MODELS if model != "gauss"] + \
    [("moons", "avae --layers 2"), ("potential", "avae"), ("potential", "gauss")]


@pytest.mark.parametrize("dataset, model", BUILDS)
def test_the_memory_estimate_counts_no_more_parameters_than_a_model_has(tmp_path, dataset, model):
    """The up-front estimate is a lower bound, so that it never refuses a model that fits."""
    args = options.parse_args(["--dataset", dataset, "--model", *model.split(), "--hidden", "7", "5", "3",
                               "--latent", "3", "2", "--device", "cpu", "--out", str(tmp_path)])
    config = options.run_config(args)
    built = train.build_model(config, train.load_data(config))
    fewest = memory.fewest_parameters(config)
    assert fewest <= sum(p.data.size for p in built.parameters().values()) and (fewest > 0) == (model != "gauss")
    assert memory.fewest_parameters({**config, "hidden": [7]}) == 0  # no matrix between hidden layers


@pytest.mark.parametrize("setting", [[], ["--samples", "10"], ["--model", "adgm-authors", "--samples", "10"],
                                     ["--model", "avae", "--layers", "2"], ["--model", "sdgm", "--samples", "5"]])
def test_the_memory_estimate_passes_the_papers_runs(tmp_path, setting):
    """Each of the paper's MNIST runs is estimated well under a gigabyte: a laptop trains them."""
    config = options.run_config(options.parse_args(["--dataset", "mnist", *setting, "--out", str(tmp_path)]))
    assert 0 < sum(memory.memory_needed(config, "cpu")) < 2 ** 30


def raises(error):
    def fail(*args, **kwargs):
        raise error
    return fail


OUT_OF_MEMORY = {  # how each backend says it
    "numpy": lambda: MemoryError("Unable to allocate 335. GiB for an array with shape (300000, 300000) and data "
                                 "type float32"),
    "cupy pool": lambda: fake_cupy.cuda.memory.OutOfMemoryError(360_000_000_000, 1_200_000),
    "cuda runtime": lambda: fake_cupy.cuda.runtime.CUDARuntimeError(),
}
QUICK = [*MOONS, "--batch-size", 1000]  # 10 batches an epoch
SIZES = "--hidden 16, --latent 4 4, --batch-size 1000 and --samples 1"


@pytest.mark.parametrize("backend", OUT_OF_MEMORY)
def test_out_of_memory_while_training_keeps_the_last_epoch(tmp_path, monkeypatch, backend):
    """A step that runs out of memory at epoch 2: a line with the sizes, epoch 1 kept and resumable."""
    real, calls = adgm.SemiSupervised.loss, itertools.count(1)

    def loss(self, *args, **kwargs):
        if next(calls) == 15:  # epoch 2, batch 5
            raise OUT_OF_MEMORY[backend]()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(adgm.SemiSupervised, "loss", loss)
    out = tmp_path / "run"
    line = few_lines_error(run(*QUICK, "--epochs", 2, "--out", out), most=4)
    assert line == (f"error: out of memory in epoch 2: the model or the batch does not fit ({SIZES}); {out} keeps "
                    f"epoch 1: continue with python3 train.py --resume --out {out} once more memory is free"), line
    assert checkpoint_epoch(out) == 1 and [r["epoch"] for r in metrics(out)[1]] == ["1"]
    monkeypatch.undo()
    ok(run("--resume", "--out", out))
    assert [r["epoch"] for r in metrics(out)[1]] == ["1", "2"]


def test_out_of_memory_before_training_leaves_no_run_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "build_model", raises(OUT_OF_MEMORY["numpy"]()))
    out = tmp_path / "runs" / "run"
    line = one_line_error(run(*QUICK, "--epochs", 2, "--out", out))
    assert line == f"error: out of memory before training started: the model or the batch does not fit ({SIZES}); " \
                   "nothing was written", line
    assert not (tmp_path / "runs").exists()


def test_out_of_memory_during_evaluate_is_one_line(moons_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(moons_run[0], out)
    before = snapshot(out)
    monkeypatch.setattr(adgm.SemiSupervised, "evaluate", raises(OUT_OF_MEMORY["cupy pool"]()))
    line = one_line_error(run("--evaluate", out, "--eval-samples", 10))
    assert line == f"error: out of memory while evaluating {out}: the model or the batch does not fit (--hidden 16, " \
                   "--latent 4 4 and --eval-samples 10)", line
    assert snapshot(out) == before


# ---------------------------------------------------------------------------------------------
# A full disk, or any failed save
# ---------------------------------------------------------------------------------------------

class FullDisk:
    """A file whose first write stores half of what it is given, then fails as a full disk does."""

    def __init__(self, file):
        self.file = file

    def write(self, data):
        self.file.write(bytes(data)[:len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def fill_the_disk(monkeypatch, name, at):
    """The disk is full when checkpoints.py writes `name` for the `at`-th time (from 0)."""
    calls, real = itertools.count(), open

    def opened(path, mode="r", *args, **kwargs):
        file = real(path, mode, *args, **kwargs)
        if "w" in mode and pathlib.Path(path).name.startswith(name) and next(calls) == at:
            return FullDisk(file)
        return file
    monkeypatch.setattr(checkpoints, "open", opened, raising=False)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("name, at", [("metrics.csv", 1), ("checkpoint.npz", 2)])
def test_a_full_disk_keeps_metrics_and_checkpoint_agreeing_and_resume_continues(tmp_path, monkeypatch, name, at):
    """The save of epoch 2 fails on either file: both still end at epoch 1, no temporary file is
    left, the line names the file and the last saved epoch, and --resume continues."""
    fill_the_disk(monkeypatch, name, at)
    out = tmp_path / "run"
    line = few_lines_error(run(*QUICK, "--epochs", 2, "--out", out), most=4)
    assert line == (f"error: cannot write {out / name} (No space left on device); {out} keeps epoch 1: "
                    f"continue with python3 train.py --resume --out {out} once there is space"), line
    assert checkpoint_epoch(out) == 1 and [r["epoch"] for r in metrics(out)[1]] == ["1"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.npz", "config.json", "metrics.csv"]
    monkeypatch.undo()
    ok(run("--resume", "--out", out))
    assert [r["epoch"] for r in metrics(out)[1]] == ["1", "2"] and checkpoint_epoch(out) == 2


def test_a_row_past_the_checkpoint_is_dropped_on_resume(moons_run, tmp_path):
    """A process that dies between the two renames of save_epoch leaves metrics.csv one row
    ahead of checkpoint.npz: --resume trains that epoch again and writes its row anew."""
    out = tmp_path / "run"
    shutil.copytree(moons_run[0], out)
    with open(out / "metrics.csv", "a") as f:
        f.write("3" + ",0" * (len(metrics(out)[0]) - 1) + "\n")
    ok(run("--resume", "--out", out, "--epochs", 3))
    rows = metrics(out)[1]
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and float(rows[2]["loss"]) != 0


def test_a_checkpoint_reaches_its_file_in_one_write():
    """The archive is made in memory and written whole: a write that fails leaves no zipfile
    holding the file (on Python 3.9 one prints a traceback when collected, after the error line)."""
    class Recording:
        def __init__(self):
            self.calls = []

        def __getattr__(self, name):
            return lambda *args: self.calls.append(name) or 0

    model = adgm.ADGM(2, 2, hidden=(3,), a_dim=2, z_dim=2)
    file = Recording()
    checkpoints.checkpoint_writer(model, train.ad.Adam(model.parameters()), 1, {"model": "adgm"})(file)
    assert file.calls == ["write"]


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_full_disk_before_the_first_save_leaves_no_run_folder(tmp_path, monkeypatch):
    fill_the_disk(monkeypatch, "checkpoint.npz", 0)
    out = tmp_path / "runs" / "run"
    line = one_line_error(run(*QUICK, "--epochs", 2, "--out", out))
    assert line == f"error: cannot write {out / 'checkpoint.npz'} (No space left on device); nothing was saved: " \
                   "run the command again once there is space", line
    assert not (tmp_path / "runs").exists()


def test_a_run_folder_removed_while_the_run_trains_is_not_said_to_keep_epochs(tmp_path, monkeypatch):
    """rm -r of the folder during epoch 2: the save fails, and the line says the folder holds no
    checkpoint rather than offering a --resume that cannot work."""
    out, real = tmp_path / "runs" / "run", train.train_epoch

    def remove_then_train(model, opt, batches, config, epoch, *rest):
        if epoch == 2:
            shutil.rmtree(tmp_path / "runs")
        return real(model, opt, batches, config, epoch, *rest)
    monkeypatch.setattr(train, "train_epoch", remove_then_train)
    line = few_lines_error(run(*QUICK, "--epochs", 3, "--out", out))
    assert line == (f"error: cannot write {out / 'metrics.csv'} (No such file or directory); {out} holds no "
                    "checkpoint: it was moved or removed while the run trained"), line


# ---------------------------------------------------------------------------------------------
# The history in metrics.csv: never lost without a word
# ---------------------------------------------------------------------------------------------

HISTORY = {"missing": None, "empty": b"", "header only": b"epoch,seconds,loss\n",
           "damaged": b"epoch,seconds,loss\n1,0.5,abc\n"}


@pytest.mark.parametrize("content", HISTORY)
def test_resume_keeps_an_unusable_metrics_csv_aside_and_says_so(moons_run, tmp_path, content):
    """A run at epoch 2 whose metrics.csv is missing, empty or damaged: --resume says so in one
    line, keeps the file aside (never over an earlier one) and starts the rows again."""
    out = tmp_path / "run"
    shutil.copytree(moons_run[0], out)
    (out / "metrics.csv").unlink()
    if HISTORY[content] is not None:
        (out / "metrics.csv").write_bytes(HISTORY[content])
        (out / "metrics.csv.aside").write_bytes(b"kept aside by an earlier resume")
    result = ok(run("--resume", "--out", out, "--epochs", 3))
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    no_row = "holds no row of epochs 1-2"
    reason = {"missing": "is missing", "empty": no_row, "header only": no_row,
              "damaged": "cannot be read (could not convert string to float: 'abc')"}[content]
    kept = "the rows of epochs 1-2 are lost" if content == "missing" else f"it is kept as {out}/metrics.csv.aside.2"
    assert notes == [f"note: {out}/metrics.csv {reason}; {kept}; metrics.csv starts again at epoch 3"], notes
    assert [r["epoch"] for r in metrics(out)[1]] == ["3"]
    if HISTORY[content] is not None:
        assert (out / "metrics.csv.aside.2").read_bytes() == HISTORY[content]
        assert (out / "metrics.csv.aside").read_bytes() == b"kept aside by an earlier resume"


def test_the_rows_of_a_run_whose_checkpoint_is_gone_are_kept_aside_when_it_starts_over(moons_run, tmp_path):
    """checkpoint.npz deleted: --resume says the epochs of metrics.csv cannot be continued; the
    command without --resume starts over and keeps the old rows as metrics.csv.aside."""
    out = tmp_path / "run"
    shutil.copytree(moons_run[0], out)
    (out / "checkpoint.npz").unlink()
    old = (out / "metrics.csv").read_bytes()
    assert one_line_error(run("--resume", "--out", out)) == (
        f"error: --resume: no checkpoint in {out}; the epochs of its metrics.csv cannot be continued without it: "
        "run the command again without --resume to start over (metrics.csv is kept aside)")
    result = ok(run(*MOONS, "--epochs", 1, "--batch-size", 200, "--out", out))
    assert f"note: {out}/metrics.csv holds the rows of a run without its checkpoint; it is kept as " \
           f"{out}/metrics.csv.aside; metrics.csv starts again at epoch 1" in result.stderr.splitlines()
    assert (out / "metrics.csv.aside").read_bytes() == old and [r["epoch"] for r in metrics(out)[1]] == ["1"]
