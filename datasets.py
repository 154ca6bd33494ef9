"""The data of the ADGM paper (Maaløe et al., ICML 2016, Sec. 4), read top to bottom:

- where data lives: <data-dir>/<dataset>/<public file name>, data-dir = --data-dir > $ADGM_DATA >
  $XDG_CACHE_HOME/adgm (~/.cache/adgm); a missing file is downloaded from public mirrors and
  checked. Every problem a user can fix raises DataError with a one-line message;
- readers of the raw formats, our own on NumPy: IDX (MNIST), MAT-file (SVHN), NORB matrix;
- the datasets as host arrays (`load`): mnist, svhn, norb, and the half-moons (ours from the
  paper's text, or the authors' loader), with a labeled subset balanced over classes;
- the 2-D potentials U1..U4 of Sec. 4.1 (Rezende & Mohamed 2015) and their log Z;
- Batches: the paper's batch composition on the backend's device.
"""
import dataclasses
import functools
import gzip
import hashlib
import http.client
import io
import math
import os
import pathlib
import struct
import sys
import tempfile
import time
import types
import urllib.error
import urllib.request
import zlib

import numpy as np

import autodiff as ad

# ---------------------------------------------------------------------------------------------
# Where data lives: folders, mirrors, checksums, downloads
# ---------------------------------------------------------------------------------------------


class DataError(Exception):
    """A data problem the user can fix (missing or corrupt file, bad request); a one-line message."""


def resolve_data_dir(arg=None):
    """--data-dir, else $ADGM_DATA, else $XDG_CACHE_HOME/adgm (default ~/.cache/adgm), as an
    absolute path: a run folder stores it, and a resumed run may start from another directory."""
    if arg:
        path = pathlib.Path(arg)
    elif os.environ.get("ADGM_DATA"):
        path = pathlib.Path(os.environ["ADGM_DATA"])
    else:
        path = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "adgm"
    return pathlib.Path(os.path.abspath(path.expanduser()))


def data_folder(dataset, arg=None):
    """<data-dir>/<dataset>, once a folder the user named (--data-dir, $ADGM_DATA) is known to
    exist (only the default cache is created) and not to be the dataset's folder itself."""
    root = resolve_data_dir(arg)
    named = "--data-dir" if arg else "$ADGM_DATA" if os.environ.get("ADGM_DATA") else None
    if named and not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"{named} {root} {what}; it should be the folder that holds {dataset}/")
    own = [name for name, _, _ in FILES.get(dataset, [])]
    own += [name[:-3] for name in own if name.endswith(".gz")]
    if root.is_dir() and not (root / dataset).exists() and (
            root.name == dataset or any((root / name).exists() for name in own)):
        raise DataError(f"{root} looks like the {dataset} folder itself: point {named or 'the data folder'} "
                        f"at the folder that holds it, {root.parent}")
    return root / dataset


MIRRORS = {
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/",
              "https://storage.googleapis.com/cvdf-datasets/mnist/", "http://yann.lecun.com/exdb/mnist/"],
    "svhn": ["http://ufldl.stanford.edu/housenumbers/"],
    "norb": ["https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/"],
}

# Each file as the mirrors serve it: (name, MD5 of the served file, SHA-256 of its content after
# gunzip); either digest vouches for it. Only published digests (shared/data/README.md and
# shared/fixtures/README.md). A served .gz may also be kept decompressed, without the .gz.
FILES = {
    "mnist": [("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873",
               "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
              ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432",
               "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
              ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3",
               "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
              ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c",
               "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2")],
    "svhn": [("train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373", None),
             ("test_32x32.mat", "eb5a983be6a315427106f1b4a4a6f0b9", None),
             ("extra_32x32.mat", "a93ce644f1a588dc4d68dda5feec44a7", None)],  # 1.3 GB
    # No checksum of small NORB is published where we could take it from: these files get a
    # format check only (a NORB header, the data size it implies, a complete gzip stream).
    "norb": [(f"smallnorb-5x46789x9x18x6x2x96x96-{part}-{kind}.mat.gz", None, None)
             for part in ("training", "testing") for kind in ("dat", "cat")],
}


