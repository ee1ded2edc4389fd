#!/usr/bin/env python
"""Draw samples from a trained jdiff run: `python sample.py --workdir runs/digits`. See
`python sample.py --help` and `jdiff/cli/sample.py`."""

from jdiff.cli.common import run_script
from jdiff.cli.sample import main

if __name__ == "__main__":
    run_script(main)
