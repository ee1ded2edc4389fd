"""sample.py end to end on a tiny checkpoint (written with the training module's own functions; the weights
are random, filled from the abstract TrainState so that no init program has to compile)."""

import concurrent.futures
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import shared_once, write_random_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_PY = os.path.join(REPO, "sample.py")
T = 100  # the tiny runs' number of diffusion steps
TILE = 8 * 8 + 1  # an 8x8 image upscaled 8x plus the 1 px grid padding


def _make_run(workdir: str, class_conditional: bool) -> str:
    from jdiff.config import apply_overrides, get_preset

    over = {
        "run.workdir": workdir,
        "data.class_conditional": str(class_conditional),
        "diffusion.num_timesteps": str(T),
        "sampling.steps": "10",
        "model.ch": "8",
        "model.ch_mult": "(1,)",
        "model.attention_resolutions": "()",
        "model.num_heads": "1",
    }
    config = apply_overrides(get_preset("digits"), over)
    write_random_run(workdir, config, 10 if class_conditional else None)
    return workdir


def _make_runs(root):
    import shutil

    cond = _make_run(str(root / "cond"), True)
    _make_run(str(root / "uncond"), False)
    # A config without checkpoints, and a checkpoint with a deleted data file.
    (root / "empty").mkdir()
    shutil.copy(os.path.join(cond, "config.json"), root / "empty" / "config.json")
    shutil.copytree(cond, root / "corrupt")
    shutil.rmtree(root / "corrupt" / "checkpoints" / "0" / "default" / "d")


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Tiny runs made once per session (shared by the xdist workers; read only): cond, uncond, empty, corrupt."""
    root = shared_once(tmp_path_factory, "sample_cli", _make_runs)
    return dict(root=root, **{k: str(root / k) for k in ("cond", "uncond", "empty", "corrupt")})


def _cli(*args, env=None, timeout=300):
    e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    e.update(env or {})
    return subprocess.run(
        [sys.executable, SAMPLE_PY, *map(str, args), "--no-progress"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=e,
        timeout=timeout,
    )


COMMON = ("--num", 20, "--steps", 10, "--batch-size", 8)
TRAJ = ("--trajectory", "--trajectory-every", 3)


def _npz(out_dir):
    return np.load(os.path.join(out_dir, "ddim_10steps_seed0.npz"))


# Tests that need several runs of the CLI do them inside one test (module fixtures would be rebuilt on
# every pytest-xdist worker).


@pytest.mark.subprocess
def test_same_seed_same_samples_files_and_warm_cache(runs, tmp_path):
    """The same command twice on a fresh persistent cache: identical samples, the expected files, and a
    persistent-cache hit on the second run."""
    cache = tmp_path / "xla_cache"
    out_a, out_b = tmp_path / "out_a", tmp_path / "out_b"
    first, second = (
        _cli("--workdir", runs["cond"], *COMMON, *TRAJ, "--cache-dir", cache, "--out", o) for o in (out_a, out_b)
    )
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    a, b = _npz(out_a), _npz(out_b)
    assert a["images"].shape == (20, 8, 8, 1) and a["images"].dtype == np.float32
    np.testing.assert_array_equal(a["images"], b["images"])
    np.testing.assert_array_equal(a["labels"], np.arange(20) % 10)  # default labels cycle the classes
    assert np.isfinite(a["images"]).all() and np.abs(a["images"]).max() <= 1.0  # x0 clipping is on
    from PIL import Image

    # Grid: one column per class (10), 2 rows, 8x8 tiles upscaled 8x with 1 px padding.
    assert Image.open(out_a / "ddim_10steps_seed0.png").size == (10 * TILE + 1, 2 * TILE + 1)
    # Trajectory of the first 8 samples: x_T, after steps 3, 6, 9, and x_0 = 1 + ceil(10 / 3) frames.
    frames = 1 + math.ceil(10 / 3)
    assert Image.open(out_a / "ddim_10steps_seed0_trajectory.png").size == (frames * TILE + 1, 8 * TILE + 1)
    gif = Image.open(out_a / "ddim_10steps_seed0_trajectory.gif")
    assert gif.n_frames == frames and gif.size == (8 * TILE + 1, TILE + 1)
    assert first.stderr.strip() == "" and "wrote" in first.stdout
    # Persistent compilation cache: a miss, then a hit (JAX's cache-hit event).
    assert "persistent cache miss" in first.stdout, first.stdout
    assert "persistent cache hit" in second.stdout, second.stdout
    # A new program on the now-warm cache directory is still reported as a miss.
    third = _cli("--workdir", runs["cond"], "--num", 4, "--steps", 5, "--cache-dir", cache, "--out", out_b)
    assert third.returncode == 0 and "persistent cache miss" in third.stdout, third.stdout + third.stderr


@pytest.mark.subprocess
def test_two_devices_shard_the_batch_and_agree_with_one(runs, tmp_path):
    outs = {}
    for n in (1, 2):
        outs[n] = tmp_path / f"out_{n}dev"
        r = _cli(
            "--workdir",
            runs["cond"],
            *COMMON,
            "--no-cache",
            "--out",
            outs[n],
            env={"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"},
        )
        assert r.returncode == 0, r.stderr
        assert f"{n} device(s), batch 8" in r.stdout
        assert int(_npz(outs[n])["batch_size"]) == 8
    # Different partitioned programs: equal up to float reassociation.
    np.testing.assert_allclose(_npz(outs[2])["images"], _npz(outs[1])["images"], atol=1e-5)


# Request errors are checked from config.json before any JAX work: run them in this process (fast);
# errors at the process boundary (checkpoint loading with orbax, argument parsing) in subprocesses.
PROCESS_ERRORS = {
    "missing_workdir": (("--workdir", "{root}/nope"), 1, "no config.json"),
    "no_checkpoint": (("--workdir", "{empty}"), 1, "no checkpoint"),
    "corrupted_checkpoint": (("--workdir", "{corrupt}", "--no-cache"), 1, "corrupted"),
    "unknown_sampler": (("--workdir", "{cond}", "--sampler", "nope"), 2, "invalid choice"),
    "unknown_spacing": (("--workdir", "{cond}", "--spacing", "nope"), 2, "invalid choice"),
}
REQUEST_ERRORS = {
    "guidance_unconditional": (("--workdir", "{uncond}", "--guidance", "3"), 2, "unconditional"),
    "labels_out_of_range": (("--workdir", "{cond}", "--labels", "0,10"), 2, "out of range"),
    "class_out_of_range": (("--workdir", "{cond}", "--class", "-1"), 2, "out of range"),
    "steps_above_T": (("--workdir", "{cond}", "--steps", str(T + 1)), 2, f"T={T}"),
    "eta_above_1": (("--workdir", "{cond}", "--eta", "1.5"), 2, "eta"),
    "eta_below_0": (("--workdir", "{cond}", "--eta", "-0.1"), 2, "eta"),
    "option_of_another_sampler": (
        ("--workdir", "{cond}", "--sampler", "heun", "--eta", "1"),
        2,
        "sampler 'heun' has no option 'eta'",
    ),
    "seed_too_large": (("--workdir", "{cond}", "--seed", str(2**70)), 2, "--seed must be in [0, 4294967295]"),
    "num_beyond_disk": (("--workdir", "{cond}", "--num", str(10**15)), 2, "GiB free"),
    "out_is_a_file": (("--workdir", "{cond}", "--out", "{cond}/config.json"), 2, "cannot write to --out"),
    "batch_not_multiple_of_devices": (("--workdir", "{cond}", "--batch-size", "0"), 2, "multiple of the number"),
}


def _check_one_line(code, stderr, stdout, expected_code, words):
    lines = stderr.strip().splitlines()
    assert code == expected_code, (code, stderr)
    assert len(lines) == 1 and lines[0].startswith("sample.py: error: "), stderr
    assert words in lines[0], lines[0]
    assert "Traceback" not in stderr + stdout


@pytest.mark.subprocess
def test_boundary_errors_are_one_line_without_traceback(runs):
    """Every boundary error case, each a separate process, run concurrently in one test."""

    def one(args):
        return _cli(*(a.format(**runs) for a in args), "--num", 4, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(len(PROCESS_ERRORS)) as pool:
        results = dict(zip(PROCESS_ERRORS, pool.map(one, (v[0] for v in PROCESS_ERRORS.values()))))
    for case, (_, code, words) in PROCESS_ERRORS.items():
        r = results[case]
        _check_one_line(r.returncode, r.stderr, r.stdout, code, words)


@pytest.fixture(scope="module")
def sample_cli():
    from jdiff.cli import sample

    return sample


@pytest.mark.parametrize("case", sorted(REQUEST_ERRORS))
def test_request_errors_are_one_line(runs, sample_cli, capsys, case):
    args, code, words = REQUEST_ERRORS[case]
    with pytest.raises(SystemExit) as exc:
        argv = [a.format(**runs) for a in args]
        sample_cli.main(argv + ([] if "--num" in argv else ["--num", "4"]) + ["--no-progress"])
    out = capsys.readouterr()
    _check_one_line(exc.value.code, out.err, out.out, code, words)


@pytest.mark.subprocess
def test_sampling_a_run_never_imports_training(runs, tmp_path):
    """sample.py on a trained run loads it through jdiff.run alone (checked in a fresh process)."""
    code = (
        "import sys; from jdiff.cli.sample import main; rc = main(sys.argv[1:]); "
        "print('TRAINING', sorted(m for m in sys.modules if m.startswith('jdiff.training')))"
    )
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "--workdir",
            runs["cond"],
            "--num",
            "2",
            "--steps",
            "2",
            "--no-cache",
            "--no-progress",
            "--out",
            str(tmp_path / "out_imports"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "TRAINING []" in r.stdout, r.stdout


def test_npz_stream_writes_what_np_savez_writes(tmp_path):
    """sample.py streams its samples batch by batch into the .npz (a memory-mapped .npy, zipped at the end)."""
    from jdiff.run import NpzStream

    images = np.random.default_rng(0).standard_normal((10, 4, 4, 3)).astype(np.float32)
    out = NpzStream(str(tmp_path / "s.npz"), 10, (4, 4, 3))
    for start in range(0, 10, 4):
        out.add(start, images[start : start + 4])
    out.finish(np.arange(10) % 3, sampler="ddpm", steps=7, guidance=float("nan"))
    got = np.load(tmp_path / "s.npz")
    np.testing.assert_array_equal(got["images"], images)
    np.testing.assert_array_equal(got["labels"], np.arange(10) % 3)
    assert str(got["sampler"]) == "ddpm" and int(got["steps"]) == 7 and np.isnan(got["guidance"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]  # no temporary files left
