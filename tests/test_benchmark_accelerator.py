"""benchmarks/accelerator.py: the device peak table, MFU, and its quickest run on CPU (the latent sampler's
stand-in: dit_tiny + the tiny VAE, 2 sampler steps)."""

import importlib.util
import sys

import pytest
from conftest import REPO

_spec = importlib.util.spec_from_file_location("accelerator", REPO / "benchmarks" / "accelerator.py")
accelerator = importlib.util.module_from_spec(_spec)  # the benchmark script (not part of the library)
sys.modules["accelerator"] = accelerator  # its dataclasses look their module up
_spec.loader.exec_module(accelerator)


@pytest.mark.parametrize(
    "kind, dtype, peak",
    [
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4),
        ("NVIDIA H100 PCIe", "bfloat16", 756.0),  # matched before the SXM entry
        ("NVIDIA H200", "float32", 494.7),  # TF32: JAX's default float32 matmul precision on GPUs
        ("NVIDIA A100-SXM4-80GB", "float32", 156.0),
        ("TPU v4", "bfloat16", 275.0),
        ("TPU v5 lite", "bfloat16", 197.0),  # v5e, matched before v5p's "TPU v5"
        ("TPU v5", "float32", 459.0),
        ("TPU v6 lite", "bfloat16", 918.0),
        ("cpu", "bfloat16", None),
    ],
)
def test_device_peaks(kind, dtype, peak):
    assert accelerator.device_peak_tflops(kind, dtype) == peak


def test_bad_dtype_and_mfu():
    with pytest.raises(ValueError, match="dtype must be one of"):
        accelerator.device_peak_tflops("TPU v4", "float16")
    assert accelerator.mfu(2e12, 4.0, 2) == pytest.approx(0.25)
    assert accelerator.mfu(2e12, None, 2) is None


def test_quickest_run_prints_the_table_and_mfu_from_jdiffs_flop_counter(capsys):
    import jax

    (row,) = accelerator.main(
        ["--quick", "--workloads", "latent_sampler", "--dtypes", "float32", "--peak-tflops", "1", "--batch", "1"]
    )
    out = capsys.readouterr().out
    assert "| latent_sampler | dit_tiny | float32 |" in out and "sample MFU" in out
    assert row["sample_output_shape"] == [64, 64, 3]  # the tiny VAE decodes 32x32x4 latents (2x upsampling)
    assert "step_ms" not in row  # a sampler: no training
    local = jax.local_device_count()
    # guided: 2 model passes per step and image, plus the decoder once
    assert row["sample_gflops_per_image"] > 2 * 2 * row["fwd_gflops_per_image"]
    achieved = row["sample_gflops_per_image"] * 1e9 * row["sample_images_per_s"]
    assert row["sample_mfu"] == pytest.approx(achieved / (1e12 * local))
