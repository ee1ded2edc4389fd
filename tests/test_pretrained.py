"""jdiff.pretrained: diffusers-format checkpoints in and out, against diffusers' own outputs.

Fixtures (tests/fixtures/make_pretrained_fixtures.py, run with torch + diffusers) are tiny random-weight
diffusers models saved with save_pretrained, and diffusers' outputs for fixed inputs. Tolerance: float32,
|jdiff - diffusers| <= 2e-5 + 1e-5 |diffusers| (measured: ~1.3e-6 absolute at output scale ~1.6 for the UNets,
~1.7e-6 at ~2.9 for the DiT); the 10-step DDIM sample of a random model reaches |x| ~ 190 and is compared
with atol 1e-6 * max|x| (measured 6e-5, i.e. 3e-7 of its scale).
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import write_random_run

import jdiff
from jdiff.models import DiT, UNet
from jdiff.pretrained import PretrainedError, load, named_schedule, read_model_dir, save
from jdiff.pretrained.scheduler import schedule_from_config

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "pretrained"
WEIGHTS = "diffusion_pytorch_model.safetensors"


def close(out, ref):
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=2e-5)


def forward(pre, d):  # jitted: one program compiles faster than eager op-by-op dispatch
    return jax.jit(pre.model.apply)({"params": pre.params}, d["x"], d["t"], d["y"] if "y" in d else None)


# ---------------------------------------------------------------------------------------------------------------
# Equality with diffusers


@pytest.mark.parametrize("name", ["ddpm_unet", "class_unet"])
def test_unet_forward_matches_diffusers(name):
    pre = load(FIX / name)
    d = np.load(FIX / name / "outputs.npz")
    close(forward(pre, d), d["out"])
    assert pre.kind == "unet" and pre.sample_shape == (8, 8, 3) and pre.prediction == "eps"
    if name == "ddpm_unet":  # google/ddpm-cifar10-32's options: freq shift 1, sin first, (0, 1) pad, eps 1e-6
        m = pre.model
        assert (m.freq_shift, m.cos_first, m.downsample_padding, m.norm_eps) == (1, False, 0, 1e-6)
        assert pre.variance == "fixed" and pre.num_classes is None and pre.guidance is None
    else:  # 6 class rows: 5 classes + jdiff's null label; out_channels 6 = learned variance
        assert pre.variance == "learned" and pre.num_classes == 5 and pre.model.use_scale_shift_norm


def test_dit_forward_matches_diffusers_with_its_convention():
    d = np.load(FIX / "dit_pipeline" / "outputs.npz")
    pre = load(FIX / "dit_pipeline", timestep_convention="diffusers")
    close(forward(pre, d), d["out"])
    assert (pre.kind, pre.variance, pre.num_classes, pre.sample_shape, pre.guidance) == (
        "dit",
        "learned",
        10,
        (4, 4, 4),
        4.0,
    )
    assert pre.id2label[3] == "class 3"
    # The default is the DiT reference code's embedding (shift 0, LayerNorm eps 1e-6): same weights, other outputs.
    ref = load(FIX / "dit_pipeline")
    assert (ref.model.freq_shift, ref.model.mlp_norm_eps) == (0.0, 1e-6)
    assert np.abs(np.asarray(forward(ref, d)) - d["out"]).max() > 1e-3
    jax.tree.map(np.testing.assert_array_equal, ref.params, pre.params)


def test_ddim_10_steps_matches_diffusers_ddim_scheduler():
    pre = load(FIX / "ddpm_unet")
    d = np.load(FIX / "ddpm_unet" / "outputs.npz")
    np.testing.assert_array_equal(
        jdiff.sampling.discrete_timesteps("leading", 10, pre.schedule.num_timesteps), d["ddim_timesteps"]
    )
    x = jdiff.sample(
        pre.model.apply,
        pre.schedule,
        d["ddim_x_T"].shape,
        None,
        sample_keys=jax.random.split(jax.random.key(0), 2),
        params={"params": pre.params},
        sampler="ddim",
        num_steps=10,
        spacing="leading",
        x_init=jnp.asarray(d["ddim_x_T"]),
        clip_x0=None,
    )
    # A random model's 10-step DDIM sample reaches |x| ~ 190: compare at float32 precision of that scale.
    np.testing.assert_allclose(np.asarray(x), d["ddim_x0"], rtol=0, atol=1e-6 * np.abs(d["ddim_x0"]).max())


def test_schedules_match_diffusers_betas():
    configs = json.loads((FIX / "schedules" / "configs.json").read_text())
    betas = np.load(FIX / "schedules" / "betas.npz")
    for name, cfg in configs.items():
        sched, pred = schedule_from_config(cfg)
        # diffusers rescales to zero terminal SNR in float32 (betas from ratios of float32 abar: ~2e-6 absolute)
        atol = 3e-6 if "zero_snr" in name else 1e-9
        np.testing.assert_allclose(np.asarray(sched.betas), betas[name], rtol=2e-6, atol=atol, err_msg=name)
        assert pred == "eps"
    v = schedule_from_config(
        {"prediction_type": "v_prediction", "trained_betas": [0.1, 0.2, 0.3], "num_train_timesteps": 3}
    )
    assert v[1] == "v" and np.allclose(v[0].betas, [0.1, 0.2, 0.3])


def test_scheduler_class_and_keys_are_checked():
    """_class_name and every key are validated (issue 24, defect 7): the discrete beta schedulers map to the
    same training schedule with their own defaults; EDM, flow-matching and unknown classes, unknown keys, flow
    sigmas, continuous timesteps and trained_betas of another length than num_train_timesteps are one line."""
    base = {"num_train_timesteps": 10, "beta_schedule": "linear"}
    ddpm, _ = schedule_from_config({"_class_name": "DDPMScheduler", **base})
    euler, _ = schedule_from_config({"_class_name": "EulerDiscreteScheduler", **base, "use_karras_sigmas": True})
    np.testing.assert_array_equal(np.asarray(euler.betas), np.asarray(ddpm.betas))
    np.testing.assert_allclose(np.asarray(ddpm.betas), np.linspace(1e-4, 0.02, 10))
    # diffusers' HeunDiscreteScheduler defaults to beta 0.00085..0.012 (not DDPM's 1e-4..0.02)
    heun, _ = schedule_from_config({"_class_name": "HeunDiscreteScheduler", **base})
    np.testing.assert_allclose(np.asarray(heun.betas), np.linspace(0.00085, 0.012, 10))
    for config, words in [
        ({"_class_name": "EDMEulerScheduler", **base}, ("_class_name 'EDMEulerScheduler' is not supported",)),
        # FlowMatchEulerDiscreteScheduler loads (tests/test_flow.py); a setting jdiff does not reproduce is refused
        (
            {"_class_name": "FlowMatchEulerDiscreteScheduler", "invert_sigmas": True},
            ("invert_sigmas=True", "not supported"),
        ),
        ({"_class_name": "DDPMScheduler", **base, "sigma_max": 80.0}, ("['sigma_max']", "DDPMScheduler")),
        ({"_class_name": "DDIMScheduler", **base, "mystery": 1}, ("['mystery']",)),
        ({"_class_name": "UniPCMultistepScheduler", **base, "use_flow_sigmas": True}, ("use_flow_sigmas",)),
        ({"_class_name": "EulerDiscreteScheduler", **base, "timestep_type": "continuous"}, ("timestep_type",)),
        ({"trained_betas": [0.1, 0.2], "num_train_timesteps": 1000}, ("num_train_timesteps=1000", "got 2 values")),
        ({"num_train_timesteps": 100_000_000}, ("num_train_timesteps=100000000", "[1, 100000]")),
        ({"num_train_timesteps": 1e3}, ("num_train_timesteps=1000.0",)),
    ]:
        one_line_error(lambda: schedule_from_config(config), *words)


def test_timestep_embedding_frequency_shift_is_diffusers_formula():
    """diffusers' get_timestep_embedding: exponent -ln(max_period) i / (half - shift), [sin | cos], flipped to
    [cos | sin] by flip_sin_to_cos; shift 0 is jdiff's default (ADM/DiT)."""
    from jdiff.models import timestep_embedding

    t = np.array([0.0, 3.5, 999.0])
    for dim, shift, flip in [(32, 1, False), (32, 0, True), (9, 1, True)]:
        half = dim // 2
        arg = t[:, None] * np.exp(-np.log(10000.0) * np.arange(half) / (half - shift))[None]
        want = np.concatenate([np.sin(arg), np.cos(arg)], 1)
        want = np.concatenate([want[:, half:], want[:, :half]], 1) if flip else want
        want = np.pad(want, ((0, 0), (0, dim % 2)))
        got = timestep_embedding(jnp.asarray(t), dim, cos_first=flip, freq_shift=shift)
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-4)  # float32 sin of t ~ 1e3
    with pytest.raises(ValueError, match="freq_shift"):
        timestep_embedding(jnp.asarray(t), 2, freq_shift=1)


