"""python3 -m figures: Fig. 5, learning curves and the numbers quoted from them (see draw.py)."""
import sys

from cli.interrupts import exit_quietly

exit_quietly("; each figure is written whole or not at all")  # Ctrl-C: one line, from the imports on
from figures.draw import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
