"""The loop: a non-finite loss stops training without writing the bad state."""

import jax
import jax.numpy as jnp
import pytest

from jdiff.run import Checkpointer
from jdiff.training import NonFiniteLossError, setup, train
from jdiff.training.state import tree_all_finite


@pytest.mark.parametrize("log_every", [1, 100])
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tiny_config, tmp_path, log_every):
    config = tiny_config(workdir=tmp_path / "nan", steps=20, checkpoint_every=2, log_every=log_every, num_samples=4)

    def poison(step, batch):
        if step == 5:
            return dict(batch, image=batch["image"] * jnp.nan)
        return batch

    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 5\b") as e:
        train(config, devices=jax.devices()[:1], batch_hook=poison, progress=False, log=lambda s: None)
    assert e.value.step == 5 and e.value.last_checkpoint == 4
    assert "last good checkpoint is step 4" in str(e.value)
    abstract = setup(config, jax.devices()[:1]).abstract_state
    with Checkpointer(config.run.workdir, create=False) as ck:
        assert ck.all_steps() == [2, 4]
        for s in ck.all_steps():
            state = ck.restore(abstract, s)
            assert bool(tree_all_finite(state)) and int(state.step) == s
    assert not (tmp_path / "nan" / "samples").exists()  # no grid from a broken model
