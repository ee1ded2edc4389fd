"""Sharded training on a 2-D ("data", "fsdp") mesh of 8 CPU devices: the meshes train the same model as one
device, the state is split over fsdp, gradient accumulation equals one big step, remat changes no numbers,
checkpoints move between meshes, and the metrics report the input-wait share."""

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_MODEL

import jdiff
from jdiff.config import ConfigError, apply_overrides, get_preset
from jdiff.models import get_model, timestep_embedding
from jdiff.run import Checkpointer, batch_sharding, local_copy, replicated
from jdiff.run.mesh import FSDP_AXIS, check_batch_size, fsdp_sharding, make_mesh, per_device_bytes
from jdiff.training import setup, train
from jdiff.training.optim import make_optimizer
from jdiff.training.setup import train_step_args
from jdiff.training.state import init_train_state
from jdiff.training.step import init_accumulator, make_step_fn, train_step

QUIET = dict(progress=False, log=lambda s: None)


class Net(nn.Module):
    """Conv denoiser with time/label embeddings and dropout; every width is 16, so fsdp=8 splits each kernel."""

    dropout: float = 0.2
    num_classes = 10  # not a field: read by train_step

    @nn.compact
    def __call__(self, x, t, y=None, train=False):
        emb = nn.Dense(16)(timestep_embedding(t, 16))
        y = jnp.full((x.shape[0],), 10, jnp.int32) if y is None else y
        emb = emb + nn.Embed(11, 16)(y)
        h = nn.Conv(16, (3, 3))(x) + emb[:, None, None, :]
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
        h = nn.silu(nn.Conv(16, (3, 3))(h))
        return nn.Conv(x.shape[-1], (3, 3))(h)


def _config(**kw):
    base = {
        "optim.batch_size": 16,
        "diffusion.num_timesteps": 100,
        "optim.lr": 1e-2,
        "optim.warmup_steps": 0,
        "data.label_dropout": 0.3,
        "optim.ema_decay": 0.9,
    }
    return apply_overrides(get_preset("digits"), {**base, **kw}.items())


def _batch(n=16, seed=0):
    r = np.random.default_rng(seed)
    return {"image": r.uniform(-1, 1, (n, 8, 8, 1)).astype(np.float32), "label": r.integers(0, 10, n).astype(np.int32)}


def _train(config, mesh, model, num_steps=3, min_size=0):
    """`num_steps` steps of the sharded step on fixed batches; (state, acc) on the host, and the device state."""
    tx = make_optimizer(config.optim)
    init = functools.partial(init_train_state, model, tx, (8, 8, 1), 0)
    sharding = fsdp_sharding(jax.eval_shape(init), mesh, min_size=min_size)
    state = jax.jit(init, out_shardings=sharding)()
    step = make_step_fn(functools.partial(train_step, model=model, **train_step_args(config)), mesh, sharding)
    rep = replicated(mesh)
    schedule = jax.device_put(jdiff.get_schedule("linear", config.diffusion.num_timesteps), rep)
    acc = jax.device_put(init_accumulator(), rep)
    for i in range(num_steps):
        state, acc = step(state, jax.device_put(_batch(seed=i), batch_sharding(mesh)), schedule, acc)
    return jax.device_get(state), jax.device_get(acc), state


def _assert_close(a, b, rtol, atol, what=""):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=what)


@pytest.fixture(scope="module")
def one_device():
    """3 steps of Net on a single device: the reference of the mesh tests."""
    s, a, _ = _train(_config(), make_mesh(jax.devices()[:1]), Net())
    return s, a


