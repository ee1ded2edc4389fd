"""Issue 24's defects, each tested at its cause: latent-run evaluation, evaluation settings checked before the
first step, a workdir holding another run's config, the VAE fingerprint, and the likelihood functions' input
checks. (Pretrained-loader and export defects are tested in tests/test_pretrained.py.)"""

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
    """The held-out evaluation of a --data.vae run (`evaluate_bpd`, as the loop calls it) is the VLB of the EMA
    model on the scaled VAE latents of the held-out batch (one fixed posterior draw, levels None), recorded
    with eval_space "latents"; it used to feed the raw pixels to the latent model."""
    from types import SimpleNamespace

    from jdiff.likelihood import vlb_bpd
    from jdiff.training.evaluate import EVAL_SEED_SALT, evaluate_bpd, heldout_batch
    from jdiff.training.setup import setup

    config = make_tiny_config(
        tmp_path / "run",
        **{
            "data.vae": VAE_DIR,
            "data.channels": 3,
            "run.eval_every": 1,
            "run.eval_num": 4,
            "diffusion.num_timesteps": 4,
            "sampling.steps": 2,
        },
    )
    s = setup(config, jax.devices()[:1])
    rng = np.random.default_rng(0)
    ema = jax.tree.map(lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype), s.abstract_state.ema_params)
    records = []
    loop = SimpleNamespace(
        config=config,
        setup=s,
        cache={},
        done=1,
        due=lambda every: True,
        state=SimpleNamespace(ema_params=ema),
        writer=SimpleNamespace(write=records.append, enabled=False),
        log=_quiet,
    )
    evaluate_bpd(loop)
    (rec,) = records
    assert rec["eval_space"] == "latents"
    batch = heldout_batch(config, 4)
    key = jax.random.fold_in(jax.random.key(config.run.seed + EVAL_SEED_SALT), 1)
    latents = s.vae.encode_latents(s.vae.params, jnp.asarray(batch["image"]), key)
    assert latents.shape == (4, 4, 4, 4)
    fn = lambda x, t: s.model.apply({"params": ema}, x, t, None)
    want = vlb_bpd(fn, s.schedule, latents, jax.random.key(config.run.seed + EVAL_SEED_SALT), levels=None)
    np.testing.assert_allclose(np.asarray(loop.cache["heldout_bpd"]["batch"][0]), np.asarray(latents), atol=1e-5)
    # float32, jitted vs eager (measured relative difference 3.6e-4 at ~47 bits/dim for these random weights);
    # scoring pixels or the discrete decoder would be off by whole bits
    np.testing.assert_allclose(rec["eval_vlb_bpd"], float(jnp.mean(want)), rtol=2e-3)


# ---------------------------------------------------------------------------------------------------
# Defect 4: evaluation settings are checked by setup(), before anything compiles or trains.


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"data.eval_split": "bogus"}, "data.eval_split 'bogus' cannot be read"),
        ({"diffusion.prediction": "edm", "diffusion.schedule": "edm"}, "prediction is 'edm'"),
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


# ---------------------------------------------------------------------------------------------------------------
# Defect 5: a workdir holding another run's config.json (even without a checkpoint) is resumed or refused.


def test_config_of_a_run_without_checkpoint_is_resumed_or_refused(tmp_path):
    from jdiff.cli.train import resolve_config
    from jdiff.run import RunError, load_run_config, save_run_config
    from jdiff.training import train

    wd = str(tmp_path / "run")
    saved = make_tiny_config(wd, **{"optim.lr": 3e-3})
    save_run_config(wd, saved, {"num_classes": 10, "image_shape": [8, 8, 1]})  # killed before its first save
    before = open(os.path.join(wd, "config.json")).read()
    config, resumed = resolve_config(None, [("run.workdir", wd)])  # plain train.py --run.workdir R
    assert resumed and config.model.fields == saved.model.fields and config.optim.lr == 3e-3
    other = make_tiny_config(wd, **{"model.fields": {**saved.model.fields, "ch": 16}})
    with pytest.raises(RunError, match=r"holds another run's config.json \(model.fields:"):
        train(other, devices=jax.devices()[:1], progress=False, log=_quiet)
    assert open(os.path.join(wd, "config.json")).read() == before
    assert load_run_config(os.path.join(wd, "config.json"))[0] == saved


# ---------------------------------------------------------------------------------------------------------------
# Defect 6: the VAE's identity is recorded and checked.


def test_vae_fingerprint_is_recorded_and_a_different_vae_is_refused(tmp_path):
    import shutil

    from safetensors.numpy import save_file

    from jdiff.pretrained import PretrainedError, read_model_dir
    from jdiff.pretrained.autoencoder import fingerprint, load_autoencoder_dir
    from jdiff.run import RunError, check_same_run, save_run_config

    config, tensors = read_model_dir(VAE_DIR)
    vae = load_autoencoder_dir(VAE_DIR)
    assert vae.fingerprint == fingerprint(config, tensors) and vae.fingerprint.startswith("sha256:")
    assert fingerprint({**config, "_diffusers_version": "9"}, dict(reversed(tensors.items()))) == vae.fingerprint
    name = sorted(tensors)[0]
    changed = {**tensors, name: tensors[name] + np.float32(1e-3)}
    assert fingerprint(config, changed) != vae.fingerprint
    assert fingerprint({**config, "scaling_factor": 0.13}, tensors) != vae.fingerprint

    swapped = tmp_path / "vae"  # the run's VAE directory, its contents replaced
    shutil.copytree(VAE_DIR, swapped)
    wd = str(tmp_path / "run")
    run = make_tiny_config(wd, **{"data.vae": str(swapped), "data.channels": 3})
    derived = {"num_classes": 10, "image_shape": [4, 4, 4], "vae_fingerprint": vae.fingerprint}
    save_run_config(wd, run, derived)
    os.makedirs(os.path.join(wd, "checkpoints", "2"))
    check_same_run(wd, run, derived)  # the same VAE: fine
    save_file(changed, str(swapped / "diffusion_pytorch_model.safetensors"))
    new = load_autoencoder_dir(str(swapped))
    with pytest.raises(RunError, match="holds another VAE than the one this run was trained with"):
        check_same_run(wd, run, {**derived, "vae_fingerprint": new.fingerprint})
    with pytest.raises(PretrainedError, match="holds another VAE"):
        load_autoencoder_dir(str(swapped), vae.fingerprint)  # what sample.py does with the run's record


def test_latent_setup_records_the_vae_fingerprint(tmp_path):
    from jdiff.pretrained.autoencoder import load_autoencoder_dir
    from jdiff.training.setup import setup

    config = make_tiny_config(tmp_path / "run", **{"data.vae": VAE_DIR, "data.channels": 3})
    s = setup(config, jax.devices()[:1])
    assert s.derived()["vae_fingerprint"] == load_autoencoder_dir(VAE_DIR).fingerprint


def test_mesh_hint_names_each_alternative_once():
    """Resuming a data=2,fsdp=4 run on one device: the hint names --run.mesh none, without repeating itself."""
    from jdiff.run.mesh import mesh_shape

    with pytest.raises(ConfigError) as e:
        mesh_shape("data=2,fsdp=4", 1)
    msg = str(e.value)
    assert "--run.mesh none" in msg and msg.count("--run.mesh") == 1, msg
    with pytest.raises(ConfigError) as e:
        mesh_shape("data=3", 4)
    msg = str(e.value)
    assert "--run.mesh data=4,fsdp=1 or --run.mesh data=1,fsdp=4" in msg and msg.count("--run.mesh") == 3, msg
