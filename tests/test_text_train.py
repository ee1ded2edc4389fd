"""Training and sampling text-conditioned models: captions, the learned tokenizer, caption dropout, TextUNet, a
frozen pretrained text encoder, sample.py --prompt on a text run, export to a StableDiffusionPipeline directory."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("tokenizers")

FIX = Path(__file__).parent / "fixtures" / "pretrained"
TEXT_TINY = {
    "block_out_channels": [16, 32],
    "heads": 2,
    "norm_groups": 4,
    "text_hidden": 32,
    "text_heads": 2,
    "text_intermediate": 64,
    "max_length": 12,
}


def text_config(workdir, **overrides):
    from conftest import make_tiny_config

    base = {"model.name": "unet_text_small", "model.fields": dict(TEXT_TINY), "data.captions": "digits"}
    return make_tiny_config(workdir, **{**base, **overrides})


# ---------------------------------------------------------------------------------------------------------------
# Captions and tokenizer


def test_digit_captions_name_the_digit_and_held_out_templates_use_only_training_words():
    from jdiff.data.captions import DIGIT_TEMPLATES, DIGIT_WORDS, HELD_OUT_TEMPLATES, digit_caption

    assert digit_caption(7, 0) == "a handwritten seven" and digit_caption(3, 1) == "the digit three"
    assert digit_caption(7, len(DIGIT_TEMPLATES)) == digit_caption(7, 0)
    train_words = {w for t in DIGIT_TEMPLATES for w in t.format("").split()} | set(DIGIT_WORDS)
    train_sentences = {t.format(w) for t in DIGIT_TEMPLATES for w in DIGIT_WORDS}
    for t in HELD_OUT_TEMPLATES:
        assert set(t.format("").split()) <= train_words  # no unknown word: only the sentence is new
        assert not {t.format(w) for w in DIGIT_WORDS} & train_sentences


def test_folder_captions_from_metadata_jsonl_and_txt_files(tmp_path):
    from PIL import Image

    from jdiff.data import make_source
    from jdiff.data.captions import caption_fn

    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name)
    (tmp_path / "a.txt").write_text("a  red\nsquare\n")
    src = make_source(str(tmp_path), image_size=8)
    with pytest.raises(ValueError, match="b.png has no caption: add b.txt"):
        caption_fn(src, "folder")
    (tmp_path / "b.txt").write_text("a blue one")
    assert caption_fn(src, "folder")(np.array([1, 0])) == ["a blue one", "a red square"]
    lines = [{"file_name": "a.png", "text": "first"}, {"file_name": "b.png", "text": "second"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    assert caption_fn(src, "folder")(np.array([0, 1])) == ["first", "second"]  # metadata.jsonl wins
    (tmp_path / "metadata.jsonl").write_text(json.dumps(lines[0]) + "\nnot json\n")
    with pytest.raises(ValueError, match="line 2: expected a JSON object"):
        caption_fn(src, "folder")
    with pytest.raises(ValueError, match="need the embedded digits"):
        caption_fn(src, "digits")


def test_learned_tokenizer_round_trips_through_its_files(tmp_path):
    from jdiff.pretrained.text import load_tokenizer, train_tokenizer

    captions = ["a handwritten seven", "the digit four", "a picture of the number nine"]
    tok = train_tokenizer(captions, 12)
    ids = tok(["a handwritten four", "", "zebra seven"])
    assert ids.shape == (3, 12) and ids.dtype == np.int32
    assert list(ids[0, :5]) == [tok.bos_id, *ids[0, 1:4], tok.eos_id] and len(set(ids[0, 1:4])) == 3  # words whole
    assert list(ids[1, :2]) == [tok.bos_id, tok.eos_id] and (ids[1, 2:] == tok.pad_id).all()
    assert ids.max() < tok.vocab_size
    tok.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok", 12)
    np.testing.assert_array_equal(again(["a handwritten four", "", "zebra seven"]), ids)
    assert again.vocab_size == tok.vocab_size and again.max_length == 12


def test_learned_tokenizer_files_load_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from jdiff.pretrained.text import train_tokenizer

    tok = train_tokenizer(["a handwritten seven", "the digit four"], 12)
    tok.save(tmp_path / "tok")
    theirs = transformers.CLIPTokenizer.from_pretrained(tmp_path / "tok")
    prompt = "The digit  SEVEN, handwritten"
    want = theirs(prompt, padding="max_length", max_length=12, truncation=True).input_ids
    assert tok([prompt])[0].tolist() == want


# ---------------------------------------------------------------------------------------------------------------
# Model and guidance


def test_caption_dropout_replaces_whole_rows_by_the_empty_caption():
    from jdiff.models import drop_labels

    tokens = jnp.arange(4000 * 6, dtype=jnp.int32).reshape(4000, 6) + 10
    null = jnp.array([0, 1, 1, 1, 1, 1], jnp.int32)
    out = drop_labels(jax.random.key(0), tokens, 0.25, null)
    dropped = (out == null).all(1)
    kept = (out == tokens).all(1)
    assert bool((dropped | kept).all()) and abs(float(dropped.mean()) - 0.25) < 0.03
    assert drop_labels(jax.random.key(0), tokens, 0.0, null) is tokens


def test_text_unet_is_the_unet_on_the_text_encoders_states_and_freezing_stops_its_gradients():
    from jdiff.models import CLIPText, UNetCond, get_model

    model = get_model(
        "unet_text_small", vocab_size=50, **{k: tuple(v) if isinstance(v, list) else v for k, v in TEXT_TINY.items()}
    )
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    t = jnp.array([3.0, 700.0])
    ids = jax.random.randint(jax.random.key(2), (2, 12), 0, 50)
    params = model.init(jax.random.key(0), x, t, ids)["params"]
    assert set(params) == {"text_encoder", "unet"}
    params = jax.tree.map(lambda a: a + 0.05, params)  # conv_out starts at zero, which stops every gradient
    states = CLIPText(**model.text_fields()).apply({"params": params["text_encoder"]}, ids)
    want = UNetCond(**model.unet_fields()).apply({"params": params["unet"]}, x, t, states)
    np.testing.assert_array_equal(model.apply({"params": params}, x, t, ids), want)
    loss = lambda m, p: jnp.sum(m.apply({"params": p}, x, t, ids) ** 2)
    free = jax.grad(lambda p: loss(model, p))(params)
    frozen = jax.grad(lambda p: loss(model.clone(freeze_text=True), p))(params)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(free["text_encoder"])) > 0
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(frozen["text_encoder"]))
    jax.tree.map(np.testing.assert_array_equal, frozen["unet"], free["unet"])
    with pytest.raises(ValueError, match="needs token ids"):
        model.apply({"params": params}, x, t)


def test_sd15_shaped_text_unet_has_the_published_parameter_counts():
    from jdiff.models import count_params, get_model

    # diffusers' UNet2DConditionModel of SD 1.5 + transformers' CLIPTextModel of CLIP ViT-L/14
    assert count_params(get_model("unet_text_sd15"), (1, 64, 64, 4)) == 859_520_964 + 123_060_480


def test_guidance_with_token_conditions_is_uncond_plus_w_times_the_difference():
    from jdiff.sampling.denoiser import Guidance, make_denoiser

    def model_fn(x, t, y):  # a "model" whose output depends on the whole token row
        return x * (1.0 + y.sum(-1).astype(jnp.float32))[:, None, None, None] / 10

    x = jax.random.normal(jax.random.key(0), (3, 4, 4, 1))
    tokens = jnp.array([[0, 5, 1], [0, 7, 1], [0, 2, 1]], jnp.int32)
    null = jnp.array([0, 1, 1], jnp.int32)
    w = 3.0
    g = Guidance(labels=tokens, null_label=null, scale=jnp.float32(w))
    alpha, sigma = jnp.float32(0.6), jnp.float32(0.8)
    out = make_denoiser(model_fn, None, prediction="eps", guidance=g)(x, jnp.float32(10), alpha, sigma)
    cond, uncond = model_fn(x, None, tokens), model_fn(x, None, jnp.broadcast_to(null, tokens.shape))
    np.testing.assert_allclose(out.eps, uncond + w * (cond - uncond), rtol=1e-6)


def test_config_refuses_mismatched_text_settings(tmp_path):
    from jdiff.config import ConfigError

    for overrides, words in [
        ({"data.captions": None}, "conditioned on text: set data.captions"),
        ({"model.name": "unet_tiny", "model.fields": {}}, "data.captions needs a text model"),
        ({"model.freeze_text": True}, "keeps a loaded text encoder fixed: set model.text_encoder"),
        ({"run.eval_every": 10}, "not available for text models"),
    ]:
        with pytest.raises(ConfigError, match=words):
            text_config(tmp_path, **overrides)


# ---------------------------------------------------------------------------------------------------------------
# Training runs


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A tiny digits_text run (4 steps) trained once for the tests below (read-only)."""
    from jdiff.training import train

    wd = tmp_path_factory.mktemp("text_run") / "run"
    train(text_config(wd), progress=False)
    return wd


