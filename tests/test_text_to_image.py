"""Stable Diffusion 1.x / 2.x in jdiff: the cross-attention U-Net, the CLIP text encoder and tokenizer, loading a
StableDiffusionPipeline directory and text_to_image, against diffusers' and transformers' own outputs.

Fixtures (tests/fixtures/make_sd_fixtures.py, run with torch + diffusers + transformers) are tiny random-weight
pipelines: sd_tiny (SD 1.x options, the published directories' layout) and sd2_tiny (SD 2.x options: linear
projections, a head count per level, v-prediction, gelu CLIP, pad token '!', clip_skip 1; transformers 5's
layout); both with the published SD schedulers' DDIM settings (steps_offset 1, set_alpha_to_one false), run by
StableDiffusionPipeline unchanged. Weights are stored in float16 and upcast. Tolerance float32: states and UNet
outputs measured within ~1.1e-6 of values ~1-2.5; the 10-step txt2img latents (|x| up to ~30 with a random UNet
at guidance 7.5) within 1.2e-6 of their scale (3.6e-5 at 30.5), the decoded images within 5e-6.
"""

import json
import shutil
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff.models.clip import CLIP_VIT_L, OPENCLIP_H, CLIPText
from jdiff.models.stats import tree_size
from jdiff.models.unet_cond import SD15, SD21, UNetCond
from jdiff.pretrained import PretrainedError, PromptTruncatedWarning, load, save, text_to_image
from jdiff.pretrained.files import PretrainedUsageError
from jdiff.pretrained.txt2img import _txt2img, grid_options

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "pretrained"
NAMES = ["sd_tiny", "sd2_tiny"]


class Loaded(dict):
    """Each fixture pipeline loaded once per module, when a test first asks for it."""

    def __missing__(self, name):
        self[name] = load(FIX / name)
        return self[name]


@pytest.fixture(scope="module")
def loaded():
    return Loaded()


def fixture_data(name):
    return np.load(FIX / name / "outputs.npz"), json.loads((FIX / name / "prompts.json").read_text())


def close(out, ref, atol=2e-6):
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("name", NAMES)
def test_tokenizer_matches_transformers_and_warns_once_on_truncation(loaded, name):
    d, prompts = fixture_data(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = loaded[name].tokenizer(prompts["prompts"])
    np.testing.assert_array_equal(ids, d["prompts_ids"])  # the last prompt is longer than the 16-token context
    truncated = [w for w in caught if issubclass(w.category, PromptTruncatedWarning)]
    assert len(truncated) == 1 and "mars" in str(truncated[0].message)


@pytest.mark.parametrize("name", NAMES)
def test_text_encoder_matches_transformers_last_and_penultimate(loaded, name):
    d, _ = fixture_data(name)
    te = loaded[name].text_encoder
    apply = jax.jit(te.module.apply, static_argnames="skip")
    close(apply({"params": te.params}, d["prompts_ids"]), d["text_last"])
    close(apply({"params": te.params}, d["prompts_ids"], skip=1), d["text_penultimate"])
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(te.params))  # float16 weights upcast


@pytest.mark.parametrize("name", NAMES)
def test_unet_cond_forward_matches_diffusers(loaded, name):
    d, _ = fixture_data(name)
    p = loaded[name]
    out = jax.jit(p.model.apply)({"params": p.params}, d["unet_x"], d["unet_t"], d["unet_context"])
    close(out, d["unet_out"])
    assert p.kind == "unet_cond" and p.guidance == 7.5 and p.sample_shape == (8, 8, 4)
    if name == "sd2_tiny":
        assert p.model.heads == (2, 4) and p.prediction == "v" and p.config["use_linear_projection"]
    else:
        assert p.model.heads == 2 and p.prediction == "eps"


@pytest.mark.parametrize("name", NAMES)
def test_txt2img_matches_stable_diffusion_pipeline(loaded, name):
    """10 DDIM steps, guidance 7.5, negative prompts ("blurry" and ""), the same start latents: latents and
    decoded images equal diffusers' StableDiffusionPipeline; a new guidance scale does not recompile."""
    d, prompts = fixture_data(name)
    kw = dict(negative_prompts=prompts["negative"], num_steps=10, rng=jax.random.key(0), x_init=d["x_T"])
    kw.update(clip_skip=int(d["clip_skip"]))
    images, latents = text_to_image(loaded[name], prompts["txt2img"], guidance_scale=7.5, return_latents=True, **kw)
    close(latents, d["latents"], atol=1e-6 * np.abs(d["latents"]).max())
    close(images, d["images"], atol=2e-5)
    compiled = _txt2img._cache_size()
    other = text_to_image(loaded[name], prompts["txt2img"], guidance_scale=3.0, **kw)
    assert _txt2img._cache_size() == compiled
    assert np.abs(np.asarray(other) - np.asarray(images)).max() > 1e-2


