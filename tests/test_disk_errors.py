"""A full disk and a read-only file system, made real with a small tmpfs mount (needs root, as in CI; skipped
otherwise): train.py and sample.py end with one line and the right exit status, and a run stopped by a full
disk resumes once there is space."""

import os
import subprocess
import sys
import uuid

import pytest
from conftest import REPO, TINY_FLAGS, run_train_py

pytestmark = pytest.mark.subprocess


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, read_only=False) -> a fresh tmpfs directory of `size` (e.g. "400k"), unmounted afterwards."""
    mounted = []

    def mount(size, read_only=False):
        path = tmp_path / f"fs_{uuid.uuid4().hex[:6]}"
        path.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.decode().strip()}")
        mounted.append(path)
        (path / "existing").mkdir()
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _one_line_error(proc, status, *needles):
    assert proc.returncode == status, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.mark.slow
def test_full_disk_stops_with_one_line_and_the_run_resumes_with_space(tmpfs, tmp_path):
    fs = tmpfs("400k")  # room for config.json and part of a checkpoint
    run = str(fs / "run")
    args = ["--run.workdir", run, *TINY_FLAGS, "--run.checkpoint_every", "2", "--run.keep_checkpoints", "50"]
    full = run_train_py([*args, "--optim.steps", "40"], cwd=tmp_path)
    _one_line_error(full, 1, "cannot write checkpoint", "No space left on device")
    assert not [n for n in os.listdir(os.path.join(run, "checkpoints")) if n.isdigit()]  # no half checkpoint
    subprocess.run(["mount", "-o", "remount,size=16m", str(fs)], check=True)
    again = run_train_py([*args, "--optim.steps", "4"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(int(n) for n in os.listdir(os.path.join(run, "checkpoints")) if n.isdigit()) == [2, 4]


def test_read_only_workdir_and_out_are_one_line(tmpfs, tmp_path, cli_run):
    fs = tmpfs("1m", read_only=True)
    for workdir in (fs / "new_run", fs / "existing"):
        proc = run_train_py(["--run.workdir", str(workdir), *TINY_FLAGS], cwd=tmp_path)
        _one_line_error(proc, 1, "Read-only file system")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, str(REPO / "sample.py"), "--workdir", str(cli_run), "--out", str(fs / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    # --out is checked before anything is compiled.
    _one_line_error(proc, 2, "--out", "Read-only file system")
