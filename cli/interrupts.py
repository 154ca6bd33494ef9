"""Ctrl-C, SIGTERM and SIGHUP before a program's own handling of them (or in a program that has
none): one line, no traceback. Standard library only, so that train.py, `python3 -m figures` and
tools/bench.py put it in place before their slow imports."""
import contextlib
import signal
import sys


def exit_quietly(what=""):
    """From now on these signals end the program with 'interrupted (SIGINT) `what`' and exit code
    128 + the signal's number; a SIGHUP ignored from the start (nohup) stays ignored."""
    def stop(signum, frame):
        with contextlib.suppress(OSError, ValueError, AttributeError):  # a terminal closed or gone
            print(f"interrupted ({signal.Signals(signum).name}){what}", file=sys.stderr)
        sys.exit(128 + signum)
    names = ("SIGINT", "SIGTERM", "SIGHUP")  # SIGHUP is POSIX's: `python3 -m figures` runs on Windows too
    for signum in (getattr(signal, name) for name in names if hasattr(signal, name)):
        if signal.getsignal(signum) != signal.SIG_IGN:
            signal.signal(signum, stop)