@pytest.mark.parametrize("shape", ["data=1,fsdp=8", "data=4,fsdp=2", "data=8,fsdp=1"])
def test_meshes_train_like_one_device(shape, one_device):
    """Loss, parameters, EMA and Adam moments after 3 steps (with dropout and label dropout) on each mesh equal
    one device's to rtol 2e-5 / atol 1e-6 (float32 reductions in another order); the state really is split."""
    s1, a1 = one_device
    mesh = make_mesh(jax.devices()[:8], shape)
    s, a, dev_state = _train(_config(), mesh, Net())
    assert int(s.step) == 3
    np.testing.assert_allclose(a["loss"], a1["loss"], rtol=1e-5)
    for name in ("params", "ema_params", "opt_state"):
        _assert_close(getattr(s, name), getattr(s1, name), 2e-5, 1e-6, name)
    kernel = dev_state.params["Conv_1"]["kernel"]  # (3, 3, 16, 16), split over the last axis
    fsdp = mesh.shape[FSDP_AXIS]
    assert kernel.addressable_shards[0].data.shape == (3, 3, 16, 16 // fsdp)
    mu = dev_state.opt_state[1][0].mu["Conv_1"]["kernel"]  # Adam moment: the parameter's sharding
    assert mu.sharding == kernel.sharding and dev_state.ema_params["Conv_1"]["kernel"].sharding == kernel.sharding


def test_per_device_state_bytes_shrink_by_the_fsdp_factor():
    """Leaves of >= min_size elements are split in F (each has a dimension F divides), the rest replicated: the
    bytes a device holds are big / F + small, in the bookkeeping and in the real arrays."""
    tx = make_optimizer(_config().optim)
    init = functools.partial(init_train_state, Net(), tx, (8, 8, 1), 0)
    shapes = jax.eval_shape(init)
    min_size = 100
    big = [x for x in jax.tree.leaves(shapes) if x.size >= min_size]
    assert len(big) == 4 * 5 and all(any(d % 8 == 0 for d in x.shape) for x in big)  # 5 kernels x (p, EMA, mu, nu)
    big_bytes = sum(x.size * x.dtype.itemsize for x in big)
    small_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes) if x.size < min_size)
    for fsdp in (1, 2, 8):
        mesh = make_mesh(jax.devices()[:8], f"data={8 // fsdp},fsdp={fsdp}")
        sharding = fsdp_sharding(shapes, mesh, min_size=min_size)
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, sharding)
        assert per_device_bytes(abstract) == big_bytes // fsdp + small_bytes
        small = [s for x, s in zip(jax.tree.leaves(shapes), jax.tree.leaves(sharding)) if x.size < min_size]
        assert all(s.is_fully_replicated for s in small)
    # The real arrays agree with the bookkeeping.
    mesh = make_mesh(jax.devices()[:8], "fsdp=8")
    state = jax.jit(init, out_shardings=fsdp_sharding(shapes, mesh, min_size=min_size))()
    held = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state))
    assert held == big_bytes // 8 + small_bytes
    # local_copy (the preview grid's parameters) gathers the shards into whole single-device arrays.
    local = local_copy(state.ema_params)
    for x, full in zip(jax.tree.leaves(local), jax.tree.leaves(jax.device_get(state.ema_params))):
        assert len(x.sharding.device_set) == 1
        np.testing.assert_array_equal(np.asarray(x), full)


def test_grad_accum_equals_one_step_on_the_whole_batch():
    """grad_accum=4 on a global batch of 16 (4 micro-batches of 4, two rows per device on a 2x2 mesh) gives the
    update of one step on the 16 examples: the same draws of t and noise (drawn for the global batch, split
    by micro-batch), loss = mean over the 16 (with per-example min-SNR weights). Without dropout the two agree
    to float reassociation (loss, grad norm rtol 1e-5; parameters, Adam moments rtol 2e-5)."""
    diffusion = {"diffusion.prediction": "v", "diffusion.weighting": "min_snr"}
    mesh = make_mesh(jax.devices()[:4], "data=2,fsdp=2")
    c1 = _config(**diffusion)
    c4 = _config(**diffusion, **{"optim.grad_accum": 4})
    s1, a1, _ = _train(c1, mesh, Net(dropout=0.0), num_steps=2)
    s4, a4, _ = _train(c4, mesh, Net(dropout=0.0), num_steps=2)
    np.testing.assert_allclose(a4["loss"], a1["loss"], rtol=1e-5)
    np.testing.assert_allclose(a4["grad_norm"], a1["grad_norm"], rtol=1e-5)
    _assert_close(s4.params, s1.params, 2e-5, 1e-6, "params")
    _assert_close(s4.opt_state, s1.opt_state, 2e-5, 1e-7, "opt_state")
    s0 = jax.jit(functools.partial(init_train_state, Net(), make_optimizer(c1.optim), (8, 8, 1), 0))()
    assert (
        max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s0.params))) > 1e-3
    )


