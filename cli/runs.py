"""The run folder of train.py: checked, created, locked while a process trains in it, and stopped.

    RUN/config.json      the options of the run
    RUN/metrics.csv      one row per epoch
    RUN/checkpoint.npz   parameters, Adam's and the generator's state, the epoch, the configuration
    RUN/figures/*.png    drawn by figures/draw.py
    RUN/output.txt       what the run could not print: only where its terminal was closed or gone
    RUN/.lock            present while a process trains in the folder (RunLock)

checkpoints.py writes the first three, each atomically, and reads them back checked, each
against the others (a file copied in from another run is refused). The folder is checked before
anything is loaded (prepare_run) and created only once the data and the model are ready, so an
input error leaves nothing behind; a new run that saved nothing removes it again (make_folder,
remove_folder). One process at a time trains in a folder (RunLock). An epoch is saved only once
its state is finite (check_finite). Ctrl-C, SIGTERM and SIGHUP raise Interrupted wherever the
program is (cli/signals.py), except inside `signals.held()`, which saves an epoch whole.
"""
import contextlib
import errno
import fcntl
import os
import pathlib
import shlex
import tempfile

import autodiff as ad
from cli.checkpoints import (check_same_run, complete_config, keep_aside, load_checkpoint, read_config, read_metrics,
                             remove_temporary, resumed_metrics, save_checkpoint, save_epoch, write_config,
                             write_metrics)
from cli import memory
from cli.memory import does_not_fit
from cli.options import VOLATILE, UserError, flags, run_config
from cli.progress import clear_line, keep_in, say
from cli.signals import Interrupted, signals

OUTPUT = "output.txt"  # in RUN: what its terminal could not take (progress.keep_in)

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
            why = ("; the epochs of its metrics.csv cannot be continued without it: run the command again without "
                   "--resume to start over (metrics.csv is kept aside)" if (out / "metrics.csv").exists() else
                   "; it holds no finished epoch: run the command again without --resume to start it"
                   if (out / "config.json").exists() else "")
            raise UserError(f"--resume: no checkpoint in {out}{why}")
        start, previous = load_checkpoint(out / "checkpoint.npz")
        previous = complete_config(previous, config, out / "checkpoint.npz")
        check_same_run(out, previous)
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
    foreign = not_a_runs(out)
    if foreign:
        raise UserError(f"--out {out} holds files that are not a run's ({foreign}): a new run needs a new or "
                        "empty folder (or its own, to start it over)")
    stored = read_config(out / "config.json") if out.is_dir() else None
    if stored is not None and {k: v for k, v in stored.items() if k not in VOLATILE} != \
            {k: v for k, v in config.items() if k not in VOLATILE}:
        raise UserError(f"{out} holds a run with a different configuration; choose another --out or --resume it")
    if (out / "checkpoint.npz").exists():
        raise UserError(f"{out} already holds this run; add --resume to continue it, or choose another --out")
    check_out(out)
    return out, config, 0


RUN_FILES = ("config.json", "metrics.csv", "checkpoint.npz", "evaluations.csv", OUTPUT, "figures")


def not_a_runs(out):
    """The first names in folder `out` that a run does not write there, '' if none: `--out ~`
    or `--out runs` (for runs/new) would scatter a run among the user's own files. A run's own are
    RUN_FILES, what comes of them (metrics.csv.aside, a .tmp left by a killed process) and hidden
    files (its .lock; a desktop's .DS_Store)."""
    try:
        entries = list(out.iterdir()) if out.is_dir() else []
    except OSError:  # a folder that cannot be listed: check_out says what is wrong with it
        return ""
    names = sorted(p.name for p in entries if not p.name.startswith(".") and p.name not in RUN_FILES
                   and not p.name.startswith(tuple(f + "." for f in RUN_FILES)))
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def shell(path):
    """`path` as a shell reads it back: a command printed with it can be pasted as it is."""
    return shlex.quote(str(path))


def resume_hint(out):
    """The command that continues the run in `out`."""
    return f"python3 train.py --resume --out {shell(out)}"


