"""The run folder of train.py: what it holds, how it is written, resumed and stopped.

    RUN/config.json      the options of the run
    RUN/metrics.csv      one row per epoch
    RUN/checkpoint.npz   parameters, Adam's state, the random generator's state, the epoch and the
                         configuration: plain arrays, read with allow_pickle=False
    RUN/figures/*.png    drawn by figures.py
    RUN/.lock            present while a process trains in the folder (RunLock)

The folder is checked before anything is loaded (prepare_run) and created only once the data and
the model are ready, so an input error leaves nothing behind; every file is replaced atomically,
and an epoch's row and checkpoint together (save_epoch), so that the two agree on the last epoch
whatever fails. One process at a time trains in a folder (RunLock). Ctrl-C, SIGTERM and SIGHUP
raise Interrupted wherever the program is, except inside `signals.held()`, which saves an epoch
whole. The progress line is here too.
"""
import contextlib
import csv
import errno
import fcntl
import io
import itertools
import json
import os
import pathlib
import signal
import sys
import tempfile
import time
import zipfile

import numpy as np

import autodiff as ad
from options import COMMON, VOLATILE, UserError, check_options, flags, run_config

# ---------------------------------------------------------------------------------------------
# Files: written atomically; checkpoints are plain arrays in an .npz, read without unpickling
# ---------------------------------------------------------------------------------------------

def atomic_writes(files):
    """Each (path, write) of `files`: write(file) into a temporary file beside `path`; once all are
    written in full, each is renamed into place, in the order given. On any failure or signal
    while writing, every file stays as it was and the temporary ones are removed. An OSError
    names the file that could not be written (`path`, not its temporary file)."""
    temporary = [(path.with_name(path.name + ".tmp"), path, write) for path, write in files]
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


def atomic_write(path, write):
    """write(file) into a temporary file beside `path`, then rename it into place (atomic_writes)."""
    atomic_writes([(path, write)])


def checkpoint_writer(model, opt, epoch, config):
    """write(file) of a checkpoint: the state as it is now, copied to the host at once."""
    arrays = {"param/" + k: v for k, v in model.state_dict().items()}
    arrays.update({"adam/" + k: v for k, v in opt.state_dict().items()})
    arrays.update(epoch=np.asarray(epoch), rng=np.asarray(ad.rng.get_state()), config=np.asarray(json.dumps(config, allow_nan=False)))
    return lambda f: np.savez(f, **arrays)


def save_checkpoint(path, model, opt, epoch, config):
    atomic_write(path, checkpoint_writer(model, opt, epoch, config))


def save_epoch(folder, rows, model, opt, epoch, config):
    """metrics.csv with `rows` and checkpoint.npz at `epoch`, such that the two agree on the last
    epoch whatever fails: both are written in full before either is renamed into place, and
    metrics.csv goes first (if the program dies between the two renames, --resume drops the row
    past the checkpoint)."""
    atomic_writes([(folder / "metrics.csv", metrics_writer(rows)),
                   (folder / "checkpoint.npz", checkpoint_writer(model, opt, epoch, config))])


class Damaged(Exception):
    """What is wrong with a checkpoint, in a few words."""


def _scalar(arrays, key, kinds):
    """arrays[key] as a Python scalar, if it is a single value of one of the dtype kinds."""
    if key not in arrays:
        raise Damaged(f"it has no {key!r}")
    value = arrays[key]
    if value.shape != () or value.dtype.kind not in kinds:
        raise Damaged(f"its {key!r} is an array of shape {value.shape} and type {value.dtype}, not a single "
                      f"{'integer' if kinds == 'iu' else 'string'}")
    return value.item()


def _json(arrays, key, kind):
    try:
        value = json.loads(_scalar(arrays, key, "U"))
    except json.JSONDecodeError:
        raise Damaged(f"its {key!r} is not valid JSON") from None
    if not isinstance(value, kind):
        raise Damaged(f"its {key!r} is not a JSON {kind.__name__}")
    return value


