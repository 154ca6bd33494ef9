"""What a run prints: a progress line per epoch (with the epoch's and the run's ETA), progress
with an ETA for a long evaluation, and the summary at the end. All of it goes to stderr but the
summary; none of it is needed for the run to go on."""
import sys
import time


def say(text, end="\n", stream=None):
    """Write `text` to stderr (or `stream`); False where it cannot be written (a closed terminal, a
    closed or full stream), which never stops a run: what a run prints is a convenience."""
    stream = stream or sys.stderr
    try:
        stream.write(text + end)
        stream.flush()
        return True
    except (OSError, ValueError, UnicodeError, AttributeError):
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
    tty, began = _isatty(), time.time()
    last = began
    for i in range(0, n, size):
        now = time.time()
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
    time of the epochs this process has trained. A stderr that cannot be written is left alone."""

    def __init__(self, total_epochs, start=0, every=60.0):
        self.tty, self.total, self.every, self.last = _isatty(), total_epochs, every, time.time()
        self.start, self.began, self.shown = start, time.time(), False

    def update(self, epoch, step, steps, started, loss):
        now = time.time()
        if self.tty or not self.shown or now - self.last > self.every:
            self.last, elapsed, self.shown = now, now - started, True
            eta = elapsed / max(step, 1) * (steps - step)
            finished = epoch - 1 - self.start  # epochs this process has trained; else this one's pace
            per_epoch = (now - self.began - elapsed) / finished if finished else elapsed + eta
            run = duration(eta + per_epoch * (self.total - epoch))
            say(f"\repoch {epoch}/{self.total}  batch {step}/{steps}  {elapsed:5.0f}s  "
                f"eta {eta:4.0f}s (run {run})  loss {loss:9.3f}  "[0 if self.tty else 1:], end="" if self.tty else "\n")

    def done(self, epoch, row):
        keys = ("seconds", "loss", "test_error_pct", "test_error_bayes_pct", "test_bound", "log_z_iw")
        text = "  ".join(shown(k, row[k]) for k in keys if k in row)
        per_epoch = (time.time() - self.began) / (epoch - self.start)
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
