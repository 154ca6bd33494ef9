"""The files of a run folder, as train.py writes them and reads them back: each replaced atomically,
and each checked when read, so that a damaged file is one line that names it.

    RUN/checkpoint.npz   parameters, Adam's state, the random generator's state, the epoch and the
                         configuration: plain arrays, read with allow_pickle=False
    RUN/metrics.csv      one row per epoch
    RUN/config.json      the options of the run
    RUN/evaluations.csv  what each --evaluate printed, a line per number, with its options

An epoch's row and checkpoint are saved together (save_epoch): both are written in full before
either is renamed into place, so that the two agree on the last epoch whatever fails. Each file
is checked to belong to the run: the checkpoint's configuration against config.json's
(check_same_run), metrics.csv's rows against the checkpoint's epochs (resumed_metrics); a
metrics.csv that --resume cannot use is kept aside, never written over (keep_aside). runs.py
holds the folder's life cycle: its checks, its lock, the signals.
"""
import contextlib
import csv
import fcntl
import glob
import io
import itertools
import json
import math
import os
import secrets
import zipfile
import zlib

import numpy as np

import autodiff as ad
from cli.options import COMMON, VOLATILE, UserError, check_options, flags

# ---------------------------------------------------------------------------------------------
# Files written atomically: in full beside their place, then renamed into it
# ---------------------------------------------------------------------------------------------