# ---------------------------------------------------------------------------------------------------------------
# Errors: one line each


def one_line_error(fn, *match):
    with pytest.raises(PretrainedError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for m in match:
        assert m in msg, msg
    return msg


@pytest.fixture
def unet_dir(tmp_path):
    d = tmp_path / "unet"
    shutil.copytree(FIX / "ddpm_unet" / "unet", d)
    return d


def rewrite(d: Path, change):
    from safetensors.numpy import save_file

    _, tensors = read_model_dir(d)
    change(tensors)
    save_file(tensors, str(d / WEIGHTS))


def test_corrupted_and_truncated_safetensors(unet_dir):
    data = (unet_dir / WEIGHTS).read_bytes()
    (unet_dir / WEIGHTS).write_bytes(data[: len(data) // 2])
    one_line_error(lambda: load(unet_dir), "corrupted or truncated", WEIGHTS)
    (unet_dir / WEIGHTS).write_bytes(b"\xff" * 64)
    one_line_error(lambda: load(unet_dir), "corrupted or truncated")


def test_missing_extra_and_misshapen_weights(unet_dir):
    rewrite(unet_dir, lambda t: t.pop("conv_in.bias"))
    one_line_error(lambda: load(unet_dir), "missing weight 'conv_in.bias'")
    rewrite(unet_dir, lambda t: t.update({"conv_in.bias": np.zeros(8, np.float32), "extra.weight": np.zeros(2)}))
    one_line_error(lambda: load(unet_dir), "unexpected weight(s) ['extra.weight']")
    rewrite(unet_dir, lambda t: (t.pop("extra.weight"), t.update({"conv_out.weight": np.zeros((3, 8, 1, 1))})))
    one_line_error(lambda: load(unet_dir), "'conv_out.weight' has shape (3, 8, 1, 1), expected (3, 8, 3, 3)")


def test_unsupported_block_and_config_values(unet_dir):
    one_line_error(
        lambda: load(FIX / "unsupported_unet"), "down_block_types", "ResnetDownsampleBlock2D", "AttnDownBlock2D"
    )
    cfg = json.loads((unet_dir / "config.json").read_text())
    for key, value, words in [
        ("resnet_time_scale_shift", "spatial", ("'default', 'scale_shift'",)),
        ("time_embedding_type", "fourier", ("time_embedding_type", "positional")),
        ("mystery_option", 3, ("mystery_option",)),
    ]:
        (unet_dir / "config.json").write_text(json.dumps({**cfg, key: value}))
        one_line_error(lambda: load(unet_dir), *words)


def test_pre_0_14_attention_names_load_the_same(unet_dir):
    """Checkpoints saved before diffusers 0.14 name the attention query/key/value/proj_attn (1x1-conv shaped)."""
    new = load(unet_dir).params
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def rename(t):
        for name in [k for k in t if ".attentions." in k]:
            for cur, was in old.items():
                if f".{cur}." in name:
                    a = t.pop(name)
                    t[name.replace(f".{cur}.", f".{was}.")] = a[:, :, None, None] if a.ndim == 2 else a

    rewrite(unet_dir, rename)
    assert any(".query." in k for k in read_model_dir(unet_dir)[1])
    jax.tree.map(np.testing.assert_array_equal, load(unet_dir).params, new)


def test_pickle_only_is_refused_with_the_conversion_command(unet_dir):
    (unet_dir / WEIGHTS).unlink()
    (unet_dir / "diffusion_pytorch_model.bin").write_bytes(b"not a pickle; never opened")
    one_line_error(lambda: load(unet_dir), "never unpickles", "torch.load", "save_file", "safetensors")
    one_line_error(lambda: load(unet_dir.parent / "nope"), "not found")


def test_load_reads_only_the_components_model_index_names(tmp_path):
    """A stale vae/ or unet/ beside transformer/ (a directory exported over an older one) is not read: the
    components are those model_index.json names (issue 24, defect 3)."""
    d = tmp_path / "pipe"
    shutil.copytree(FIX / "dit_pipeline", d)
    index = json.loads((d / "model_index.json").read_text())
    index["vae"] = [None, None]
    (d / "model_index.json").write_text(json.dumps(index))
    shutil.copytree(FIX / "ddpm_unet" / "unet", d / "unet")  # stale
    pre = load(d)
    assert pre.vae is None and pre.kind == "dit"
    index.pop("transformer")
    (d / "model_index.json").write_text(json.dumps(index))
    one_line_error(lambda: load(d), "exactly one of unet or transformer")


def test_sharded_checkpoint_reads_like_a_single_file(unet_dir):
    from safetensors.numpy import save_file

    config, tensors = read_model_dir(unet_dir)
    names = sorted(tensors)
    shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2 :]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(unet_dir / shard))
    (unet_dir / WEIGHTS).unlink()
    index = {"weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (unet_dir / (WEIGHTS + ".index.json")).write_text(json.dumps(index))
    config2, tensors2 = read_model_dir(unet_dir)
    assert config2 == config and sorted(tensors2) == names
    assert all(np.array_equal(tensors2[k], tensors[k]) for k in names)


# ---------------------------------------------------------------------------------------------------------------
# Export


def random_params(model, shape, seed=0):
    from jdiff.models import abstract_params

    abstract = abstract_params(model, (1, *shape), with_labels=model.num_classes is not None)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype), abstract)


