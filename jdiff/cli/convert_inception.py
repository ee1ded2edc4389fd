"""Converts pytorch-fid's published FID Inception weights (.pth) to the .safetensors file jdiff reads.

    pip install -e .[bench]          # torch
    python -m jdiff.cli.convert_inception pt_inception-2015-12-05-6726825d.pth inception.safetensors

The .pth is pytorch-fid's release asset ``FID_WEIGHTS_URL`` in ``pytorch_fid/inception.py``
(github.com/mseitzer/pytorch-fid, release ``fid_weights``, file ``pt_inception-2015-12-05-6726825d.pth``, the
TensorFlow ``inception-2015-12-05`` graph ported to PyTorch); download it yourself, jdiff downloads nothing.
This is the only place a pickle is read, by ``torch.load(weights_only=True)`` (tensors only, no code), on the
user's machine with torch; the output keeps the state-dict keys and is checked against the network's tensors
(`jdiff.metrics.inception_weights.params_from_state_dict`) before it is written. One-line errors, exit 2
(usage) or 1 (an unreadable or wrong file).
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from jdiff.cli.common import Parser, fail

PROG = "convert_inception"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = Parser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("pth", help="pytorch-fid's pt_inception-2015-12-05-*.pth")
    p.add_argument("out", help="output .safetensors")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.out.endswith(".safetensors"):
        fail(PROG, f"the output must end in .safetensors, got {args.out!r}", 2)
    try:
        import torch
    except ImportError:
        fail(PROG, "needs torch: pip install -e .[bench]", 2)
    import numpy as np
    from safetensors.numpy import save_file

    from jdiff.metrics.inception_weights import IGNORED_SUFFIX, InceptionWeightsError, params_from_state_dict

    try:
        state = torch.load(args.pth, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a missing, truncated or non-torch file
        fail(PROG, f"cannot read {args.pth}: {' '.join(str(e).split())[:300]}", 1)
    if not isinstance(state, dict):
        fail(PROG, f"{args.pth} holds a {type(state).__name__}, not a state dict", 1)
    tensors = {
        k: np.ascontiguousarray(v.detach().cpu().numpy())
        for k, v in state.items()
        if torch.is_tensor(v) and not k.endswith(IGNORED_SUFFIX)
    }
    try:
        params_from_state_dict(tensors, what=args.pth)
    except InceptionWeightsError as e:
        fail(PROG, e, 1)
    tmp = args.out + ".tmp"
    save_file(tensors, tmp)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {len(tensors)} tensors, {sum(t.size for t in tensors.values()) / 1e6:.1f} M values")
    return 0


if __name__ == "__main__":
    sys.exit(main())
