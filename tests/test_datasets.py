"""Tests of datasets.py: MNIST (the real files where conftest.py finds them, and a tiny sample in
their format), the SVHN and NORB readers on the format fixtures, downloads from a local HTTP
server (127.0.0.1 only), malformed files, moons, the potentials' log Z, and the batches; a subset
is the whole dataset cut, bit for bit, and MNIST is checked and decoded once per process. No test
reaches the network: MIRRORS is emptied for all.
"""
import copy
import dataclasses
import gzip
import hashlib
import http.server
import math
import os
import re
import shutil
import socket
import struct
import threading

import numpy as np
import pytest

import autodiff as ad
import datasets
from authors import data as authors_data
from datasets import DataError

MNIST = [name for name, _, _ in datasets.FILES["mnist"]]
LABELS = ["train-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]  # small files for fast tests
IMAGES = ["train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No public mirror for any test, and 127.0.0.1 never through a proxy."""
    monkeypatch.setattr(datasets, "MIRRORS", {k: [] for k in datasets.MIRRORS})
    for key in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(key, "127.0.0.1,localhost")


# ---------------------------------------------------------------------------------------------
# MNIST
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist():
    """mnist(data_dir, seed, binarize_test, labels=100, **load's keywords): each whole load made
    once for this module, freed after it."""
    cache = {}

    def get(data_dir, seed=0, binarize_test=False, labels=100, **kw):
        key = (str(data_dir), seed, binarize_test, labels, *sorted(kw.items()))
        if key not in cache:
            cache[key] = datasets.load("mnist", labels, seed=seed, data_dir=data_dir, binarize_test=binarize_test,
                                       **kw)
        return cache[key]
    yield get
    cache.clear()


def cut(data, n):
    """The first n unlabeled and test examples of a whole dataset, the labeled ones all kept."""
    return dataclasses.replace(data, x_unlabeled=data.x_unlabeled[:n], y_unlabeled=data.y_unlabeled[:n],
                               x_test=data.x_test[:n], y_test=data.y_test[:n])


def assert_same(a, b):
    """Every field equal; arrays of the same type, dtype and shape, and equal bit for bit."""
    for field in dataclasses.fields(a):
        u, v = getattr(a, field.name), getattr(b, field.name)
        if isinstance(u, np.ndarray) or isinstance(v, np.ndarray):
            assert type(u) is type(v) and (u.dtype, u.shape) == (v.dtype, v.shape), field.name
            assert u.tobytes() == v.tobytes(), field.name
        else:
            assert u == v, field.name


def test_mnist_shapes_and_the_444_columns(data_dir, mnist):
    d = mnist(data_dir)
    assert d.x_unlabeled.shape == (60000, 444) and d.x_test.shape == (10000, 444)
    assert d.x_labeled.shape == (100, 444) and d.y_labeled.shape == (100,)
    assert all(a.dtype == np.float32 for a in (d.x_labeled, d.x_unlabeled, d.x_test))
    assert all(a.dtype == np.int64 for a in (d.y_labeled, d.y_unlabeled, d.y_test))
    assert (d.n_classes, d.likelihood, d.binarize, d.image_shape) == (10, "bernoulli", True, (28, 28))
    assert len(d.columns) == 444 and np.all(np.diff(d.columns) > 0) and 0 <= d.columns[0] and d.columns[-1] < 784
    assert 0 not in d.columns and 14 * 28 + 14 in d.columns  # a corner pixel is constant, the centre is not
    assert np.array_equal(np.bincount(d.y_test), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])
    assert np.array_equal(np.bincount(d.y_unlabeled), [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949])
    assert d.x_unlabeled.min() == 0 and d.x_unlabeled.max() == 1 and d.x_test.max() == 1
    assert len(np.unique(d.x_test[:100])) > 100  # real-valued test images (the authors' evaluation)
    assert np.all(d.x_unlabeled.std(axis=0) > 0.1)  # every kept column passes the criterion


def test_mnist_labeled_subset_is_balanced_and_part_of_the_training_set(data_dir, mnist):
    d = mnist(data_dir)
    assert np.array_equal(np.bincount(d.y_labeled, minlength=10), [10] * 10)
    idx = datasets.labeled_subset(d.y_unlabeled, 100, 10, seed=0)
    assert len(set(idx.tolist())) == 100
    assert np.array_equal(d.x_labeled, d.x_unlabeled[idx]) and np.array_equal(d.y_labeled, d.y_unlabeled[idx])


def test_mnist_labeled_subset_is_fixed_by_the_seed(data_dir, mnist):
    d0, d1 = mnist(data_dir, 0), mnist(data_dir, 1)
    y = d0.y_unlabeled
    again = datasets.load("mnist", 100, seed=0, data_dir=data_dir, subset=1)
    assert np.array_equal(again.x_labeled, d0.x_labeled) and np.array_equal(again.y_labeled, d0.y_labeled)
    assert np.array_equal(d0.x_labeled, d0.x_unlabeled[datasets.labeled_subset(y, 100, 10, 0)])
    assert np.array_equal(np.bincount(d1.y_labeled), [10] * 10)
    shared = {r.tobytes() for r in d0.x_labeled} & {r.tobytes() for r in d1.x_labeled}
    assert len(shared) < 10  # another seed, (almost) another subset
    assert np.array_equal(d0.x_unlabeled, d1.x_unlabeled)  # the data themselves do not depend on it


# The released ADGM code's 100 labels, ten per class: computed once, outside this repository, by
# running its own _create_semi_supervised (data_preparation/mnist.py, RandomState(123456)) on
# Python 3 (range -> list) over MNIST's training labels in file order.
AUTHORS_LABELS = [
    27407, 46227, 28855, 596, 5373, 14153, 37686, 6097, 1590, 56775,
    3733, 12323, 46240, 15271, 37014, 32721, 55173, 105, 37101, 55596,
    4457, 18713, 18117, 44707, 3830, 39597, 2377, 45920, 54330, 6060,
    5831, 47651, 13568, 6826, 18919, 49054, 8054, 27420, 5396, 30885,
    46472, 26067, 35363, 11652, 17444, 57082, 1275, 30745, 53990, 10633,
    22819, 49032, 49728, 24310, 27778, 9261, 18364, 2566, 12695, 40776,
    17855, 19037, 33960, 30638, 32549, 41912, 27404, 45569, 52897, 58043,
    41769, 1353, 31382, 55090, 45592, 14590, 34307, 27944, 18969, 1225,
    59949, 18291, 1616, 31334, 23347, 41764, 42778, 30318, 7199, 32175,
    16621, 30334, 50710, 59325, 6379, 13032, 19320, 46423, 14627, 58918]


def test_mnist_labels_drawn_as_the_released_adgm_code(data_dir, mnist):
    y = mnist(data_dir).y_unlabeled
    idx = authors_data.labeled_subset(y, 100, 10, seed=0)
    assert idx.tolist() == AUTHORS_LABELS
    assert np.array_equal(authors_data.labeled_subset(y, 100, 10, seed=5), idx)  # no seed in it
    d = mnist(data_dir, 3, draw=authors_data.labeled_subset)
    assert np.array_equal(d.x_labeled, d.x_unlabeled[AUTHORS_LABELS]) and np.array_equal(d.y_labeled, y[idx])


def test_mnist_test_images_binarised_when_asked(data_dir, mnist):
    real, binary = mnist(data_dir).x_test, mnist(data_dir, 0, True).x_test
    assert set(np.unique(binary).tolist()) == {0.0, 1.0}
    assert abs(binary.mean() - real.mean()) < 2e-3  # Bernoulli samples with the intensities as means
    assert np.all(binary[real == 0] == 0) and np.all(binary[real == 1] == 1)


def test_mnist_batches_have_the_paper_composition(data_dir, mnist):
    batches = datasets.Batches(mnist(data_dir), 100, 100)
    assert len(batches) == 600
    x_l, y_l, x_u = next(batches.epoch())
    assert x_l.shape == (100, 444) and y_l.shape == (100,) and x_u.shape == (100, 444)
    assert set(np.unique(x_u).tolist()) == {0.0, 1.0} and np.array_equal(np.sort(y_l), np.repeat(np.arange(10), 10))


@pytest.mark.parametrize("labels, kw, n", [  # 20 000: more than the 10 000 test images
    (100, dict(seed=0), 200), (100, dict(seed=0), 20000), (100, dict(seed=0, binarize_test=True), 200),
    (100, dict(seed=0, binarize_test=True), 20000), (100, dict(seed=3, draw=authors_data.labeled_subset), 200),
    (10, dict(seed=2, pixels="all"), 200)])
def test_an_mnist_subset_is_the_whole_dataset_cut(data_dir, mnist, labels, kw, n):
    """The labeled examples still come from all 60 000; the rest is the whole load's first n."""
    part = datasets.load("mnist", labels, data_dir=data_dir, subset=n, **kw)
    assert len(part.x_unlabeled) == n and len(part.x_test) == min(n, 10000) and len(part.x_labeled) == labels
    assert_same(part, cut(mnist(data_dir, labels=labels, **kw), n))


# load("mnist", 100, seed=0, subset=200, binarize_test=True) on the published MNIST files: the first
# 16 hex digits of the SHA-256 of each array's bytes, and its dtype and shape.
MNIST_DIGESTS = {"x_labeled": ("float32", (100, 444), "e0feb2d0786ca7de"),
                 "y_labeled": ("int64", (100,), "7d8caa66123b2ae6"),
                 "x_unlabeled": ("float32", (200, 444), "31389936a8fd208c"),
                 "y_unlabeled": ("int64", (200,), "9e12fe53995f3a26"),
                 "x_test": ("float32", (200, 444), "a4a7adb502039534"),
                 "y_test": ("int64", (200,), "da7f2703def944ef"),
                 "columns": ("int64", (444,), "63ab73cf0ae2fbc3")}


def test_a_small_mnist_load_is_pinned_bit_for_bit(data_dir):
    d = datasets.load("mnist", 100, seed=0, data_dir=data_dir, subset=200, binarize_test=True)
    for name, (dtype, shape, digest) in MNIST_DIGESTS.items():
        a = getattr(d, name)
        digest_now = hashlib.sha256(a.tobytes()).hexdigest()[:16]
        assert (str(a.dtype), a.shape, digest_now) == (dtype, shape, digest), name


def test_mnist_is_checked_and_decoded_once_per_process(data_dir, monkeypatch):
    first = datasets.load("mnist", 100, seed=0, data_dir=data_dir, subset=200)

    def no_read(*args):
        raise AssertionError("a file was read again")
    monkeypatch.setattr(datasets, "_problem", no_read)   # the checksum check
    monkeypatch.setattr(datasets, "read_idx", no_read)
    assert_same(datasets.load("mnist", 100, seed=0, data_dir=data_dir, subset=200), first)
    other = datasets.load("mnist", 10, seed=1, data_dir=data_dir, subset=50, pixels="all")
    assert other.x_unlabeled.shape == (50, 784) and np.array_equal(other.y_unlabeled, first.y_unlabeled[:50])


def test_loads_give_their_own_arrays_that_change_nothing_shared(data_dir):
    first = datasets.load("mnist", 100, seed=0, data_dir=data_dir, subset=300)
    kept = copy.deepcopy(first)
    for a in (first.x_labeled, first.y_labeled, first.x_unlabeled, first.y_unlabeled, first.x_test, first.y_test,
              first.columns):
        a[...] = 7  # writable, like every load's arrays
    assert_same(datasets.load("mnist", 100, seed=0, data_dir=data_dir, subset=300), kept)


# ---------------------------------------------------------------------------------------------
# Requests that cannot be met, data folder
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, labels, message", [
    ("mnist", 15, "multiple of the 10 classes"), ("moons", -2, "multiple of the 2 classes"),
    ("moons", 10002, "only 5000"), ("cifar10", 10, "unknown dataset"), ("potential", 2, "unknown dataset")])
