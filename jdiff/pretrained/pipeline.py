"""``load(path) -> Pretrained`` and ``save(path, ...)``: diffusers-format pipeline directories in and out.

A pipeline directory holds ``model_index.json``, ``unet/`` (UNet2DModel) or ``transformer/`` (DiT), optionally
``vae/`` (AutoencoderKL: the model then samples its latents) and ``scheduler/scheduler_config.json``. A single
model directory (``config.json`` + safetensors) also loads; its schedule is then diffusers' DDPMScheduler
default (linear 1e-4..0.02, T=1000, epsilon prediction).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp

from jdiff.pretrained.files import PretrainedError, read_json, read_model_dir
from jdiff.pretrained.scheduler import LEARNED, config_from_schedule, schedule_from_config
from jdiff.pretrained.transformer import CLASSES as DIT_CLASSES
from jdiff.pretrained.transformer import config_from_dit, dit_from_config, dit_params, dit_tensors
from jdiff.pretrained.unet2d import CLASS as UNET_CLASS
from jdiff.pretrained.unet2d import config_from_unet, unet_from_config, unet_params, unet_tensors
from jdiff.schedules import Schedule

DIFFUSERS_VERSION = "0.31.0"  # written into exported configs (the format, not a dependency)
DIT_GUIDANCE = 4.0  # DiTPipeline's default guidance_scale


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A loaded checkpoint: ``model.apply({'params': params}, x, t, y)`` on NHWC ``x`` of ``sample_shape``
    (latents when ``vae`` is set); ``schedule`` / ``prediction`` ("eps", "v", "x0") from the scheduler config;
    ``variance`` "learned" when the model outputs [eps | v] (2x channels; jdiff's DDPM ``variance=learned``
    reads v as Improved DDPM's interpolation, diffusers' "learned_range") else "fixed"; ``num_classes``
    (None: unconditional; label ``num_classes`` is the null label of classifier-free guidance);
    ``guidance``: the pipeline's default guidance scale (4.0 for DiT as in DiTPipeline, else None)."""

    model: Any
    params: Any
    schedule: Schedule
    prediction: str
    variance: str
    num_classes: Optional[int]
    sample_shape: tuple[int, int, int]
    vae: Any = None
    id2label: Optional[dict[int, str]] = None
    kind: str = "unet"  # "unet" or "dit"
    guidance: Optional[float] = None
    config: dict = dataclasses.field(default_factory=dict)


def _component(root: Path, index: dict) -> tuple[str, Path]:
    found = [name for name in ("unet", "transformer") if name in index or (root / name).is_dir()]
    if len(found) != 1:
        raise PretrainedError(
            f"pipeline {root} must have exactly one of unet/ or transformer/ (model_index.json names {sorted(index)})"
        )
    return found[0], root / found[0]


def _model_from(config: dict, tensors: dict, convention: Optional[str]):
    cls = config.get("_class_name")
    if cls == UNET_CLASS:
        if convention is not None:
            raise PretrainedError("timestep_convention applies to DiT checkpoints only (this is a UNet2DModel)")
        model, shape = unet_from_config(config)
        return "unet", model, shape, unet_params(model, shape, tensors)
    if cls in DIT_CLASSES:
        model, shape = dit_from_config(config, convention)
        return "dit", model, shape, dit_params(model, shape, tensors)
    raise PretrainedError(f"model class {cls!r} is not supported; supported: {UNET_CLASS}, {', '.join(DIT_CLASSES)}")


def _load_vae(path: Path):
    try:
        from jdiff.pretrained.autoencoder import load_autoencoder
    except ImportError:
        raise PretrainedError(
            f"{path}: this jdiff has no AutoencoderKL loader (jdiff.pretrained.autoencoder)"
        ) from None
    return load_autoencoder(*read_model_dir(path))


