"""The loop: a non-finite loss stops training without writing the bad state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff.run import Checkpointer
from jdiff.training import NonFiniteLossError, setup, train
from jdiff.training.state import tree_all_finite


@pytest.mark.parametrize("log_every", [1, 100])
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tiny_config, tmp_path, log_every):
    over = {"optim.steps": 20, "run.checkpoint_every": 2, "run.log_every": log_every, "sampling.num_samples": 4}
    config = tiny_config(workdir=tmp_path / "nan", **over)

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


def test_a_second_training_process_on_the_same_workdir_is_refused(tiny_config, tmp_path):
    """The run directory is locked while a run trains: another process (here: another lock holder) refuses
    at once with one line naming the holder, and nothing of the run is written."""
    import os

    from jdiff.run import RunError, workdir_lock

    config = tiny_config(workdir=tmp_path / "locked")
    with workdir_lock(config.run.workdir):
        with pytest.raises(RunError, match=rf"in use by another training process \(pid {os.getpid()}\)") as e:
            train(config, devices=jax.devices()[:1], progress=False, log=lambda s: None)
        assert "\n" not in str(e.value)
        assert not (tmp_path / "locked" / "config.json").exists()


@pytest.mark.subprocess
def test_the_lock_dies_with_its_holder(tmp_path):
    """kill -9 of the holder releases the lock (an OS lock): no stale lock blocks a resume."""
    import signal
    import subprocess
    import sys

    from jdiff.run import RunError, workdir_lock

    code = (
        "import sys, time\nfrom jdiff.run.rundir import workdir_lock\n"
        "with workdir_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunError, match=f"pid {proc.pid}"):
            with workdir_lock(str(tmp_path)):
                pass
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    with workdir_lock(str(tmp_path)):  # free again
        pass


def test_metrics_of_replayed_steps_are_dropped_on_resume(tmp_path):
    """After a kill, the steps after the restored checkpoint are trained again: their old records (and a line
    torn by the kill) are dropped, so every step appears once."""
    import json

    from jdiff.training.metrics_log import MetricsWriter

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (2, 4, 6)) + '{"step": 8, "lo')
    w = MetricsWriter(str(tmp_path), after_step=4)
    w.write({"step": 6, "loss": 0.5})
    w.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4, 6]
    assert json.loads(path.read_text().splitlines()[-1])["loss"] == 0.5


def test_a_data_error_during_training_saves_the_steps_taken_first(tiny_config, tmp_path):
    """An image that becomes unreadable mid-run: the steps already taken are checkpointed, then the one-line
    DataError naming the file is raised (the command line exits 1 with it)."""
    from PIL import Image

    from jdiff.data import DataError
    from jdiff.run import Checkpointer

    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / f"{i}.png")
    config = tiny_config(
        workdir=tmp_path / "run",
        **{"data.dataset": str(root), "data.image_size": 8, "data.channels": 3, "optim.steps": 40},
        **{"run.checkpoint_every": 0, "data.class_conditional": False},
    )

    def break_files(step, batch):
        if step == 2:
            for f in root.iterdir():
                f.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
        return batch

    with pytest.raises(DataError) as e:
        train(config, devices=jax.devices()[:1], batch_hook=break_files, progress=False, log=lambda s: None)
    assert "imgs" in str(e.value) and "\n" not in str(e.value)
    with Checkpointer(config.run.workdir, create=False) as ck:
        assert ck.latest_step() is not None and ck.latest_step() >= 3