def load_checkpoint(path, model=None, opt=None):
    """Returns (epoch, config); loads parameters and optimizer state (and the generator's) when
    given. Everything is checked before it is used: a damaged file is one UserError."""
    try:
        if not zipfile.is_zipfile(path):  # np.load would try to unpickle it: refuse it first
            raise Damaged("it is not an .npz file" + (" (it is empty)" if path.stat().st_size == 0 else ""))
        with np.load(path, allow_pickle=False) as z:
            arrays = {}
            for k in z.files:
                try:
                    arrays[k] = z[k]
                except ValueError:  # an object array: loading it would unpickle it
                    raise Damaged(f"its {k!r} holds Python objects (refused, not loaded)") from None
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
            adam = {k[5:]: v for k, v in arrays.items() if k.startswith("adam/")}
            if _scalar(arrays, "adam/t", "iu") < 0 or not all(k in adam for k in ("m", "v", "lr")):
                raise Damaged("its Adam state is incomplete")
            state = _json(arrays, "rng", dict)
            opt.load_state_dict(adam)
            ad.rng.set_state(json.dumps(state))
        return epoch, config
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path}") from None
    except Damaged as e:
        raise UserError(f"{path} is not a usable adgm checkpoint: {e}") from None
    except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:
        reason = str(e) if "pickle" not in str(e) else "it holds Python objects (refused, not loaded)"
        raise UserError(f"{path} is not a usable adgm checkpoint ({type(e).__name__}: {reason})") from None


class Unreadable(Exception):
    """Why metrics.csv cannot be read, in a few words."""


def _metrics_rows(path, upto_epoch):
    """The rows of metrics.csv up to an epoch (numbers); FileNotFoundError, or Unreadable."""
    try:
        with open(path, newline="") as f:
            rows = [{k: int(v) if k == "epoch" else float(v) for k, v in row.items() if v != ""}
                    for row in csv.DictReader(f)]
    except (ValueError, TypeError, csv.Error, UnicodeDecodeError) as e:
        raise Unreadable(str(e)) from None
    if any("epoch" not in row for row in rows):
        raise Unreadable("a row without an epoch")
    return [row for row in rows if row["epoch"] <= upto_epoch]


def read_metrics(path, upto_epoch):
    """The rows of metrics.csv up to an epoch (numbers), [] if there is none."""
    try:
        return _metrics_rows(path, upto_epoch)
    except FileNotFoundError:
        return []
    except Unreadable as e:
        raise UserError(f"{path} is damaged ({e}); move it away to continue without the earlier rows") from None


def resumed_metrics(path, epoch):
    """The rows of metrics.csv that a run resumed at `epoch` trains on from, and, when the file
    does not hold them (it is missing, holds no row up to `epoch` or cannot be read, while the
    checkpoint is past epoch 0), what is wrong with it (else None). See keep_aside."""
    try:
        rows = _metrics_rows(path, epoch)
    except FileNotFoundError:
        return [], "is missing" if epoch else None
    except Unreadable as e:
        return [], f"cannot be read ({e})"
    return rows, f"holds no row of epochs 1-{epoch}" if epoch and not rows else None


def keep_aside(path, epoch, problem):
    """Keep a metrics.csv that resumed_metrics found wrong aside, as metrics.csv.damaged (or
    .damaged.2, ...: never over an earlier one), so that nothing writes over it. Returns the line
    that says so."""
    if not path.exists():
        return f"{path} {problem}; the rows of epochs 1-{epoch} are lost; {path.name} starts again at epoch {epoch + 1}"
    aside = path.with_name(path.name + ".damaged")
    for n in itertools.count(2):
        if not aside.exists():
            break
        aside = path.with_name(f"{path.name}.damaged.{n}")
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


# ---------------------------------------------------------------------------------------------
# The run folder: checked before anything is loaded, then created whole
# ---------------------------------------------------------------------------------------------

def writable(folder):
    """None if a file can be created in `folder`, else why not. The test writes a real file:
    permission bits say nothing for root, and a read-only mount shows only when written."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".adgm-write-test-", dir=folder)
        os.close(fd)
        os.remove(probe)
        return None
    except OSError as e:
        return e.strerror or str(e)


def check_out(out):
    """--out must be a folder we can write in, or a path we can create one at."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    above = out
    while not above.exists():  # the nearest existing folder above it must take the new folder
        above = above.parent
    if not above.is_dir():
        raise UserError(f"--out {out} cannot be created: {above} is a file, not a folder")
    problem = writable(above)
    if problem:
        raise UserError(f"--out {out}: cannot write in {above} ({problem})")