def what_is_kept(out, done, last):
    """What a run folder keeps after a failure once `done` of its `last` epochs are saved, and the
    command that goes on from there."""
    if not (out / "checkpoint.npz").is_file():  # begin() writes one before any epoch
        return f"{out} holds no checkpoint: it was moved or removed while the run trained"
    if done < last:
        kept = f"epochs 1-{done}" if done > 1 else "epoch 1" if done else "the initial state"
        return f"{out} keeps {kept}: continue with {resume_hint(out)}"
    return f"{out} keeps all {last} epochs: --evaluate {shell(out)} redoes the final evaluation and the figures"


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
        it, or if it cannot be locked (RUN/.lock is a folder, the file system has no flock): a run
        that nothing keeps from a second process is refused. A folder in which no file can be
        created stays unlocked: check_out refuses it in its own words."""
        path = self.folder / LOCK
        while self.fd is None and self.folder.is_dir():
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
            except OSError as e:
                if writable(self.folder):
                    return
                raise UserError(f"cannot lock {self.folder}: {path} cannot be opened ({e.strerror}); remove it "
                                "if no other process trains there") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise UserError(f"another process is training in {self.folder}; wait for it to end, "
                                    "or stop it first") from None
                raise UserError(f"cannot lock {path} ({e.strerror}), so nothing would keep a second process from "
                                "training there: choose an --out on a file system with locks (flock)") from None
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


@contextlib.contextmanager
def figure_notes(folder):
    """Figures drawn into `folder`: one that cannot be drawn (a model or data too small for it,
    running out of memory) is a note, never the failure of a run whose epoch is saved. A folder
    that cannot be written stays an OSError, which names the folder, and a signal a signal."""
    try:
        yield
    except OSError as e:
        if e.errno:  # the file it names may be a temporary one: name the folder
            raise OSError(e.errno, e.strerror, str(folder)) from None
        raise
    except Interrupted:
        raise
    except Exception as e:
        say(f"{clear_line()}note: figures in {folder} not all drawn ({type(e).__name__}: {' '.join(str(e).split())})")


# ---------------------------------------------------------------------------------------------
# A run while this process trains it: every failure in one line, the folder always resumable
# ---------------------------------------------------------------------------------------------

class NonFinite(Exception):
    """The loss or the state became non-finite: the run stops, and its checkpoint keeps the last
    saved epoch."""


def check_finite(model, opt, epoch):
    """NonFinite unless the parameters, the model's other tensors (BatchNorm's averages, frozen
    weights) and Adam's moments are all finite, checked on the device with one host sync: an
    epoch is saved, and called good, only once this holds."""
    xp = ad.xp
    arrays = [opt.flat, opt.m, opt.v] + [t.data for _, t in model.named_tensors() if not t.requires_grad]
    if not bool(xp.stack([xp.isfinite(a).all() for a in arrays]).all()):
        raise NonFinite(f"the parameters or Adam's state became non-finite in epoch {epoch}")


class Run:
    """The run folder of `args` while this process trains in it, from its lock to its last epoch:

        with Run(args) as run:            # locked and checked: nothing is created yet
            ...                           # build the data, the model and the optimizer
            run.begin(model, opt)         # the checkpoint loaded (--resume), or the folder made
            for epoch in run.epochs():    #   with epoch 0, so that --resume works from then on
                ...
                run.save(row, model, opt) # metrics.csv and checkpoint.npz together, or neither

    A run that has trained all its epochs but not its final evaluation (--iw-samples; it was
    stopped during it) is not `finished`: --resume trains no epoch and does that evaluation.
    Once begun, any failure ends in one UserError line that says what the folder keeps, which is
    always a state that --resume continues; a new run that saved nothing leaves no folder behind.
    Ctrl-C, SIGTERM or SIGHUP print the same and leave run.exit_code at 128 + the signal."""

    def __init__(self, args):
        self.args, self.lock, self.exit_code = args, RunLock(pathlib.Path(args.out)), 0
        self.done = self.created = self.epoch = None  # done: the last epoch saved

    def __enter__(self):
        try:
            with signals.held():  # a folder that exists is locked before anything in it is read
                self.lock.take()
            if self.args.resume and self.lock.fd is not None:  # its own folder, locked: see progress.keep_in
                keep_in(self.lock.folder / OUTPUT)
            self.out, self.config, self.start = prepare_run(self.args)
        except BaseException:
            self.lock.release()
            raise
        self.last, self.begun, self.epoch = self.config["epochs"], False, self.start + 1
        self.rows, self.lost = [], None
        if self.args.resume:
            self.rows, self.lost = resumed_metrics(self.out / "metrics.csv", self.start)
        return self

    @property
    def final_asked(self):
        """--iw-samples asks for a final test log-likelihood (the potential has none)."""
        return bool(self.config["iw_samples"]) and self.config["dataset"] != "potential"

    @property
    def final_missing(self):
        """All epochs are saved, but the last row lacks the final evaluation that was asked for."""
        return (self.final_asked and self.start == self.last and bool(self.rows) and self.rows[-1]["epoch"] == self.last
                and f"test_ll_iw{self.config['iw_samples']}" not in self.rows[-1])

    @property
    def finished(self):
        return self.start == self.last and not self.final_missing

    def saved_rows(self):
        return read_metrics(self.out / "metrics.csv", self.start)

    def begin(self, model, opt):
        """The model and optimizer from the checkpoint (--resume), or a new folder whose
        checkpoint holds the initial state (epoch 0); the folder appears whole or not at all."""
        out, self.begun = self.out, True
        with signals.held():
            if self.args.resume:
                load_checkpoint(out / "checkpoint.npz", model, opt)
                say(f"resuming {out} at epoch {self.start + 1} of {self.last}" if self.start < self.last else
                    f"resuming {out}: all {self.last} epochs are trained, but not the final evaluation "
                    f"(--iw-samples {self.config['iw_samples']}); doing it now")
                self.done = self.start
                if self.lost:
                    say(f"note: {keep_aside(out / 'metrics.csv', self.start, self.lost)}")
            else:
                self.created = make_folder(out)
                self.lock.take()
                keep_in(out / OUTPUT)
                if (out / "checkpoint.npz").exists():  # started by another process meanwhile
                    raise UserError(f"{out} already holds this run; add --resume to continue it, or choose "
                                    "another --out")
                if (out / "metrics.csv").exists():  # the rows of a run whose checkpoint is gone
                    say(f"note: {keep_aside(out / 'metrics.csv', 0, 'holds the rows of a run without its checkpoint')}")
                save_checkpoint(out / "checkpoint.npz", model, opt, 0, self.config)
                self.done = 0
            for name in ("checkpoint.npz", "metrics.csv", "config.json"):  # what a killed process left
                remove_temporary(out / name)
            write_config(out / "config.json", self.config)

    def epochs(self):
        for self.epoch in range(self.start + 1, self.last + 1):
            yield self.epoch

    def save(self, row, model, opt):
        """The epoch saved whole, once its state is found finite: its metrics.csv row and its
        checkpoint agree on it."""
        check_finite(model, opt, self.epoch)
        with signals.held():
            save_epoch(self.out, self.rows + [row], model, opt, self.epoch, self.config)
            self.rows.append(row)
            self.done = self.epoch

    def rewrite_metrics(self):
        write_metrics(self.out / "metrics.csv", self.rows)

    def __exit__(self, kind, e, tb):
        try:
            return self.begun and e is not None and self._failed(e)
        finally:
            self.lock.release()

    def _failed(self, e):
        """What a failure after begin() says; True where it is handled here (an interrupt)."""
        out, done, last = self.out, self.done, self.last
        if isinstance(e, NonFinite):
            raise UserError(f"{e}; {out}/checkpoint.npz keeps the last good state (epoch {done})") from None
        if isinstance(e, Interrupted):
            if done is None:  # before the new run's folder was made: main says so
                return False
            message = (f"during epoch {done + 1}; {what_is_kept(out, done, last)}" if done < last else
                       f"after all {last} epochs were saved in {out}; the final evaluation was not done: "
                       f"{resume_hint(out)} does it" if self.final_asked else
                       f"after all {last} epochs were saved in {out} (--evaluate {shell(out)} redoes the figures)")
            say(f"{clear_line()}interrupted ({e}) {message}")
            self.exit_code = 128 + e.signum
            return True
        if isinstance(e, OSError):  # a file of the run could not be written: a full disk, most often
            failure = f"cannot write {e.filename or out} ({e.strerror or e})"
            then = " once there is space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
            nothing = f"nothing was saved: run the command again{then}"
        elif isinstance(e, Exception) and memory.out_of_memory(e):
            when = ("before training started" if done is None else f"in epoch {self.epoch}" if done < last else
                    "after the last epoch was saved")
            failure = f"out of memory {when}: {does_not_fit(self.config)}"
            then, nothing = " once more memory is free", "nothing was written"
        else:
            return False
        if done is None:  # a new run that saved nothing leaves no folder behind
            self.lock.release()
            remove_folder(out, self.created)
            raise UserError(f"{failure}; {nothing}") from None
        raise UserError(f"{failure}; {what_is_kept(out, done, last)}{then}") from None