def atomic_writes(files):
    """Each (path, write) of `files`: write(file) into a temporary file beside `path`; once all are
    written in full, each is renamed into place, in the order given. On any failure or signal
    while writing, every file stays as it was and the temporary ones are removed. An OSError
    names the file that could not be written (`path`, not its temporary file). Each temporary
    file has a name of its own (PATH.<pid>-<random>.tmp), so that processes writing the same
    file (two --evaluate) never write into each other's."""
    temporary = [(path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"), path, write)
                 for path, write in files]
    try:
        for tmp, path, write in temporary:
            try:
                with open(tmp, "wb") as f:
                    write(f)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        for tmp, path, _ in temporary:
            os.replace(tmp, path)
    finally:
        for tmp, _, _ in temporary:
            if tmp.exists():
                tmp.unlink()


def remove_temporary(path):
    """Remove the temporary files of `path` that a killed process left behind (atomic_writes'),
    where no other process can be writing one (under the run's lock, or the evaluations')."""
    for tmp in path.parent.glob(glob.escape(path.name) + ".*tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()


def atomic_write(path, write):
    """write(file) into a temporary file beside `path`, then rename it into place (atomic_writes)."""
    atomic_writes([(path, write)])


# ---------------------------------------------------------------------------------------------
# checkpoint.npz: plain arrays, read without unpickling, every value checked before it is used
# ---------------------------------------------------------------------------------------------

def checkpoint_writer(model, opt, epoch, config):
    """write(file) of a checkpoint: the state as it is now, copied to the host at once."""
    arrays = {"param/" + k: v for k, v in model.state_dict().items()}
    arrays.update({"adam/" + k: v for k, v in opt.state_dict().items()})
    arrays.update(epoch=np.asarray(epoch), rng=np.asarray(ad.rng.get_state()), config=np.asarray(json.dumps(config, allow_nan=False)))

    def write(f):
        """The archive made in memory, then written whole: a zipfile left failing on a full disk
        would complain again when collected (Python 3.9)."""
        archive = io.BytesIO()
        np.savez(archive, **arrays)
        f.write(archive.getbuffer())
    return write


def save_checkpoint(path, model, opt, epoch, config):
    atomic_write(path, checkpoint_writer(model, opt, epoch, config))


class Damaged(Exception):
    """What is wrong with a checkpoint, in a few words."""


SINGLE = {"iu": "integer", "f": "number", "U": "string"}  # the dtype kinds of a single value, in words


def _scalar(arrays, key, kinds):
    """arrays[key] as a Python scalar, if it is a single value of one of the dtype kinds."""
    if key not in arrays:
        raise Damaged(f"it has no {key!r}")
    value = arrays[key]
    if value.shape != () or value.dtype.kind not in kinds:
        raise Damaged(f"its {key!r} is an array of shape {value.shape} and type {value.dtype}, not a single "
                      f"{SINGLE[kinds]}")
    return value.item()


def _json(arrays, key, kind):
    try:
        value = json.loads(_scalar(arrays, key, "U"))
    except json.JSONDecodeError:
        raise Damaged(f"its {key!r} is not valid JSON") from None
    if not isinstance(value, kind):
        raise Damaged(f"its {key!r} is not a JSON {kind.__name__}")
    return value


def _one_line(e):
    return " ".join(str(e).split())


def _arrays(path):
    """Every member of the .npz file at `path`, each an array read without unpickling."""
    if not zipfile.is_zipfile(path):  # np.load would try to unpickle it: refuse it first
        raise Damaged("it is not an .npz file" + (" (it is empty)" if path.stat().st_size == 0 else ""))
    arrays = {}
    with np.load(path, allow_pickle=False) as z:
        for k in z.files:
            try:
                arrays[k] = z[k]
            except MemoryError:
                raise
            except Exception as e:  # a bad header, CRC or compression, an encrypted member, objects
                if isinstance(e, ValueError) and "pickle" in str(e):  # loading it would unpickle it
                    raise Damaged(f"its {k!r} holds Python objects (refused, not loaded)") from None
                raise Damaged(f"its {k!r} cannot be read ({type(e).__name__}: {_one_line(e)})") from None
            if not isinstance(arrays[k], np.ndarray):  # a member that is not an .npy file comes as bytes
                raise Damaged(f"its {k!r} is not an array")
    return arrays


def _check_adam(arrays, opt):
    """Adam's state as it must be to go on from: a step count of at least 0, a positive learning
    rate, and both moments finite, of the optimizer's size, the second one not negative."""
    if _scalar(arrays, "adam/t", "iu") < 0:
        raise Damaged(f"its Adam step count is {arrays['adam/t'].item()}")
    lr = _scalar(arrays, "adam/lr", "f")
    if not (math.isfinite(lr) and lr > 0):
        raise Damaged(f"its Adam learning rate is {lr}")
    for key in ("adam/m", "adam/v"):
        if key not in arrays:
            raise Damaged(f"its Adam state is incomplete (no {key!r})")
        value = arrays[key]
        if value.dtype.kind != "f" or value.shape != tuple(opt.m.shape):
            raise Damaged(f"its {key!r} is an array of shape {value.shape} and type {value.dtype}, not "
                          f"{opt.m.size} numbers, one per parameter")
        if not np.all(np.isfinite(value)):
            raise Damaged(f"its {key!r} is not finite")
        if key == "adam/v" and np.any(value < 0):  # a mean of squares
            raise Damaged(f"its {key!r} is negative")


def load_checkpoint(path, model=None, opt=None):
    """Returns (epoch, config); loads parameters and optimizer state (and the generator's) when
    given. Everything is checked before it is used: a damaged file is one UserError."""
    try:
        arrays = _arrays(path)
        epoch, config = _scalar(arrays, "epoch", "iu"), _json(arrays, "config", dict)
        if epoch < 0:
            raise Damaged(f"its epoch is {epoch}")
        params = {k[6:]: v for k, v in arrays.items() if k.startswith("param/")}
        bad = [k for k, v in params.items() if v.dtype.kind != "f" or not np.all(np.isfinite(v))]
        if not params or bad:
            raise Damaged(f"its parameter {bad[0]} is not finite" if bad else "it holds no parameters")
        if model is not None:
            model.load_state_dict(params)
        if opt is not None:
            _check_adam(arrays, opt)
            state = _json(arrays, "rng", dict)
            opt.load_state_dict({k[5:]: v for k, v in arrays.items() if k.startswith("adam/")})
            ad.rng.set_state(json.dumps(state))
        return epoch, config
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path}") from None
    except Damaged as e:
        raise UserError(f"{path} is not a usable adgm checkpoint: {e}") from None
    except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile, zlib.error) as e:
        reason = _one_line(e) if "pickle" not in str(e) else "it holds Python objects (refused, not loaded)"
        raise UserError(f"{path} is not a usable adgm checkpoint ({type(e).__name__}: {reason})") from None


