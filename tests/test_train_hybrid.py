"""Training with the improved-DDPM losses: importance-sampling state resumes exactly, runs without it keep the
plain train state, config checks, the held-out bits/dim action, and hybrid beats simple on held-out VLB bpd."""

import json
import os

import jax
import numpy as np
import pytest

from jdiff.config import ConfigError, get_preset
from jdiff.run import Checkpointer, build_model, build_schedule, load_for_inference, make_mesh, replicated
from jdiff.training import train
from jdiff.training.evaluate import heldout_batch, make_bpd_fn
from jdiff.training.optim import make_optimizer
from jdiff.training.state import LossHistory, TrainState, init_train_state

QUIET = dict(progress=False, log=lambda s: None)
IMPORTANCE = {"diffusion.loss": "vlb", "diffusion.t_sampling": "importance", "model.learn_sigma": True}


def _restore(config, step):
    model = build_model(config, 10)
    history = config.diffusion.num_timesteps if config.diffusion.t_sampling == "importance" else 0
    abstract = jax.eval_shape(
        lambda: init_train_state(model, make_optimizer(config.optim), (8, 8, 1), 0, history_steps=history)
    )
    rep = replicated(make_mesh(jax.devices()[:1]))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), abstract)
    with Checkpointer(config.run.workdir, create=False) as ck:
        return ck.restore(abstract, step)


def test_importance_sampling_state_resumes_exactly(tiny_config, tmp_path):
    """6 steps in one call == 3 steps, stop, resume for 3: every leaf bitwise, the loss history included; the
    history holds the 48 recorded losses (fewer than T * 10: sampling is still uniform)."""
    over = {"optim.steps": 6, "run.checkpoint_every": 6, **IMPORTANCE}
    a, b = tiny_config(workdir=tmp_path / "a", **over), tiny_config(workdir=tmp_path / "b", **over)
    dev = jax.devices()[:1]
    assert train(a, devices=dev, **QUIET).step == 6
    assert train(b, devices=dev, stop_after=3, **QUIET).last_checkpoint == 3
    assert train(b, devices=dev, **QUIET).step == 6
    sa, sb = _restore(a, 6), _restore(b, 6)
    assert isinstance(sa, TrainState) and isinstance(sa.loss_history, LossHistory)
    assert int(np.asarray(sa.loss_history.count).sum()) == 6 * 8
    assert np.asarray(sa.loss_history.values).any()
    for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_runs_without_importance_sampling_have_no_loss_history(tiny_config):
    """The loss history is an optional field of the one TrainState: None (no leaves) for simple and hybrid runs,
    a LossHistory only with t_sampling importance."""
    for over in [{}, {"diffusion.loss": "hybrid", "model.learn_sigma": True}]:
        c = tiny_config(**over)
        s = jax.eval_shape(lambda: init_train_state(build_model(c, 10), make_optimizer(c.optim), (8, 8, 1), 0))
        assert type(s) is TrainState and s.loss_history is None
        assert len(jax.tree.leaves(s)) == len(jax.tree.leaves((s.step, s.params, s.ema_params, s.opt_state, s.rng)))
    p = LossHistory.empty(100).probs()
    np.testing.assert_allclose(np.asarray(p), np.full(100, 0.01))


def test_config_checks():
    base = get_preset("digits")
    from jdiff.config import apply_overrides

    with pytest.raises(ConfigError, match="learned variance"):
        apply_overrides(base, {"diffusion.loss": "hybrid"})
    with pytest.raises(ConfigError, match="needs diffusion.loss vlb or hybrid"):
        apply_overrides(base, {"diffusion.t_sampling": "importance"})
    dit = get_preset("dit")
    assert dit.diffusion.loss == "hybrid" and dit.learned_variance()
    assert base.data.pixel_levels() == 17 and get_preset("cifar10").data.pixel_levels() == 256


def test_heldout_bpd_is_logged(tiny_config):
    c = tiny_config(**{"run.eval_every": 2, "run.eval_num": 8})
    train(c, devices=jax.devices()[:1], **QUIET)
    with open(os.path.join(c.run.workdir, "metrics.jsonl")) as f:
        recs = [r for r in map(json.loads, f) if "eval_vlb_bpd" in r]
    assert [r["step"] for r in recs] == [2, 4]
    assert all(3.0 < r["eval_vlb_bpd"] < 30.0 for r in recs)  # a 4-step model: a poor but finite bound


@pytest.mark.slow
def test_hybrid_gets_lower_heldout_vlb_than_simple(tiny_config, tmp_path):
    """Same tiny U-Net with a variance head, same data, seed and steps: the hybrid loss trains the head, L_simple
    leaves it at its zero initialisation (the geometric mean of beta and beta-tilde), so the hybrid run's
    held-out VLB (64 test digits) is lower."""
    over = {
        "optim.steps": 300,
        "optim.batch_size": 64,
        "optim.lr": 3e-3,
        "run.checkpoint_every": 0,
        "run.log_every": 100,
        "model.learn_sigma": True,
    }
    bpd = {}
    for loss in ("simple", "hybrid"):
        c = tiny_config(workdir=tmp_path / loss, **over, **{"diffusion.loss": loss})
        train(c, devices=jax.devices()[:1], **QUIET)
        config, model, schedule, ema = load_for_inference(c.run.workdir)
        batch = heldout_batch(config, 64)
        fn = make_bpd_fn(
            model, build_schedule(config), prediction=config.diffusion.prediction, levels=config.data.pixel_levels()
        )
        bpd[loss] = float(np.mean(fn(ema, batch["image"], batch["label"], jax.random.key(0))))
    assert bpd["hybrid"] < bpd["simple"] - 0.1, bpd
