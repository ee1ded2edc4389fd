"""Several processes that agree when to stop (`jdiff.training.stops`), launched as on a cluster: two train.py
processes on localhost joined by jax.distributed (CPU collectives) stand in for the hosts of a pod. Only one of
them receives SIGTERM, or only one of them reads an unreadable image: both stop at the same step, save one
restorable checkpoint and exit with the same status, within a bounded time."""

import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from conftest import REPO, TINY_FLAGS

from jdiff.run import Checkpointer, load_for_inference

TIMEOUT_S = 240  # each process must have exited by then (a hang fails the test instead of CI)


def _port_free(port):
    with socket.socket() as s:
        try:
            s.bind(("localhost", port))
        except OSError:
            return False
        return True


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _slurm_env(n):
    """What `srun --ntasks=N` on one node sets for each task, with a job id whose coordinator port (JAX derives
    it from SLURM_JOB_ID: 61440 + id % 4096) is free here."""
    job = next(j for j in random.Random(os.getpid()).sample(range(100_000), 200) if _port_free(61440 + j % 4096))
    env = {"SLURM_JOB_ID": str(job), "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": str(n)}
    return [{**env, "SLURM_PROCID": str(i), "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": "1"} for i in range(n)]


def _start(args, cwd, env):
    env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS="--xla_force_host_platform_device_count=1", **env)
    cmd = [sys.executable, str(REPO / "train.py"), *TINY_FLAGS, *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs):
    """(return codes, stderr texts); kills whatever is still running after TIMEOUT_S."""
    deadline, errs = time.time() + TIMEOUT_S, []
    try:
        for p in procs:
            errs.append(p.communicate(timeout=max(deadline - time.time(), 1))[1])
    except subprocess.TimeoutExpired:
        pytest.fail(f"a process did not exit within {TIMEOUT_S}s (hang)")
    finally:
        for p in procs:
            p.kill()
    return [p.returncode for p in procs], errs


def _restorable(wd, step):
    with Checkpointer(str(wd), create=False) as ck:
        assert ck.latest_step() == step
    _, _, _, params = load_for_inference(str(wd), which="params")
    assert params is not None


@pytest.mark.subprocess
def test_sigterm_on_one_process_under_slurm_stops_both_at_the_same_step(tmp_path):
    """`train.py --coordinator_address auto` under (simulated) SLURM srun; SIGTERM reaches process 1 only.
    Without the agreement process 1 would save alone and wait forever in the collective save (or, with JAX's
    preemption notifier taking SIGTERM, never stop)."""
    wd = tmp_path / "run"
    args = ["--optim.steps", "100000", "--run.checkpoint_every", "0", "--run.log_every", "1"]
    args += ["--sampling.num_samples", "0", "--run.workdir", str(wd), "--coordinator_address", "auto"]
    slurm = _slurm_env(2)
    procs = [_start(args, tmp_path, slurm[i]) for i in range(2)]
    deadline = time.time() + TIMEOUT_S
    metrics = wd / "metrics.jsonl"
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    codes, errs = _finish(procs)
    assert codes == [0, 0], errs
    assert "2 device(s)" in errs[0], errs[0]
    steps = []
    for err in errs:
        line = next((x for x in err.splitlines() if "stopped by SIGTERM (on process 1) at step" in x), None)
        assert line is not None and "Traceback" not in err, err
        steps.append(int(line.split("at step ")[1].split(":")[0]))
    assert steps[0] == steps[1] >= 2
    _restorable(wd, steps[0])
    assert json.loads(metrics.read_text().splitlines()[-1])["step"] == steps[0]


def _corrupt_png(size):
    """A PNG with a valid signature, header and CRCs (it passes the start-up check) whose pixel data is not zlib."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"not zlib data") + chunk(b"IEND", b"")


@pytest.mark.subprocess
def test_an_unreadable_image_on_one_process_stops_both_at_the_same_step(tmp_path):
    """32 images, global batch 8 over 2 processes: the one file that process 1 alone reads first at step 2 has
    corrupt pixel data. Both stop before step 2, save checkpoint 2 and exit with status 1: process 1 naming
    the file, process 0 naming process 1."""
    from PIL import Image

    from jdiff.config import apply_overrides, get_preset
    from jdiff.data import ImageFolderSource, sampler

    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(32):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    source = ImageFolderSource(root, 8)
    seed = apply_overrides(get_preset("digits"), {}).run.seed

    def files(step, process):
        rows = sampler.host_rows(8, process, 2)
        return {source.files[i] for i in sampler.indices_at(len(source), step * 8 + rows, seed)}

    earlier = files(0, 0) | files(0, 1) | files(1, 0) | files(1, 1) | files(2, 0)
    bad = sorted(files(2, 1) - earlier)[0]
    bad.write_bytes(_corrupt_png(8))
    wd = tmp_path / "run"
    args = ["--data.dataset", str(root), "--data.image_size", "8", "--data.channels", "3"]
    args += ["--data.class_conditional", "false", "--optim.steps", "6", "--run.checkpoint_every", "0"]
    args += ["--sampling.num_samples", "0", "--run.workdir", str(wd)]
    args += ["--coordinator_address", f"localhost:{_free_port()}", "--num_processes", "2"]
    procs = [_start([*args, "--process_id", str(i)], tmp_path, {}) for i in range(2)]
    codes, errs = _finish(procs)
    assert codes == [1, 1], errs
    last = [err.strip().splitlines()[-1] for err in errs]
    assert last[1].startswith("train.py: error: cannot decode image file") and bad.name in last[1], errs[1]
    assert last[0] == (
        "train.py: error: process 1 could not read its batch for step 2 (its log names the file); every process "
        "stopped at step 2 with a checkpoint"
    ), errs[0]
    _restorable(wd, 2)


@pytest.mark.parametrize(
    "flags, env, words",
    [
        (["--coordinator_address", "host0:1234"], {}, "needs --num_processes and --process_id"),
        (["--coordinator_address", "host0:1234", "--num_processes", "2", "--process_id", "2"], {}, "in [0, 2), got 2"),
        (
            [],
            {"JDIFF_COORDINATOR_ADDRESS": "auto", "JDIFF_NUM_PROCESSES": "2", "JDIFF_PROCESS_ID": "first"},
            "JDIFF_PROCESS_ID must be an integer, got 'first'",
        ),
    ],
)
def test_bad_multi_host_settings_are_one_line(flags, env, words, monkeypatch, capsys, tmp_path):
    from jdiff.cli import train as cli

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        cli.main([*flags, "--run.workdir", str(tmp_path / "w")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("train.py: error: distributed initialisation failed: ") and words in lines[0], lines


def test_one_process_votes_alone_and_a_data_error_outranks_a_signal():
    from jdiff.training.stops import Stop, StopVote

    vote = StopVote()
    assert vote.count == 1
    assert vote(3, None, False) is None
    assert vote(3, "SIGINT", False) == Stop("SIGINT", 0, 3)
    assert vote(4, "SIGTERM", True) == Stop("data", 0, 4)  # exit status 1, not a clean stop
