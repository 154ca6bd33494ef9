"""python3 -m figures: Fig. 5, learning curves and the numbers quoted from them (see draw.py)."""
import sys

from figures.draw import main

sys.exit(main(sys.argv[1:]))
