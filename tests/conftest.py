"""Shared test fixtures and helpers: where the MNIST files are, float64 / NumPy defaults, and
train.py run as a user runs it, with what a run writes read back.

The suite runs on a fresh clone with no data: the SVHN and NORB format fixtures are in
tests/fixtures/. The tests that need the real MNIST files (checksums, the 444 pixels, a run on
MNIST) use them where they are found: $ADGM_SHARED/data (a folder holding mnist/ and paper/, as
this project's CI has beside the clone), $ADGM_DATA, or the download cache of datasets.py; else
they skip with the reason. The test of the equation table against the paper's text needs the
paper's extracted text in $ADGM_SHARED/paper and skips without it.

`run` runs train.py in this process, through train.main, as from the repository root; `run_process`
starts it as a real subprocess, for what needs one (signals, a stalled or absent network, read-only
mounts, the program as started from the shell). Both give every run an HTTP(S) proxy on a closed
local port, so that no download reaches the network. Test modules import these helpers with
`from conftest import ...`.
"""
import contextlib
import csv
import io
import json
import math
import os
import pathlib
import re
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHARED = pathlib.Path(os.environ["ADGM_SHARED"]) if os.environ.get("ADGM_SHARED") else None
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
               "t10k-labels-idx1-ubyte.gz")


def real_mnist_dir():
    """A --data-dir that holds the four MNIST files, or None."""
    import datasets
    candidates = [SHARED / "data" if SHARED else None, os.environ.get("ADGM_DATA"), datasets.resolve_data_dir()]
    for folder in (pathlib.Path(c) for c in candidates if c):
        if all((folder / "mnist" / name).is_file() for name in MNIST_FILES):
            return folder.resolve()
    return None


@pytest.fixture(scope="module")
def data_dir():
    """A --data-dir with the real MNIST files in mnist/; the test skips where there is none."""
    folder = real_mnist_dir()
    if folder is None:
        pytest.skip("needs the MNIST files: set ADGM_DATA to a folder holding mnist/, or run "
                    "`python3 train.py --dataset mnist --epochs 1` once online to download them")
    return folder


@pytest.fixture(scope="module")
def paper_dir():
    """The paper's extracted text (one .txt per page), in $ADGM_SHARED/paper; else the test skips."""
    if SHARED is None or not (SHARED / "paper").is_dir():
        pytest.skip("needs the paper's extracted text in $ADGM_SHARED/paper")
    return SHARED / "paper"


@pytest.fixture
def fixtures_dir():
    """tests/fixtures: tiny SVHN and NORB files in their real formats, with expected.npz."""
    return ROOT / "tests" / "fixtures"


@pytest.fixture(autouse=True)
def numpy_backend():
    """Every test starts on NumPy with a fixed seed, whatever ADGM_DEVICE says."""
    import autodiff
    autodiff.use_array_module(autodiff.np, seed=0)
    yield
    autodiff.use_array_module(autodiff.np, seed=0)


# ---------------------------------------------------------------------------------------------
# Running train.py
# ---------------------------------------------------------------------------------------------

SMALL = ["--hidden", "16", "--latent", "4", "4", "--device", "cpu"]
MNIST = ["--dataset", "mnist", "--subset", "200", "--labels", "10", "--batch-size", "50", *SMALL]
MOONS = ["--dataset", "moons", *SMALL]
SEMI_COLUMNS = ["epoch", "seconds", "lr", "loss", "bound_labeled", "bound_unlabeled", "log_px", "kl_z", "kl_a",
                "cross_entropy", "entropy_qy", "test_error_pct", "test_error_bayes_pct", "test_bound",
                "kl_a_1", "kl_a_2", "kl_a_3", "kl_a_4"]  # a model with p(a|z,y) and SMALL's dim(a) = 4
OFFLINE = "http://127.0.0.1:9"  # the discard port: nothing listens, a connection is refused at once
PROXIES = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")


def environment():
    """The environment of a run: no $ADGM_DATA or $ADGM_DEVICE of the caller's, and no network."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "adgm_data", "adgm_device")}
    env.update(dict.fromkeys(PROXIES, OFFLINE))
    return env


@contextlib.contextmanager
def _as_a_run(env):
    """os.environ = env and the repository root as working folder, then both as they were."""
    before, cwd = dict(os.environ), os.getcwd()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(ROOT)
    try:
        yield
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(before)


def run(*args, timeout=None):
    """train.py with `args`, run in this process through train.main: its exit code, stdout and
    stderr as a subprocess.CompletedProcess. (`timeout` is run_process's; ignored here.)"""
    import train
    argv, out, err = [str(a) for a in args], io.StringIO(), io.StringIO()
    with _as_a_run(environment()), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = train.main(argv)
        except SystemExit as e:  # --help
            code = e.code or 0
    return subprocess.CompletedProcess(["train.py", *argv], code, out.getvalue(), err.getvalue())


def run_process(*args, timeout=120, env=None, cwd=ROOT, script="train.py"):
    """train.py with `args` as a real process, as a user would start it from the shell."""
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd, env=env or environment(),
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


def last_line(result):
    return result.stdout.strip().splitlines()[-1]


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


# ---------------------------------------------------------------------------------------------
# Runs made once per test process, which tests must not change: copy a folder to change it
# ---------------------------------------------------------------------------------------------

_finished = {}


def finished_run(name, args, tmp_path_factory):
    """A run done once for the test process: (folder, result)."""
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


# ---------------------------------------------------------------------------------------------
# Reading what a run wrote
# ---------------------------------------------------------------------------------------------

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
    """metrics.csv has exactly `columns`, one row per epoch, every value finite; its rows."""
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
    buffers = ("running_mean", "running_var")  # batch normalisation's averages: stored, not trained
    assert sum(v.size for k, v in params.items() if not k.endswith(buffers)) == count  # every parameter
    return ckpt


def check_figures(folder, names):
    found = sorted(p.name for p in (folder / "figures").glob("*.png"))
    assert set(names) <= set(found), found
    for name in found:
        png_size(folder / "figures" / name)
