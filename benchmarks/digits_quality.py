"""Sample quality on 8x8 digits, judged by a small classifier trained on held-out digits.

A thin wrapper over `jdiff.quality` (protocol, table columns and reference rows are described there).

    python benchmarks/digits_quality.py --workdir runs/digits [--num 500] [--sampler ddim --steps 50]
    python benchmarks/digits_quality.py --npz samples.npz          # images (or samples) (N, 8, 8, 1) in [-1, 1]
    ... [--json out.json | --json -] [--save-samples out.npz] [--labels balanced|null] [--guidance 2.0]
    python benchmarks/digits_quality.py --sweep --workdir runs/digits [--samplers unipc,ddim] [--nfes 5,10]
        [--spacing trailing,karras]    # one table: Frechet for every sampler x spacing x NFE
"""

import sys

from jdiff.quality import main

if __name__ == "__main__":
    sys.exit(main())