def prepare_run(args):
    """(run folder, configuration, first epoch to train), after every check that needs no data:
    the folder can be written, and it does not hold another run. Nothing is created yet."""
    out = pathlib.Path(args.out)
    config = run_config(args)
    if args.resume:
        if not (out / "checkpoint.npz").exists():
            raise UserError(f"--resume: no checkpoint in {out}" + (
                "; it holds no finished epoch: run the command again without --resume to start it"
                if (out / "config.json").exists() else ""))
        start, previous = load_checkpoint(out / "checkpoint.npz")
        previous = complete_config(previous, config, out / "checkpoint.npz")
        clash = [k for k in args.given - VOLATILE if k in previous and previous[k] != config[k]]
        if clash:
            raise UserError(f"--resume: {out} was started with other values of {flags(clash)}; only "
                            f"{flags(VOLATILE - {'out', 'resume', 'evaluate'})} may change")
        previous.update({k: config[k] for k in VOLATILE & args.given if k in config})
        if previous["epochs"] < start:
            raise UserError(f"--resume: {out} has trained {start} epochs already; --epochs "
                            f"{previous['epochs']} would train none (give more than {start} to continue)")
        check_out(out)
        return out, previous, start
    stored = read_config(out / "config.json") if out.is_dir() else None
    if stored is not None and {k: v for k, v in stored.items() if k not in VOLATILE} != \
            {k: v for k, v in config.items() if k not in VOLATILE}:
        raise UserError(f"{out} holds a run with a different configuration; choose another --out or --resume it")
    if (out / "checkpoint.npz").exists():
        raise UserError(f"{out} already holds this run; add --resume to continue it, or choose another --out")
    check_out(out)
    return out, config, 0


def resume_hint(out):
    return f"python3 train.py --resume --out {out}"


