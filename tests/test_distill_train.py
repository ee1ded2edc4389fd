"""Distillation runs (jdiff.training.distill, python -m jdiff.cli.distill) on a tiny teacher: exact resume of
every method (across a progressive round boundary), the teacher kept / replaced in the state, the student's
recorded sampler used by sample.py without flags, and the one-line errors of the command line."""

import functools
import json
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import make_tiny_config

from jdiff.cli import distill as cli
from jdiff.run import Checkpointer, load_params, open_run, save_run_config
from jdiff.training import train
from jdiff.training.distill import METHODS, DistillConfig, distill_setup

QUIET = dict(progress=False, log=lambda s: None)
DEV = jax.devices()[:1]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A finished tiny run (4 steps) to distil."""
    config = make_tiny_config(tmp_path_factory.mktemp("teacher") / "run")
    train(config, devices=DEV, **QUIET)
    return config.run.workdir


def _distill(method, teacher_dir):
    d = DistillConfig.parse(
        {
            "method": method,
            "teacher": None if method == "consistency_training" else teacher_dir,
            "teacher_steps": 8,
            "rounds": 2,
            "s1": 40,
        }
    )
    params = None if d.teacher is None else load_params(open_run(teacher_dir))[2]
    return d, params, functools.partial(distill_setup, distill=d, teacher_params=params)


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_resume_is_exact(teacher, tmp_path, method):
    """6 steps in one call == 3 steps, stop, resume for 3 (the whole state, teacher included, bitwise); progressive
    with 2 rounds of 3 steps: the stop falls on the round boundary, where the teacher becomes the EMA student."""
    d, params, build = _distill(method, teacher)
    over = {"optim.steps": 6, "run.checkpoint_every": 4, "model.dropout": 0.1, "data.label_dropout": 0.3}
    a, b = (make_tiny_config(tmp_path / n, **over) for n in ("a", "b"))
    assert train(a, devices=DEV, build=build, **QUIET).step == 6
    assert train(b, devices=DEV, build=build, stop_after=3, **QUIET).stopped_by == "stop_after"
    assert train(b, devices=DEV, build=build, **QUIET).step == 6
    abstract = build(a, DEV).abstract_state
    with Checkpointer(a.run.workdir, create=False) as ck:
        sa = ck.restore(abstract, 6)
    with Checkpointer(b.run.workdir, create=False) as ck:
        sb = ck.restore(abstract, 6)
    assert int(sa.step) == 6 and _leaves_equal(sa, sb)
    assert not _leaves_equal(sa.params, sa.ema_params)  # it trained
    if method == "consistency":
        assert _leaves_equal(sa.teacher, params)  # CD: the teacher never changes
    elif method == "progressive":
        assert not _leaves_equal(sa.teacher, params)  # round 2's teacher is round 1's EMA student
    else:
        assert sa.teacher is None
    rec = json.load(open(os.path.join(b.run.workdir, "config.json")))["derived"]
    want = ("ddim", 2) if method == "progressive" else ("consistency", 1)
    assert (rec["sampler"]["sampler"], rec["sampler"]["steps"], rec["distill"]["method"]) == (*want, method)


def test_cli_student_is_sampled_with_its_recorded_sampler(teacher, tmp_path, capsys):
    """distill (2 steps) then `sample.py --workdir STUDENT` with no sampler flags draws with the recorded
    consistency sampler, 2 steps, trailing and its sigma_min; --steps overrides the step count only."""
    from jdiff.cli import sample

    out = str(tmp_path / "student")
    argv = ["--teacher", teacher, "--method", "consistency", "--workdir", out, "--optim.steps", "2"]
    assert cli.main([*argv, "--distill.s1", "40", "--distill.sample_steps", "2", "--no_progress"]) == 0
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["config"]["sampling"]["sampler"] == "consistency"
    assert sample.main(["--workdir", out, "--num", "8", "--no-cache", "--no-progress"]) == 0
    npz = np.load(os.path.join(out, "samples", "consistency_2steps_seed0.npz"))
    assert str(npz["sampler"]) == "consistency" and int(npz["steps"]) == 2 and str(npz["spacing"]) == "trailing"
    sigma_min = cfg["derived"]["sampler"]["options"]["sigma_min"]
    assert float(npz["sigma_min"]) == pytest.approx(sigma_min)
    # running the command again resumes: already at its steps, nothing to do
    assert cli.main([*argv, "--no_progress"]) == 0
    assert "already trained to step 2" in capsys.readouterr().err


def _fails(argv, code, capsys, *words):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == code and len(err.splitlines()) == 1 and err.startswith("distill: error:"), err
    for w in words:
        assert w in err, err


def test_cli_errors_are_one_line(teacher, tmp_path, capsys):
    out = str(tmp_path / "s")
    _fails(["--method", "progressive", "--workdir", out], 2, capsys, "--teacher")
    _fails(["--teacher", teacher, "--method", "consistency_training", "--workdir", out], 2, capsys, "without a teacher")
    _fails(["--teacher", teacher, "--method", "consistency"], 2, capsys, "--workdir")
    _fails(["--teacher", teacher, "--workdir", out, "--model.ch", "16"], 2, capsys, "model.fields")
    _fails(["--teacher", teacher, "--workdir", out, "--distill.rounds", "7"], 2, capsys, "teacher_steps")
    _fails(["--teacher", teacher, "--workdir", out, "--distill.nope", "1"], 2, capsys, "distill.nope")
    _fails(["--teacher", teacher, "--workdir", out, "--optim.nope", "1"], 2, capsys, "optim.nope")
    _fails(["--teacher", str(tmp_path / "missing"), "--workdir", out], 1, capsys, "no config.json")
    # a teacher without a checkpoint
    bare = tmp_path / "bare"
    run = open_run(teacher)
    save_run_config(str(bare), run.config, run.derived)
    _fails(["--teacher", str(bare), "--workdir", out], 1, capsys, "checkpoint")
    # a teacher trained on other data
    other = tmp_path / "other"
    shutil.copytree(teacher, other)
    save_run_config(str(other), run.config, {**run.derived, "dataset_size": 99})
    _fails(["--teacher", str(other), "--workdir", out, "--no_progress"], 1, capsys, "other data", "dataset_size")
    assert not os.path.exists(os.path.join(out, "checkpoints"))
