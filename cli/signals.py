"""Signals and the process of train.py: Ctrl-C, SIGTERM and SIGHUP stop a run at once, wherever
it is, but not in the middle of a save (`signals.held()`); a SIGHUP ignored from the start (nohup)
stays ignored. `process()` is main()'s program around a run: these signals, and a terminal that
never stops a run (progress.terminal), with no NumPy warnings.
"""
import contextlib
import signal

from cli.progress import terminal

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(Exception):
    """Ctrl-C, SIGTERM or SIGHUP, raised where the program is (see `signals`)."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Signals:
    """SIGINT, SIGTERM and SIGHUP all raise Interrupted, except inside `held()`: a block that
    must finish (an epoch's metrics and checkpoint) runs to its end, and the signal follows.
    A SIGHUP that the program was started ignoring (nohup) stays ignored."""

    def __init__(self):
        self.holding, self.pending, self.stopping = False, None, False

    def install(self):
        self.holding, self.pending, self.stopping = False, None, False
        for signum in SIGNALS:
            if signum != signal.SIGHUP or signal.getsignal(signum) != signal.SIG_IGN:
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


@contextlib.contextmanager
def process():
    """main() of train.py as a program: `signals` installed, and what it prints as
    progress.terminal() makes it (never a reason to stop, no NumPy warnings); all as it was
    afterwards."""
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    signals.install()
    try:
        with terminal():
            yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