def make_folder(folder):
    """mkdir -p `folder`; the topmost folder this created (None if `folder` existed), for remove_folder."""
    missing = [f for f in (folder, *folder.parents) if not f.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return missing[-1] if missing else None


def remove_folder(folder, top):
    """Remove `folder` and the folders above it up to `top` (from make_folder: None removes
    nothing), each only if it is empty."""
    for f in (folder, *folder.parents) if top else ():
        try:
            f.rmdir()
        except OSError:
            return
        if f == top:
            return


# ---------------------------------------------------------------------------------------------
# One process per run folder: flock(2) on RUN/.lock
# ---------------------------------------------------------------------------------------------

LOCK = ".lock"


class RunLock:
    """An exclusive lock on a run folder, held while a process trains in it or resumes it, so
    that two processes never write the same checkpoint. It is flock(2) on RUN/.lock: the kernel
    drops it when the process ends, however it ends, so a process killed by SIGKILL or a power
    cut blocks no one (the file it leaves behind is locked anew by the next). A process that ends
    otherwise removes the file. --evaluate takes no lock: it only reads.

        with RunLock(folder) as lock:
            lock.take()  # again once the folder exists, if it did not

    Take it inside `signals.held()`, so that a signal cannot come between the lock and its record.
    """

    def __init__(self, folder):
        self.folder, self.fd = folder, None

    def take(self):
        """Lock the folder if it exists and is not locked yet; UserError if another process holds
        it. A folder in which no file can be created stays unlocked: check_out refuses it."""
        path = self.folder / LOCK
        while self.fd is None and self.folder.is_dir():
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
            except OSError:
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise UserError(f"another process is training in {self.folder}; wait for it to end, "
                                    "or stop it first") from None
                print(f"note: cannot lock {path} ({e.strerror}): make sure that no other process trains "
                      f"in {self.folder}", file=sys.stderr)  # a file system without flock
                return
            if _same_file(fd, path):
                self.fd = fd
            else:  # its holder removed it as we opened it: lock the file there now
                os.close(fd)

    def release(self):
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.remove(self.folder / LOCK)  # while still locked: see take()
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _same_file(fd, path):
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------------------------------------
# Signals: Ctrl-C, SIGTERM and SIGHUP stop a run at once, but not in the middle of a save
# ---------------------------------------------------------------------------------------------

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(Exception):
    """Ctrl-C, SIGTERM or SIGHUP, raised where the program is (see `signals`)."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Signals:
    """SIGINT, SIGTERM and SIGHUP all raise Interrupted, except inside `held()`: a block that
    must finish (an epoch's metrics and checkpoint) runs to its end, and the signal follows."""

    def __init__(self):
        self.holding, self.pending, self.stopping = False, None, False

    def install(self):
        self.holding, self.pending, self.stopping = False, None, False
        for signum in SIGNALS:
            signal.signal(signum, self.handle)

    def handle(self, signum, frame):
        if self.stopping:  # a second Ctrl-C while the first is handled: already on the way out
            return
        if self.holding:
            self.pending = self.pending or signum
            return
        self.stopping = True
        raise Interrupted(signum)

    @contextlib.contextmanager
    def held(self):
        self.holding = True
        try:
            yield
        finally:
            self.holding, pending, self.pending = False, self.pending, None
        if pending and not self.stopping:
            self.stopping = True
            raise Interrupted(pending)


signals = Signals()


# ---------------------------------------------------------------------------------------------
# What a run prints: a progress line per epoch and a summary
# ---------------------------------------------------------------------------------------------

def shown(key, value):
    """One metric as printed: test errors as 'test_error 3.21%', the rest to 4 digits."""
    return f"{key[:-4]} {value:.2f}%" if key.endswith("_pct") else f"{key} {value:.4g}"


def duration(seconds):
    """'42s', '17m', '3h05m', '2d04h'."""
    m, h = seconds / 60, seconds / 3600
    return (f"{seconds:.0f}s" if seconds < 90 else f"{m:.0f}m" if m < 90 else
            f"{int(h)}h{int(m % 60):02d}m" if h < 48 else f"{int(h // 24)}d{int(h % 24):02d}h")


def summary(rows):
    last = rows[-1] if rows else {}
    if "test_error_pct" in last:
        return f"test error {last['test_error_pct']:.2f}% (Bayes classifier {last['test_error_bayes_pct']:.2f}%)"
    return "  ".join(f"{k} {v:.4g}" for k, v in last.items() if k.startswith(("test_", "log_z")))


class Progress:
    """One line per epoch on stderr: rewritten in place on a terminal, printed once otherwise.
    The ETA is the epoch's and the whole run's, from the mean time of the epochs this process
    has trained."""

    def __init__(self, total_epochs, start=0, every=60.0):
        self.tty, self.total, self.every, self.last = sys.stderr.isatty(), total_epochs, every, time.time()
        self.start, self.began = start, time.time()

    def update(self, epoch, step, steps, started, loss):
        now = time.time()
        if self.tty or now - self.last > self.every:  # a plain line a minute into a log file
            self.last, elapsed = now, now - started
            eta = elapsed / max(step, 1) * (steps - step)
            finished = epoch - 1 - self.start  # epochs this process has trained; else this one's pace
            per_epoch = (now - self.began - elapsed) / finished if finished else elapsed + eta
            run = duration(eta + per_epoch * (self.total - epoch))
            end = "" if self.tty else "\n"
            sys.stderr.write(f"\repoch {epoch}/{self.total}  batch {step}/{steps}  {elapsed:5.0f}s  "
                             f"eta {eta:4.0f}s (run {run})  loss {loss:9.3f}  {end}"[0 if self.tty else 1:])
            sys.stderr.flush()

    def done(self, epoch, row):
        keys = ("seconds", "loss", "test_error_pct", "test_error_bayes_pct", "test_bound", "log_z_iw")
        text = "  ".join(shown(k, row[k]) for k in keys if k in row)
        per_epoch = (time.time() - self.began) / (epoch - self.start)
        left = f"  run eta {duration(per_epoch * (self.total - epoch))}" if epoch < self.total else ""
        clear = "\r\033[K" if self.tty else ""
        sys.stderr.write(f"{clear}epoch {epoch}/{self.total}  {text}{left}\n")
        sys.stderr.flush()