def test_grid_options_are_what_stable_diffusion_pipeline_runs():
    """steps_offset 1 on leading (StableDiffusionPipeline's rewrite); DDIM's last step goes to alphas_cumprod[0]
    with set_alpha_to_one false, and also with true when T // N == 1 (DDIMScheduler.step from timestep 1 to
    1 - 1 = 0: checked with diffusers 0.42.1, 600 of 1000 steps ends at alphas_cumprod[0], 10 steps at 1)."""
    published, default = {"set_alpha_to_one": False}, {}
    assert grid_options(published, "ddim", "leading", 10, 1000) == (1, "first")
    assert grid_options(default, "ddim", "leading", 10, 1000) == (1, "clean")
    assert grid_options(default, "ddim", "leading", 600, 1000) == (1, "first")
    assert grid_options(default, "ddim", "leading", 500, 1000) == (1, "clean")
    assert grid_options(published, "ddim", "trailing", 10, 1000) == (0, "first")
    assert grid_options(published, "euler", "leading", 10, 1000) == (1, "clean")  # only DDIM reads it


def test_negative_prompts_default_to_the_empty_prompt(loaded):
    d, prompts = fixture_data("sd_tiny")
    kw = dict(num_steps=10, rng=jax.random.key(0), x_init=d["x_T"], guidance_scale=7.5)
    none = text_to_image(loaded["sd_tiny"], prompts["txt2img"], **kw)
    empty = text_to_image(loaded["sd_tiny"], prompts["txt2img"], negative_prompts="", **kw)
    np.testing.assert_array_equal(np.asarray(none), np.asarray(empty))
    blurry = text_to_image(loaded["sd_tiny"], prompts["txt2img"], negative_prompts="blurry", **kw)
    assert np.abs(np.asarray(blurry) - np.asarray(none)).max() > 1e-3
    # guidance <= 1: StableDiffusionPipeline runs the prompts alone; the negative prompt then changes nothing
    kw["guidance_scale"] = 0.5
    low = [text_to_image(loaded["sd_tiny"], prompts["txt2img"], negative_prompts=n, **kw) for n in ("", "blurry")]
    np.testing.assert_array_equal(np.asarray(low[0]), np.asarray(low[1]))


def test_published_configs_have_diffusers_parameter_counts():
    """SD 1.5 / 2.1 UNets and their text encoders (CLIP ViT-L/14, OpenCLIP ViT-H/14 with 23 layers), abstract
    init: the counts of diffusers' UNet2DConditionModel and transformers' CLIPTextModel built from the published
    config.json files on the meta device (diffusers 0.42.1, transformers 5.24.0)."""
    for cfg, hw, want in [(SD15, 64, 859_520_964), (SD21, 96, 865_910_724)]:
        m = UNetCond(**cfg)
        x, t, ctx = jnp.zeros((1, hw, hw, 4)), jnp.zeros((1,)), jnp.zeros((1, 77, cfg["context_dim"]))
        assert tree_size(jax.eval_shape(lambda: m.init(jax.random.key(0), x, t, ctx))) == want
    for cfg, want in [(CLIP_VIT_L, 123_060_480), (OPENCLIP_H, 340_387_840)]:
        m = CLIPText(**cfg)
        ids = jnp.zeros((1, 77), jnp.int32)
        assert tree_size(jax.eval_shape(lambda: m.init(jax.random.key(0), ids))) == want


# ---------------------------------------------------------------------------------------------------------------
# What jdiff cannot run: one line each


def one_line(fn, *match, cls=PretrainedError):
    with pytest.raises(cls) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and all(m in msg for m in match), msg


@pytest.fixture
def sd_dir(tmp_path):
    d = tmp_path / "sd"
    shutil.copytree(FIX / "sd_tiny", d)
    return d


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_sdxl_controlnet_and_lora_are_refused(sd_dir):
    unet_config = json.loads((sd_dir / "unet" / "config.json").read_text())
    edit_json(sd_dir / "model_index.json", text_encoder_2=["transformers", "CLIPTextModelWithProjection"])
    one_line(lambda: load(sd_dir), "text_encoder_2", "SDXL")
    edit_json(sd_dir / "model_index.json", text_encoder_2=[None, None], controlnet=["diffusers", "ControlNetModel"])
    one_line(lambda: load(sd_dir), "controlnet", "ControlNet")
    edit_json(sd_dir / "model_index.json", controlnet=[None, None])
    edit_json(sd_dir / "unet" / "config.json", addition_embed_type="text_time", addition_time_embed_dim=256)
    one_line(lambda: load(sd_dir), "addition_embed_type", "SDXL")
    (sd_dir / "unet" / "config.json").write_text(json.dumps(unet_config))
    edit_json(sd_dir / "unet" / "config.json", only_cross_attention=True)
    one_line(lambda: load(sd_dir), "only_cross_attention")
    (sd_dir / "unet" / "config.json").write_text(json.dumps(unet_config))
    (sd_dir / "pytorch_lora_weights.safetensors").write_bytes(b"")
    one_line(lambda: load(sd_dir), "LoRA")