def fields(m):
    return {f.name: getattr(m, f.name) for f in dataclasses.fields(m) if f.name not in ("parent", "name")}


UNET = UNet(
    ch=16,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    dropout=0.0,
    num_classes=3,
    learn_sigma=True,
    num_head_channels=8,
    norm_groups=4,
    freq_shift=1,
    use_scale_shift_norm=True,
)
DIT = DiT(patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=4, learn_sigma=True)


@pytest.mark.filterwarnings("ignore::jdiff.pretrained.PretrainedWarning")
@pytest.mark.parametrize("model,shape", [(UNET, (8, 8, 3)), (DIT, (4, 4, 4))], ids=["unet", "dit"])
def test_export_then_load_is_exact(tmp_path, model, shape):
    params = random_params(model, shape)
    schedule = jdiff.get_schedule("cosine", 50)
    vae = FIX / "dit_pipeline" / "vae" if isinstance(model, DiT) else None  # a latent DiT: its VAE goes along
    save(tmp_path / "out", model, params, sample_shape=shape, schedule=schedule, prediction="v", vae_dir=vae)
    pre = load(tmp_path / "out")
    assert (pre.vae is not None) == (vae is not None)
    assert fields(pre.model) == fields(model)
    jax.tree.map(np.testing.assert_array_equal, pre.params, params)
    np.testing.assert_array_equal(np.asarray(pre.schedule.betas), np.asarray(schedule.betas))
    assert (pre.prediction, pre.sample_shape, pre.variance, pre.num_classes) == (
        "v",
        shape,
        "learned",
        model.num_classes,
    )
    named = named_schedule("linear", 100, beta_end=0.01)
    save(tmp_path / "named", model, params, sample_shape=shape, schedule=named)
    np.testing.assert_array_equal(
        np.asarray(load(tmp_path / "named").schedule.betas),
        np.asarray(jdiff.get_schedule("linear", 100, beta_end=0.01).betas),
    )