def load(path: str | Path, *, timestep_convention: Optional[str] = None) -> Pretrained:
    """Loads a diffusers-format pipeline or model directory (see the module docstring); every tensor is used
    and checked, and anything jdiff cannot run is one `PretrainedError` line. ``timestep_convention`` (DiT
    only): "reference" (the DiT paper's code, with which the published weights were trained; the default) or
    "diffusers" (diffusers' DiTTransformer2DModel, frequency shift 1); see `jdiff.pretrained.transformer`."""
    root = Path(path)
    if not root.is_dir():
        raise PretrainedError(f"checkpoint directory {root} not found")
    scheduler: dict = {}
    vae, id2label = None, None
    if (root / "model_index.json").is_file():
        index = read_json(root / "model_index.json", "pipeline index")
        _, model_dir = _component(root, index)
        if (root / "scheduler").is_dir() or "scheduler" in index:
            scheduler = read_json(root / "scheduler" / "scheduler_config.json", "scheduler config")
        if (root / "vae").is_dir() or index.get("vae") not in (None, [None, None]):
            vae = _load_vae(root / "vae")
        labels = index.get("id2label")
        if isinstance(labels, dict):
            try:
                id2label = {int(k): str(v) for k, v in labels.items()}
            except ValueError:
                raise PretrainedError(
                    f"pipeline index id2label keys must be integers, got {sorted(labels)[:3]}"
                ) from None
    elif (root / "config.json").is_file():
        model_dir = root
    else:
        raise PretrainedError(f"{root} is neither a diffusers pipeline (model_index.json) nor a model (config.json)")
    config, tensors = read_model_dir(model_dir)
    kind, model, shape, params = _model_from(config, tensors, timestep_convention)
    schedule, prediction = schedule_from_config(scheduler)
    c = shape[-1]
    out_ch = (model.out_channels or c) * (2 if model.learn_sigma else 1)
    latent_c = getattr(getattr(vae, "module", None), "latent_channels", c)
    if latent_c != c:
        raise PretrainedError(f"vae latent_channels={latent_c} but the {kind} samples {c} channels (in_channels)")
    if scheduler.get("variance_type") in LEARNED and out_ch != 2 * c:
        raise PretrainedError(
            f"scheduler variance_type={scheduler['variance_type']!r} needs a model with 2x{c} output channels, "
            f"this one has {out_ch}"
        )
    return Pretrained(
        model=model,
        params=_to_jax(params),
        schedule=schedule,
        prediction=prediction,
        variance="learned" if out_ch == 2 * c else "fixed",
        num_classes=model.num_classes,
        sample_shape=shape,
        vae=vae,
        id2label=id2label,
        kind=kind,
        guidance=DIT_GUIDANCE if kind == "dit" else None,
        config=config,
    )


def _to_jax(params: Any) -> Any:
    return jax.tree.map(jnp.asarray, params)


def save(
    path: str | Path,
    model: Any,
    params: Any,
    *,
    sample_shape: tuple[int, int, int],
    schedule: Schedule | dict,
    prediction: str = "eps",
    vae_dir: str | Path | None = None,
) -> Path:
    """Writes a jdiff `UNet` or `DiT` as a diffusers-format pipeline directory: ``model_index.json``,
    ``unet/`` or ``transformer/`` (config.json + diffusion_pytorch_model.safetensors) and
    ``scheduler/scheduler_config.json`` (a DDPMScheduler; ``schedule`` is a jdiff Schedule, written as its
    trained_betas, or a dict of diffusers keys from `jdiff.pretrained.scheduler.named_schedule`).
    ``sample_shape`` (H, W, C) is what the model samples. diffusers' ``from_pretrained`` then computes what
    jdiff computes (DiT: with ``freq_shift=1``, diffusers' convention; a reference-convention DiT is written
    with the same weights, which diffusers runs with its own timestep embedding, exactly as for the published
    DiT checkpoints). `load` reads it back exactly. ``vae_dir``: a diffusers AutoencoderKL directory whose
    latents the model samples, copied into ``vae/``. PretrainedError for a model diffusers cannot express."""
    from safetensors.numpy import save_file

    from jdiff.models import DiT, UNet

    if isinstance(model, UNet):
        name, pipeline = "unet", "DDPMPipeline"
        config, tensors = config_from_unet(model, sample_shape), unet_tensors(model, sample_shape, params)
    elif isinstance(model, DiT):
        name, pipeline = "transformer", "DiTPipeline"
        config, tensors = config_from_dit(model, sample_shape), dit_tensors(model, sample_shape, params)
    else:
        raise PretrainedError(f"save: expected a jdiff UNet or DiT, got {type(model).__name__}")
    c = int(sample_shape[-1])
    learned = config["out_channels"] == 2 * c
    scheduler = config_from_schedule(schedule, prediction, learned_variance=learned)
    root = Path(path)
    try:
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / "scheduler").mkdir(exist_ok=True)
        write = lambda p, d: p.write_text(json.dumps({**d, "_diffusers_version": DIFFUSERS_VERSION}, indent=2) + "\n")
        write(root / name / "config.json", config)
        save_file(tensors, str(root / name / "diffusion_pytorch_model.safetensors"))
        write(root / "scheduler" / "scheduler_config.json", scheduler)
        index = {"_class_name": pipeline, name: ["diffusers", config["_class_name"]]}
        index["scheduler"] = ["diffusers", "DDPMScheduler"]
        if vae_dir is not None:
            vae_config, vae_tensors = read_model_dir(vae_dir)  # checks it is a readable model directory
            (root / "vae").mkdir(exist_ok=True)
            write(root / "vae" / "config.json", vae_config)
            save_file(vae_tensors, str(root / "vae" / "diffusion_pytorch_model.safetensors"))
            index["vae"] = ["diffusers", vae_config.get("_class_name", "AutoencoderKL")]
        elif pipeline == "DiTPipeline":
            index["vae"] = [None, None]
        write(root / "model_index.json", index)
    except OSError as e:
        raise PretrainedError(f"cannot write {root}: {e.strerror or e}") from None
    return root
