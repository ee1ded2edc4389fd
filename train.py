#!/usr/bin/env python
"""Train a jdiff diffusion model: `python train.py` (8x8 digits on a CPU in a few minutes) or
`python train.py --preset cifar10`. See `python train.py --help`."""

import os
import signal

_EARLY: list = []  # SIGINT / SIGTERM that arrive while Python imports jdiff and JAX; main() honours them
for _sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(_sig, lambda signum, frame: _EARLY.append(signum))
if os.environ.get("JDIFF_TEST_SIGNAL_AT") == "import":  # jdiff.signals.signal_point("import"), before jdiff loads
    os.kill(os.getpid(), signal.SIGINT)

from jdiff.cli.common import run_script  # noqa: E402
from jdiff.cli.train import main  # noqa: E402

if __name__ == "__main__":
    run_script(lambda: main(early_signals=_EARLY))
