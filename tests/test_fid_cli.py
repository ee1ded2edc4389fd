"""python -m jdiff.cli.fid: statistics of a folder, a sample .npz and a run agree; KID / IS / precision-recall;
one-line errors. Random pytorch-fid weights (tests/fixtures/inception_recipe.py); one Inception compile."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
import inception_recipe as recipe  # noqa: E402


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from safetensors.numpy import save_file

    with np.load(FIXTURES / "inception" / "reference.npz") as f:
        shapes = dict(zip(f["keys"].tolist(), map(tuple, json.loads(str(f["shapes"])))))
    path = tmp_path_factory.mktemp("inception") / "inception.safetensors"
    save_file(recipe.random_state_dict(shapes), str(path))
    return str(path)


def _fid(capsys, *args):
    """(exit status, the JSON result or None, stderr) of one in-process run of the CLI."""
    from jdiff.cli import fid

    try:
        code = fid.main([*map(str, args), "--no-progress"])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return code, json.loads(lines[-1]) if code == 0 and lines else None, err


@pytest.mark.slow
def test_folder_samples_and_reference_batch_agree(weights, tmp_path, capsys):
    from PIL import Image

    from jdiff import metrics

    u8 = np.random.default_rng(0).integers(0, 256, (4, 24, 20, 3), dtype=np.uint8)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(u8):
        Image.fromarray(im).save(folder / f"{i:02d}.png")
    (folder / "notes.txt").write_text("not an image")
    stats = tmp_path / "ref_stats.npz"
    code, res, err = _fid(
        capsys, "--images", folder, "--inception", weights, "--save-stats", stats, "--inception-score"
    )
    assert code == 0, err
    assert res["num"] == 4 and res["stats"] == str(stats) and res["inception_score_splits"] == 4
    assert res["inception_score"] >= 1.0 - 1e-9
    mu, sigma = metrics.load_stats(str(stats))
    # the same images as sample.py's float samples in [-1, 1] (quantised back to the same 8 bits) against an ADM
    # reference batch (arr_0 + mu/sigma) of them: FID 0, precision = recall = 1
    samples = tmp_path / "samples.npz"
    np.savez(samples, images=u8.astype(np.float32) / 127.5 - 1.0, labels=np.zeros(0, np.int32))
    adm = tmp_path / "VIRTUAL_ref.npz"
    np.savez(adm, u8, mu=mu, sigma=sigma)
    code, res, err = _fid(
        capsys, "--samples", samples, "--inception", weights, "--ref", adm, "--kid", "--precision-recall"
    )
    assert code == 0, err
    assert res["fid"] == pytest.approx(0.0, abs=1e-6 * np.trace(sigma))
    assert (res["precision"], res["recall"]) == (1.0, 1.0)
    assert res["kid_subset_size"] == 4 and np.isfinite(res["kid"])


@pytest.mark.slow
def test_workdir_samples_equal_sample_py_samples(weights, tmp_path, capsys):
    from conftest import make_tiny_config, write_random_run

    from jdiff.cli import sample

    run = tmp_path / "run"
    write_random_run(run, make_tiny_config(run))
    flags = ("--sampler", "ddim", "--steps", 2, "--seed", 3)
    code, res, err = _fid(
        capsys, "--workdir", run, "--num", 4, *flags, "--inception", weights, "--save-stats", tmp_path / "a.npz"
    )
    assert code == 0, err
    out = ["--out", str(tmp_path / "s"), "--no-cache", "--no-progress"]
    assert sample.main(["--workdir", str(run), "--num", "4", *map(str, flags), *out]) == 0
    capsys.readouterr()
    npz = next((tmp_path / "s").glob("*.npz"))
    code, res, err = _fid(capsys, "--samples", npz, "--inception", weights, "--save-stats", tmp_path / "b.npz")
    assert code == 0, err
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        np.testing.assert_allclose(a["mu"], b["mu"], rtol=1e-6, atol=1e-7)


def test_one_line_errors(weights, tmp_path, capsys):
    stats = tmp_path / "nomu.npz"
    np.savez(stats, sigma=np.eye(2))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"junk")
    cases = [
        ((["--images", imgs, "--inception", weights]), 2, "nothing to compute"),
        ((["--images", imgs, "--inception", weights, "--save-stats", "x.npz", "--num", 1]), 2, "--num must be >= 2"),
        ((["--images", imgs, "--inception", tmp_path / "none.safetensors", "--save-stats", "x.npz"]), 1, "not found"),
        ((["--images", imgs, "--inception", bad, "--save-stats", "x.npz"]), 1, "corrupted or truncated"),
        ((["--images", imgs, "--inception", weights, "--ref", stats]), 1, "has no mu array"),
        ((["--images", imgs, "--inception", weights, "--save-stats", tmp_path / "s.npz"]), 1, "holds no image files"),
        ((["--workdir", tmp_path, "--inception", weights, "--save-stats", "x.npz"]), 2, "--workdir needs --num"),
        ((["--images", imgs, "--steps", 3, "--inception", weights, "--save-stats", "x"]), 2, "applies to --workdir"),
    ]
    for args, want, message in cases:
        code, _, err = _fid(capsys, *args)
        assert code == want and message in err and err.count("\n") == 1, (args, err)
