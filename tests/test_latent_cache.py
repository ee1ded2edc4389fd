"""The latent cache: `python -m jdiff.cli.encode` stores the tiny VAE fixture's posterior mean and std (and
of the flipped images), chunk by chunk, resumably and per host; training from it gives the latents that
encoding on the fly gives; a cache from another VAE, resolution or dataset is refused with one line."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from jdiff.cli import encode
from jdiff.data import LatentCacheSource, make_source
from jdiff.data.latent_cache import MANIFEST
from jdiff.pretrained.autoencoder import load_autoencoder_dir

VAE_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "pretrained", "vae")  # 8x8x3 -> 4x4x4
N = 11


def _folder(root, n, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
        (root / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (10, 9, 3), dtype=np.uint8)).save(root / "ab"[i % 2] / f"{i:02d}.png")
    return root


def _encode(*args):
    return encode.main(["--vae", VAE_DIR, "--batch", "4", "--chunk_size", "4", "--dtype", "float32", *map(str, args)])


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(image folder, complete float32 cache with flips) made once for the module."""
    root = tmp_path_factory.mktemp("latent")
    folder = _folder(root / "images", N, 0)
    assert _encode("--dataset", folder, "--out", root / "cache", "--image_size", 8) == 0
    return folder, root / "cache"


def test_cache_holds_the_encoders_posteriors(made):
    folder, cache = made
    vae = load_autoencoder_dir(VAE_DIR)
    pixels = make_source(str(folder), image_size=8).get(np.arange(N))
    src = make_source(str(cache))
    assert isinstance(src, LatentCacheSource) and len(src) == N and src.num_classes == 2
    assert src.latent_shape == (4, 4, 4) and src.pixel_shape == (8, 8, 3) and src.image_shape == (4, 4, 8)
    for flip in (False, True):
        images = pixels["image"][:, :, ::-1] if flip else pixels["image"]
        mean, logvar = map(np.asarray, vae.encode(jax.numpy.asarray(images)))
        got = src.get(np.arange(N), flip=np.full(N, flip))
        np.testing.assert_allclose(got["image"][..., :4], mean, atol=1e-5)
        np.testing.assert_allclose(got["image"][..., 4:], np.exp(0.5 * logvar), rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(got["label"], pixels["label"])
    m = json.loads((cache / MANIFEST).read_text())
    assert m["vae_fingerprint"] == vae.fingerprint and m["resolution"] == 8 and m["flips"] is True
    assert m["dataset"]["count"] == N and m["dataset"]["dataset"] == str(folder) and "files_sha256" in m["dataset"]
    assert sorted(p.name for p in cache.iterdir()) == [f"chunk-00000{i}" for i in range(3)] + [MANIFEST]


def test_rerun_continues_and_hosts_split_the_chunks(made, tmp_path, capsys):
    folder, cache = made
    out = tmp_path / "cache"
    shutil.copytree(cache, out)
    shutil.rmtree(out / "chunk-000001")
    (out / "chunk-000002.tmp-123").mkdir()  # left by an interrupted run: ignored
    before = os.stat(out / "chunk-000000" / "mean.npy").st_mtime_ns
    assert _encode("--dataset", folder, "--out", out, "--image_size", 8) == 0
    assert "encoding 1 chunks" in capsys.readouterr().err
    assert os.stat(out / "chunk-000000" / "mean.npy").st_mtime_ns == before  # not rewritten
    for k in ("mean", "std_flip", "label"):
        np.testing.assert_array_equal(
            np.load(out / "chunk-000001" / f"{k}.npy"), np.load(cache / "chunk-000001" / f"{k}.npy")
        )
    split = tmp_path / "split"
    assert _encode("--dataset", folder, "--out", split, "--image_size", 8, "--process_id", 1, "--num_processes", 2) == 0
    assert sorted(p.name for p in split.glob("chunk-*")) == ["chunk-000001"]
    with pytest.raises(ValueError, match=r"incomplete \(1 of 3 chunks\)"):
        LatentCacheSource(split)
    assert _encode("--dataset", folder, "--out", split, "--image_size", 8, "--process_id", 0, "--num_processes", 2) == 0
    np.testing.assert_array_equal(
        LatentCacheSource(split).get(np.arange(N))["image"], LatentCacheSource(cache).get(np.arange(N))["image"]
    )


def _other_vae(tmp_path):
    other = tmp_path / "other_vae"
    shutil.copytree(VAE_DIR, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.2}))
    return other


def test_encode_refuses_a_cache_made_differently(made, tmp_path, capsys):
    folder, cache = made
    out = tmp_path / "cache"
    shutil.copytree(cache, out)
    cases = [
        (["--image_size", 4], "another resolution"),
        (["--image_size", 8, "--vae", _other_vae(tmp_path)], "another VAE"),
        (["--image_size", 8, "--no-flip"], "another flips"),
    ]
    other = _folder(tmp_path / "other", N, 1)
    cases.append((["--image_size", 8, "--dataset", other], "another dataset"))
    for extra, message in cases:
        with pytest.raises(SystemExit) as e:
            _encode("--dataset", folder, "--out", out, *extra)
        err = capsys.readouterr().err
        assert e.value.code == 1 and message in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as e:
        _encode("--dataset", folder, "--out", out, "--batch", 0)
    assert e.value.code == 2


def _train_config(tmp_path, dataset, **more):
    from conftest import make_tiny_config

    over = {"data.dataset": str(dataset), "data.vae": VAE_DIR, "data.random_flip": True, "data.channels": 3}
    return make_tiny_config(tmp_path / "run", **{**over, **more})


def test_training_from_the_cache_draws_the_on_the_fly_latents(made, tmp_path):
    from jdiff.training.setup import setup

    folder, cache = made
    devices = jax.devices()[:2]
    fly = setup(_train_config(tmp_path, folder, **{"data.image_size": 8}), devices)
    cached = setup(_train_config(tmp_path, cache), devices)
    assert cached.image_shape == fly.image_shape == (4, 4, 4)
    assert cached.derived()["decoded_shape"] == [8, 8, 3] and len(cached.source) == N
    with fly.batches(2, 2) as a, cached.batches(2, 2) as b:
        for x, y in zip(a, b):  # steps 2, 3: flips and epoch boundaries included (batch 8 of 11)
            np.testing.assert_allclose(np.asarray(y["image"]), np.asarray(x["image"]), atol=2e-5)
            np.testing.assert_array_equal(np.asarray(y["label"]), np.asarray(x["label"]))


def test_training_refuses_a_mismatched_cache(made, tmp_path):
    from jdiff.config import ConfigError
    from jdiff.training.setup import setup

    _, cache = made
    devices = jax.devices()[:1]
    cases = [
        ({"data.vae": str(_other_vae(tmp_path))}, "encoded with another VAE"),
        ({"data.image_size": 16}, "was encoded at image_size 8"),
        ({"data.vae": None}, "is a latent cache: set data.vae"),
        ({"data.split": "test"}, "split 'test' is not the split"),
    ]
    no_flip = tmp_path / "no_flip"
    shutil.copytree(cache, no_flip)
    manifest = json.loads((no_flip / MANIFEST).read_text())
    (no_flip / MANIFEST).write_text(json.dumps({**manifest, "flips": False}))
    for over, message in cases:
        with pytest.raises(ConfigError, match=message) as e:
            setup(_train_config(tmp_path, cache, **over), devices)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="random_flip needs the flipped posteriors"):
        setup(_train_config(tmp_path, no_flip), devices)
    assert setup(_train_config(tmp_path, no_flip, **{"data.random_flip": False}), devices).source.flips_stored is False
