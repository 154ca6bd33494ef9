"""What a run prints: a progress line per epoch (with the epoch's and the run's ETA), progress
with an ETA for a long evaluation, and the summary at the end. All of it goes to stderr but the
summary; none of it is needed for the run to go on.

While train.py runs, sys.stdout and sys.stderr are Terminals: a write that the terminal cannot
take (it was closed, went away, or its file filled the disk) never stops the run. From then on
what would have been shown goes to RUN/output.txt once the run folder is known (keep_in),
finished lines only: a progress line rewritten in place on a terminal is not kept.
"""
import contextlib
import os
import sys
import time
import warnings

import numpy as np

# ---------------------------------------------------------------------------------------------
# The terminal, and RUN/output.txt for what it cannot take
# ---------------------------------------------------------------------------------------------

_kept = {"path": None, "lines": []}  # RUN/output.txt, and the lines not yet written there
GONE = (OSError, ValueError, UnicodeError, AttributeError)  # a closed, hung-up or full stream (None: AttributeError)


def keep_in(path):
    """Keep what the terminal cannot take in `path` from now on (None: in memory only), with
    what it could not take before."""
    _kept["path"] = path
    _write_kept()


def _keep(pending):
    """Keep the finished lines of `pending` (as a terminal would show them: what follows the last
    carriage return); return the unfinished rest."""
    *lines, rest = pending.split("\n")
    shown = [line.rsplit("\r", 1)[-1].replace("\033[K", "") for line in lines]
    _kept["lines"] = (_kept["lines"] + [line for line in shown if line.strip()])[-200:]
    _write_kept()
    return rest.rsplit("\r", 1)[-1]


def _write_kept():
    if _kept["path"] is None or not _kept["lines"]:
        return
    try:
        with open(_kept["path"], "a", encoding="utf-8", errors="backslashreplace") as f:
            f.write("".join(line + "\n" for line in _kept["lines"]))
        _kept["lines"] = []
    except OSError:  # a folder that cannot be written: they stay in memory, the last 200
        pass


class Terminal:
    """sys.stdout or sys.stderr as train.py sees them: a write that fails marks the stream gone
    (its descriptor then points at /dev/null, so that Python's last flush does not fail either),
    and it and every later write are kept (see keep_in) instead."""

    def __init__(self, stream):
        self.stream, self.gone, self.pending = stream, stream is None, ""
        try:
            self.tty = stream.isatty()  # what it was, gone or not: a line rewritten in place stays one
        except GONE:
            self.tty = False

    def write(self, text):
        if not self.gone:
            try:
                self.stream.write(text)
                self.stream.flush()
                return len(text)
            except GONE:
                self._lost()
        self.pending = _keep(self.pending + text)
        return len(text)

    def flush(self):
        if not self.gone:
            try:
                self.stream.flush()
            except GONE:
                self._lost()

    def isatty(self):
        return self.tty

    def _lost(self):
        self.gone = True
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self.stream.fileno())
            os.close(null)
        except (OSError, ValueError, AttributeError):  # not a file descriptor (a StringIO): nothing to flush
            pass

    def __getattr__(self, name):  # encoding, fileno, ... of the stream
        return getattr(self.stream, name)


@contextlib.contextmanager
def terminal():
    """sys.stdout and sys.stderr as Terminals, with what their encoding cannot show escaped (a
    non-ASCII run folder under PYTHONIOENCODING=ascii), and no RuntimeWarning of NumPy, whatever
    PYTHONWARNINGS says: a non-finite value is found explicitly (NonFinite, a damaged checkpoint).
    All as it was afterwards."""
    for fd in (0, 1, 2):  # closed at the start (2>&-): /dev/null takes it, not the next file opened
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)
    streams = sys.stdout, sys.stderr
    errors = [(s, s.errors) for s in streams if hasattr(s, "reconfigure") and getattr(s, "errors", None)]
    for stream, _ in errors:
        with contextlib.suppress(ValueError, OSError):
            stream.reconfigure(errors="backslashreplace")
    sys.stdout, sys.stderr = Terminal(sys.stdout), Terminal(sys.stderr)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            yield
    finally:
        sys.stdout, sys.stderr = streams
        _kept.update(path=None, lines=[])  # what this program could not print is its own
        for stream, before in errors:
            with contextlib.suppress(ValueError, OSError):
                stream.reconfigure(errors=before)


