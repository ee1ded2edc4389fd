#!/usr/bin/env python
"""Train a jdiff diffusion model: `python train.py` (8x8 digits on a CPU in a few minutes) or
`python train.py --preset cifar10`. See `python train.py --help`."""

from jdiff.cli.common import run_script
from jdiff.cli.train import main

if __name__ == "__main__":
    run_script(main)
