"""Encode a dataset once with a VAE: `python -m jdiff.cli.encode --vae DIR --dataset SRC --out CACHE`.

Writes a latent cache (`jdiff.data.latent_cache`: the posterior mean and std of every image, and of its
horizontal flip unless --no-flip, plus a manifest with the VAE fingerprint, resolution and dataset identity),
which `train.py --data.dataset CACHE --data.vae DIR` trains from, drawing a fresh latent per step.

The work is split into chunks of --chunk_size examples, each written atomically: a rerun with the same
arguments skips the chunks that exist, and one with another VAE, resolution, dataset or layout is refused.
On several hosts each runs the same command with --process_id I --num_processes N (or JDIFF_PROCESS_ID /
JDIFF_NUM_PROCESSES) and encodes chunks I, I + N, ... on its local devices (no cross-host communication);
the cache is complete when every host has finished. Each batch is sharded over this host's devices.

Errors in flags print one line and exit 2; an unusable VAE, dataset or cache, or an image that cannot be
decoded, prints one line and exits 1 (the chunks written so far are kept).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from typing import Optional, Sequence

import jax

from jdiff.cli.common import Parser, both, fail

PROG = "python -m jdiff.cli.encode"


def parse_args(argv: Optional[Sequence[str]] = None):
    p = Parser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--vae", required=True, help="diffusers AutoencoderKL directory (config.json + safetensors)")
    p.add_argument("--dataset", required=True, help='"digits", a prepared tfds name or an image folder path')
    p.add_argument("--out", required=True, help="cache directory (created; an existing one is continued)")
    p.add_argument(*both("--image_size"), type=int, default=None, help="resolution (none: the data's native)")
    p.add_argument("--channels", type=int, default=None, choices=(1, 3), help="pixel channels (none: native)")
    p.add_argument("--split", default="train", help="dataset split (default train)")
    p.add_argument(*both("--data_dir"), default=None, help="tfds data directory")
    p.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also store the posterior of each horizontally flipped image (for data.random_flip; default on)",
    )
    p.add_argument("--batch", type=int, default=64, help="images per encoder call on this host (default 64)")
    p.add_argument(*both("--chunk_size"), type=int, default=1024, help="examples per chunk file (default 1024)")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="stored dtype")
    p.add_argument("--workers", type=int, default=None, help="image decoding threads (none: one per core)")
    p.add_argument(*both("--on_bad_image"), default="skip", choices=("skip", "error"), help="image folders")
    p.add_argument(*both("--process_id"), type=int, default=None, help="this host's index (multi-host)")
    p.add_argument(*both("--num_processes"), type=int, default=None, help="number of hosts (multi-host)")
    ns = p.parse_args(argv)
    for flag in ("batch", "chunk_size"):
        if getattr(ns, flag) < 1:
            p.error(f"--{flag} must be a positive int, got {getattr(ns, flag)}")
    for flag in ("image_size", "workers"):
        if getattr(ns, flag) is not None and getattr(ns, flag) < 1:
            p.error(f"--{flag} must be a positive int, got {getattr(ns, flag)}")
    env = lambda k: int(os.environ[k]) if os.environ.get(k) else None  # noqa: E731
    ns.process_id = ns.process_id if ns.process_id is not None else env("JDIFF_PROCESS_ID")
    ns.num_processes = ns.num_processes if ns.num_processes is not None else env("JDIFF_NUM_PROCESSES")
    if (ns.process_id is None) != (ns.num_processes is None):
        p.error("--process_id and --num_processes go together")
    ns.process_id, ns.num_processes = ns.process_id or 0, ns.num_processes or 1
    if ns.num_processes < 1 or not 0 <= ns.process_id < ns.num_processes:
        p.error(f"--process_id must be in [0, --num_processes), got {ns.process_id} of {ns.num_processes}")
    return ns


def manifest_for(ns, vae, source) -> dict:
    from jdiff.data import latent_cache

    return {
        "format": latent_cache.FORMAT,
        "vae_fingerprint": vae.fingerprint,
        "resolution": int(source.image_shape[0]),
        "channels": int(source.image_shape[2]),
        "latent_shape": [int(d) for d in vae.latent_shape(tuple(source.image_shape))],
        "flips": bool(ns.flip),
        "dtype": ns.dtype,
        "chunk_size": ns.chunk_size,
        "dataset": latent_cache.dataset_identity(source, ns.dataset, ns.split),
    }


def check_same(old: dict, new: dict, out: str) -> None:
    """ValueError (one line) naming the first field where an existing cache differs from this command's."""
    what = {"vae_fingerprint": "VAE", "resolution": "resolution", "dataset": "dataset", "channels": "channels"}
    for k in ("vae_fingerprint", "resolution", "channels", "dataset", "flips", "dtype", "chunk_size", "format"):
        if old.get(k) != new.get(k):
            a, b = old.get(k), new.get(k)
            if k == "vae_fingerprint":
                a, b = str(a)[:19], str(b)[:19]
            raise ValueError(
                f"{out} holds a latent cache made with another {what.get(k, k)} ({a} != {b} of this command); "
                "use another --out or remove it"
            )


