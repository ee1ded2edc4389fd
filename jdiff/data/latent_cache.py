"""A dataset's VAE posteriors, encoded once (``python -m jdiff.cli.encode``), as a random-access source.

Layout of a cache directory::

  latent_cache.json              the manifest (``MANIFEST``): format, VAE fingerprint, resolution, pixel
                                 channels, latent shape, dtype, chunk size, whether flips are stored, and the
                                 identity of the source dataset (``dataset_identity``: name, split, count, ...)
  chunk-000000/mean.npy          posterior mean of examples [0, C) (C = chunk_size), (n, h, w, c)
  chunk-000000/std.npy           posterior std exp(logvar / 2), same shape
  chunk-000000/mean_flip.npy     ... of the horizontally flipped images (only when flips are stored)
  chunk-000000/std_flip.npy
  chunk-000000/label.npy         int32 (n,)
  chunk-000001/ ...

A chunk is written into a temporary directory and renamed into place (``write_chunk``), so a chunk either
exists whole or not at all and an interrupted encode continues where it stopped. Posteriors are stored
unscaled (the VAE's own latents); training draws ``mean + std * eps`` with a fresh eps each step and applies
the VAE's scaling (``jdiff.training.setup``), so a cache gives the same batches as encoding on the fly.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
from typing import Any, Optional

import numpy as np

from jdiff.data.sources import _as_indices

MANIFEST = "latent_cache.json"
FORMAT = "jdiff-latent-cache-1"
CACHE_DTYPES = ("float16", "float32")
_ARRAYS = ("mean", "std")


def is_latent_cache(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding a latent-cache manifest."""
    return os.path.isfile(os.path.join(os.path.expanduser(os.fspath(path)), MANIFEST))


def chunk_dir(root: str | os.PathLike, chunk: int) -> pathlib.Path:
    return pathlib.Path(root) / f"chunk-{chunk:06d}"


