"""Issue 24's defects, each tested at its cause: latent-run evaluation, evaluation settings checked before the
first step, a workdir holding another run's config, the VAE fingerprint, and the likelihood functions' input
checks. (Pretrained-loader and export defects are tested in tests/test_pretrained.py.)"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_tiny_config

from jdiff.config import ConfigError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "pretrained")
VAE_DIR = os.path.join(FIXTURES, "vae")


def _quiet(_):
    pass


# ---------------------------------------------------------------------------------------------------
# Defect 2: a latent run is evaluated on the latents it was trained on, as continuous data.


def test_latent_run_evaluates_bits_per_latent_dimension(tmp_path):
    """eval_vlb_bpd of a --data.vae run is the VLB of the EMA model on the scaled VAE latents of the held-out
    batch (one fixed posterior draw, levels None), recorded with eval_space "latents"."""
    from jdiff.likelihood import vlb_bpd
    from jdiff.run import Checkpointer
    from jdiff.training import train
    from jdiff.training.evaluate import EVAL_SEED_SALT, heldout_batch
    from jdiff.training.setup import setup

    wd = str(tmp_path / "run")
    config = make_tiny_config(
        wd,
        **{
            "data.vae": VAE_DIR,
            "data.channels": 3,
            "optim.steps": 1,
            "run.checkpoint_every": 1,
            "run.eval_every": 1,
            "run.eval_num": 4,
            "diffusion.num_timesteps": 20,
        },
    )
    devices = jax.devices()[:1]
    train(config, devices=devices, progress=False, log=_quiet)
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        (rec,) = [r for r in map(json.loads, f) if "eval_vlb_bpd" in r]
    assert rec["eval_space"] == "latents"
    s = setup(config, devices)
    with Checkpointer(wd, create=False) as ck:
        ema = s.restore_or_init(ck).ema_params
    batch = heldout_batch(config, 4)
    key = jax.random.fold_in(jax.random.key(config.run.seed + EVAL_SEED_SALT), 1)
    latents = s.vae.encode_latents(s.vae.params, jnp.asarray(batch["image"]), key)
    assert latents.shape == (4, 4, 4, 4)
    fn = lambda x, t: s.model.apply({"params": ema}, x, t, None)
    want = vlb_bpd(fn, s.schedule, latents, jax.random.key(config.run.seed + EVAL_SEED_SALT), levels=None)
    np.testing.assert_allclose(rec["eval_vlb_bpd"], float(jnp.mean(want)), rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# Defect 4: evaluation settings are checked by setup(), before anything compiles or trains.


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"data.eval_split": "bogus"}, "data.eval_split 'bogus' cannot be read"),
        ({"diffusion.objective": "edm", "diffusion.schedule": "edm"}, "objective is 'edm'"),
    ],
)
def test_evaluation_settings_fail_before_the_first_step(tmp_path, overrides, words):
    from jdiff.training.setup import setup

    config = make_tiny_config(tmp_path / "run", **{"run.eval_every": 2, **overrides})
    with pytest.raises(ConfigError, match="run.eval_every") as e:
        setup(config, jax.devices()[:1])
    assert words in str(e.value)
    assert not os.path.exists(tmp_path / "run")  # nothing was written


def test_image_folder_without_held_out_split_fails_before_the_first_step(tmp_path):
    from PIL import Image

    from jdiff.training.setup import setup

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    config = make_tiny_config(
        tmp_path / "run",
        **{"data.dataset": str(folder), "data.image_size": 8, "data.class_conditional": False, "run.eval_every": 2},
    )
    with pytest.raises(ConfigError, match="data.eval_split 'test' cannot be read.*image folder"):
        setup(config, jax.devices()[:1])