# ---------------------------------------------------------------------------------------------
# What a run prints
# ---------------------------------------------------------------------------------------------

def say(text, end="\n", stream=None):
    """Write `text` to stderr (or `stream`); False where it cannot be written (a closed terminal, a
    closed or full stream), which never stops a run: what a run prints is a convenience."""
    stream = stream or sys.stderr
    try:
        stream.write(text + end)
        stream.flush()
        return True
    except GONE:
        return False


def shown(key, value):
    """One metric as printed: test errors as 'test_error 3.21%', the rest to 4 digits."""
    return f"{key[:-4]} {value:.2f}%" if key.endswith("_pct") else f"{key} {value:.4g}"


def duration(seconds):
    """'42s', '17m', '3h05m', '2d04h'."""
    m, h = seconds / 60, seconds / 3600
    return (f"{seconds:.0f}s" if seconds < 90 else f"{m:.0f}m" if m < 90 else
            f"{int(h)}h{int(m % 60):02d}m" if h < 48 else f"{int(h // 24)}d{int(h % 24):02d}h")


def counted(n, size, what, every=60.0):
    """range(0, n, size) for a long evaluation in chunks, with a line on stderr saying how far it
    has come and when it will end: rewritten in place on a terminal, else one every `every` s."""
    tty, began = _isatty(), time.monotonic()
    last = began
    for i in range(0, n, size):
        now = time.monotonic()
        if i and (tty or now - last >= every):
            last, spent = now, now - began
            line = f"{what}: {i}/{n} images  {duration(spent)}  eta {duration(spent / i * (n - i))}"
            say(f"\r{line}" if tty else line, end="" if tty else "\n")
        yield i
    if tty and n > size:
        say("\r\033[K", end="")


def summary(rows):
    last = rows[-1] if rows else {}
    if "test_error_pct" in last:
        return f"test error {last['test_error_pct']:.2f}% (Bayes classifier {last['test_error_bayes_pct']:.2f}%)"
    return "  ".join(f"{k} {v:.4g}" for k, v in last.items() if k.startswith(("test_", "log_z")))


class Progress:
    """One line per epoch on stderr: rewritten in place on a terminal; in a log file the first
    batch's line, then one a minute. The ETA is the epoch's and the whole run's, from the mean
    time of the epochs this process has trained (none on the process's first batch). A stderr
    that cannot be written is left alone."""

    def __init__(self, total_epochs, start=0, every=60.0):
        self.tty, self.total, self.every, self.last = _isatty(), total_epochs, every, time.monotonic()
        self.start, self.began, self.shown = start, time.monotonic(), False

    def update(self, epoch, step, steps, started, loss):
        now = time.monotonic()
        if self.tty or not self.shown or now - self.last > self.every:
            self.last, elapsed, self.shown = now, now - started, True
            eta = elapsed / max(step, 1) * (steps - step)
            finished = epoch - 1 - self.start  # epochs this process has trained; else this one's pace
            per_epoch = (now - self.began - elapsed) / finished if finished else elapsed + eta
            run = duration(eta + per_epoch * (self.total - epoch))
            # A process's first batch carries its warm-up (a resumed SDGM's took 4 times a later
            # one's): a pace from it alone would be no estimate, so that line gives none.
            etas = f"eta {eta:4.0f}s (run {run})" if step > 1 or finished else "eta from the next line"
            say(f"\repoch {epoch}/{self.total}  batch {step}/{steps}  {elapsed:5.0f}s  "
                f"{etas}  loss {loss:9.3f}  "[0 if self.tty else 1:], end="" if self.tty else "\n")

    def done(self, epoch, row):
        keys = ("seconds", "loss", "test_error_pct", "test_error_bayes_pct", "test_bound", "log_z_iw")
        text = "  ".join(shown(k, row[k]) for k in keys if k in row)
        per_epoch = (time.monotonic() - self.began) / (epoch - self.start)
        left = f"  run eta {duration(per_epoch * (self.total - epoch))}" if epoch < self.total else ""
        say(f"{clear_line()}epoch {epoch}/{self.total}  {text}{left}")


def _isatty():
    try:
        return sys.stderr.isatty()
    except (OSError, ValueError, AttributeError):
        return False


def clear_line():
    """What erases a progress line rewritten in place: on a terminal only."""
    return "\r\033[K" if _isatty() else ""