def fetch(dataset, data_dir, mirrors=None, timeout=30, names=None, verify=True):
    """The paths of the files of `dataset` (those in `names`, if given) in <data_dir>/<dataset>,
    the missing ones downloaded from `mirrors` (default MIRRORS[dataset]). verify=False uses a
    present file that fails its checksum, with a warning. One error names every file not had;
    once no mirror answers, or the folder cannot be written, the rest are not tried."""
    if dataset not in FILES:
        raise DataError(f"no files to fetch for dataset {dataset!r}; known: {', '.join(FILES)}")
    folder = pathlib.Path(data_dir) / dataset
    paths, missing, problems, errors, give_up = [], [], [], [], False
    for name, md5, sha256 in FILES[dataset]:
        if names is None or name in names:
            path = _local_copy(folder, name, md5, sha256, problems, verify)
            if path is None and not give_up:
                path, give_up = _download_checked(folder, name, md5, sha256, MIRRORS[dataset] if mirrors is None
                                                  else mirrors, timeout, errors)
            (paths if path else missing).append(path or name)
    if missing:
        reasons = problems[:1] + errors[-1:]  # a bad local copy first: it is what the user can fix
        if len(problems) > 1:
            reasons[0] += f" (and {len(problems) - 1} more)"
        raise DataError(f"{dataset}: could not get {', '.join(missing)}; " + "".join(r + "; " for r in reasons)
                        + f"put {'a good copy' if len(missing) == 1 else 'good copies'} in {folder} by hand, "
                        f"or point --data-dir or $ADGM_DATA at a folder that holds {dataset}/")
    return paths


def _local_copy(folder, name, md5, sha256, problems, verify):
    """A present copy of the file (as served, or gunzipped) that passes its check, or None."""
    for path in [folder / name] + ([folder / name[:-3]] if name.endswith(".gz") else []):
        if path.is_file():
            problem = _check(path, md5, sha256)
            if problem is None:
                return path
            if problem == "fails its checksum" and not verify:
                print(f"{path} {problem}; used anyway (--no-verify)", file=sys.stderr)
                return path
            problems.append(f"{path} {problem}")
            print(f"{path} {problem}; not used", file=sys.stderr)
    return None


def _download_checked(folder, name, md5, sha256, mirrors, timeout, errors):
    """Try each mirror: download into a temporary file, check it, rename it into place.
    (path or None, give_up): give_up when no mirror answered or the folder cannot be written."""
    unreachable = True
    for base in mirrors:
        url = base.rstrip("/") + "/" + name
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=folder)
            os.close(fd)
        except OSError as e:
            errors.append(f"{folder} cannot be written ({e.strerror}), so nothing can be downloaded into it")
            return None, True
        try:
            _download(url, tmp, timeout)
            problem = _check(tmp, md5, sha256)
            if problem is None:
                os.replace(tmp, folder / name)
                return folder / name, False
            errors.append(f"{url} {problem}")
            unreachable = False
        except (OSError, http.client.HTTPException, ValueError) as e:  # URLError, timeout, short read
            errors.append(f"{url}: {getattr(e, 'reason', None) or e}")
            # no answer at all: no network, refused, timed out (an HTTP error status is an answer)
            no_answer = isinstance(e, (TimeoutError, ConnectionError, urllib.error.URLError))
            unreachable = unreachable and no_answer and not isinstance(e, urllib.error.HTTPError)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        if not unreachable:
            print(f"  failed: {errors[-1]}", file=sys.stderr)
    if unreachable and errors:
        errors[-1] = f"no mirror could be reached (last: {errors[-1]})"
    return None, unreachable


PROGRESS_BYTES = 50e6  # a download larger than this shows a line at every 5 % of it


def _download(url, dest, timeout):
    """Stream url into the file dest in 1 MiB chunks, with progress lines and the time left for
    big files (SVHN's extra set is 1.3 GB)."""
    print(f"downloading {url}", file=sys.stderr)
    started = time.monotonic()
    with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
        total, done, shown = int(response.headers.get("Content-Length") or 0), 0, 0
        while chunk := response.read(1 << 20):
            out.write(chunk)
            done += len(chunk)
            if total > PROGRESS_BYTES and done - shown >= total / 20:
                shown, left = done, (time.monotonic() - started) / done * (total - done)
                left = f"{left:.0f} s" if left < 90 else f"{left / 60:.0f} min"
                print(f"  {done / 1e6:.0f} of {total / 1e6:.0f} MB, about {left} to go", file=sys.stderr)
    if total and done != total:
        raise OSError(f"the download stopped after {done} of {total} bytes")


def _file_key(path):
    """(absolute path, size, mtime): a file changed or replaced since gets another key."""
    stat = os.stat(path)
    return os.path.abspath(path), stat.st_size, stat.st_mtime_ns


_PASSED = set()  # (file key, md5, sha256) of every file that passed its check in this process


def _check(path, md5, sha256):
    """None if the present file is good, else what is wrong: a published digest, or else the NORB
    format. A file that passed is not read again while its path, size and mtime stay the same."""
    key = (_file_key(path), md5, sha256)
    problem = None if key in _PASSED else _problem(path, md5, sha256)
    if problem is None:
        _PASSED.add(key)
    return problem