def test_bad_requests_are_clear_errors(data_dir, name, labels, message):
    with pytest.raises(DataError, match=message):
        datasets.load(name, labels, data_dir=data_dir)


def test_resolve_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ADGM_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert datasets.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert datasets.resolve_data_dir() == tmp_path / "env"
    monkeypatch.delenv("ADGM_DATA")
    assert datasets.resolve_data_dir() == tmp_path / "xdg" / "adgm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert datasets.resolve_data_dir() == tmp_path / "home" / ".cache" / "adgm"


# ---------------------------------------------------------------------------------------------
# SVHN and NORB: readers compared exactly with the fixtures' expected arrays
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("part", ["train", "test", "extra"])  # uncompressed, y double, compressed
def test_read_mat_matches_expected(fixtures_dir, part):
    expected = np.load(fixtures_dir / "svhn" / "expected.npz")
    arrays = datasets.read_mat(fixtures_dir / "svhn" / f"{part}_32x32.mat")
    assert sorted(arrays) == ["X", "y"]
    for key in "Xy":
        want = expected[f"{part}_{key}"]
        assert arrays[key].dtype == want.dtype and arrays[key].shape == want.shape
        assert np.array_equal(arrays[key], want)


@pytest.mark.parametrize("part", ["training", "testing"])  # plain, gzipped
@pytest.mark.parametrize("kind", ["dat", "cat", "info"])
def test_read_norb_matches_expected(fixtures_dir, part, kind):
    expected = np.load(fixtures_dir / "norb" / "expected.npz")[f"{part}_{kind}"]
    path, = (fixtures_dir / "norb").glob(f"smallnorb-*-{part}-{kind}.mat*")
    array = datasets.read_norb(path)
    assert array.dtype == expected.dtype and array.shape == expected.shape
    assert np.array_equal(array, expected)