def test_text_run_records_its_tokenizer_and_text_fields(text_run):
    from jdiff import run as jrun
    from jdiff.data.captions import DIGIT_TEMPLATES, DIGIT_WORDS

    run = jrun.open_run(str(text_run))
    fields = run.derived["text_fields"]
    tok = jrun.run_tokenizer(str(text_run), fields)
    assert fields["max_length"] == 12 and fields["vocab_size"] == tok.vocab_size and run.num_classes is None
    words = [w for t in DIGIT_TEMPLATES for w in t.format("").split()] + list(DIGIT_WORDS)
    ids = tok(words)
    assert (ids[:, 2] == tok.eos_id).all()  # every training word is one token
    model = jrun.build_run_model(run)
    assert model.vocab_size == tok.vocab_size and model.max_length == 12


def test_sample_py_on_a_text_run_draws_what_the_generator_draws_for_the_prompts(text_run, tmp_path):
    from jdiff import run as jrun
    from jdiff.cli import sample as sample_cli

    out = tmp_path / "out"
    prompts = ["a handwritten seven", "the digit two"]
    argv = ["--workdir", str(text_run), "--prompt", prompts[0], "--prompt", prompts[1], "--num", "4"]
    assert sample_cli.main([*argv, "--steps", "2", "--guidance", "2", "--out", str(out), "--no-cache"]) == 0
    npz = np.load(out / "ddim_2steps_seed0_g2.npz")
    assert list(npz["prompts"]) == [prompts[0], prompts[1], prompts[0], prompts[1]]
    run = jrun.open_run(str(text_run))
    gen = jrun.Generator.from_run(run, jrun.Settings(sampler="ddim", steps=2, guidance=2.0), batch=8)
    _, _, params = jrun.load_params(run)
    want, _, _ = gen.draw(params, 4, labels=jrun.tokens_for(gen.tokenizer, 4, prompts))
    np.testing.assert_allclose(npz["images"], want, atol=1e-6)
    # the prompt changes the image: the condition reaches the model
    other, _, _ = gen.draw(params, 4, labels=jrun.tokens_for(gen.tokenizer, 4, ["a handwritten nine"]))
    assert float(np.abs(other - want).max()) > 1e-4


