"""The figures: a run's analogues of the paper's Fig. 2-4 (draw.py, called by train.py), Fig. 5 and
the learning curves from run folders (python3 -m figures), the plots they are made of (plots.py)
and the PNG writer (png.py). NumPy only."""