def test_missing_tokenizer_files_and_text_encoder(sd_dir):
    (sd_dir / "tokenizer" / "merges.txt").unlink()
    one_line(lambda: load(sd_dir), "merges.txt", "tokenizer.json")
    shutil.rmtree(sd_dir / "tokenizer")
    one_line(lambda: load(sd_dir), "tokenizer directory", "not found")
    edit_json(sd_dir / "model_index.json", tokenizer=[None, None])
    one_line(lambda: load(sd_dir), "names no", "tokenizer")


def test_sharded_text_encoder_reads_like_one_file(loaded, sd_dir):
    from safetensors.numpy import load_file, save_file

    te = sd_dir / "text_encoder"
    tensors = load_file(te / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, te / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (te / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (te / "model.safetensors").unlink()
    from jdiff.pretrained.text import load_text_encoder

    got = load_text_encoder(te)
    jax.tree.map(np.testing.assert_array_equal, got.params, loaded["sd_tiny"].text_encoder.params)


def test_missing_tokenizers_package_names_the_extra(sd_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import fails as if not installed
    one_line(lambda: load(sd_dir), "jdiff[text]")


def test_text_to_image_usage_errors(loaded):
    p = loaded["sd_tiny"]
    key = jax.random.key(0)
    one_line(
        lambda: text_to_image(p, ["a", "b"], negative_prompts=["x"] * 3, rng=key), "negative_prompts", cls=ValueError
    )
    one_line(lambda: text_to_image(p, [], rng=key), "prompts", cls=ValueError)
    one_line(lambda: text_to_image(p, "a", guidance_scale=float("nan"), rng=key), "guidance_scale", cls=ValueError)
    one_line(lambda: text_to_image(p, "a", clip_skip=2, rng=key), "clip_skip", cls=ValueError)
    one_line(lambda: text_to_image(p, "a", x_init=np.zeros((2, 8, 8, 4)), rng=key), "x_init", cls=ValueError)
    one_line(lambda: text_to_image(p, "a", sampler="nope", rng=key), "nope", cls=ValueError)
    ddpm = load(FIX / "ddpm_unet")
    one_line(lambda: text_to_image(ddpm, "a cat", rng=key), "text-to-image pipeline", cls=PretrainedUsageError)


# ---------------------------------------------------------------------------------------------------------------
# sample.py --pretrained SD_PIPELINE --prompt ...


def test_sample_py_text_to_image_writes_what_text_to_image_computes(loaded, tmp_path):
    from jdiff.cli import sample as sample_cli

    d, prompts = fixture_data("sd_tiny")
    out = tmp_path / "out"
    argv = ["--pretrained", str(FIX / "sd_tiny"), "--prompt", prompts["txt2img"][0], "--prompt", prompts["txt2img"][1]]
    argv += ["--negative-prompt", "blurry", "--steps", "10", "--guidance", "5", "--out", str(out), "--no-cache"]
    assert sample_cli.main(argv) == 0
    npz = np.load(out / "ddim_10steps_seed0_g5.npz")
    want = text_to_image(
        loaded["sd_tiny"],
        prompts["txt2img"],
        negative_prompts="blurry",
        num_steps=10,
        guidance_scale=5.0,
        rng=jax.random.fold_in(jax.random.key(0), 0),
    )
    np.testing.assert_array_equal(npz["images"], np.asarray(want))
    assert list(npz["prompts"]) == prompts["txt2img"] and (out / "ddim_10steps_seed0_g5.png").is_file()


def test_sample_py_text_flags_usage_errors(tmp_path, capsys):
    from jdiff.cli import sample as sample_cli

    prompts_file = tmp_path / "empty.txt"
    prompts_file.write_text("\n  \n")
    sd = ["--pretrained", str(FIX / "sd_tiny")]
    for argv, words in [
        (["--pretrained", str(FIX / "ddpm_unet"), "--prompt", "a cat"], "--prompt applies to text-to-image"),
        (sd, "give --prompt TEXT or --prompts-file FILE"),
        ([*sd, "--prompt", "a", "--labels", "1"], "--labels does not apply"),
        ([*sd, "--prompts-file", str(prompts_file)], "holds no prompt"),
        ([*sd, "--prompts-file", str(tmp_path / "missing.txt")], "cannot be read"),
    ]:
        with pytest.raises(SystemExit) as e:
            sample_cli.main([*argv, "--steps", "1", "--out", str(tmp_path / "out"), "--no-cache"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and words in err and err.count("\n") == 1, err


# ---------------------------------------------------------------------------------------------------------------
# Export


def export(p, name, out):
    save(
        out,
        p.model,
        p.params,
        sample_shape=p.sample_shape,
        schedule=p.schedule,
        prediction=p.prediction,
        vae_dir=FIX / name / "vae",
        text_encoder=p.text_encoder,
        tokenizer_dir=FIX / name / "tokenizer",
        linear_projection=p.config["use_linear_projection"],
    )
    return out


@pytest.mark.parametrize("name", NAMES)
def test_export_then_load_is_exact(loaded, name, tmp_path):
    p = loaded[name]
    q = load(export(p, name, tmp_path / "out"))
    assert (q.model, q.prediction, q.sample_shape, q.text_encoder.module) == (
        p.model,
        p.prediction,
        p.sample_shape,
        p.text_encoder.module,
    )
    for a, b in [(p.params, q.params), (p.text_encoder.params, q.text_encoder.params), (p.vae.params, q.vae.params)]:
        jax.tree.map(np.testing.assert_array_equal, a, b)
    np.testing.assert_array_equal(np.asarray(q.schedule.betas), np.asarray(p.schedule.betas))
    _, prompts = fixture_data(name)
    np.testing.assert_array_equal(q.tokenizer(prompts["prompts"][:4]), p.tokenizer(prompts["prompts"][:4]))
    one_line(
        lambda: save(tmp_path / "x", p.model, p.params, sample_shape=(8, 8, 4), schedule=p.schedule), "text_encoder="
    )


def test_export_runs_in_stable_diffusion_pipeline(loaded, tmp_path):
    """diffusers' StableDiffusionPipeline loads the export of sd2_tiny and reproduces the fixture's txt2img."""
    torch = pytest.importorskip("torch", reason="needs the [bench] extra (torch + diffusers + transformers)")
    diffusers = pytest.importorskip("diffusers", reason="needs the [bench] extra (torch + diffusers + transformers)")
    d, prompts = fixture_data("sd2_tiny")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(export(loaded["sd2_tiny"], "sd2_tiny", tmp_path / "o"))
    object.__setattr__(pipe.text_encoder, "text_model", pipe.text_encoder)  # diffusers' clip_skip on transformers 5
    with torch.no_grad():
        latents = pipe(
            prompt=prompts["txt2img"],
            negative_prompt=prompts["negative"],
            num_inference_steps=10,
            guidance_scale=7.5,
            latents=torch.from_numpy(d["x_T"].transpose(0, 3, 1, 2).copy()),
            output_type="latent",
            clip_skip=1,
        ).images
    close(latents.numpy().transpose(0, 2, 3, 1), d["latents"], atol=1e-6 * np.abs(d["latents"]).max())


def test_pndm_txt2img_matches_stable_diffusion_pipeline_with_its_default_scheduler(loaded):
    """SD 1.5's default scheduler, PNDMScheduler(skip_prk_steps=True): jdiff's `pndm` in text_to_image equals
    StableDiffusionPipeline with it (sd_tiny, 7 steps, guidance 7.5, the fixture's start latents)."""
    torch = pytest.importorskip("torch", reason="needs the [bench] extra (torch + diffusers + transformers)")
    diffusers = pytest.importorskip("diffusers", reason="needs the [bench] extra (torch + diffusers + transformers)")
    d, prompts = fixture_data("sd_tiny")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        FIX / "sd_tiny", safety_checker=None, torch_dtype=torch.float32
    )
    pipe.scheduler = diffusers.PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    with torch.no_grad():
        theirs = pipe(
            prompt=prompts["txt2img"],
            num_inference_steps=7,
            guidance_scale=7.5,
            latents=torch.from_numpy(d["x_T"].transpose(0, 3, 1, 2).copy()),
            output_type="latent",
        ).images.numpy()
    _, ours = text_to_image(
        loaded["sd_tiny"],
        prompts["txt2img"],
        sampler="pndm",
        num_steps=7,
        rng=jax.random.key(0),
        x_init=d["x_T"],
        return_latents=True,
    )
    close(ours, theirs.transpose(0, 2, 3, 1), atol=1e-6 * np.abs(theirs).max())