# ---------------------------------------------------------------------------------------------
# metrics.csv: one row per epoch; an epoch saved whole with its checkpoint
# ---------------------------------------------------------------------------------------------

class Unreadable(Exception):
    """Why metrics.csv cannot be read, in a few words."""


def _metrics_rows(path, upto_epoch=None):
    """The rows of metrics.csv (numbers), up to an epoch if given; FileNotFoundError, or Unreadable."""
    try:
        with open(path, newline="") as f:
            rows = [{k: int(v) if k == "epoch" else float(v) for k, v in row.items() if v != ""}
                    for row in csv.DictReader(f)]
    except (ValueError, TypeError, csv.Error, UnicodeDecodeError) as e:
        raise Unreadable(str(e)) from None
    if any("epoch" not in row for row in rows):
        raise Unreadable("a row without an epoch")
    return [row for row in rows if upto_epoch is None or row["epoch"] <= upto_epoch]


def read_metrics(path, upto_epoch):
    """The rows of metrics.csv up to an epoch (numbers), [] if there is none."""
    try:
        return _metrics_rows(path, upto_epoch)
    except FileNotFoundError:
        return []
    except Unreadable as e:
        raise UserError(f"{path} is damaged ({e}); move it away to continue without the earlier rows") from None


def spans(numbers):
    """[1, 2, 3, 5, 7, 8] as '1-3, 5, 7-8'."""
    runs = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def resumed_metrics(path, epoch):
    """The rows of metrics.csv that a run resumed at `epoch` trains on from, and, when the file
    does not hold them, what is wrong with it (else None): it is missing or cannot be read while
    the checkpoint is past epoch 0, or its rows are not those of epochs 1 to `epoch` exactly, one
    row each, in order (the next epoch's row may follow: save_epoch writes it before the
    checkpoint). See keep_aside."""
    try:
        rows = _metrics_rows(path)
    except FileNotFoundError:
        return [], "is missing" if epoch else None
    except Unreadable as e:
        return [], f"cannot be read ({e})"
    kept, epochs = [row for row in rows if row["epoch"] <= epoch], [row["epoch"] for row in rows]
    if epoch and not kept:
        return [], f"holds no row of epochs 1-{epoch}"
    if epochs not in (list(range(1, epoch + 1)), list(range(1, epoch + 2))):
        return [], (f"holds the rows of epochs {spans(epochs)}, not those of epochs 1-{epoch} of its checkpoint"
                    if epoch else f"holds the rows of epochs {spans(epochs)}, while its checkpoint is at epoch 0")
    return kept, None


def keep_aside(path, epoch, problem):
    """Keep a metrics.csv that resumed_metrics found wrong aside, as metrics.csv.aside (or
    .aside.2, ...: never over an earlier one), so that nothing writes over it: its rows may be
    damaged, or whole but of epochs its checkpoint does not have. Returns the line that says so."""
    if not path.exists():
        return f"{path} {problem}; the rows of epochs 1-{epoch} are lost; {path.name} starts again at epoch {epoch + 1}"
    aside = path.with_name(path.name + ".aside")
    for n in itertools.count(2):
        if not aside.exists():
            break
        aside = path.with_name(f"{path.name}.aside.{n}")
    os.rename(path, aside)
    return f"{path} {problem}; it is kept as {aside}; {path.name} starts again at epoch {epoch + 1}"


