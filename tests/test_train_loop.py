"""The loop: a non-finite loss stops training without writing the bad state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff.training.checkpoint import Checkpointer, with_shardings
from jdiff.training.factory import build_model
from jdiff.training.loop import NonFiniteLossError, train
from jdiff.training.mesh import make_mesh, replicated
from jdiff.training.optim import make_optimizer
from jdiff.training.state import init_train_state, tree_all_finite


@pytest.mark.parametrize("log_every", [1, 100])
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tiny_config, tmp_path, log_every):
    config = tiny_config(workdir=tmp_path / "nan", steps=20, checkpoint_every=2, log_every=log_every,
                         num_samples=4)

    def poison(step, batch):
        if step == 5:
            return dict(batch, image=batch["image"] * jnp.nan)
        return batch

    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 5\b") as e:
        train(config, devices=jax.devices()[:1], batch_hook=poison, progress=False, log=lambda s: None)
    assert e.value.step == 5 and e.value.last_checkpoint == 4
    assert "last good checkpoint is step 4" in str(e.value)
    model = build_model(config, 10)
    abstract = jax.eval_shape(lambda: init_train_state(model, make_optimizer(config), (8, 8, 1), 0))
    abstract = with_shardings(abstract, replicated(make_mesh(jax.devices()[:1])))
    with Checkpointer(config.workdir, create=False) as ck:
        assert ck.all_steps() == [2, 4]
        for s in ck.all_steps():
            state = ck.restore(abstract, s)
            assert bool(tree_all_finite(state)) and int(state.step) == s
    assert not (tmp_path / "nan" / "samples").exists()  # no grid from a broken model