def test_sample_py_text_run_usage_errors(text_run, tmp_path, capsys):
    from jdiff.cli import sample as sample_cli

    wd = ["--workdir", str(text_run)]
    for argv, words in [
        (wd, "give --prompt TEXT or --prompts-file FILE"),
        ([*wd, "--prompt", "a one", "--labels", "1"], "--labels does not apply to the text model"),
        ([*wd, "--prompt", "a one", "--negative-prompt", "x"], "--negative-prompt applies to --pretrained"),
    ]:
        with pytest.raises(SystemExit) as e:
            sample_cli.main([*argv, "--steps", "1", "--out", str(tmp_path / "out"), "--no-cache"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and words in err and err.count("\n") == 1, err


def test_prompt_on_a_label_run_is_one_line(tmp_path, capsys):
    from conftest import make_tiny_config, write_random_run

    from jdiff.cli import sample as sample_cli

    wd = tmp_path / "labels"
    write_random_run(wd, make_tiny_config(wd), num_classes=10)
    with pytest.raises(SystemExit) as e:
        sample_cli.main(["--workdir", str(wd), "--prompt", "a cat", "--steps", "1", "--no-cache"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--prompt applies to text models" in err and err.count("\n") == 1, err


def test_frozen_pretrained_text_encoder_is_loaded_and_stays_fixed(tmp_path):
    from jdiff import run as jrun
    from jdiff.pretrained.text import load_text_encoder, load_tokenizer
    from jdiff.training import train

    wd = tmp_path / "frozen"
    cfg = text_config(wd, **{"model.text_encoder": str(FIX / "sd_tiny"), "model.freeze_text": True})
    train(cfg, progress=False)
    run = jrun.open_run(str(wd))
    enc = load_text_encoder(FIX / "sd_tiny" / "text_encoder")
    assert run.derived["text_fields"]["text_hidden"] == 16 and run.derived["text_fields"]["vocab_size"] == 573
    for which in ("params", "ema"):
        _, _, params = jrun.load_params(run, which=which)
        jax.tree.map(np.testing.assert_array_equal, params["text_encoder"], enc.params)
    prompt = ["a photo of a cat"]
    theirs = load_tokenizer(FIX / "sd_tiny" / "tokenizer", 16)(prompt)
    np.testing.assert_array_equal(jrun.run_tokenizer(str(wd), run.derived["text_fields"])(prompt), theirs)


def test_latent_text_run_exports_a_stable_diffusion_pipeline_that_loads_back_exactly(tmp_path):
    from jdiff import run as jrun
    from jdiff.cli import export as export_cli
    from jdiff.pretrained import load
    from jdiff.training import train

    wd = tmp_path / "latent"
    vae = FIX / "sd_tiny" / "vae"
    cfg = text_config(wd, **{"data.vae": str(vae), "data.image_size": 16, "data.channels": 3, "optim.steps": 2})
    train(cfg, progress=False)
    out = tmp_path / "exported"
    assert export_cli.main(["--workdir", str(wd), "--out", str(out)]) == 0
    p = load(out)
    run = jrun.open_run(str(wd))
    model = jrun.build_run_model(run)
    _, _, params = jrun.load_params(run)
    prompts = ["a handwritten seven", "the digit one"]
    ids = p.tokenizer(prompts)
    np.testing.assert_array_equal(ids, jrun.run_tokenizer(str(wd), run.derived["text_fields"])(prompts))
    x = jax.random.normal(jax.random.key(0), (2, *p.sample_shape))
    t = jnp.array([10.0, 500.0])
    states = p.text_encoder.module.apply({"params": p.text_encoder.params}, jnp.asarray(ids))
    theirs = p.model.apply({"params": p.params}, x, t, states)
    np.testing.assert_allclose(theirs, model.apply({"params": params}, x, t, jnp.asarray(ids)), atol=1e-6)


def test_pixel_text_run_export_is_refused_in_one_line(text_run, tmp_path, capsys):
    from jdiff.cli import export as export_cli

    with pytest.raises(SystemExit) as e:
        export_cli.main(["--workdir", str(text_run), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "StableDiffusionPipeline needs a VAE" in err and err.count("\n") == 1, err


def test_text_run_dataset_without_captions_is_refused(tmp_path):
    from jdiff.config import ConfigError
    from jdiff.training import setup

    shutil.copytree(FIX / "sd_tiny" / "tokenizer", tmp_path / "tok")
    with pytest.raises(ConfigError, match="need an image folder"):
        setup(text_config(tmp_path / "r", **{"data.captions": "folder"}))


def test_export_refuses_group_norms_diffusers_cannot_express():
    from jdiff.models import UNetCond
    from jdiff.pretrained import PretrainedError
    from jdiff.pretrained.unet_cond import config_from_unet_cond

    model = UNetCond(block_out_channels=(16, 32), cross_attention=(True, True), heads=2, norm_groups=8)
    with pytest.raises(PretrainedError, match="norm_groups=8 cannot be expressed in diffusers"):
        config_from_unet_cond(model, (8, 8, 4), False)  # jdiff uses 4 groups for width 16
    assert config_from_unet_cond(model.clone(norm_groups=4), (8, 8, 4), False)["norm_num_groups"] == 4


def test_guidance_on_a_run_trained_without_caption_dropout_warns(text_run, tmp_path, capsys):
    from jdiff.cli import sample as sample_cli

    wd = tmp_path / "no_dropout"
    shutil.copytree(text_run, wd)
    saved = json.loads((wd / "config.json").read_text())
    saved["config"]["data"]["label_dropout"] = 0.0
    (wd / "config.json").write_text(json.dumps(saved))
    argv = ["--workdir", str(wd), "--prompt", "a one", "--num", "8", "--steps", "1", "--no-cache"]
    assert sample_cli.main([*argv, "--guidance", "3", "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "without caption dropout" in err and err.count("warning:") == 1, err
    assert sample_cli.main([*argv, "--out", str(tmp_path / "o2")]) == 0  # no guidance: no warning
    assert "warning" not in capsys.readouterr().err


def test_text_run_resumes_exactly(tmp_path):
    """4 steps in one call == 2 steps, stop, resume for 2 (captions, caption dropout draws, params and EMA)."""
    from jdiff import run as jrun
    from jdiff.training import train

    over = {"optim.steps": 4, "run.checkpoint_every": 2, "data.label_dropout": 0.5}
    a, b = text_config(tmp_path / "a", **over), text_config(tmp_path / "b", **over)
    dev = jax.devices()[:1]
    train(a, devices=dev, progress=False)
    assert train(b, devices=dev, stop_after=2, progress=False).step == 2
    assert train(b, devices=dev, progress=False).step == 4
    for which in ("params", "ema"):
        pa = jrun.load_params(jrun.open_run(str(tmp_path / "a")), which=which)[2]
        pb = jrun.load_params(jrun.open_run(str(tmp_path / "b")), which=which)[2]
        jax.tree.map(np.testing.assert_array_equal, pa, pb)


def test_learned_tokenizer_ids_are_the_same_in_every_process():
    """tokenizers' BpeTrainer numbers tokens in a hash map's order, which changes between processes; the ids of
    `train_tokenizer` must not (every host of a run, and a resumed run, learns it again)."""
    import subprocess
    import sys

    code = (
        "from jdiff.data.captions import DIGIT_TEMPLATES as T, DIGIT_WORDS as W\n"
        "from jdiff.pretrained.text import train_tokenizer\n"
        "t = train_tokenizer([a.format(w) for a in T for w in W], 12)\n"
        "print(sorted(t.backend.get_vocab().items()), t(['a handwritten seven!']).tolist())\n"
    )
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout for _ in "ab"
    }
    assert len(outs) == 1
