"""train.py's periodic FID (run.fid_every): a record in metrics.jsonl at the due step, equal to the Frechet
distance of the features of the samples it drew; config checks. The Inception network is replaced by a stand-in
here (tests/test_fid.py checks the network): the action's plumbing is what is tested."""

import json
from pathlib import Path

import numpy as np
import pytest


class FakeInception:
    """Features = the image's pixels, cycled to 2048 values; records every batch it is given."""

    def __init__(self):
        self.seen = []

    def features_and_logits(self, images):
        from jdiff import metrics

        x = metrics.check_images(images)
        self.seen.append(x)
        feats = np.resize(x.reshape(len(x), -1), (len(x), 2048))
        return feats, np.zeros((len(x), 1008), np.float32)


@pytest.mark.slow
def test_fid_every_writes_fid_records(tiny_config, tmp_path, monkeypatch):
    import jax

    from jdiff import metrics
    from jdiff.config import ConfigError
    from jdiff.training import train

    fake = FakeInception()
    monkeypatch.setattr(metrics, "load_inception", lambda path, devices=None: fake)
    ref_mu, ref_sigma = np.full(2048, 0.5), np.eye(2048) * 0.01
    ref = metrics.save_stats(str(tmp_path / "ref.npz"), ref_mu, ref_sigma)
    with pytest.raises(ConfigError, match="run.fid_every needs run.fid_inception"):
        tiny_config(**{"run.fid_every": 2})
    flags = {"run.fid_every": 3, "run.fid_num": 4, "run.fid_inception": str(tmp_path / "w.safetensors")}
    c = tiny_config(**flags, **{"run.fid_ref": ref})
    train(c, devices=jax.devices()[:2], progress=False, log=lambda s: None)
    with open(Path(c.run.workdir) / "metrics.jsonl") as f:
        recs = [r for r in map(json.loads, f) if "fid" in r]
    assert [r["step"] for r in recs] == [3]  # optim.steps 4
    images = np.concatenate(fake.seen)
    assert images.shape == (4, 8, 8, 3) and images.min() >= 0.0 and images.max() <= 1.0
    np.testing.assert_array_equal(images[..., 0], images[..., 2])  # grey digits repeated to RGB
    feats = np.resize(images.reshape(4, -1), (4, 2048))
    want = metrics.frechet_distance_from_stats(*metrics.gaussian_stats(feats), ref_mu, ref_sigma)
    assert recs[0]["fid_num"] == 4 and recs[0]["fid"] == pytest.approx(want, rel=1e-9)