@functools.partial(jax.jit, static_argnums=0)
def posterior(module, params, x):
    """(mean, std = exp(logvar / 2)) of the VAE posterior of images x (logvar clipped as the encoder does)."""
    mean, logvar = module.apply({"params": params}, x, method="encode")
    return mean, jax.numpy.exp(0.5 * logvar)


def encode_cache(ns, log=lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """Encodes this host's missing chunks; returns {"written": chunks written, "missing": chunks still absent
    (other hosts'), "manifest": ...}. Raises ValueError / PretrainedError / DataError (one line)."""
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from jdiff.data import BatchIterator, latent_cache, make_source
    from jdiff.pretrained.autoencoder import load_autoencoder_dir

    vae = load_autoencoder_dir(ns.vae)
    source = make_source(
        ns.dataset,
        split=ns.split,
        image_size=ns.image_size,
        channels=ns.channels,
        data_dir=ns.data_dir,
        on_bad_image=ns.on_bad_image,
        workers=ns.workers,
    )
    if isinstance(source, latent_cache.LatentCacheSource):
        raise ValueError(f"--dataset {ns.dataset} is a latent cache already; give the images it was made from")
    f, want = vae.module.downsample_factor, vae.module.in_channels
    h, w, c = source.image_shape
    if c != want or h % f or w % f:
        raise ValueError(
            f"--vae {ns.vae} takes images with {want} channels and sides divisible by {f}; the data gives "
            f"{tuple(source.image_shape)} (set --channels / --image_size)"
        )
    manifest = manifest_for(ns, vae, source)
    os.makedirs(ns.out, exist_ok=True)
    path = os.path.join(ns.out, latent_cache.MANIFEST)
    if os.path.exists(path):
        check_same(latent_cache.read_manifest(ns.out), manifest, ns.out)
    else:
        latent_cache.write_json_atomic(path, manifest)
    mine = [k for k in latent_cache.missing_chunks(ns.out, manifest) if k % ns.num_processes == ns.process_id]
    n, size = len(source), ns.chunk_size
    log(
        f"encoding {len(mine)} chunks of {size} ({n} examples, {latent_cache.num_chunks(n, size)} chunks) into {ns.out}"
    )

    devices = jax.local_devices()
    mesh = Mesh(np.array(devices), ("data",))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    batch = -(-ns.batch // len(devices)) * len(devices)  # a multiple of the local device count
    params = jax.device_put(vae.params, NamedSharding(mesh, PartitionSpec()))

    work = [(k, lo) for k in mine for lo in range(k * size, min((k + 1) * size, n), batch)]

    def read(i: int):
        k, lo = work[i]
        hi = min(lo + batch, (k + 1) * size, n)
        got = source.get(np.arange(lo, hi))
        x = np.zeros((batch, *source.image_shape), np.float32)  # padded to the full batch: one compiled shape
        x[: hi - lo] = got["image"]
        return k, hi - lo, x, got["label"]

    dtype = np.dtype(ns.dtype)
    parts: dict = {}
    written, start = 0, time.perf_counter()
    with BatchIterator(read, num_steps=len(work), prefetch=2, name="jdiff-encode-read") as it:
        for k, m, x, labels in it:
            xs = {"": x, "_flip": x[:, :, ::-1]} if ns.flip else {"": x}
            part = parts.setdefault(k, {"label": []})
            for suffix, images in xs.items():
                mean, std = posterior(vae.module, params, jax.device_put(images, rows))
                part.setdefault("mean" + suffix, []).append(np.asarray(mean)[:m].astype(dtype))
                part.setdefault("std" + suffix, []).append(np.asarray(std)[:m].astype(dtype))
            part["label"].append(np.asarray(labels, np.int32))
            if sum(len(v) for v in part["label"]) == min((k + 1) * size, n) - k * size:
                arrays = {name: np.concatenate(v) for name, v in parts.pop(k).items()}
                if not all(np.isfinite(a).all() for name, a in arrays.items() if name != "label"):
                    raise ValueError(f"the VAE gave non-finite posteriors in chunk {k}; nothing written for it")
                latent_cache.write_chunk(ns.out, k, arrays)
                written += 1
                log(f"chunk {k} written ({written}/{len(mine)}, {time.perf_counter() - start:.0f} s)")
    return {"written": written, "missing": latent_cache.missing_chunks(ns.out, manifest), "manifest": manifest}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ns = parse_args(argv)
    from jdiff.data import DataError
    from jdiff.pretrained.files import PretrainedError

    try:
        result = encode_cache(ns)
    except (ValueError, PretrainedError, DataError, OSError) as e:
        fail(PROG, e, 1)
    missing = result["missing"]
    if missing:
        print(
            f"{result['written']} chunks written; {len(missing)} chunks are other hosts' or still to do",
            file=sys.stderr,
        )
    else:
        print(f"latent cache complete: {result['manifest']['dataset']['count']} examples in {ns.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