def num_chunks(count: int, chunk_size: int) -> int:
    return -(-count // chunk_size)


def dataset_identity(source: Any, name: str, split: str) -> dict:
    """What identifies the encoded data: the dataset name (an absolute path for folders), split, example
    count, image shape, classes, and for image folders the SHA-256 of the files' relative paths and sizes (a
    file added, removed, renamed or rewritten with another size changes it)."""
    ident = {
        "dataset": os.path.abspath(os.path.expanduser(name)) if os.path.exists(os.path.expanduser(name)) else name,
        "split": split,
        "count": len(source),
        "image_shape": [int(d) for d in source.image_shape],
        "num_classes": source.num_classes,
    }
    files = getattr(source, "files", None)
    if files is not None:
        root = pathlib.Path(ident["dataset"])
        h = hashlib.sha256()
        for f in files:
            rel = pathlib.Path(f).relative_to(root).as_posix() if root.is_dir() else pathlib.Path(f).name
            h.update(f"{rel}\0{os.path.getsize(f)}\n".encode())
        ident["files_sha256"] = h.hexdigest()
    return ident


def read_manifest(root: str | os.PathLike) -> dict:
    """The manifest of the cache in ``root``; ValueError (one line) if it is missing or not a jdiff cache."""
    path = os.path.join(os.path.expanduser(os.fspath(root)), MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{os.fspath(root)!r} is not a latent cache (no {MANIFEST})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path!r}: {' '.join(str(e).split())}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a {FORMAT} manifest")
    return manifest


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def missing_chunks(root: str | os.PathLike, manifest: dict) -> list[int]:
    """Chunks of the manifest's dataset that are not written yet, in order."""
    n = num_chunks(manifest["dataset"]["count"], manifest["chunk_size"])
    return [c for c in range(n) if not chunk_dir(root, c).is_dir()]


def write_chunk(root: str | os.PathLike, chunk: int, arrays: dict[str, np.ndarray]) -> None:
    """Writes one chunk's arrays (``mean``, ``std``, [``mean_flip``, ``std_flip``,] ``label``) atomically:
    into a temporary directory, then renamed to ``chunk-NNNNNN`` (a rerun skips chunks that exist)."""
    final = chunk_dir(root, chunk)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for k, v in arrays.items():
        with open(tmp / f"{k}.npy", "wb") as f:
            np.save(f, v)
            f.flush()
            os.fsync(f.fileno())
    try:
        os.rename(tmp, final)
    except OSError:  # another host or an earlier run wrote it meanwhile: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise


class LatentCacheSource:
    """The posteriors of a latent cache (see the module docstring) as a source.

    ``get(indices, flip=None)`` returns ``{"image": float32 (n, h, w, 2c), "label": int32 (n,)}`` where the
    image holds the posterior mean (channels ``[:c]``) and std (``[c:]``); where ``flip`` is True the stored
    posterior of the flipped image is returned (``handles_flips``: the pipeline passes its flip mask here
    instead of mirroring). ``latent_shape`` is (h, w, c), ``pixel_shape`` the encoded images' shape.

    Raises ValueError (one line) for a missing or incomplete cache, or a ``split`` other than the encoded one.
    """

    handles_flips = True

    def __init__(self, path: str | os.PathLike, split: Optional[str] = None):
        self.root = pathlib.Path(os.path.expanduser(os.fspath(path)))
        m = self.manifest = read_manifest(self.root)
        ds = m["dataset"]
        if split is not None and split != ds["split"]:
            raise ValueError(f"split {split!r} is not the split the latent cache encodes ({ds['split']!r})")
        missing = missing_chunks(self.root, m)
        if missing:
            total = num_chunks(ds["count"], m["chunk_size"])
            raise ValueError(
                f"latent cache {str(self.root)!r} is incomplete ({total - len(missing)} of {total} chunks); "
                "rerun python -m jdiff.cli.encode with the same arguments to finish it"
            )
        self.flips_stored = bool(m["flips"])
        names = _ARRAYS + (("mean_flip", "std_flip") if self.flips_stored else ())
        chunks = range(num_chunks(ds["count"], m["chunk_size"]))
        try:  # memory-mapped: opening is cheap, pages are read on use
            self._arrays = {
                k: [np.load(chunk_dir(self.root, c) / f"{k}.npy", mmap_mode="r") for c in chunks] for k in names
            }
            self._labels = np.concatenate([np.load(chunk_dir(self.root, c) / "label.npy") for c in chunks])
        except (OSError, ValueError) as e:
            raise ValueError(f"latent cache {str(self.root)!r} is damaged: {' '.join(str(e).split())}") from None
        self.chunk_size = int(m["chunk_size"])
        self.latent_shape = tuple(int(d) for d in m["latent_shape"])
        self.pixel_shape = (int(m["resolution"]), int(m["resolution"]), int(m["channels"]))
        self.image_shape = (*self.latent_shape[:2], 2 * self.latent_shape[2])
        self.num_classes = ds["num_classes"]
        self.vae_fingerprint = m["vae_fingerprint"]
        if len(self._labels) != ds["count"]:
            raise ValueError(
                f"latent cache {str(self.root)!r} is damaged: {len(self._labels)} labels, not {ds['count']}"
            )

    def __len__(self) -> int:
        return len(self._labels)

    def get(self, indices: np.ndarray, flip: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
        idx = _as_indices(indices, len(self))
        flip = np.zeros(len(idx), bool) if flip is None else np.asarray(flip, bool)
        if flip.any() and not self.flips_stored:
            raise ValueError(f"latent cache {str(self.root)!r} stores no flipped posteriors (encode with --flip)")
        c = self.latent_shape[2]
        out = np.empty((len(idx), *self.image_shape), np.float32)
        for k, (i, f) in enumerate(zip(idx, flip)):
            chunk, row = divmod(int(i), self.chunk_size)
            suffix = "_flip" if f else ""
            out[k, ..., :c] = self._arrays["mean" + suffix][chunk][row]
            out[k, ..., c:] = self._arrays["std" + suffix][chunk][row]
        return {"image": out, "label": self._labels[idx]}