@pytest.mark.filterwarnings("ignore::jdiff.pretrained.PretrainedWarning")
def test_flow_dit_export_then_load_is_exact(tmp_path):
    """A flow-matching DiT (SiT-style) goes out with a FlowMatchEulerDiscreteScheduler config (its shift) and
    comes back as the same flow schedule, prediction "flow" and weights; a flow prediction over a VP schedule
    or with learned variance is refused."""
    model = DIT.clone(learn_sigma=False)
    params = random_params(model, (4, 4, 4))
    schedule = jdiff.get_schedule("flow", 1000, shift=3.0)
    save(tmp_path / "flow", model, params, sample_shape=(4, 4, 4), schedule=schedule, prediction="flow")
    sch_cfg = json.loads((tmp_path / "flow" / "scheduler" / "scheduler_config.json").read_text())
    assert (sch_cfg["_class_name"], sch_cfg["shift"], sch_cfg["num_train_timesteps"]) == (
        "FlowMatchEulerDiscreteScheduler",
        3.0,
        1000,
    )
    index = json.loads((tmp_path / "flow" / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    pre = load(tmp_path / "flow")
    assert pre.prediction == "flow" and float(pre.schedule.flow_shift) == 3.0
    np.testing.assert_array_equal(np.asarray(pre.schedule.betas), np.asarray(schedule.betas))
    jax.tree.map(np.testing.assert_array_equal, pre.params, params)
    for sch, mdl in [(jdiff.get_schedule("linear", 10), model), (schedule, DIT)]:
        one_line_error(
            lambda: save(tmp_path / "bad", mdl, params, sample_shape=(4, 4, 4), schedule=sch, prediction="flow"),
            "flow schedule",
        )


def test_export_refuses_what_diffusers_cannot_express(tmp_path):
    sch = jdiff.get_schedule("linear", 10)
    for model, words in [
        (UNET.clone(resblock_updown=True), ("resblock_updown",)),
        (UNET.clone(norm_groups=32), ("norm_groups", "groups")),  # jdiff: 4 groups at width 16, 8 at 32
        (DIT.clone(num_classes=None), ("num_classes", "class-conditional")),
    ]:
        shape = (8, 8, 3) if isinstance(model, UNet) else (4, 4, 4)
        one_line_error(lambda: save(tmp_path, model, None, sample_shape=shape, schedule=sch), *words)


@pytest.mark.filterwarnings("ignore::jdiff.pretrained.PretrainedWarning")
def test_export_is_atomic_and_refuses_a_non_empty_target(tmp_path, monkeypatch):
    """save() writes a temporary sibling renamed into place (issue 24, defects 3 and 9): a non-empty target is
    refused unless overwrite, which replaces it as a whole (no stale vae/ or unet/ beside transformer/); an
    interrupted export leaves nothing; a temporary left by a killed process is removed by the next export."""
    import warnings

    from jdiff.pretrained import pipeline

    sch, shape, out = jdiff.get_schedule("linear", 10), (4, 4, 4), tmp_path / "out"
    model = DIT.clone(freq_shift=1.0)
    params = random_params(model, shape)
    save(out, UNET, random_params(UNET, (8, 8, 3)), sample_shape=(8, 8, 3), schedule=sch)
    shutil.copytree(FIX / "dit_pipeline" / "vae", out / "vae")  # a stale part
    one_line_error(lambda: save(out, model, params, sample_shape=shape, schedule=sch), "not empty", "overwrite")
    stale = tmp_path / f".out{pipeline.TMP_TAG}999999999"  # a kill -9's temporary (no such pid)
    (stale / "transformer").mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # freq_shift 1: no warning
        save(out, model, params, sample_shape=shape, schedule=sch, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json", "scheduler", "transformer"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the stale temporary is gone too
    assert load(out).vae is None
    calls = []
    stop = lambda: calls.append(1) or len(calls) > 1  # interrupted at the second file boundary
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path / "new", model, params, sample_shape=shape, schedule=sch, stop=stop)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "a_file").write_text("")
    one_line_error(
        lambda: save(tmp_path / "a_file", model, params, sample_shape=shape, schedule=sch), "not a directory"
    )


def test_export_warns_where_diffusers_computes_otherwise(tmp_path):
    """A reference-convention DiT (diffusers embeds t with shift 1) and a class-conditional UNet (DDPMPipeline
    passes no labels) are exported with a PretrainedWarning naming the difference (issue 24, defect 8)."""
    from jdiff.pretrained import PretrainedWarning

    sch = jdiff.get_schedule("linear", 10)
    with pytest.warns(PretrainedWarning, match="downscale_freq_shift 1"):
        save(tmp_path / "dit", DIT, random_params(DIT, (4, 4, 4)), sample_shape=(4, 4, 4), schedule=sch)
    with pytest.warns(PretrainedWarning, match="class_labels"):
        save(tmp_path / "unet", UNET, random_params(UNET, (8, 8, 3)), sample_shape=(8, 8, 3), schedule=sch)


def test_export_loads_in_diffusers_with_equal_outputs(tmp_path):
    torch = pytest.importorskip("torch", reason="needs the [bench] extra (torch + diffusers)")
    diffusers = pytest.importorskip("diffusers", reason="needs the [bench] extra (torch + diffusers)")
    sch = jdiff.get_schedule("linear", 1000)
    rng = np.random.default_rng(1)
    for model, shape, sub, cls in [
        (UNET, (8, 8, 3), "unet", diffusers.UNet2DModel),
        (DIT.clone(freq_shift=1.0), (4, 4, 4), "transformer", diffusers.DiTTransformer2DModel),
    ]:
        params = random_params(model, shape)
        vae = FIX / "dit_pipeline" / "vae" if sub == "transformer" else None
        save(tmp_path / sub, model, params, sample_shape=shape, schedule=sch, vae_dir=vae)
        pipeline = diffusers.DiffusionPipeline.from_pretrained(tmp_path / sub)  # DDPMPipeline / DiTPipeline
        assert type(getattr(pipeline, sub)) is cls
        theirs = getattr(pipeline, sub).eval()
        x = rng.standard_normal((2, *shape)).astype(np.float32)
        t, y = np.array([5.0, 700.0], np.float32), np.array([0, 2])
        ours = np.asarray(model.apply({"params": params}, x, t, y))
        with torch.no_grad():
            ref = theirs(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t), torch.from_numpy(y)).sample
        close(ours, ref.numpy().transpose(0, 2, 3, 1))
        scheduler = diffusers.DDPMScheduler.from_pretrained(tmp_path / sub / "scheduler")
        np.testing.assert_allclose(scheduler.betas.numpy(), np.asarray(sch.betas), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# sample.py --pretrained


@pytest.mark.subprocess
def test_sample_py_pretrained_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = tmp_path / "samples"
    r = subprocess.run(
        [sys.executable, str(REPO / "sample.py"), "--pretrained", str(FIX / "class_unet"), "--num", "3", "--steps", "2"]
        + ["--sampler", "ddpm", "--variance", "learned", "--labels", "1,4", "--guidance", "2"]
        + ["--out", str(out), "--no-cache", "--no-progress"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "prediction eps" in r.stdout and "guidance 2" in r.stdout
    npz = np.load(out / "ddpm_2steps_seed0_g2.npz")
    assert npz["images"].shape == (3, 8, 8, 3) and np.isfinite(npz["images"]).all()
    np.testing.assert_array_equal(npz["labels"], [1, 4, 1])
    assert (out / "ddpm_2steps_seed0_g2.png").is_file()
    bad = subprocess.run(
        [sys.executable, str(REPO / "sample.py"), "--pretrained", str(FIX / "unsupported_unet")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "ResnetDownsampleBlock2D" in bad.stderr


def test_export_cli_writes_a_trained_run(tmp_path):
    """python -m jdiff.cli.export on a tiny run (random weights written as a checkpoint): load() gives back the
    run's EMA parameters exactly, its model, schedule and prediction."""
    from jdiff.cli.export import main
    from jdiff.config import apply_overrides, get_preset
    from jdiff.run import build_schedule, save_run_config

    workdir = str(tmp_path / "run")
    over = {"run.workdir": workdir, "diffusion.num_timesteps": "100", "model.ch": "8", "model.ch_mult": "(1, 2)"}
    over.update({"model.attention_resolutions": "(4,)", "model.num_heads": "1", "model.norm_groups": "2"})
    config = apply_overrides(get_preset("digits"), over)
    model, state = write_random_run(workdir, config)
    assert main(["--workdir", workdir, "--out", str(tmp_path / "out")]) == 0
    pre = load(tmp_path / "out")
    jax.tree.map(np.testing.assert_array_equal, pre.params, state.ema_params)
    np.testing.assert_array_equal(np.asarray(pre.schedule.betas), np.asarray(build_schedule(config).betas))
    assert pre.prediction == config.diffusion.prediction and pre.sample_shape == (8, 8, 1)
    drop_dtype = lambda m: {k: v for k, v in fields(m).items() if k != "dtype"}
    assert drop_dtype(pre.model) == drop_dtype(model)
    with pytest.raises(SystemExit) as e:  # the default norm_groups 32 gives 2 and 4 groups here: one line, status 2
        config32 = apply_overrides(config, {"model.norm_groups": "32"})
        save_run_config(workdir, config32, {"num_classes": None, "image_shape": [8, 8, 1]})
        main(["--workdir", workdir, "--out", str(tmp_path / "out32")])
    assert e.value.code == 2


# ---------------------------------------------------------------------------------------------------------------
# Malformed checkpoints (issue 24, defects 10 and 11): one line naming the cause, before anything large is built


def test_weights_file_replaced_by_something_else_is_named(unet_dir):
    w = unet_dir / WEIGHTS
    w.unlink()
    w.symlink_to(unet_dir / "nowhere.safetensors")
    one_line_error(lambda: load(unet_dir), "is a dangling symlink")
    w.unlink()
    w.symlink_to(w)
    one_line_error(lambda: load(unet_dir), "is a symlink loop")
    w.unlink()
    w.mkdir()
    one_line_error(lambda: load(unet_dir), "is a directory, not a file")
    w.rmdir()
    os.mkfifo(w)  # never opened (it would block)
    one_line_error(lambda: load(unet_dir), "is a FIFO, not a file")


def test_non_finite_weights_and_norm_eps_are_refused_at_load(unet_dir, tmp_path):
    rewrite(unet_dir, lambda t: t["conv_in.weight"].__setitem__((0, 0, 0, 0), np.inf))
    one_line_error(lambda: load(unet_dir), "tensor 'conv_in.weight' has 1 non-finite value(s)")
    shutil.copy(FIX / "ddpm_unet" / "unet" / WEIGHTS, unet_dir / WEIGHTS)
    cfg = json.loads((unet_dir / "config.json").read_text())
    for eps in (float("nan"), 0.0):
        (unet_dir / "config.json").write_text(json.dumps({**cfg, "norm_eps": eps}))
        one_line_error(lambda: load(unet_dir), "norm_eps")
    dit = tmp_path / "dit"
    shutil.copytree(FIX / "dit_pipeline" / "transformer", dit)
    cfg = json.loads((dit / "config.json").read_text())
    (dit / "config.json").write_text(json.dumps({**cfg, "norm_eps": float("nan")}))
    one_line_error(lambda: load(dit), "norm_eps=nan", "positive finite")


def test_configs_are_checked_against_the_weights_before_building(unet_dir, tmp_path):
    """A DiT config asking for 20,000 layers of 2-layer weights fails at once (it used to build the model for
    minutes); so do U-Net levels / layers_per_block the weights do not hold, and a non-string shard name."""
    dit = tmp_path / "dit"
    shutil.copytree(FIX / "dit_pipeline" / "transformer", dit)
    cfg = json.loads((dit / "config.json").read_text())
    (dit / "config.json").write_text(json.dumps({**cfg, "num_layers": 20_000}))
    one_line_error(lambda: load(dit), "num_layers=20000 but the weights hold 2 such block(s)")
    cfg_u = json.loads((unet_dir / "config.json").read_text())
    (unet_dir / "config.json").write_text(json.dumps({**cfg_u, "layers_per_block": 500}))
    one_line_error(lambda: load(unet_dir), "layers_per_block=500 but the weights hold")
    (unet_dir / "config.json").write_text(json.dumps(cfg_u))
    _, tensors = read_model_dir(unet_dir)
    (unet_dir / WEIGHTS).unlink()
    (unet_dir / (WEIGHTS + ".index.json")).write_text(json.dumps({"weight_map": {k: 3 for k in tensors}}))
    one_line_error(lambda: load(unet_dir), "weight_map values must be shard file names, got 3")


def test_sample_py_usage_errors_exit_2_before_work(tmp_path, capsys):
    """--guidance nan, --params with --pretrained and --timestep-convention on a U-Net are usage errors: one
    line, status 2, nothing sampled (issue 24, defect 11)."""
    from jdiff.cli import sample as sample_cli

    out = str(tmp_path / "out")
    for argv, words in [
        (["--pretrained", str(FIX / "ddpm_unet"), "--guidance", "nan"], "--guidance must be a finite number"),
        (["--pretrained", str(FIX / "ddpm_unet"), "--params", "raw"], "--params applies to --workdir runs only"),
        (["--pretrained", str(FIX / "ddpm_unet"), "--timestep-convention", "diffusers"], "DiT checkpoints only"),
    ]:
        with pytest.raises(SystemExit) as e:
            sample_cli.main([*argv, "--num", "1", "--steps", "1", "--out", out, "--no-cache", "--no-progress"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and words in err and err.count("\n") == 1, err
    assert not os.path.exists(out)


def test_export_cli_interrupted_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    """Ctrl-C during an export (here: right after the parameters are read) stops it at the next file boundary:
    one line, status 130, no output directory and no temporary left (issue 24, defect 9); a non-empty --out
    needs --overwrite."""
    import signal
    import time

    from jdiff import run as jrun
    from jdiff.cli.export import main
    from jdiff.config import apply_overrides, get_preset

    workdir = str(tmp_path / "run")
    over = {"run.workdir": workdir, "diffusion.num_timesteps": "10", "sampling.steps": "2", "model.ch": "8"}
    over["model.ch_mult"] = "(1,)"
    over.update({"model.attention_resolutions": "()", "model.norm_groups": "2", "model.num_res_blocks": "1"})
    write_random_run(workdir, apply_overrides(get_preset("digits"), over))
    out = tmp_path / "out"
    assert main(["--workdir", workdir, "--out", str(out)]) == 0
    with pytest.raises(SystemExit) as e:
        main(["--workdir", workdir, "--out", str(out)])
    assert e.value.code == 2 and "not empty" in capsys.readouterr().err
    real = jrun.load_params

    def interrupted(*a, **k):
        got = real(*a, **k)
        signal.raise_signal(signal.SIGINT)
        time.sleep(0.3)  # the signal watcher thread sets the flag
        return got

    monkeypatch.setattr(jrun, "load_params", interrupted)
    with pytest.raises(SystemExit) as e:
        main(["--workdir", workdir, "--out", str(tmp_path / "new")])
    err = capsys.readouterr().err
    assert e.value.code == 130 and err.count("\n") == 1 and "interrupted (SIGINT); nothing written" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]
