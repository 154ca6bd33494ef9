"""Tools for the developers: bench.py measures the step's speed and memory (python3 -m tools.bench)."""
