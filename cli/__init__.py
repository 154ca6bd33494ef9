"""The command line and the run folder of train.py: its options and their checks (options.py), the
one table of models and how each kind is built, stepped, measured and drawn (kinds.py), the run
folder's life cycle (runs.py: checks, lock, the one-line failures), its files (checkpoints.py),
signals and the process (signals.py), a signal before those are in place (interrupts.py), what a
run prints (progress.py) and the memory check (memory.py)."""