def _problem(path, md5, sha256):
    """_check's verdict, from the whole file read through."""
    try:
        if md5 is None and sha256 is None:
            with _open(path) as f:
                dtype, shape = _norb_header(f, path)
                size = sum(len(chunk) for chunk in iter(lambda: f.read(1 << 22), b""))
            ok = size == math.prod(shape) * dtype.itemsize
            return None if ok else f"fails the NORB format check ({size} bytes of data for shape {shape})"
        if md5 and _digest(open(path, "rb"), "md5") == md5:
            return None
        return None if sha256 and _digest(_open(path), "sha256") == sha256 else "fails its checksum"
    except (OSError, EOFError, zlib.error) as e:  # gzip's BadGzipFile is an OSError
        return f"is corrupt ({e})"
    except DataError:  # from _norb_header
        return "fails the NORB format check (not a NORB matrix header)"


def _open(path):
    """A binary stream of the file's content, gunzipped if it is gzip data."""
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _digest(stream, algorithm):
    with stream:
        h = hashlib.new(algorithm)
        for chunk in iter(lambda: stream.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Readers: IDX (MNIST), MATLAB level-5 MAT-file (SVHN), NORB binary matrix
# ---------------------------------------------------------------------------------------------

def _content(path):
    """All bytes of the file, gunzipped if it is gzip data."""
    with _open(path) as f:
        try:
            return f.read()
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt or truncated gzip data ({e})") from None


_IDX_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path):
    """An IDX file (.gz or plain) as an array of its shape, e.g. (60000, 28, 28) uint8."""
    data = _content(path)
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_TYPES:
        raise DataError(f"{path}: not an IDX file (magic number 0x{data[:4].hex()})")
    header = 4 + 4 * data[3]  # the magic number, then one big-endian uint32 per dimension
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX file (the header is cut short)")
    shape, dtype = struct.unpack(f">{data[3]}I", data[4:header]), np.dtype(_IDX_TYPES[data[2]])
    if len(data) - header != math.prod(shape) * dtype.itemsize:
        raise DataError(f"{path}: truncated or malformed IDX file ({len(data) - header} bytes of "
                        f"data; its header {shape} needs {math.prod(shape) * dtype.itemsize})")
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="), copy=False)


_MAT_TYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
_MAT_CLASSES = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4", 14: "i8", 15: "u8"}
_MI_MATRIX, _MI_COMPRESSED = 14, 15


def read_mat(path):
    """The real numeric matrices of a MATLAB level-5 MAT-file by name, in MATLAB's shape (decoded
    column-major), e.g. SVHN's {'X': (32, 32, 3, N) uint8, 'y': (N, 1)}; elements may be
    zlib-compressed. The arrays may be read-only views of the file's bytes (no second copy)."""
    data = pathlib.Path(path).read_bytes()
    if len(data) < 128 or not data.startswith(b"MATLAB") or data[126:128] not in (b"IM", b"MI"):
        raise DataError(f"{path}: not a MATLAB 5 MAT-file (bad header; v7.3/HDF5 files are not read)")
    arrays = {}
    _mat_elements(memoryview(data), 128, "<" if data[126:128] == b"IM" else ">", path, arrays)
    return arrays


def _mat_tags(buf, pos, end, order, path):
    """(type, byte count, data start) of each element from pos to end."""
    while pos < end:
        if pos + 8 > len(buf):
            raise DataError(f"{path}: truncated MAT-file (a tag at byte {pos} is cut short)")
        kind, size = struct.unpack_from(order + "II", buf, pos)
        if kind >> 16:  # a small element: byte count and type in 4 bytes, the data in the next 4
            kind, size, start, after = kind & 0xFFFF, kind >> 16, pos + 4, pos + 8
        else:  # data padded to 8 bytes, except after compressed data
            start, after = pos + 8, pos + 8 + size + (0 if kind == _MI_COMPRESSED else -size % 8)
        if start + size > len(buf):
            raise DataError(f"{path}: truncated MAT-file (an element at byte {pos} needs {size} bytes)")
        yield kind, size, start
        pos = after


def _mat_elements(buf, pos, order, path, out):
    for kind, size, start in _mat_tags(buf, pos, len(buf), order, path):
        if kind == _MI_COMPRESSED:
            try:
                inner = zlib.decompress(buf[start:start + size])
            except zlib.error as e:
                raise DataError(f"{path}: corrupt compressed element ({e})") from None
            _mat_elements(memoryview(inner), 0, order, path, out)
        elif kind == _MI_MATRIX:
            _mat_matrix(buf, start, start + size, order, path, out)


