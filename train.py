#!/usr/bin/env python
"""Train a jdiff diffusion model: `python train.py` (8x8 digits on a CPU in a few minutes) or
`python train.py --preset cifar10`. See `python train.py --help`."""

import sys

from jdiff.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