def test_svhn_fixture_files_fail_their_checksum(fixtures_dir, capsys):
    with pytest.raises(DataError, match="train_32x32.mat") as error:
        datasets.fetch("svhn", fixtures_dir, mirrors=[])
    assert str(fixtures_dir / "svhn") in str(error.value) and "\n" not in str(error.value)
    assert "fails its checksum; not used" in capsys.readouterr().err


def test_svhn_load_on_the_fixtures(fixtures_dir, capsys):
    """The real files' checksums cannot match the fixtures: verify=False uses them, and says so."""
    with pytest.raises(DataError, match="fails its checksum"):
        datasets.load("svhn", 10, seed=0, data_dir=fixtures_dir)
    capsys.readouterr()
    e = np.load(fixtures_dir / "svhn" / "expected.npz")
    d = datasets.load("svhn", 10, seed=0, data_dir=fixtures_dir, verify=False)
    assert capsys.readouterr().err.count("fails its checksum; used anyway") == 3
    X = np.concatenate([e["train_X"], e["extra_X"]], axis=3)
    assert d.x_unlabeled.shape == (40, 3072) and d.x_test.shape == (11, 3072) and d.x_unlabeled.dtype == np.float32
    assert np.array_equal(d.y_unlabeled, np.concatenate([e["train_y"], e["extra_y"]]).ravel() % 10)
    assert np.array_equal(d.y_test, e["test_y"].ravel().astype(np.int64) % 10) and 0 in d.y_test
    std = np.sqrt(X.reshape(-1, 3, 40).transpose(0, 2, 1).reshape(-1, 3).astype(np.float64).var(axis=0) + 1 / 12)
    noise = d.x_unlabeled.reshape(40, 32, 32, 3) * std - X.transpose(3, 0, 1, 2)  # (N, 32, 32, 3) layout
    assert noise.min() >= -1e-3 and noise.max() < 1 + 1e-3 and abs(noise.mean() - 0.5) < 0.01
    assert (d.likelihood, d.binarize, d.image_shape, d.n_classes) == ("gaussian", False, (32, 32, 3), 10)
    with pytest.raises(DataError, match="class 0"):  # the train file alone has no 0 and no 1
        datasets.load("svhn", 10, data_dir=fixtures_dir, svhn_extra=False, verify=False)


def test_norb_fetch_accepts_plain_and_gzipped_and_load_checks_classes(fixtures_dir):
    paths = datasets.fetch("norb", fixtures_dir)  # format check only: the fixtures pass it
    served = [name for name, _, _ in datasets.FILES["norb"]]  # training dat, cat, testing dat, cat
    assert paths == [fixtures_dir / "norb" / name[:-3] for name in served[:2]] + \
        [fixtures_dir / "norb" / name for name in served[2:]]
    with pytest.raises(DataError, match="class 2"):  # the 9 training pairs have no airplane
        datasets.load("norb", 5, data_dir=fixtures_dir)


@pytest.mark.parametrize("name, labels, n", [("svhn", 10, 5), ("svhn", 10, 20), ("norb", 0, 3), ("norb", 0, 8)])
def test_an_svhn_or_norb_subset_is_the_whole_dataset_cut(fixtures_dir, name, labels, n):
    """svhn: 40 training and 11 test images; norb: 9 and 7 pairs (n = 8 keeps all the test pairs)."""
    whole = datasets.load(name, labels, seed=1, data_dir=fixtures_dir, verify=False)
    part = datasets.load(name, labels, seed=1, data_dir=fixtures_dir, verify=False, subset=n)
    assert len(part.x_unlabeled) == n and len(part.x_test) == min(n, len(whole.x_test))
    assert_same(part, cut(whole, n))


