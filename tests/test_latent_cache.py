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


@pytest.fixture(scope="module")
def posteriors(made):
    """{flip: (mean, logvar)} of the VAE encoder for the folder's images (file order), flipped or not, and
    "label": their labels."""
    folder, _ = made
    vae = load_autoencoder_dir(VAE_DIR)
    pixels, labels = make_source(str(folder), image_size=8).get(np.arange(N)).values()
    return {"label": labels} | {
        f: tuple(map(np.asarray, vae.encode(jax.numpy.asarray(pixels[:, :, ::-1] if f else pixels))))
        for f in (False, True)
    }


def test_cache_holds_the_encoders_posteriors(made, posteriors):
    folder, cache = made
    vae = load_autoencoder_dir(VAE_DIR)
    labels = posteriors["label"]
    src = make_source(str(cache))
    assert isinstance(src, LatentCacheSource) and len(src) == N and src.num_classes == 2
    assert src.latent_shape == (4, 4, 4) and src.pixel_shape == (8, 8, 3) and src.image_shape == (4, 4, 8)
    for flip in (False, True):
        mean, logvar = posteriors[flip]
        got = src.get(np.arange(N), flip=np.full(N, flip))
        np.testing.assert_allclose(got["image"][..., :4], mean, atol=1e-5)
        np.testing.assert_allclose(got["image"][..., 4:], np.exp(0.5 * logvar), rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(got["label"], labels)
    assert np.abs(posteriors[True][0] - posteriors[False][0]).max() > 1e-3  # flips are not the same posterior
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
    for bad in (["--batch", 0], ["--workers", 0], ["--process_id", 2, "--num_processes", 2], ["--process_id", 0]):
        with pytest.raises(SystemExit) as e:
            _encode("--dataset", folder, "--out", out, *bad)
        assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def _train_config(tmp_path, dataset, **more):
    from conftest import make_tiny_config

    over = {"data.dataset": str(dataset), "data.vae": VAE_DIR, "data.random_flip": True, "data.channels": 3}
    return make_tiny_config(tmp_path / "run", **{**over, **more})


def test_training_from_the_cache_draws_the_on_the_fly_latents(made, posteriors, tmp_path):
    """Setup.batches of a cache run equal what encoding on the fly draws (tests/test_vae.py checks that
    formula against the on-the-fly transform): scaling x (mean + exp(logvar / 2) eps) of each example's
    (flipped, where the step's flip mask says so) image, eps from key fold_in(fold_in(key(seed), 0x7AE), step),
    on a batch sharded over 2 devices."""
    from jdiff.data import sampler
    from jdiff.training.setup import VAE_SEED_SALT, setup

    _, cache = made
    s = setup(_train_config(tmp_path, cache), jax.devices()[:2])
    assert s.image_shape == (4, 4, 4) and s.derived()["decoded_shape"] == [8, 8, 3] and len(s.source) == N
    seed = s.config.run.seed
    with s.batches(2, 2) as it:
        for step, got in zip((2, 3), it):  # batch 8 of 11: step 2 spans the epoch boundary
            rows = np.arange(8)
            idx = sampler.indices_at(N, step * 8 + rows, seed)
            flip = sampler.flip_mask(step, rows, global_batch_size=8, seed=seed)
            assert flip.any() and not flip.all()
            mean = np.where(flip[:, None, None, None], posteriors[True][0][idx], posteriors[False][0][idx])
            logvar = np.where(flip[:, None, None, None], posteriors[True][1][idx], posteriors[False][1][idx])
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), VAE_SEED_SALT), step)
            want = (mean + np.exp(0.5 * logvar) * np.asarray(jax.random.normal(key, mean.shape))) * 0.18215
            np.testing.assert_allclose(np.asarray(got["image"]), want, atol=2e-5)
            np.testing.assert_array_equal(np.asarray(got["label"]), posteriors["label"][idx])


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
        ({"run.eval_every": 2, "data.eval_split": "train"}, "run.eval_every encodes held-out pixel images"),
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
