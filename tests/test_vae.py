"""The Flax AutoencoderKL (jdiff.models.vae) against diffusers' fixtures, its weight mapping and errors
(jdiff.pretrained.autoencoder), and latent-space training/sampling. Fixtures: tests/fixtures/pretrained/,
written by tests/fixtures/make_pretrained_fixtures.py (torch + diffusers); no torch here."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff.pretrained.autoencoder import load_autoencoder, load_autoencoder_dir, to_diffusers
from jdiff.pretrained.files import PretrainedError, read_model_dir

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "pretrained")
VAE_DIR = os.path.join(FIXTURES, "vae")
# float32 tolerance: both sides compute in float32; diffusers' and XLA's conv/GroupNorm summation orders differ
# (observed max abs difference ~2e-6 on outputs of magnitude ~4; ~1.3e-6 for the 10-step latent sample with
# guidance 4 then the decoder, whose images differ by 0.13 with the other DiT timestep convention).
ATOL, RTOL = 2e-5, 1e-5


@pytest.fixture(scope="module")
def tiny():
    config, tensors = read_model_dir(VAE_DIR)
    return config, tensors, load_autoencoder(config, tensors), np.load(os.path.join(VAE_DIR, "outputs.npz"))


def test_encode_matches_diffusers(tiny):
    *_, vae, ref = tiny
    mean, logvar = vae.encode(jnp.asarray(ref["image"]))
    np.testing.assert_allclose(mean, ref["mean"], atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(logvar, ref["logvar"], atol=ATOL, rtol=RTOL)


def test_decode_matches_diffusers(tiny):
    *_, vae, ref = tiny
    np.testing.assert_allclose(vae.decode(jnp.asarray(ref["z"])), ref["decoded"], atol=ATOL, rtol=RTOL)


def test_latent_scaling(tiny):
    config, _, vae, ref = tiny
    assert vae.scaling_factor == config["scaling_factor"] == 0.18215 and vae.shift_factor is None
    z, x = jnp.asarray(ref["z"]), jnp.asarray(ref["image"])
    decode_latents, encode_latents = jax.jit(vae.decode_latents), jax.jit(vae.encode_latents)
    np.testing.assert_allclose(decode_latents(vae.params, z * vae.scaling_factor), vae.decode(z), atol=1e-5)
    mean, logvar = vae.encode(x)
    np.testing.assert_allclose(encode_latents(vae.params, x, None), mean * vae.scaling_factor, atol=1e-6)
    key = jax.random.key(3)
    eps = jax.random.normal(key, mean.shape)
    np.testing.assert_allclose(
        encode_latents(vae.params, x, key), (mean + jnp.exp(0.5 * logvar) * eps) * vae.scaling_factor, atol=1e-5
    )
    assert vae.latent_shape((16, 16, 3)) == (8, 8, 4)


def test_old_attention_names_and_export_round_trip(tiny):
    config, tensors, vae, _ = tiny
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for k, v in tensors.items():
        for new, o in old.items():
            k = k.replace(f".{new}.", f".{o}.")
        renamed[k] = v
    assert any(".proj_attn." in k for k in renamed)
    same = load_autoencoder(config, renamed)
    jax.tree.map(np.testing.assert_array_equal, same.params, vae.params)
    back = to_diffusers(vae.params)
    assert sorted(back) == sorted(tensors)
    for k in tensors:
        np.testing.assert_array_equal(back[k], tensors[k])


def test_every_tensor_checked(tiny):
    config, tensors, *_ = tiny
    missing = dict(tensors)
    del missing["decoder.mid_block.attentions.0.to_k.bias"]
    with pytest.raises(PretrainedError, match=r"'decoder\.mid_block\.attentions\.0\.to_k\.bias' missing"):
        load_autoencoder(config, missing)
    with pytest.raises(PretrainedError, match=r"'encoder\.extra\.weight' is not part .*unexpected"):
        load_autoencoder(config, {**tensors, "encoder.extra.weight": np.zeros(3, np.float32)})
    bad = dict(tensors)
    bad["encoder.conv_in.weight"] = np.zeros((8, 3, 5, 5), np.float32)
    with pytest.raises(PretrainedError, match=r"'encoder\.conv_in\.weight' has shape \(8, 3, 5, 5\).*\(8, 3, 3, 3\)"):
        load_autoencoder(config, bad)
    dup = {
        **tensors,
        "encoder.mid_block.attentions.0.query.weight": tensors["encoder.mid_block.attentions.0.to_q.weight"],
    }
    with pytest.raises(PretrainedError, match="both give"):
        load_autoencoder(config, dup)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}, "down_block_types.*allowed: Down"),
        ({"up_block_types": ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]}, "up_block_types.*allowed: Up"),
        ({"act_fn": "gelu"}, "act_fn 'gelu' not supported; allowed: silu"),
        ({"norm_type": "spatial"}, r"key\(s\) \['norm_type'\] not supported"),
        ({"latents_mean": [0.0] * 4}, r"\['latents_mean'\] not supported"),
        ({"_class_name": "AutoencoderTiny"}, "_class_name 'AutoencoderTiny' not supported"),
        ({"scaling_factor": 0}, "scaling_factor must be a non-zero number"),
    ],
)
def test_unsupported_config(tiny, change, message):
    config, tensors, *_ = tiny
    with pytest.raises(PretrainedError, match=message):
        load_autoencoder({**config, **change}, tensors)


def test_latent_pipeline_ddim_sample_matches_diffusers():
    """DiT pipeline with a VAE (dit_pipeline/, diffusers' timestep convention): jdiff.sample's 10-step DDIM
    (leading spacing, eta 0, CFG 4 with the null label) from diffusers' x_T, decoded by the pipeline's VAE with
    Generator's decode hook (latents / scaling_factor), equals diffusers' DiTPipeline loop."""
    import jdiff
    from jdiff.pretrained import load

    ref = np.load(os.path.join(FIXTURES, "dit_latent", "outputs.npz"))
    p = load(os.path.join(FIXTURES, "dit_pipeline"), timestep_convention="diffusers")
    assert p.vae is not None and p.sample_shape == (4, 4, 4) and p.vae.scaling_factor == 0.18215
    x_t = jnp.asarray(ref["x_T"])
    labels = jnp.asarray(ref["labels"])

    @jax.jit
    def run(params, vae_params, x_t, labels):
        z = jdiff.sample(
            p.model.apply,
            p.schedule,
            x_t.shape,
            jax.random.key(0),  # unused: DDIM with eta 0 from x_init draws nothing
            params={"params": params},
            sampler="ddim",
            num_steps=int(ref["steps"]),
            spacing="leading",
            prediction=p.prediction,
            labels=labels,
            guidance_scale=float(ref["guidance"]),
            null_label=p.num_classes,
            x_init=x_t,
        )
        return jnp.clip(p.vae.decode_latents(vae_params, z), -1.0, 1.0)

    images = run(p.params, p.vae.params, x_t, labels)
    assert images.shape == ref["images"].shape == (2, 8, 8, 3)
    np.testing.assert_allclose(images, ref["images"], atol=ATOL, rtol=RTOL)


def test_sd_config_has_diffusers_parameter_count():
    """The "sd" config (sd-vae-ft-ema / -mse) has diffusers' 83,653,863 parameters in 248 tensors, and encodes
    256x256x3 images to 32x32x4 latents."""
    from jdiff.models import tree_size
    from jdiff.models.vae import get_vae

    vae = get_vae("sd")
    shapes = jax.eval_shape(vae.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))
    assert tree_size(shapes["params"]) == 83_653_863 and len(jax.tree.leaves(shapes)) == 248
    x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    mean, _ = jax.eval_shape(lambda p, x: vae.apply({"params": p}, x, method="encode"), shapes["params"], x)
    assert mean.shape == (1, 32, 32, 4)
    with pytest.raises(ValueError, match="unknown VAE config 'xl'; allowed: sd, tiny"):
        get_vae("xl")


def test_generator_decode_hook():
    """Generator(decode=...): images = clip(decode(latents)) of the same draw without the hook, trajectory frames
    decoded too, output_shape the decoded shape; x0 is not clipped in latent space."""
    import jdiff
    from jdiff.models import get_model
    from jdiff.run import Generator, Settings

    model = get_model("unet_tiny")
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)))["params"]
    schedule = jdiff.get_schedule("linear", 100)

    def decode(dp, z):  # (B, 8, 8, 1) -> (B, 16, 16, 3), unbounded
        return 3.0 * dp["scale"] * jnp.repeat(jnp.repeat(z, 2, 1), 2, 2)[..., [0, 0, 0]]

    common = dict(image_shape=(8, 8, 1), num_classes=None, prediction="eps", batch=2, devices=jax.devices()[:1])
    gen = Generator(
        model, schedule, Settings(steps=3, trajectory_every=1), decode=decode, decode_params={"scale": 1.0}, **common
    )
    assert gen.output_shape == (16, 16, 3)
    x, traj = gen(params, 0, None)
    raw, raw_traj = Generator(model, schedule, Settings(steps=3, clip=False, trajectory_every=1), **common)(
        params, 0, None
    )
    assert x.shape == (2, 16, 16, 3) and traj.shape == (4, 2, 16, 16, 3)
    np.testing.assert_allclose(x, np.clip(decode({"scale": 1.0}, raw), -1, 1), atol=1e-6)
    np.testing.assert_allclose(traj[-1], x, atol=1e-6)
    np.testing.assert_allclose(traj[0], np.clip(decode({"scale": 1.0}, raw_traj[0]), -1, 1), atol=1e-6)


def test_load_dir_missing():
    with pytest.raises(PretrainedError, match="not found"):
        load_autoencoder_dir(os.path.join(FIXTURES, "no_such_vae"))


@pytest.mark.slow
def test_train_vae_previews_decode_resumes_and_sample_py_decodes(tmp_path):
    """train.py --vae (as `train(config)` on one device): a step on latents and a decoded preview grid; the
    workdir resumes as a latent run (its saved config, the VAE's latent shape, checkpoint 1 restored) whose
    batches are scaling_factor x (mean + std eps) of the pixel batch with the documented key; sample.py on the
    workdir decodes through the run's VAE."""
    from conftest import make_tiny_config
    from PIL import Image

    from jdiff.cli import sample as sample_cli
    from jdiff.cli.train import parse_args, resolve_config
    from jdiff.config import apply_overrides
    from jdiff.data import batch_at
    from jdiff.run import Checkpointer
    from jdiff.training import train
    from jdiff.training.setup import VAE_SEED_SALT, setup

    _, overrides = parse_args(["--data.vae", VAE_DIR, "--data.channels", "3"])  # the train.py flag
    wd = str(tmp_path / "run")
    config = apply_overrides(make_tiny_config(wd, **{"optim.steps": 1, "sampling.num_samples": 4}), overrides)
    assert config.data.vae == VAE_DIR
    devices = jax.devices()[:1]
    done = train(config, devices=devices, progress=False, log=lambda s: None)
    assert done.step == 1 and done.last_checkpoint == 1
    # 4 decoded 8x8 images (not 4x4 latents), upscale 4, one pixel of padding: 4 * 33 + 1 wide
    assert Image.open(done.sample_path).size == (133, 34)
    resumed, was_resumed = resolve_config(None, [("run.workdir", wd), ("optim.steps", "2")])
    assert was_resumed and resumed.data.vae == VAE_DIR and resumed.optim.steps == 2
    s = setup(resumed, devices)
    assert s.image_shape == (4, 4, 4) and s.derived()["decoded_shape"] == [8, 8, 3]
    with Checkpointer(wd, create=False) as ck:
        assert int(s.restore_or_init(ck).step) == 1
    with s.batches(1, 1) as it:
        got = next(it)
    pixels = batch_at(s.source, 1, global_batch_size=8, seed=config.run.seed)
    mean, logvar = s.vae.encode(jnp.asarray(pixels["image"]))
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.run.seed), VAE_SEED_SALT), 1)
    want = (mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)) * 0.18215
    np.testing.assert_allclose(np.asarray(got["image"]), want, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got["label"]), pixels["label"])
    out = str(tmp_path / "out")
    assert sample_cli.main(["--workdir", wd, "--num", "3", "--steps", "2", "--no-cache", "--out", out]) == 0
    (npz,) = [f for f in os.listdir(out) if f.endswith(".npz")]
    images = np.load(os.path.join(out, npz))["images"]
    assert images.shape == (3, 8, 8, 3) and np.isfinite(images).all() and np.abs(images).max() <= 1.0