def metrics_writer(rows):
    """write(file) of metrics.csv with `rows`."""
    fields = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fields)
    writer.writeheader()
    writer.writerows(rows)
    return lambda f: f.write(buf.getvalue().encode())


def write_metrics(path, rows):
    atomic_write(path, metrics_writer(rows))


def save_epoch(folder, rows, model, opt, epoch, config):
    """metrics.csv with `rows` and checkpoint.npz at `epoch`, such that the two agree on the last
    epoch whatever fails: both are written in full before either is renamed into place, and
    metrics.csv goes first (if the program dies between the two renames, --resume drops the row
    past the checkpoint)."""
    atomic_writes([(folder / "metrics.csv", metrics_writer(rows)),
                   (folder / "checkpoint.npz", checkpoint_writer(model, opt, epoch, config))])


def record_evaluation(path, epoch, config, row):
    """Add one --evaluate's numbers to evaluations.csv (rewritten whole, atomically), a line per
    number with the checkpoint's epoch and the evaluation's options, so that evaluations with
    other options (--iw-samples 5000, 1000) add lines under the same columns. Evaluations that
    end at once take turns (locked), so that none rewrites the file without another's lines."""
    new = "".join(f"{epoch},{config['eval_samples']},{config['iw_samples']},{config['eval_images']},{k},{v!r}\n"
                  for k, v in row.items())
    with locked(path.parent):
        remove_temporary(path)
        old = path.read_bytes() if path.exists() else b"epoch,eval_samples,iw_samples,eval_images,metric,value\n"
        atomic_write(path, lambda f: f.write(old + new.encode()))


@contextlib.contextmanager
def locked(folder):
    """The block with flock(2) held on `folder` itself (no file is added to it); where the file
    system has no flock, without it."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # which releases the lock


# ---------------------------------------------------------------------------------------------
# config.json, and a stored configuration completed with COMMON's values
# ---------------------------------------------------------------------------------------------

def write_config(path, config):
    atomic_write(path, lambda f: f.write(json.dumps(config, indent=2, allow_nan=False).encode()))


def read_config(path):
    """config.json as a dict, None if there is none; UserError if it is damaged."""
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"{path} is damaged (not valid JSON: {e})") from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is damaged (a JSON {type(config).__name__}, not an object of options)")
    return config


def complete_config(stored, config, path):
    """A stored configuration with every option `config` has: an option of COMMON that it lacks
    gets COMMON's value (what a run without that option used); any other missing option is damage."""
    stored = {**stored, **{k: v for k, v in COMMON.items() if k not in stored}}  # the stored order kept
    missing = [k for k in config if k not in stored]
    problem = f"lacks {flags(missing)}" if missing else check_options(stored)
    if problem:
        raise UserError(f"{path} is not a usable adgm checkpoint: its configuration {'has ' * (not missing)}{problem}")
    return stored


def check_same_run(folder, stored):
    """Refuse folder/checkpoint.npz where its configuration (`stored`, completed) is not that of
    the run in folder/config.json on an option that may not change (VOLATILE may): a checkpoint
    copied in from another run. A missing or damaged config.json says nothing (--resume writes
    it anew), and one that lacks an option added since is read with COMMON's value."""
    try:
        written = read_config(folder / "config.json")
    except UserError:
        return
    written = {**COMMON, **(written or stored)}
    clash = [k for k in stored if k in written and k not in VOLATILE and written[k] != stored[k]]
    if clash:
        show = lambda v: " ".join(map(str, v)) if isinstance(v, list) else v  # noqa: E731
        differ = "; ".join(f"{flags([k])} {show(stored[k])} in the checkpoint, {show(written[k])} in config.json"
                           for k in clash[:2]) + ("; ..." if len(clash) > 2 else "")
        raise UserError(f"{folder / 'checkpoint.npz'} is not the checkpoint of the run in {folder / 'config.json'} "
                        f"({differ}): put the run's own checkpoint back, or move config.json away to go on with "
                        "the checkpoint's run")