def test_norb_pixels_downsample_and_place_the_pair_side_by_side(fixtures_dir):
    dat = np.load(fixtures_dir / "norb" / "expected.npz")["training_dat"]
    x = datasets._norb_pixels(dat, np.random.default_rng(0), "dat")
    assert x.shape == (9, 2048) and x.dtype == np.float32
    small = dat.reshape(9, 2, 32, 3, 32, 3).mean(axis=(3, 5))              # (N, 2, 32, 32)
    image = x.reshape(9, 32, 64) * 256
    for eye in (0, 1):
        noise = image[:, :, 32 * eye:32 * (eye + 1)] - small[:, eye]
        assert noise.min() >= -1e-3 and noise.max() < 1 + 1e-3


# ---------------------------------------------------------------------------------------------
# Downloads from a local HTTP server
# ---------------------------------------------------------------------------------------------

def _handler(folder, mode, log):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            log.append(self.path)
            path = folder / self.path.lstrip("/")
            if not path.is_file():
                return self.send_error(404)
            data = sent = path.read_bytes()
            if mode == "corrupt":  # valid gzip, one byte of the content changed
                content = bytearray(gzip.decompress(data))
                content[-1] ^= 1
                data = sent = gzip.compress(bytes(content))
            elif mode == "truncated":  # half the file, served as if complete
                data = sent = data[:len(data) // 2]
            elif mode == "short":  # the connection drops half-way
                sent = data[:len(data) // 2]
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(sent)

        def log_message(self, *args):
            pass
    return Handler


@pytest.fixture
def serve(tmp_path):
    """serve(folder, mode) -> (mirror URL, list of requested paths); servers stop after the test."""
    servers = []

    def start(folder, mode="ok"):
        log = []
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(folder, mode, log))
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/", log
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def mnist_copy(tmp_path, data_dir):
    folder = tmp_path / "served"
    shutil.copytree(data_dir / "mnist", folder)
    return folder


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def test_download_into_an_empty_folder_succeeds_and_verifies(serve, mnist_copy, tmp_path):
    url, log = serve(mnist_copy)
    paths = datasets.fetch("mnist", tmp_path / "data", mirrors=[url])
    assert [p.name for p in paths] == MNIST and sorted(log) == sorted("/" + n for n in MNIST)
    for p in paths:
        assert p.parent == tmp_path / "data" / "mnist" and p.read_bytes() == (mnist_copy / p.name).read_bytes()
    assert sorted(q.name for q in (tmp_path / "data" / "mnist").iterdir()) == sorted(MNIST)  # no temporaries
    assert datasets.fetch("mnist", tmp_path / "data", mirrors=[]) == paths and len(log) == 4  # no new download


def test_a_big_download_shows_how_far_it_is_and_the_time_left(serve, tmp_path, monkeypatch, capsys):
    """Past PROGRESS_BYTES, a line at every 5 %: the megabytes so far, of all, and the time left."""
    (tmp_path / "served").mkdir()
    (tmp_path / "served" / "big.bin").write_bytes(bytes(3 << 20))
    url, _ = serve(tmp_path / "served")
    monkeypatch.setattr(datasets, "PROGRESS_BYTES", 1e6)
    datasets._download(url + "big.bin", tmp_path / "big.bin", timeout=10)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"downloading {url}big.bin" and len(lines) == 4, lines
    assert [re.fullmatch(r"  (\d) of 3 MB, about \d+ s to go", line)[1] for line in lines[1:]] == ["1", "2", "3"], lines
    assert (tmp_path / "big.bin").stat().st_size == 3 << 20


@pytest.mark.parametrize("mode", ["corrupt", "truncated", "short"])
def test_a_bad_download_leaves_no_file_and_a_clear_error(serve, mnist_copy, tmp_path, mode):
    url, log = serve(mnist_copy, mode)
    with pytest.raises(DataError) as error:
        datasets.fetch("mnist", tmp_path, mirrors=[url], names=LABELS[1:])
    message = str(error.value)
    assert LABELS[1] in message and str(tmp_path / "mnist") in message and "\n" not in message
    assert log == ["/" + LABELS[1]] and list((tmp_path / "mnist").iterdir()) == []
    assert ("stopped after" in message) == (mode == "short")  # a dropped connection is named as such


def test_an_unreachable_mirror_falls_through_to_the_next(serve, mnist_copy, tmp_path):
    url, log = serve(mnist_copy)
    empty, empty_log = serve(tmp_path)  # answers 404
    paths = datasets.fetch("mnist", tmp_path / "data", mirrors=[closed_port_url(), empty, url], names=LABELS)
    assert [p.name for p in paths] == LABELS and len(empty_log) == 2 and len(log) == 2
    assert all(p.read_bytes() == (mnist_copy / p.name).read_bytes() for p in paths)


def test_offline_the_error_names_the_files_and_the_folder(tmp_path):
    with pytest.raises(DataError) as error:
        datasets.fetch("mnist", tmp_path, mirrors=[closed_port_url()], timeout=5)
    message = str(error.value)
    assert all(name in message for name in MNIST) and str(tmp_path / "mnist") in message
    assert "\n" not in message and list((tmp_path / "mnist").iterdir()) == []


def test_a_corrupt_local_file_is_reported_not_used_and_replaced(serve, mnist_copy, tmp_path, capsys):
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    (folder / LABELS[1]).write_bytes(gzip.compress(b"not the labels"))
    with pytest.raises(DataError, match=LABELS[1]):
        datasets.fetch("mnist", tmp_path / "data", mirrors=[], names=LABELS[1:])
    assert "fails its checksum; not used" in capsys.readouterr().err
    url, _ = serve(mnist_copy)
    path, = datasets.fetch("mnist", tmp_path / "data", mirrors=[url], names=LABELS[1:])
    assert path.read_bytes() == (mnist_copy / LABELS[1]).read_bytes()


def test_a_file_is_checked_once_while_its_size_and_mtime_stay(data_dir, tmp_path, monkeypatch):
    path = tmp_path / "mnist" / LABELS[1]
    path.parent.mkdir()
    shutil.copy(data_dir / "mnist" / LABELS[1], path)
    checked, problem = [], datasets._problem
    monkeypatch.setattr(datasets, "_problem", lambda *args: checked.append(args[0]) or problem(*args))
    for _ in range(3):
        assert datasets.fetch("mnist", tmp_path, mirrors=[], names=LABELS[1:]) == [path]
    assert checked == [path]
    mtime = path.stat().st_mtime_ns
    os.utime(path, ns=(mtime, mtime + 1))                        # touched: checked again
    assert datasets.fetch("mnist", tmp_path, mirrors=[], names=LABELS[1:]) == [path] and len(checked) == 2
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 1                              # the same size, one bit changed
    path.write_bytes(bytes(content))
    os.utime(path, ns=(mtime, mtime + 2))
    with pytest.raises(DataError, match=LABELS[1]):
        datasets.fetch("mnist", tmp_path, mirrors=[], names=LABELS[1:])
    assert len(checked) == 3


def test_a_decompressed_local_copy_is_accepted(mnist_copy, tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    (folder / LABELS[1][:-3]).write_bytes(gzip.decompress((mnist_copy / LABELS[1]).read_bytes()))
    path, = datasets.fetch("mnist", tmp_path, mirrors=[], names=LABELS[1:])
    assert path == folder / LABELS[1][:-3] and len(datasets.read_idx(path)) == 10000


@pytest.mark.parametrize("mode, ok", [("ok", True), ("truncated", False), ("short content", False)])
def test_norb_downloads_get_a_format_check(serve, fixtures_dir, tmp_path, mode, ok):
    name = "smallnorb-5x46789x9x18x6x2x96x96-testing-dat.mat.gz"
    served = tmp_path / "served"
    served.mkdir()
    content = gzip.decompress((fixtures_dir / "norb" / name).read_bytes())
    (served / name).write_bytes(gzip.compress(content[:-100] if mode == "short content" else content))
    url, _ = serve(served, "ok" if mode == "short content" else mode)  # a valid gzip of too few bytes
    if ok:
        path, = datasets.fetch("norb", tmp_path, mirrors=[url], names=[name])
        assert datasets.read_norb(path).shape == (7, 2, 96, 96)
    else:
        with pytest.raises(DataError, match=name):
            datasets.fetch("norb", tmp_path, mirrors=[url], names=[name])
        assert list((tmp_path / "norb").iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Malformed files
# ---------------------------------------------------------------------------------------------

def idx_bytes(array):
    """An IDX file of a uint8 array, written from the format's description (magic 0x0000 08 ndim,
    each dimension as a big-endian int32, then the data)."""
    header = struct.pack(">I", 0x0800 + array.ndim) + b"".join(struct.pack(">i", n) for n in array.shape)
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


@pytest.fixture
def labels_idx():
    return idx_bytes(np.random.default_rng(0).integers(0, 10, 10000).astype(np.uint8))  # 8-byte header + 10000


def write_tiny_mnist(folder, n_train=300, n_test=100):
    """A tiny MNIST in the real files' format (gzipped IDX): noisy strokes whose position is the
    digit, so that a classifier has something to learn. It fails MNIST's checksums: --no-verify."""
    gen = np.random.default_rng(1)
    (folder / "mnist").mkdir(parents=True)
    for images, labels, n in ((IMAGES[0], LABELS[0], n_train), (IMAGES[1], LABELS[1], n_test)):
        y = np.arange(n) % 10
        x = (gen.random((n, 28, 28)) * 60).astype(np.uint8)
        for i, digit in enumerate(y):
            x[i, 4:24, 2 + 2 * digit:5 + 2 * digit] = 255
        (folder / "mnist" / images).write_bytes(gzip.compress(idx_bytes(x)))
        (folder / "mnist" / labels).write_bytes(gzip.compress(idx_bytes(y.astype(np.uint8))))


def test_mnist_files_that_do_not_fit_together_say_their_shapes(tmp_path):
    """The test labels in place of the training labels: one line with the shapes that disagree."""
    write_tiny_mnist(tmp_path / "data")
    (tmp_path / "data" / "mnist" / LABELS[0]).write_bytes((tmp_path / "data" / "mnist" / LABELS[1]).read_bytes())
    with pytest.raises(datasets.DataError, match=r": the MNIST files do not fit together: training images "
                                                 r"\(300, 28, 28\), labels \(100,\); test images \(100, 28, 28\)"):
        datasets.load("mnist", 20, seed=0, data_dir=tmp_path / "data", verify=False)


def test_a_tiny_mnist_in_the_real_format_trains_end_to_end(tmp_path):
    """Without the real files: the MNIST path (IDX reading, the pixel filter, the labeled draw,
    a run and its evaluation) on a sample the test writes; --no-verify lets its checksums pass."""
    write_tiny_mnist(tmp_path / "data")
    data = datasets.load("mnist", 20, seed=0, data_dir=tmp_path / "data", verify=False)
    assert data.x_unlabeled.shape[0] == 300 and data.x_test.shape[0] == 100 and len(data.y_labeled) == 20
    assert np.bincount(data.y_labeled, minlength=10).tolist() == [2] * 10
    assert 0 < data.x_unlabeled.shape[1] < 784 and data.x_unlabeled.max() <= 1  # the constant pixels filtered out
    from conftest import SMALL, ok, run
    result = ok(run("--dataset", "mnist", "--labels", "20", "--batch-size", "50", *SMALL, "--epochs", "1",
                    "--no-verify", "--data-dir", tmp_path / "data", "--out", tmp_path / "run"))
    assert "test error" in result.stdout
    with pytest.raises(DataError, match="checksum|MD5|SHA|does not match"):
        datasets.load("mnist", 20, seed=0, data_dir=tmp_path / "data")


@pytest.mark.parametrize("change, message", [
    (lambda b: b[:-10], "truncated"), (lambda b: b[:6], "truncated"), (lambda b: b + b"\0", "malformed"),
    (lambda b: b"\0\0\x07\x01" + b[4:], "not an IDX file"), (lambda b: b"\x01" + b[1:], "not an IDX file"),
    (lambda b: gzip.compress(b)[:-20], "gzip")])
def test_malformed_idx_files_are_clear_errors(labels_idx, tmp_path, change, message):
    path = tmp_path / "file"
    path.write_bytes(change(labels_idx))
    with pytest.raises(DataError, match=message):
        datasets.read_idx(path)


def test_idx_reads_plain_and_gzipped_alike(labels_idx, tmp_path):
    (tmp_path / "a").write_bytes(labels_idx)
    (tmp_path / "b").write_bytes(gzip.compress(labels_idx))
    a, b = datasets.read_idx(tmp_path / "a"), datasets.read_idx(tmp_path / "b")
    assert a.shape == (10000,) and a.dtype == np.uint8 and np.array_equal(a, b) and a.max() == 9


@pytest.mark.parametrize("part, change, message", [
    ("train", lambda b: b"hello, not a MAT-file" + bytes(200), "bad header"),
    ("train", lambda b: b[:100], "bad header"),
    ("train", lambda b: b[:len(b) // 2], "truncated"),
    ("extra", lambda b: b[:len(b) // 2], "truncated"),
    ("extra", lambda b: b[:300] + bytes(100) + b[400:], "corrupt compressed")])
def test_malformed_mat_files_are_clear_errors(fixtures_dir, tmp_path, part, change, message):
    path = tmp_path / "file.mat"
    path.write_bytes(change((fixtures_dir / "svhn" / f"{part}_32x32.mat").read_bytes()))
    with pytest.raises(DataError, match=message):
        datasets.read_mat(path)


@pytest.mark.parametrize("change, message", [(lambda b: b[:-1], "truncated"), (lambda b: b[:10], "truncated"),
                                             (lambda b: b"\0" * 4 + b[4:], "not a NORB")])
def test_malformed_norb_files_are_clear_errors(fixtures_dir, tmp_path, change, message):
    path = tmp_path / "file.mat"
    path.write_bytes(change((fixtures_dir / "norb" / "smallnorb-5x46789x9x18x6x2x96x96-training-cat.mat").read_bytes()))
    with pytest.raises(DataError, match=message):
        datasets.read_norb(path)


# ---------------------------------------------------------------------------------------------
# Moons and potentials
# ---------------------------------------------------------------------------------------------

def test_moons_are_balanced_and_lie_on_the_two_half_circles():
    d = datasets.load("moons", 6, seed=3)
    assert d.x_unlabeled.shape == (10000, 2) and d.x_test.shape == (10000, 2) and d.x_unlabeled.dtype == np.float32
    assert np.array_equal(np.bincount(d.y_unlabeled), [5000, 5000]) and np.array_equal(np.bincount(d.y_test), [5000, 5000])
    assert np.array_equal(np.bincount(d.y_labeled), [3, 3]) and (d.image_shape, d.columns) == (None, None)
    for x, y in ((d.x_unlabeled, d.y_unlabeled), (d.x_test, d.y_test)):
        centre = np.where(y[:, None] == 0, [0.0, 0.0], [1.0, 0.5])  # top: (cos t, sin t); bottom: (1−cos t, ½−sin t)
        radius = np.linalg.norm(x - centre, axis=1)
        assert abs(np.mean(radius) - 1) < 0.01 and 0.07 < np.std(radius) < 0.12  # noise std 0.1
        assert np.mean(x[y == 0, 1]) > 0.5 and np.mean(x[y == 1, 1]) < 0  # top above, bottom below
    assert not np.allclose(d.x_unlabeled, d.x_test)  # separate streams
    again, other = datasets.load("moons", 6, seed=3), datasets.load("moons", 6, seed=4)
    assert np.array_equal(again.x_unlabeled, d.x_unlabeled) and np.array_equal(again.x_labeled, d.x_labeled)
    assert not np.allclose(other.x_unlabeled, d.x_unlabeled)


@pytest.mark.parametrize("setup, labels", [("ours", 6), ("authors", 6), ("authors", 0)])
def test_a_moons_subset_is_the_whole_dataset_cut(setup, labels):
    load = (lambda **kw: datasets.load("moons", labels, seed=3, **kw)) if setup == "ours" else \
        (lambda **kw: authors_data.half_moons(labels, **kw))
    whole, part = load(), load(subset=100)
    assert len(part.x_unlabeled) == len(part.x_test) == 100 and len(part.x_labeled) == labels
    assert_same(part, cut(whole, 100))


# sklearn.datasets.make_moons(10000, shuffle=True, noise=0.2, random_state=1234) (scikit-learn
# 1.9.1): rows 0, 1, 4999 and 9999, their classes, the smallest coordinate and its flat index.
SKLEARN_MOONS = ([[0.041758590747571406, 1.0158291261486752], [0.9454072018081836, 0.7449214024963189],
                  [-0.9039817064637778, 0.09129068241115113], [1.9333256554863383, -0.16023258291519346]],
                 [0, 0, 0, 1], -1.593337361016422, 18172)


def test_make_moons_gives_sklearns_points():
    x, y = authors_data.make_moons(10_000, noise=0.2, random_state=1234)
    rows, classes, smallest, where = SKLEARN_MOONS
    assert x.shape == (10_000, 2) and np.array_equal(np.bincount(y), [5000, 5000])
    np.testing.assert_allclose(x[[0, 1, 4999, 9999]], rows, rtol=0, atol=1e-15)  # NumPy's sin and cos
    assert y[[0, 1, 4999, 9999]].tolist() == classes and x.argmin() == where      # differ by an ulp
    assert x.min() == pytest.approx(smallest, rel=0, abs=1e-15)                     # between versions
    x_odd, y_odd = authors_data.make_moons(11, noise=0.0, random_state=0)  # n // 2 on top, the rest below
    assert np.bincount(y_odd).tolist() == [5, 6]
    on_top = np.abs(np.linalg.norm(x_odd[y_odd == 0], axis=1) - 1) < 1e-12
    on_bottom = np.abs(np.linalg.norm(x_odd[y_odd == 1] - [1, 0.5], axis=1) - 1) < 1e-12
    assert on_top.all() and on_bottom.all()


def test_the_authors_moons_setup():
    """noise 0.2, one scalar shift by |min|, six fixed labels near the ends and middles of their
    own moon, test set = training set, and no seed."""
    d = authors_data.half_moons(6)
    x, y = d.x_unlabeled, d.y_unlabeled
    assert x.shape == (10_000, 2) and x.dtype == np.float32 and np.array_equal(np.bincount(y), [5000, 5000])
    assert np.array_equal(d.x_test, x) and np.array_equal(d.y_test, y)
    shift = -SKLEARN_MOONS[2]
    np.testing.assert_allclose(x[[0, 1, 4999, 9999]], np.array(SKLEARN_MOONS[0]) + shift, rtol=1e-6)
    assert x.min() == 0
    centre = np.where(y[:, None] == 0, [shift, shift], [1 + shift, 0.5 + shift])
    radius = np.linalg.norm(x - centre, axis=1)
    assert abs(np.mean(radius) - 1) < 0.03 and 0.17 < np.std(radius) < 0.23  # noise std 0.2
    assert d.y_labeled.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(d.x_labeled, np.float32([[0.7, 1.7], [1.6, 2.6], [2.7, 1.7],
                                                           [1.6, 2.0], [2.7, 1.1], [3.5, 2.0]]))
    for point, label in zip(d.x_labeled, d.y_labeled):  # each lies on its own moon
        nearest = np.linalg.norm(x - point, axis=1).argsort()[:20]
        assert np.mean(y[nearest] == label) >= 0.75
    assert authors_data.half_moons(0).x_labeled.shape == (0, 2)  # the avae's
    with pytest.raises(DataError, match="6 fixed labeled points"):
        authors_data.half_moons(10)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_log_z_converges_as_the_grid_is_refined(k):
    fine = datasets.log_z(k, grid=1000)
    errors = [abs(datasets.log_z(k, grid=n) - fine) for n in (16, 32, 64)]
    assert errors[0] > errors[1] > errors[2] and errors[0] > 1e-4
    assert abs(datasets.log_z(k, grid=400) - fine) < 1e-9 and abs(datasets.log_z(k, grid=1000, box=10.0) - fine) < 1e-9


@pytest.mark.parametrize("k, scale", [(2, 0.4), (3, 0.7), (4, 0.75)])
def test_log_z_matches_the_closed_form_of_the_boxed_potentials(k, scale):
    """U2-U4 are Gaussian in z2 (total scale σ√(2π)), times exp(−(z1/4)⁸) whose integral is 8Γ(9/8)."""
    exact = math.log(scale * math.sqrt(2 * math.pi) * 8 * math.gamma(9 / 8))
    assert abs(datasets.log_z(k) - exact) < 1e-9


def test_potentials_run_on_tensors_and_match_numpy_and_finite_differences():
    gen = np.random.default_rng(0)
    z1, z2 = gen.uniform(-3, 3, 7), gen.uniform(-3, 3, 7)
    for k, U in datasets.POTENTIALS.items():
        t1, t2 = ad.Tensor(z1, requires_grad=True), ad.Tensor(z2, requires_grad=True)
        out = U(t1, t2, ops=ad)
        np.testing.assert_allclose(out.data, U(z1, z2), rtol=1e-12, err_msg=f"U{k}")
        out.sum().backward()
        h = 1e-6
        np.testing.assert_allclose(t1.grad, (U(z1 + h, z2) - U(z1 - h, z2)) / (2 * h), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(t2.grad, (U(z1, z2 + h) - U(z1, z2 - h)) / (2 * h), rtol=1e-5, atol=1e-6)


def test_the_potentials_are_those_of_rezende_and_mohamed_table_1():
    """U1-U4 at a few points against the published formulas written out with scalars, U2-U4 with
    the box (z1/4)⁸ added."""
    w1 = lambda z1: math.sin(2 * math.pi * z1 / 4)                                # noqa: E731
    w2 = lambda z1: 3 * math.exp(-0.5 * ((z1 - 1) / 0.6) ** 2)                   # noqa: E731
    w3 = lambda z1: 3 / (1 + math.exp(-(z1 - 1) / 0.3))                          # noqa: E731
    bump = lambda u, s: math.exp(-0.5 * (u / s) ** 2)                            # noqa: E731
    published = {
        1: lambda z1, z2: (0.5 * ((math.hypot(z1, z2) - 2) / 0.4) ** 2
                           - math.log(bump(z1 - 2, 0.6) + bump(z1 + 2, 0.6))),
        2: lambda z1, z2: 0.5 * ((z2 - w1(z1)) / 0.4) ** 2,
        3: lambda z1, z2: -math.log(bump(z2 - w1(z1), 0.35) + bump(z2 - w1(z1) + w2(z1), 0.35)),
        4: lambda z1, z2: -math.log(bump(z2 - w1(z1), 0.4) + bump(z2 - w1(z1) + w3(z1), 0.35)),
    }
    for k, U in datasets.POTENTIALS.items():
        for z1, z2 in [(0.3, -0.7), (1.2, 1.5), (-2.1, 0.4), (1.0, -2.5), (2.5, 0.0)]:
            box = (z1 / 4) ** 8 if k > 1 else 0.0
            assert U(np.array(z1), np.array(z2)) == pytest.approx(published[k](z1, z2) + box, rel=1e-12), (k, z1, z2)


def test_the_box_term_leaves_u2_to_u4_alone_near_the_centre():
    z1, z2 = np.meshgrid(np.linspace(-2, 2, 41), np.linspace(-4, 4, 41))
    w1 = np.sin(2 * np.pi * z1 / 4)
    assert np.max(np.abs(datasets.U2(z1, z2) - 0.5 * ((z2 - w1) / 0.4) ** 2)) < 0.004
    assert datasets.U2(np.array(6.0), np.array(0.0)) > 10  # but it confines z1
    assert np.isfinite(datasets.U4(np.array([-1e3, 1e3]), np.array([0.0, 0.0]))).all()  # stable sigmoid


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------

def toy(binarize=False, n_u=50, n_l=6):
    """x[:, 0] identifies an example (its index / 100); the labeled ones are the first n_l."""
    x = np.full((n_u, 4), 0.3, np.float32)
    x[:, 0] = np.arange(n_u) / 100
    y = np.arange(n_u) % 3
    return datasets.Dataset("toy", x[:n_l].copy(), y[:n_l].copy(), x, y, x[:5], y[:5], 3,
                            "bernoulli" if binarize else "gaussian", binarize, None)


def test_each_epoch_visits_every_unlabeled_example_once_and_cycles_the_labeled():
    batches = datasets.Batches(toy(), labeled_batch=4, unlabeled_batch=10)
    assert len(batches) == 5
    orders = []
    for _ in range(2):
        epoch = list(batches.epoch())
        assert len(epoch) == 5 and all(x_l.shape == (4, 4) and x_u.shape == (10, 4) for x_l, _, x_u in epoch)
        seen = np.rint(np.concatenate([x_u[:, 0] for _, _, x_u in epoch]) * 100).astype(int)
        assert np.array_equal(np.sort(seen), np.arange(50))
        orders.append(seen)
        labeled = np.rint(np.concatenate([x_l[:, 0] for x_l, _, _ in epoch]) * 100).astype(int)  # 20 draws
        assert all(sorted(labeled[i:i + 6]) == list(range(6)) for i in (0, 6, 12))   # successive reshuffles
        assert not np.array_equal(labeled[0:6], labeled[6:12])
        assert np.array_equal(np.concatenate([y_l for _, y_l, _ in epoch]), labeled % 3)
    assert not np.array_equal(orders[0], orders[1])


def test_labeled_batch_is_capped_by_the_labeled_set_and_too_big_a_batch_is_an_error():
    x_l, _, _ = next(datasets.Batches(toy(), 100, 10).epoch())
    assert x_l.shape == (6, 4)
    with pytest.raises(DataError, match=r"a batch of 51 needs as many training examples \(50 here\)"):
        datasets.Batches(toy(), 10, 51)


def test_training_images_are_binarised_anew_each_epoch():
    data = toy(binarize=True, n_u=2000)
    batches = datasets.Batches(data, 6, 1000)
    first, second = (np.concatenate([x_u for _, _, x_u in batches.epoch()]) for _ in range(2))
    x_l = next(batches.epoch())[0]
    for x in (first, second, x_l):
        assert set(np.unique(x).tolist()) <= {0.0, 1.0}
    assert abs(first[:, 1:].mean() - 0.3) < 0.02  # Bernoulli(0.3) samples
    assert not np.array_equal(np.sort(first, axis=0), np.sort(second, axis=0))
    assert np.all(data.x_unlabeled[:, 1:] == np.float32(0.3))  # the originals are untouched


def test_restoring_the_rng_state_replays_an_epoch_exactly():
    batches = datasets.Batches(toy(binarize=True), 4, 10)
    state = ad.rng.get_state()
    first = [a.copy() for batch in batches.epoch() for a in batch]
    ad.rng.set_state(state)
    again = [a.copy() for batch in batches.epoch() for a in batch]
    assert len(first) == len(again) == 5 * 3  # 5 batches of (x_l, y_l, x_u)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(next(batches.epoch())[2], first[2])  # without a restore, another epoch


def test_batches_on_a_device_upload_once_and_transfer_nothing_per_batch():
    fake_cupy = pytest.importorskip("fake_cupy")
    ad.use_array_module(fake_cupy, seed=0)
    fake_cupy.reset()
    batches = datasets.Batches(toy(binarize=True), 4, 10)
    assert fake_cupy.transfers["h2d"] == 3  # x_labeled, y_labeled, x_unlabeled
    with fake_cupy.record() as log:
        epoch = list(batches.epoch())
    assert len(epoch) == 5 and all(isinstance(a, fake_cupy.FakeArray) for batch in epoch for a in batch)
    assert log == []