def _mat_matrix(buf, pos, end, order, path, out):
    """One miMATRIX element: sub-elements array flags, dimensions, name, real part, ..."""
    parts = list(_mat_tags(buf, pos, end, order, path))  # (type, byte count, data start)
    if len(parts) < 3 or parts[0][1] < 4:
        raise DataError(f"{path}: malformed MAT-file (a matrix lacks its flags, shape or name)")
    flags = struct.unpack_from(order + "I", buf, parts[0][2])[0]
    if flags & 0xFF not in _MAT_CLASSES or flags & 0x800:
        return  # not a real numeric matrix
    shape = tuple(np.frombuffer(buf, order + "i4", parts[1][1] // 4, parts[1][2]).tolist())
    name = bytes(buf[parts[2][2]:parts[2][2] + parts[2][1]]).decode("latin-1")
    kind, size, start = parts[3] if len(parts) > 3 else (0, 0, 0)
    if kind not in _MAT_TYPES or size != math.prod(shape) * np.dtype(_MAT_TYPES[kind]).itemsize:
        raise DataError(f"{path}: malformed MAT-file (the data of {name!r} do not fit its shape {shape})")
    values = np.frombuffer(buf, order + _MAT_TYPES[kind], math.prod(shape), start).reshape(shape, order="F")
    out[name] = values.astype(_MAT_CLASSES[flags & 0xFF], copy=False)  # may be stored in a smaller type


_NORB_TYPES = {0x1E3D4C51: "<f4", 0x1E3D4C53: "<f8", 0x1E3D4C54: "<i4", 0x1E3D4C55: "u1", 0x1E3D4C56: "<i2"}


def _norb_header(f, what):
    """(dtype, shape) from the NORB header read off stream f, which is left at the data."""
    head = f.read(8)
    magic, ndim = struct.unpack("<Ii", head) if len(head) == 8 else (None, 0)
    if magic not in _NORB_TYPES or not 0 <= ndim <= 16:
        raise DataError(f"{what}: not a NORB matrix file (bad magic number or header)")
    dims = f.read(4 * max(3, ndim))  # at least 3 dimensions are stored, the unused ones 1
    if len(dims) < 4 * max(3, ndim):
        raise DataError(f"{what}: truncated NORB file (the header is cut short)")
    return np.dtype(_NORB_TYPES[magic]), struct.unpack(f"<{max(3, ndim)}i", dims)[:ndim]


def read_norb(path):
    """A NORB binary matrix (.gz or plain), e.g. small NORB's -dat (N, 2, 96, 96) uint8."""
    data = _content(path)
    head = io.BytesIO(data[:8 + 4 * 16])
    dtype, shape = _norb_header(head, path)
    if min(shape, default=1) < 0 or len(data) - head.tell() != math.prod(shape) * dtype.itemsize:
        raise DataError(f"{path}: truncated or malformed NORB file ({len(data) - head.tell()} "
                        f"bytes of data for shape {shape})")
    return np.frombuffer(data, dtype, offset=head.tell()).reshape(shape).astype(dtype.newbyteorder("="), copy=False)


# ---------------------------------------------------------------------------------------------
# Datasets: host arrays, a labeled subset balanced over classes and fixed by the seed
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Dataset:
    """One dataset as host NumPy arrays (x float32, y int64). x_unlabeled holds ALL training
    examples (the labeled ones too, as in the authors' code); y_unlabeled is for analysis only."""
    name: str
    x_labeled: np.ndarray = dataclasses.field(repr=False)    # (N_l, D)
    y_labeled: np.ndarray = dataclasses.field(repr=False)    # (N_l,)
    x_unlabeled: np.ndarray = dataclasses.field(repr=False)  # (N_u, D)
    y_unlabeled: np.ndarray = dataclasses.field(repr=False)  # (N_u,)
    x_test: np.ndarray = dataclasses.field(repr=False)       # (N_test, D)
    y_test: np.ndarray = dataclasses.field(repr=False)       # (N_test,)
    n_classes: int
    likelihood: str            # 'bernoulli' or 'gaussian': p(x|·)
    binarize: bool             # training images binarised anew every epoch (by Batches)
    image_shape: tuple = None  # (28, 28), (32, 32, 3), (32, 64) for a NORB pair; None for moons
    columns: np.ndarray = dataclasses.field(default=None, repr=False)  # MNIST's kept pixels, of 28×28


N_CLASSES = {"mnist": 10, "svhn": 10, "norb": 5, "moons": 2}


def load(name, labels, seed=0, data_dir=None, svhn_extra=True, binarize_test=False, pixels="filtered",
         subset=0, verify=True, draw=None):
    """Dataset `name` (mnist, svhn, norb, moons) with `labels` labeled training examples, drawn by
    labeled_subset with `seed` (or by `draw`, a function of the same arguments: another code's draw).
    pixels='all' keeps all 784 MNIST pixels, 'filtered' the 444 of the paper. subset=N > 0 keeps
    the first N unlabeled and test examples (quick checks), each array the whole dataset's cut; the
    labeled examples still come from all of it. verify=False: see fetch."""
    if name not in N_CLASSES:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(N_CLASSES)}")
    check_labels(labels, N_CLASSES[name])
    draw = draw or labeled_subset
    if name == "moons":
        return first_examples(_moons(labels, seed, draw), subset)
    folder = data_folder(name, data_dir).parent
    if name == "mnist":  # cut before its images become floats
        return _mnist(labels, seed, folder, binarize_test, pixels, draw, verify, subset)
    if name == "svhn":
        return first_examples(_svhn(labels, seed, folder, svhn_extra, verify, draw), subset)
    return first_examples(_norb(labels, seed, folder, verify, draw), subset)


def first_examples(data, n):
    """The dataset with only its first n unlabeled and first n test examples (all for n = 0). SVHN's
    and NORB's noise is one stream over all training and then test images, so they are cut whole."""
    if n:
        data.x_unlabeled, data.y_unlabeled = data.x_unlabeled[:n].copy(), data.y_unlabeled[:n].copy()
        data.x_test, data.y_test = data.x_test[:n].copy(), data.y_test[:n].copy()
    return data


def check_labels(labels, n_classes):
    if labels < 0 or labels % n_classes:
        raise DataError(f"the number of labels must be a multiple of the {n_classes} classes "
                        f"(the labeled set is balanced), not {labels}")


def labeled_subset(y, labels, n_classes, seed):
    """Indices of `labels` training examples, labels / n_classes of each class, fixed by `seed`."""
    check_labels(labels, n_classes)
    per = labels // n_classes
    order = np.random.default_rng(seed).permutation(len(y))
    return checked_subset([order[y[order] == c][:per] for c in range(n_classes)], labels, per)


def checked_subset(chosen, labels, per):
    """The indices of each class's chosen examples as one array, once every class has `per`."""
    for c, members in enumerate(chosen):
        if len(members) < per:
            raise DataError(f"{labels} labels need {per} examples of class {c}; "
                            f"the training set has only {len(members)}")
    return np.concatenate(chosen)


def _dataset(name, labels, seed, x, y, x_test, y_test, draw=labeled_subset, **kw):
    idx = draw(y, labels, N_CLASSES[name], seed)
    return Dataset(name, x[idx], y[idx], x, y, x_test, y_test, N_CLASSES[name], **kw)


def _std(blocks, axis):
    """Standard deviation over `axis` of a uint8 array given as blocks, from exact integer sums
    (no float64 copy of a large array)."""
    n = s1 = s2 = 0
    for b in blocks:
        b = b.astype(np.uint32)  # in b's memory order; 255² fits
        b1 = b.sum(axis, dtype=np.uint64)
        n, s1, s2 = n + b.size // b1.size, s1 + b1, s2 + (b * b).sum(axis, dtype=np.uint64)
    return np.sqrt(np.maximum(s2 / n - (s1 / n) ** 2, 0))


@functools.lru_cache(maxsize=1)
def _mnist_files(keys):
    """The four MNIST files named by their _file_key, decoded once per process while unchanged:
    x (60000, 784), y, x_test, y_test, uint8, read-only (every load shares them), the 444 columns."""
    x, y, x_test, y_test = (read_idx(path) for path, _, _ in keys)
    if x.shape[1:] != (28, 28) or x_test.shape[1:] != (28, 28) or (len(x), len(x_test)) != (len(y), len(y_test)):
        raise DataError(f"{pathlib.Path(keys[0][0]).parent}: the MNIST files do not fit together: training images "
                        f"{x.shape}, labels {y.shape}; test images {x_test.shape}, labels {y_test.shape} (images of "
                        "28×28, one label each)")
    x, x_test = x.reshape(len(x), 784), x_test.reshape(len(x_test), 784)         # (N, 784) uint8
    filtered = np.flatnonzero(_std((x[i:i + 10000] for i in range(0, len(x), 10000)), axis=0) / 255 > 0.1)
    for a in (x, y, x_test, y_test, filtered):
        a.flags.writeable = False
    return x, y, x_test, y_test, filtered


def _mnist(labels, seed, folder, binarize_test, pixels="filtered", draw=labeled_subset, verify=True, subset=0):
    """60 000 train / 10 000 test images, the 444 pixels whose std over the training set is > 0.1
    (or all 784). Only the images kept (the labeled ones, the first `subset`) become floats."""
    keys = tuple(_file_key(path) for path in fetch("mnist", folder, verify=verify))
    x, y, x_test, y_test, filtered = _mnist_files(keys)
    columns = np.arange(784) if pixels == "all" else filtered.copy()
    idx = draw(y, labels, N_CLASSES["mnist"], seed)                        # from the whole training set
    n = subset or None                                                     # [:None] keeps all

    def intensities(images):  # (N, 784) uint8 -> (N, D) float32 in [0, 1]
        out = images[:, columns].astype(np.float32)
        out /= 255
        return out
    x_test_kept = intensities(x_test[:n])               # real-valued in [0, 1], as the authors tested
    if binarize_test:  # one fixed binarisation; its draws for the first rows do not depend on n
        u = np.random.default_rng([seed, 1]).random(x_test_kept.shape, np.float32)
        x_test_kept = (u < x_test_kept).astype(np.float32)
    return Dataset("mnist", intensities(x[idx]), y[idx].astype(np.int64), intensities(x[:n]),
                   y[:n].astype(np.int64), x_test_kept, y_test[:n].astype(np.int64), N_CLASSES["mnist"],
                   likelihood="bernoulli", binarize=True, image_shape=(28, 28), columns=columns)


def _svhn_arrays(path):
    """(X (32, 32, 3, N) uint8, y (N,) int64 with 10 -> 0) of one SVHN file."""
    arrays = read_mat(path)
    X, y = arrays.get("X"), arrays.get("y")
    if X is None or y is None or X.shape[:3] != (32, 32, 3) or X.ndim != 4 or y.size != X.shape[3] \
            or not np.all((y >= 1) & (y <= 10)):
        raise DataError(f"{path}: not an SVHN file (it needs X (32, 32, 3, N) and y (N, 1) in 1..10)")
    return X, y.ravel().astype(np.int64) % 10


def _svhn_pixels(Xs, std, gen, chunk=4096):
    """(N, 3072) float32 rows, each image flattened as (32, 32, 3): (x + U[0, 1)) / std[channel]."""
    out = np.empty((sum(X.shape[3] for X in Xs), 3072), np.float32)
    std, i = np.tile(std, 1024).astype(np.float32), 0   # the channel varies fastest
    for X in Xs:
        for j in range(0, X.shape[3], chunk):
            rows = out[i:i + min(chunk, X.shape[3] - j)]
            rows[...] = X[..., j:j + chunk].transpose(3, 0, 1, 2).reshape(len(rows), 3072)
            rows += gen.random(rows.shape, np.float32)
            rows /= std
            i += len(rows)
    return out


def _svhn(labels, seed, folder, extra, verify=True, draw=labeled_subset):
    """train (+ extra) / test; uniform noise added, divided by the per-channel std over training."""
    names = ["train_32x32.mat", "test_32x32.mat"] + (["extra_32x32.mat"] if extra else [])
    train, test, *more = fetch("svhn", folder, names=names, verify=verify)
    parts, (X_test, y_test) = [_svhn_arrays(p) for p in [train, *more]], _svhn_arrays(test)
    blocks = (X[..., j:j + 8192] for X, _ in parts for j in range(0, X.shape[3], 8192))
    std = np.sqrt(_std(blocks, axis=(0, 1, 3)) ** 2 + 1 / 12)          # of x + U[0, 1): Var x + 1/12
    gen = np.random.default_rng([seed, 1])
    x, y = _svhn_pixels([X for X, _ in parts], std, gen), np.concatenate([y for _, y in parts])
    del parts
    return _dataset("svhn", labels, seed, x, y, _svhn_pixels([X_test], std, gen), y_test, draw=draw,
                    likelihood="gaussian", binarize=False, image_shape=(32, 32, 3))


def _norb_pixels(dat, gen, path, chunk=1000):
    """(N, 2048) float32: each 96×96 image averaged over 3×3 blocks to 32×32, the pair side by
    side as one 32×64 image, then (x + U[0, 1)) / 256 (the noise added after downsampling)."""
    if dat.ndim != 4 or dat.shape[1:] != (2, 96, 96):
        raise DataError(f"{path}: not a small NORB -dat file (shape {dat.shape}, not (N, 2, 96, 96))")
    out = np.empty((len(dat), 2048), np.float32)
    for i in range(0, len(dat), chunk):
        x = dat[i:i + chunk].astype(np.float32)                            # (n, 2, 96, 96)
        x = x[..., 0::3] + x[..., 1::3] + x[..., 2::3]                      # (n, 2, 96, 32)
        x = (x[:, :, 0::3] + x[:, :, 1::3] + x[:, :, 2::3]) / 9             # (n, 2, 32, 32)
        x = x.transpose(0, 2, 1, 3).reshape(len(x), 2048)                   # (n, 32 rows, 2 eyes, 32)
        out[i:i + len(x)] = (x + gen.random(x.shape, np.float32)) / 256
    return out


def _norb(labels, seed, folder, verify=True, draw=labeled_subset):
    """small NORB: 24 300 training and 24 300 test stereo pairs, 5 categories."""
    train_dat, train_cat, test_dat, test_cat = fetch("norb", folder, verify=verify)
    gen = np.random.default_rng([seed, 1])
    x, x_test = (_norb_pixels(read_norb(p), gen, p) for p in (train_dat, test_dat))
    y, y_test = (read_norb(p).astype(np.int64) for p in (train_cat, test_cat))
    if y.shape != (len(x),) or y_test.shape != (len(x_test),) or max(y.max(), y_test.max()) > 4:
        raise DataError(f"{folder}: the NORB -cat files do not fit the -dat files")
    return _dataset("norb", labels, seed, x, y, x_test, y_test, draw=draw, likelihood="gaussian", binarize=False,
                    image_shape=(32, 64))


def _moons(labels, seed, draw=labeled_subset, n=10_000, noise=0.1):
    """Two half-moons (Sec. 4.2): top (cos t, sin t), bottom (1 − cos t, 1 − sin t − 0.5),
    t ~ U[0, π], plus N(0, noise²); n/2 of each, train and test from separate streams."""
    def sample(gen):
        y, t = np.arange(n) % 2, gen.uniform(0, np.pi, n)
        top, bottom = np.stack([np.cos(t), np.sin(t)], 1), np.stack([1 - np.cos(t), 0.5 - np.sin(t)], 1)
        x = np.where(y[:, None] == 0, top, bottom) + noise * gen.standard_normal((n, 2))
        order = gen.permutation(n)
        return x[order].astype(np.float32), y[order].astype(np.int64)
    (x, y), (x_test, y_test) = (sample(np.random.default_rng([seed, stream])) for stream in (0, 1))
    return _dataset("moons", labels, seed, x, y, x_test, y_test, draw=draw, likelihood="gaussian", binarize=False)


# ---------------------------------------------------------------------------------------------
# Potentials (Sec. 4.1): U1..U4 of Rezende & Mohamed (2015, Table 1), p(z) = exp(−U(z)) / Z
# ---------------------------------------------------------------------------------------------
# U(z1, z2, ops) is elementwise on ops = NUMPY_OPS for arrays, or the autodiff module for Tensors.
# U2-U4 do not decay along z1; here they add the soft box (z1/4)**8 (below 0.004 for |z1| < 2, 0.1
# at |z1| = 3) that confines the mass to about [-4.5, 4.5]. Their z2-integrals are then Gaussian,
# so log Z has a closed form: Z2 = 0.4·√(2π)·8Γ(9/8), Z3 = 0.7·√(2π)·8Γ(9/8), Z4 = 0.75·√(2π)·8Γ(9/8).

NUMPY_OPS = types.SimpleNamespace(exp=np.exp, log=np.log, sin=np.sin, sqrt=np.sqrt, logaddexp=np.logaddexp,
                                  sigmoid=lambda x: 0.5 * (np.tanh(0.5 * x) + 1))  # cannot overflow


def _w1(z1, ops):
    return ops.sin(2 * math.pi * z1 / 4)


def U1(z1, z2, ops=NUMPY_OPS):
    """A ring with two modes:
    ½((‖z‖ − 2)/0.4)² − log(exp(−½((z1 − 2)/0.6)²) + exp(−½((z1 + 2)/0.6)²))."""
    r = ops.sqrt(z1 ** 2 + z2 ** 2)
    return 0.5 * ((r - 2) / 0.4) ** 2 - ops.logaddexp(-0.5 * ((z1 - 2) / 0.6) ** 2,
                                                      -0.5 * ((z1 + 2) / 0.6) ** 2)


def U2(z1, z2, ops=NUMPY_OPS):
    """½((z2 − w1)/0.4)² + (z1/4)⁸, with w1 = sin(2πz1/4)."""
    return 0.5 * ((z2 - _w1(z1, ops)) / 0.4) ** 2 + (z1 / 4) ** 8


def U3(z1, z2, ops=NUMPY_OPS):
    """−log(exp(−½((z2 − w1)/0.35)²) + exp(−½((z2 − w1 + w2)/0.35)²)) + (z1/4)⁸,
    with w2 = 3 exp(−½((z1 − 1)/0.6)²)."""
    w1, w2 = _w1(z1, ops), 3 * ops.exp(-0.5 * ((z1 - 1) / 0.6) ** 2)
    return -ops.logaddexp(-0.5 * ((z2 - w1) / 0.35) ** 2,
                          -0.5 * ((z2 - w1 + w2) / 0.35) ** 2) + (z1 / 4) ** 8


def U4(z1, z2, ops=NUMPY_OPS):
    """−log(exp(−½((z2 − w1)/0.4)²) + exp(−½((z2 − w1 + w3)/0.35)²)) + (z1/4)⁸,
    with w3 = 3 σ((z1 − 1)/0.3)."""
    w1, w3 = _w1(z1, ops), 3 * ops.sigmoid((z1 - 1) / 0.3)
    return -ops.logaddexp(-0.5 * ((z2 - w1) / 0.4) ** 2,
                          -0.5 * ((z2 - w1 + w3) / 0.35) ** 2) + (z1 / 4) ** 8


POTENTIALS = {1: U1, 2: U2, 3: U3, 4: U4}


@functools.lru_cache(maxsize=None)
def log_z(k, grid=2000, box=8.0):
    """log ∫ exp(−U_k(z)) dz by the midpoint rule on a grid × grid lattice over [−box, box]²,
    summed with log-sum-exp, a block of rows at a time (a fine grid needs little memory)."""
    if k not in POTENTIALS:
        raise DataError(f"unknown potential {k!r}; choose one of {', '.join(map(str, POTENTIALS))}")
    h = 2 * box / grid
    z = -box + h * (np.arange(grid) + 0.5)                                      # cell midpoints
    blocks = [-POTENTIALS[k](z[i:i + 256, None], z[None, :]) for i in range(0, grid, 256)]
    m = max(b.max() for b in blocks)
    return float(m + np.log(sum(np.exp(b - m).sum() for b in blocks)) + 2 * math.log(h))


# ---------------------------------------------------------------------------------------------
# Batches on the device: labeled examples (cycled) + a slice of the shuffled unlabeled set
# ---------------------------------------------------------------------------------------------

class Batches:
    """`epoch()` yields (x_l, y_l, x_u) device arrays: min(labeled_batch, N_l) labeled examples,
    cycled through successive reshuffles, and unlabeled_batch examples of the unlabeled set,
    shuffled each epoch; len(batches) = N_u // unlabeled_batch. The dataset goes to the device
    once. dataset.binarize: images binarised anew from the originals, the unlabeled set once an
    epoch and the labeled batch at every step, as in the authors' code. All randomness comes from
    ad.rng: restoring its state replays an epoch. `order`, indices of the unlabeled set, walks it
    in that order every epoch instead, never reshuffled (authors/data.py: the released code's)."""

    def __init__(self, dataset, labeled_batch, unlabeled_batch, order=None):
        self.binarize = dataset.binarize
        self.x_l0, self.y_l = ad.xp.asarray(dataset.x_labeled), ad.xp.asarray(dataset.y_labeled)
        self.x_u0 = ad.xp.asarray(dataset.x_unlabeled)                          # the one upload
        self.x_u = None if self.binarize else self.x_u0
        self.order = None if order is None else ad.xp.asarray(order)
        self.n_l, self.n_u = len(self.x_l0), len(self.x_u0)
        self.labeled_batch, self.unlabeled_batch = min(labeled_batch, self.n_l), unlabeled_batch
        if self.n_u < unlabeled_batch:
            raise DataError(f"a batch of {unlabeled_batch} needs as many training examples ({self.n_u} here)")

    def __len__(self):
        return self.n_u // self.unlabeled_batch

    def epoch(self):
        if self.binarize:  # Bernoulli samples with the pixel intensities as means
            self.x_u = None  # free last epoch's copy first
            self.x_u = ad.rng.bernoulli(self.x_u0)
        L, U = self.labeled_batch, self.unlabeled_batch
        unlabeled = ad.rng.permutation(self.n_u) if self.order is None else self.order
        cycles = -(-len(self) * L // max(self.n_l, 1))                          # ceil
        labeled = ad.xp.concatenate([ad.rng.permutation(self.n_l) for _ in range(cycles)] or
                                    [ad.xp.zeros(0, dtype="int64")])
        for i in range(len(self)):
            l, u = labeled[i * L:(i + 1) * L], unlabeled[i * U:(i + 1) * U]
            x_l = self.x_l0[l]
            yield ad.rng.bernoulli(x_l) if self.binarize else x_l, self.y_l[l], self.x_u[u]


class PotentialSteps:
    """The batches of --dataset potential, which has no data: an 'epoch' is 100 steps, each
    with fresh samples of q."""

    def __len__(self):
        return 100

    def epoch(self):
        return iter(range(len(self)))
