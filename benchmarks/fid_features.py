"""FID Inception features per second, jdiff (JAX) vs pytorch-fid on the same batch, and memory flat in N.

    /work/venv-bench/bin/python benchmarks/fid_features.py --torchvision-src DIR     # [bench] env + pytorch-fid
    python benchmarks/fid_features.py --no-peer                                      # jdiff only

Weights: the seeded random pytorch-fid state dict of tests/fixtures/inception_recipe.py (speed does not depend
on the values); pass ``--inception W.safetensors`` for real weights. One batch of ``--batch`` random 32x32 images
(resized to 299 by both, as pytorch-fid does), timed in interleaved rounds after a warm-up (medians), with
both networks on the same machine in the same process: the ratio is the figure to quote on a CPU. torch uses
its default thread count; jdiff the devices JAX sees (all of them). Then ``stream_stats`` over N = n1 and
n2 images (batches of ``--batch``): the peak resident memory (ru_maxrss) after the second run exceeds that
after the first by the growth attributable to N (features are not kept, statistics are float64 (d, d)).
``--torchvision-src``: see tests/fixtures/make_inception_fixtures.py (the torchvision stand-in). Prints one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "fixtures"))


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n", default="16,64", help="n1,n2 images for the memory check")
    p.add_argument("--inception", default=None, help="weights .safetensors (default: seeded random weights)")
    p.add_argument("--no-peer", action="store_true", help="jdiff only")
    p.add_argument("--torchvision-src", default=None)
    args = p.parse_args()

    import inception_recipe as recipe
    import jax
    from safetensors.numpy import load_file, save_file

    from jdiff import metrics
    from jdiff.metrics.inception_weights import expected_shapes

    tmp = tempfile.TemporaryDirectory()
    path = args.inception
    if path is None:
        path = str(Path(tmp.name) / "inception.safetensors")
        save_file(recipe.random_state_dict(expected_shapes()), path)
    inception = metrics.load_inception(path)
    x = recipe.images((args.batch, 32, 32, 3), 0)
    out = {"batch": args.batch, "devices": len(jax.devices()), "platform": jax.devices()[0].platform}

    t0 = time.perf_counter()
    feats = inception(x)
    out["jdiff_first_call_s"] = round(time.perf_counter() - t0, 2)  # compile + one batch
    fns = {"jdiff": lambda: inception(x)}
    if not args.no_peer:
        import torch

        sys.argv = [sys.argv[0]] + (["--torchvision-src", args.torchvision_src] if args.torchvision_src else [])
        try:
            import torchvision  # noqa: F401
        except (ImportError, RuntimeError):
            from make_inception_fixtures import torchvision_stand_in

            for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
                del sys.modules[name]
            torchvision_stand_in(args.torchvision_src)
        from pytorch_fid import inception as pfi

        skeleton = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None).state_dict()
        loaded = {k: torch.from_numpy(v) for k, v in load_file(path).items()}
        state = {k: loaded.get(k, v) for k, v in skeleton.items()}
        pfi.load_state_dict_from_url = lambda url, progress=True: state
        model = pfi.InceptionV3([3]).eval()
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

        def peer():
            with torch.no_grad():
                return model(xt)[0]

        ref = peer()[:, :, 0, 0].numpy()
        out["max_abs_diff_vs_peer"] = float(np.abs(feats - ref).max())
        out["max_abs_feature"] = float(np.abs(ref).max())
        out["torch_threads"] = torch.get_num_threads()
        fns["pytorch_fid"] = peer
    times = {k: [] for k in fns}
    for _ in range(args.rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    for k, ts in times.items():
        out[f"{k}_images_per_s"] = round(args.batch / float(np.median(ts)), 2)
    if "pytorch_fid" in fns:
        out["jdiff_over_pytorch_fid"] = round(out["jdiff_images_per_s"] / out["pytorch_fid_images_per_s"], 3)

    n1, n2 = (int(v) for v in args.n.split(","))
    peaks = []
    for n in (n1, n2):
        batches = (recipe.images((args.batch, 32, 32, 3), 1 + i) for i in range(-(-n // args.batch)))
        stats, _, _ = metrics.stream_stats(inception, batches)
        assert stats.count == -(-n // args.batch) * args.batch
        peaks.append(rss_mib())
    out.update({"n1": n1, "n2": n2, "peak_rss_mib_n1": round(peaks[0], 1), "peak_rss_mib_n2": round(peaks[1], 1)})
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
