"""Command-line front ends: `train` (train.py) and `sample` (sample.py). Both print errors as one line on
stderr and exit non-zero (2: bad arguments, 1: the run or checkpoint), never with a traceback."""