def test_grad_accum_micro_batches_see_their_own_rows():
    """The strided split: micro-batch i holds rows i, i+K, ... (so every device keeps an equal share); the
    gradient of a loss that weighs rows differently tells the rows apart."""
    from jdiff.training.step import _micro, loss_and_grads

    x = jnp.arange(12.0)
    assert [list(np.asarray(_micro(x, i, 3))) for i in range(3)] == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]
    rows = jnp.arange(12.0)[:, None]
    w = jnp.linspace(1.0, 2.0, 12)[:, None]

    def batch_loss(model_fn):  # a per-example loss like the diffusion loss: sum_i w_i (f(x_i) - i)^2 / n
        out = model_fn(rows, jnp.zeros(12))
        return jnp.mean(w * (out - rows) ** 2), {"out": out}

    apply = lambda p, x, t, y, rng: p["a"] * x + p["b"]  # noqa: E731
    params = {"a": jnp.float32(0.5), "b": jnp.float32(0.1)}
    (l1, aux1), g1 = loss_and_grads(batch_loss, apply, params, None, jax.random.PRNGKey(0), 1)
    (l3, aux3), g3 = loss_and_grads(batch_loss, apply, params, None, jax.random.PRNGKey(0), 3)
    np.testing.assert_allclose(l3, l1, rtol=1e-6)
    np.testing.assert_allclose(aux3["out"], aux1["out"], rtol=1e-6)
    _assert_close(g3, g1, 1e-6, 1e-7)
    assert abs(float(g1["a"])) > 1.0  # a non-trivial gradient


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_remat_changes_no_numbers(name):
    """A train step with remat on (each U-Net res/attention block, each DiT block) equals the step without,
    parameter tree and values (rtol 1e-5); the U-Net has dropout, so the recomputation must redraw the same
    masks."""
    if name == "unet":
        fields = dict(TINY_MODEL, attention_resolutions=(8,), dropout=0.3, num_classes=10)
        models = [get_model("unet_tiny", **fields, remat=r) for r in (False, True)]
    else:
        fields = dict(hidden_size=32, depth=2, num_heads=2, num_classes=10, remat_policy="dots_saveable")
        models = [get_model("dit_tiny", **fields, remat=r) for r in (False, True)]
    config = _config()
    batch = jax.tree.map(jnp.asarray, _batch())
    schedule = jdiff.get_schedule("linear", 100)
    out = []
    for model in models:
        state = jax.jit(functools.partial(init_train_state, model, make_optimizer(config.optim), (8, 8, 1), 0))()
        step = jax.jit(functools.partial(train_step, model=model, **train_step_args(config)))
        s, m = step(state, batch, schedule=schedule)
        out.append((jax.device_get(s), jax.device_get(m)))
    (s0, m0), (s1, m1) = out
    assert jax.tree.structure(s0) == jax.tree.structure(s1)
    np.testing.assert_allclose(m1["loss"], m0["loss"], rtol=1e-6)
    _assert_close(s1.params, s0.params, 1e-5, 1e-7, "params")
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s1.ema_params)))
    assert moved > 1e-4


def test_bad_mesh_and_batch_are_one_line_errors(tiny_config):
    with pytest.raises(ConfigError, match=r"data=2,fsdp=2 has 4 devices, not the 8 devices") as e:
        setup(tiny_config(**{"run.mesh": "data=2,fsdp=2"}), devices=jax.devices()[:8])
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="bad run.mesh"):
        tiny_config(**{"run.mesh": "data=2,tensor=4"})
    with pytest.raises(ValueError, match=r"multiple of grad_accum x devices \(4 x 8\); e.g. use --batch_size 32"):
        check_batch_size(48, 8, grad_accum=4)
    with pytest.raises(
        ConfigError, match=r"grad_accum x devices .* e.g. use --optim.batch_size 24"
    ):  # the train.py key
        setup(tiny_config(**{"optim.grad_accum": 3}), devices=jax.devices()[:8])


def _restore(config, devices, mesh):
    s = setup(apply_overrides(config, {"run.mesh": mesh}.items()), devices=devices)
    with Checkpointer(config.run.workdir, create=False) as ck:
        return ck.restore(s.abstract_state, 2)


def test_checkpoints_move_between_meshes_and_resume_exactly(tiny_config, tmp_path):
    """A run on mesh 2x4 (state split over fsdp=4): its checkpoint restores on 1x8, 8x1 and one device with the
    same values, each leaf in the new mesh's sharding; stopping at step 2 and resuming on 2x4 ends bitwise
    equal to 4 uninterrupted steps. metrics.jsonl reports the input-wait share in [0, 1]."""
    over = {"run.mesh": "data=2,fsdp=4", "run.fsdp_min_size": 64}
    a = tiny_config(workdir=tmp_path / "a", **over)
    b = tiny_config(workdir=tmp_path / "b", **over)
    eight = jax.devices()[:8]
    assert train(a, devices=eight, **QUIET).step == 4
    assert train(b, devices=eight, stop_after=2, **QUIET).step == 2
    ref = _restore(b, eight, "data=2,fsdp=4")
    sharded = [x for x in jax.tree.leaves(ref.params) if not x.is_fully_replicated]
    assert sharded and all(FSDP_AXIS in x.sharding.spec for x in sharded)
    for devices, mesh in ((eight, "data=1,fsdp=8"), (eight, "data=8,fsdp=1"), (eight[:1], None)):
        got = _restore(b, devices, mesh)
        assert jax.tree.structure(got) == jax.tree.structure(ref)
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            np.testing.assert_array_equal(np.asarray(jax.device_get(x)), np.asarray(jax.device_get(y)))
            assert len(x.sharding.device_set) == len(devices)
    assert train(b, devices=eight, **QUIET).step == 4
    with Checkpointer(a.run.workdir, create=False) as ca, Checkpointer(b.run.workdir, create=False) as cb:
        abstract = setup(a, devices=eight).abstract_state
        sa, sb = ca.restore(abstract, 4), cb.restore(abstract, 4)
    for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
        np.testing.assert_array_equal(np.asarray(jax.device_get(x)), np.asarray(jax.device_get(y)))
    with open(os.path.join(a.run.workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    timed = [r for r in records if r["steps_per_sec"] is not None]
    assert timed and all(0.0 <= r["input_wait_share"] <= 1.0 for r in timed)
