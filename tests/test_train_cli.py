"""train.py as users run it: end to end, clean stops on SIGTERM/SIGINT, one-line errors, resume rules,
an image-folder dataset, and two processes on localhost (jax.distributed with CPU collectives)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO, TINY_FLAGS, run_train_py, start_train_py

from jdiff.cli import train as cli
from jdiff.run import Checkpointer, load_for_inference
from jdiff.sampling import SAMPLERS
from jdiff.training import train

QUIET = dict(progress=False, log=lambda s: None)


def _read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _copy_run(wd, tmp_path):
    import shutil

    shutil.copytree(wd, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.subprocess
def test_train_py_writes_config_metrics_checkpoints_and_grid(cli_run):
    wd = cli_run
    saved = json.loads((wd / "config.json").read_text())
    assert saved["config"]["optim"]["steps"] == 4 and saved["config"]["model"]["fields"]["ch"] == 8
    assert saved["derived"] == {**saved["derived"], "num_classes": 10, "image_shape": [8, 8, 1]}
    assert [m["step"] for m in _read_metrics(wd)] == [2, 4]
    assert all(np.isfinite(m["loss"]) and m["lr"] > 0 for m in _read_metrics(wd))
    assert sorted(os.listdir(wd / "checkpoints")) == ["2", "4"]
    from PIL import Image

    grid = Image.open(wd / "samples" / "step_000004.png")
    assert grid.size == (4 * (8 * 4 + 1) + 1, 8 * 4 + 2)  # 4 tiles of 8x8 upscaled 4x, 1 px padding


@pytest.mark.subprocess
def test_train_py_again_with_more_steps_resumes_and_keeps_the_last_k(cli_run, tmp_path):
    """Running again with a larger --optim.steps resumes from the saved checkpoint instead of starting over;
    --run.keep_checkpoints 2 still holds."""
    wd = _copy_run(cli_run, tmp_path)
    r = run_train_py(["--run.workdir", str(wd), "--optim.steps", "6", "--no_progress"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "resumed from checkpoint step 4" in r.stderr
    assert [m["step"] for m in _read_metrics(wd)] == [2, 4, 6]
    assert sorted(os.listdir(wd / "checkpoints")) == ["4", "6"]


@pytest.mark.subprocess
def test_train_py_on_a_damaged_checkpoint_is_one_line(cli_run, tmp_path):
    """A damaged latest checkpoint: one line naming it and the older one to fall back to, no traceback."""
    import shutil

    wd = _copy_run(cli_run, tmp_path)
    shutil.rmtree(wd / "checkpoints" / "4" / "default" / "d")
    r = run_train_py(["--run.workdir", str(wd), "--optim.steps", "8", "--no_progress"], cwd=tmp_path)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("train.py: error: checkpoint ") and "Traceback" not in r.stderr, r.stderr
    assert "corrupted" in lines[-1] and "resume from checkpoint 2" in lines[-1], lines[-1]
    assert sorted(os.listdir(wd / "checkpoints")) == ["2", "4"]  # nothing deleted


def test_a_config_json_of_another_model_is_one_line(cli_run, tmp_path, capsys):
    """config.json edited to another model than the checkpoints': one line saying so, no traceback and no
    advice to fall back to an older checkpoint (those share the mismatch)."""
    wd = _copy_run(cli_run, tmp_path)
    meta = json.loads((wd / "config.json").read_text())
    meta["config"]["model"]["fields"]["ch"] = 16
    (wd / "config.json").write_text(json.dumps(meta))
    code, line = _fail(["--run.workdir", str(wd), "--optim.steps", "8", "--no_progress"], capsys)
    assert code == 1 and "does not match the model of the run's config.json" in line, line
    assert "resume from checkpoint" not in line


@pytest.mark.subprocess
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    wd = tmp_path / "run"
    args = [
        *TINY_FLAGS,
        "--optim.steps",
        "100000",
        "--run.checkpoint_every",
        "0",
        "--run.log_every",
        "1",
        "--run.workdir",
        str(wd),
    ]
    proc = start_train_py(args, cwd=tmp_path)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if (wd / "metrics.jsonl").exists() and len(_read_metrics(wd)) >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    with Checkpointer(str(wd), create=False) as ck:
        step = ck.latest_step()
    assert step is not None and step >= 3
    assert f"saved checkpoint {step}" in err
    assert not (wd / "samples").exists()  # an interrupted run writes no final grid


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_signal_in_process_stops_at_a_checkpoint_on_an_image_folder(tmp_path, tiny_config, sig):
    """A signal during training (sent from the data hook at step 3) finishes that step, saves it and
    returns; the run trains on an image folder with two class subfolders."""
    from PIL import Image

    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    config = tiny_config(
        **{"data.dataset": str(root), "data.image_size": 8, "data.channels": 3, "optim.steps": 50},
        **{"run.checkpoint_every": 0, "sampling.every": 0, "sampling.num_samples": 4},
    )

    def hook(step, batch):
        assert batch["image"].shape == (8, 8, 8, 3) and int(np.max(batch["label"])) <= 1
        if step == 3:
            os.kill(os.getpid(), sig)
        return batch

    result = train(config, devices=jax.devices()[:2], batch_hook=hook, **QUIET)
    assert (result.step, result.stopped_by, result.last_checkpoint) == (4, sig.name, 4)
    assert result.sample_path is None
    assert signal.getsignal(sig) is not None  # handlers restored
    cfg, model, _, _ = load_for_inference(config.run.workdir)
    assert model.num_classes == 2 and cfg.data.dataset == str(root)


def _fail(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), err
    return e.value.code, lines[0]


BAD_FLAGS = {
    "unknown_flag": (["--optim.lrr", "1e-3"], "did you mean --optim.lr"),
    "bare_field_name": (["--lr", "1e-3"], "unrecognized argument '--lr' (did you mean --optim.lr?)"),
    "no_set_flag": (["--set", "optim.lr=1"], "unrecognized argument '--set'"),
    "bad_float": (["--optim.lr", "fast"], "bad value 'fast' for optim.lr"),
    "bad_float_dotted": (["--optim.lr=fast"], "bad value 'fast' for optim.lr"),
    "bad_choice": (["--sampling.sampler", "nope"], "allowed: " + ", ".join(sorted(SAMPLERS))),
    "bad_range": (["--optim.batch_size", "0"], "batch_size must be >= 1"),
    "bad_preset": (["--preset", "imagenet"], "invalid choice"),
    "unknown_model": (["--model.name", "resnet"], "bad value 'resnet' for model.name; allowed: dit_b2"),
    "unknown_sampler_option": (["--sampling.etaa", "1"], "sampler 'ddim' has no option 'etaa' (its options: eta)"),
    "option_of_another_sampler": (
        ["--sampling.sampler", "euler", "--sampling.eta", "1"],
        "sampler 'euler' has no option 'eta'",
    ),
    "bad_sampler_option": (["--sampling.eta", "2"], "sampling.eta must be in [0, 1]"),
    "unknown_model_field": (["--model.chanels", "8"], "unknown model field(s) ['chanels']"),
    "model_flag_without_value": (["--model.ch"], "needs a value"),
    "model_field_breaks_the_model": (["--model.ch", "0"], "cannot be built for (8, 8, 1) images"),
    "seed_out_of_range": (
        ["--run.seed", "1e30"],
        "run.seed must be in [0, 4294967295], got 1000000000000000019884624838656",
    ),
    "infinite_lr": (["--optim.lr", "inf"], "optim.lr must be finite"),
    "steps_above_T": (["--sampling.steps", "2000"], "sampling.steps (2000) must be <= diffusion.num_timesteps"),
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flags_exit_2_with_one_line(case, capsys, tmp_path):
    argv, words = BAD_FLAGS[case]
    code, line = _fail([*argv, "--run.workdir", str(tmp_path / "w")], capsys)
    assert code == 2 and words in line, line
    assert not (tmp_path / "w").exists()  # nothing is created for a rejected command


def test_run_time_errors_exit_with_one_line(tmp_path, capsys):
    """Errors found once the run starts: a missing dataset or an unprepared tfds one (no download), a batch that
    does not split over the devices, --resume without a checkpoint."""
    code, line = _fail(
        [
            "--data.dataset",
            str(tmp_path / "no_such_dir"),
            "--run.workdir",
            str(tmp_path / "a"),
            "--data.image_size",
            "8",
        ],
        capsys,
    )
    assert code == 2 and "cannot open dataset" in line, line
    code, line = _fail(
        ["--data.dataset", "mnist", "--data.data_dir", str(tmp_path / "tfds"), "--run.workdir", str(tmp_path / "a")],
        capsys,
    )
    assert code == 2 and "not prepared" in line and "tfds build mnist" in line, line
    code, line = _fail([*TINY_FLAGS, "--optim.batch_size", "12", "--run.workdir", str(tmp_path / "b")], capsys)
    assert code == 2 and f"number of devices ({jax.device_count()})" in line, line
    code, line = _fail(["--resume", "--run.workdir", str(tmp_path / "c")], capsys)
    assert code == 1 and "no checkpoint" in line, line
    (tmp_path / "a_file").write_text("")
    code, line = _fail([*TINY_FLAGS, "--run.workdir", str(tmp_path / "a_file")], capsys)
    assert code == 1 and "cannot write the run in" in line, line


def test_resume_keeps_the_saved_model_and_data(tmp_path, capsys):
    """In a workdir with config.json, flags override the saved config, but a change of model/data is refused."""
    from jdiff.cli.train import resolve_config
    from jdiff.config import ConfigError, apply_overrides, get_preset
    from jdiff.run import save_run_config

    wd = str(tmp_path / "run")
    saved = apply_overrides(get_preset("digits"), {"run.workdir": wd, "optim.lr": "1e-3", "model.ch": "16"})
    save_run_config(wd, saved, {"num_classes": 10, "image_shape": [8, 8, 1]})
    with pytest.raises(ConfigError, match="model.fields"):  # no checkpoint yet: still that run's config
        resolve_config(None, {"run.workdir": wd, "model.ch": "32"})
    config, resumed = resolve_config(None, {"run.workdir": wd, "optim.steps": "7"})
    assert resumed and config.optim.lr == 1e-3 and config.optim.steps == 7
    os.makedirs(os.path.join(wd, "checkpoints", "10"))
    config, resumed = resolve_config(None, {"run.workdir": wd, "optim.steps": "50"})
    assert resumed and config.optim.lr == 1e-3 and config.optim.steps == 50 and config.model.fields == {"ch": 16}
    code, line = _fail(["--run.workdir", wd, "--model.ch", "32"], capsys)
    assert code == 2 and "model.fields: {'ch': 16} -> {'ch': 32}" in line, line
    code, line = _fail(["--run.workdir", wd, "--preset", "mnist"], capsys)
    assert code == 2 and "data.dataset: 'digits' -> 'mnist'" in line, line


def test_print_config(capsys):
    assert cli.main(["--preset", "cifar10", "--optim.lr", "1e-4", "--print_config"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["name"] == "unet_ddpm_cifar10" and out["optim"]["lr"] == 1e-4
    assert out["data"]["random_flip"] is True


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.subprocess
@pytest.mark.parametrize("mesh", [None, "data=2,fsdp=2"])
def test_two_processes_on_localhost_equal_one_process(tmp_path, tiny_config, mesh):
    """Two train.py processes (2 CPU devices each) joined by jax.distributed train the same model as one
    process on 4 devices: same global batch, same noise, gradients all-reduced across processes; with
    --run.mesh data=2,fsdp=2 the parameters, EMA and Adam moments are also split over fsdp (every leaf)."""
    wd = tmp_path / "mp"
    flags = [
        *TINY_FLAGS,
        "--optim.steps",
        "3",
        "--run.checkpoint_every",
        "0",
        "--sampling.num_samples",
        "0",
        "--optim.lr",
        "1e-3",
        "--run.workdir",
        str(wd),
        "--coordinator_address",
        f"localhost:{_free_port()}",
        "--num_processes",
        "2",
        *(["--run.mesh", mesh, "--run.fsdp_min_size", "0"] if mesh else []),
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), *flags, "--process_id", str(i)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        errs = [p.communicate(timeout=240)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], errs
    assert "4 device(s)" in errs[0]
    ref = tiny_config(
        workdir=tmp_path / "one",
        **{"optim.steps": 3, "run.checkpoint_every": 0, "sampling.num_samples": 0, "run.log_every": 2},
    )
    train(ref, devices=jax.devices()[:4], **QUIET)
    _, _, _, p_mp = load_for_inference(str(wd), which="params")
    _, _, _, p_one = load_for_inference(ref.run.workdir, which="params")
    for a, b in zip(jax.tree.leaves(p_mp), jax.tree.leaves(p_one)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    m_mp, m_one = _read_metrics(wd), _read_metrics(ref.run.workdir)
    assert [m["step"] for m in m_mp] == [2, 3]
    np.testing.assert_allclose([m["loss"] for m in m_mp], [m["loss"] for m in m_one], rtol=1e-5)


@pytest.mark.subprocess
def test_ctrl_c_at_any_moment_of_start_up_stops_cleanly(tmp_path):
    """SIGINT while Python imports, during set-up, or twice during the train step's compilation: one interrupt
    stops with status 0 and one line (never lost, never a segfault); a second exits at once with status 130 and
    one line. Each process interrupts itself at the named phase (`jdiff.signals.signal_point`, through
    JDIFF_TEST_SIGNAL_AT), so the phase is the one named, not whatever a sleep happened to reach."""
    cases = {"import": ("import", 0), "setup": ("setup", 0), "twice": ("compile:2", 130)}
    procs = {
        name: start_train_py(
            [*TINY_FLAGS, "--optim.steps", "100000", "--run.workdir", str(tmp_path / name)],
            cwd=tmp_path,
            devices=1,
            # no persistent cache: the compilation the second SIGINT interrupts is a real one
            env={"JDIFF_TEST_SIGNAL_AT": phase, "JAX_ENABLE_COMPILATION_CACHE": "false"},
        )
        for name, (phase, _) in cases.items()
    }
    try:
        out = {name: p.communicate(timeout=240) for name, p in procs.items()}
    finally:
        for p in procs.values():
            p.kill()
    for name, (_, code) in cases.items():
        err = out[name][1]
        assert procs[name].returncode == code, (name, err)
        assert "Traceback" not in err, (name, err)
    for name in ("import", "setup"):
        assert "stopped by SIGINT before the first step" in out[name][1], out[name][1]
        assert "compiled the train step" not in out[name][1], out[name][1]
    lines = out["twice"][1].strip().splitlines()
    assert lines[-1].startswith("train.py: error: interrupted twice"), out["twice"][1]
    assert sum("error" in line for line in lines) == 1, out["twice"][1]
    assert "compiled the train step" not in out["twice"][1], out["twice"][1]  # it ended during the compilation


def test_unreadable_images_are_skipped_with_one_warning_or_refused(tmp_path, capsys):
    """A folder with one file that has a PNG signature and garbage after it: skipped with one warning naming it
    (the default), or refused with one line (--data.on_bad_image error), before anything is trained."""
    import warnings

    from PIL import Image

    from jdiff.config import apply_overrides, get_preset
    from jdiff.run import build_source

    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(5):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / f"{i}.png")
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    config = apply_overrides(
        get_preset("digits"), {"data.dataset": str(root), "data.image_size": 8, "run.workdir": str(tmp_path)}
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        source = build_source(config)
    assert len(source) == 5 and len(caught) == 1 and "bad.png" in str(caught[0].message)
    code, line = _fail(
        [
            "--data.dataset",
            str(root),
            "--data.image_size",
            "8",
            "--data.on_bad_image",
            "error",
            "--run.workdir",
            str(tmp_path / "w"),
        ],
        capsys,
    )
    assert code == 2 and "bad.png" in line, line
