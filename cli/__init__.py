"""The command line and the run folder of train.py: its options (options.py), the models it can
train and how each kind is built, stepped and measured (kinds.py), the run folder's life cycle
(runs.py: lock, signals, progress), its files (checkpoints.py) and the memory check (memory.py)."""
