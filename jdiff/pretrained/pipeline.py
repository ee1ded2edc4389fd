"""``load(path) -> Pretrained`` and ``save(path, ...)``: diffusers-format pipeline directories in and out.

A pipeline directory holds ``model_index.json``, ``unet/`` (UNet2DModel) or ``transformer/`` (DiT), optionally
``vae/`` (AutoencoderKL: the model then samples its latents) and ``scheduler/scheduler_config.json``. A single
model directory (``config.json`` + safetensors) also loads; its schedule is then diffusers' DDPMScheduler
default (linear 1e-4..0.02, T=1000, epsilon prediction). A pipeline's components are those model_index.json
names: a ``vae/`` or ``scheduler/`` directory it does not name is not read. A StableDiffusionPipeline (``unet/``
a UNet2DConditionModel) also has ``text_encoder/`` (CLIPTextModel) and ``tokenizer/``, read before the UNet;
the components and files jdiff cannot run (SDXL's second text encoder, ControlNet, adapters, LoRA weights) are
one `PretrainedError` line.

`save` writes the whole directory into a temporary sibling (``.NAME.jdiff-tmp-PID``) and renames it into place
at the end, so an interrupted export leaves no partial directory (a temporary left by a killed process is
removed by the next export to the same path).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from jdiff.pretrained.files import PretrainedError, PretrainedUsageError, read_json, read_model_dir
from jdiff.pretrained.scheduler import LEARNED, config_from_schedule, schedule_from_config
from jdiff.pretrained.transformer import CLASSES as DIT_CLASSES
from jdiff.pretrained.transformer import CONVENTION_KEY, config_from_dit, dit_from_config, dit_params, dit_tensors
from jdiff.pretrained.unet2d import CLASS as UNET_CLASS
from jdiff.pretrained.unet2d import config_from_unet, unet_from_config, unet_params, unet_tensors
from jdiff.pretrained.unet_cond import CLASS as UNET_COND_CLASS
from jdiff.pretrained.unet_cond import config_from_unet_cond, unet_cond_from_config, unet_cond_params, unet_cond_tensors
from jdiff.schedules import Schedule

DIFFUSERS_VERSION = "0.31.0"  # written into exported configs (the format, not a dependency)
DIT_GUIDANCE = 4.0  # DiTPipeline's default guidance_scale
SD_GUIDANCE = 7.5  # StableDiffusionPipeline's
TMP_TAG = ".jdiff-tmp-"  # temporary siblings of an export in progress: .NAME.jdiff-tmp-PID[-old]


class PretrainedWarning(UserWarning):
    """An export that diffusers loads but does not run as jdiff does (the message names the difference)."""


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A loaded checkpoint: ``model.apply({'params': params}, x, t, y)`` on NHWC ``x`` of ``sample_shape``
    (latents when ``vae`` is set); ``schedule`` / ``prediction`` ("eps", "v", "x0") from the scheduler config;
    ``variance`` "learned" when the model outputs [eps | v] (2x channels; jdiff's DDPM ``variance=learned``
    reads v as Improved DDPM's interpolation, diffusers' "learned_range") else "fixed"; ``num_classes``
    (None: unconditional; label ``num_classes`` is the null label of classifier-free guidance);
    ``guidance``: the pipeline's default guidance scale (4.0 for DiT as in DiTPipeline, 7.5 for Stable Diffusion
    as in StableDiffusionPipeline, else None). A text-to-image pipeline (kind "unet_cond": a `UNetCond` called
    as ``model.apply({'params': params}, x, t, context)``) has its `text_encoder` and `tokenizer`
    (`jdiff.pretrained.text`); ``scheduler`` is the scheduler config read (its timestep_spacing is the default
    of `text_to_image`)."""

    model: Any
    params: Any
    schedule: Schedule
    prediction: str
    variance: str
    num_classes: Optional[int]
    sample_shape: tuple[int, int, int]
    vae: Any = None
    id2label: Optional[dict[int, str]] = None
    kind: str = "unet"  # "unet", "dit" or "unet_cond"
    guidance: Optional[float] = None
    config: dict = dataclasses.field(default_factory=dict)
    text_encoder: Any = None
    tokenizer: Any = None
    scheduler: dict = dataclasses.field(default_factory=dict)


def _named(index: dict, name: str) -> bool:
    """Whether model_index.json names component `name` (a [library, class] entry that is not [null, null])."""
    return index.get(name) not in (None, [None, None])


def _component(root: Path, index: dict) -> tuple[str, Path]:
    found = [name for name in ("unet", "transformer") if _named(index, name)]
    if len(found) != 1:
        raise PretrainedError(
            f"pipeline {root} must name exactly one of unet or transformer in model_index.json (it names "
            f"{sorted(k for k in index if not k.startswith('_'))})"
        )
    return found[0], root / found[0]


def _model_from(config: dict, tensors: dict, convention: Optional[str]):
    cls = config.get("_class_name")
    if cls == UNET_CLASS:
        if convention is not None:
            raise PretrainedUsageError("timestep_convention applies to DiT checkpoints only (this is a UNet2DModel)")
        model, shape = unet_from_config(config)
        return "unet", model, shape, unet_params(model, shape, tensors)
    if cls in DIT_CLASSES:
        model, shape = dit_from_config(config, convention)
        return "dit", model, shape, dit_params(model, shape, tensors)
    if cls == UNET_COND_CLASS:
        if convention is not None:
            raise PretrainedUsageError(f"timestep_convention applies to DiT checkpoints only (this is a {cls})")
        model, shape, linear = unet_cond_from_config(config)
        return "unet_cond", model, shape, unet_cond_params(model, shape, tensors, linear)
    supported = ", ".join((UNET_CLASS, *DIT_CLASSES, UNET_COND_CLASS))
    raise PretrainedError(f"model class {cls!r} is not supported; supported: {supported}")


UNSUPPORTED = {  # pipeline components jdiff cannot run -> what they are
    "text_encoder_2": "SDXL's second text encoder",
    "tokenizer_2": "SDXL's second tokenizer",
    "controlnet": "a ControlNet",
    "image_encoder": "an IP-Adapter image encoder",
    "adapter": "a T2I-Adapter",
    "prior": "a prior model",
}


def _check_runnable(root: Path, index: dict) -> None:
    """One PretrainedError line for a pipeline jdiff cannot run as diffusers does (SDXL, ControlNet, LoRA...)."""
    for name, what in UNSUPPORTED.items():
        if _named(index, name):
            raise PretrainedError(
                f"pipeline {root} ({index.get('_class_name', '?')}) has {name} ({what}), which jdiff does not run; "
                "supported: Stable Diffusion 1.x / 2.x text-to-image, UNet2DModel and DiT pipelines"
            )


def _check_no_lora(root: Path) -> None:
    lora = sorted(p.name for p in root.glob("*.safetensors") if "lora" in p.name.lower())
    if lora:
        raise PretrainedError(
            f"{root / lora[0]} is a LoRA weights file; jdiff loads whole pipelines and does not apply LoRA (merge it "
            "into the UNet with diffusers' fuse_lora and save_pretrained first)"
        )


def _load_text(root: Path, index: dict):
    """The text encoder and tokenizer a text-to-image pipeline names (both must be there)."""
    from jdiff.pretrained.text import load_text_encoder, load_tokenizer

    missing = [n for n in ("text_encoder", "tokenizer") if not _named(index, n)]
    if missing:
        raise PretrainedError(f"pipeline {root} has a UNet2DConditionModel but its model_index.json names no {missing}")
    encoder = load_text_encoder(root / "text_encoder")
    return encoder, load_tokenizer(root / "tokenizer", encoder.module.max_length)


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
    vae, id2label, index = None, None, {}
    _check_no_lora(root)
    if (root / "model_index.json").is_file():
        index = read_json(root / "model_index.json", "pipeline index")
        _check_runnable(root, index)
        _, model_dir = _component(root, index)
        if _named(index, "scheduler"):
            scheduler = read_json(root / "scheduler" / "scheduler_config.json", "scheduler config")
        if _named(index, "vae"):
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
    text_encoder, tokenizer = None, None
    if index.get("unet") == ["diffusers", UNET_COND_CLASS]:  # the text side first: its errors are cheap
        text_encoder, tokenizer = _load_text(root, index)
    config, tensors = read_model_dir(model_dir)
    kind, model, shape, params = _model_from(config, tensors, timestep_convention)
    if kind == "unet_cond" and index and text_encoder is None:
        text_encoder, tokenizer = _load_text(root, index)
    if text_encoder is not None and text_encoder.module.hidden != model.context_dim:
        raise PretrainedError(
            f"text encoder hidden_size={text_encoder.module.hidden} but the UNet's cross_attention_dim is "
            f"{model.context_dim}"
        )
    schedule, prediction = schedule_from_config(scheduler)
    c = shape[-1]
    out_ch = (model.out_channels or c) * (2 if getattr(model, "learn_sigma", False) else 1)
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
        num_classes=getattr(model, "num_classes", None),
        sample_shape=shape,
        vae=vae,
        id2label=id2label,
        kind=kind,
        guidance={"dit": DIT_GUIDANCE, "unet_cond": SD_GUIDANCE}.get(kind),
        config=config,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
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
    overwrite: bool = False,
    stop: Optional[Callable[[], bool]] = None,
    text_encoder: Any = None,
    tokenizer_dir: str | Path | None = None,
    linear_projection: bool = False,
) -> Path:
    """Writes a jdiff `UNet` or `DiT` as a diffusers-format pipeline directory: ``model_index.json``,
    ``unet/`` or ``transformer/`` (config.json + diffusion_pytorch_model.safetensors) and
    ``scheduler/scheduler_config.json`` (a DDPMScheduler; ``schedule`` is a jdiff Schedule, written as its
    trained_betas, or a dict of diffusers keys from `jdiff.pretrained.scheduler.named_schedule`; for
    prediction "flow" a FlowMatchEulerDiscreteScheduler with the flow schedule's shift).
    ``sample_shape`` (H, W, C) is what the model samples. ``vae_dir``: a diffusers AutoencoderKL directory whose
    latents the model samples, copied into ``vae/``. `load` reads the directory back exactly.

    diffusers' ``from_pretrained`` computes what jdiff computes for a UNet and for a DiT with ``freq_shift=1``
    (diffusers' convention). Two exports differ in diffusers, each with a `PretrainedWarning` naming the
    difference: a reference-convention DiT (``freq_shift=0``, as the published DiT weights; diffusers' DiT
    embeds t with downscale_freq_shift 1, so its outputs differ), and a class-conditional UNet (DDPMPipeline
    passes no class labels; call its ``unet`` with ``class_labels``).

    The directory is written to a temporary sibling and renamed into place at the end. An existing non-empty
    ``path`` is refused unless ``overwrite`` (then it is replaced as a whole, nothing of it is kept).
    ``stop()``, if given, is asked between files: True removes the partial output and raises
    KeyboardInterrupt. PretrainedError for a model diffusers cannot express or a path that cannot be written.

    A `UNetCond` is written as a StableDiffusionPipeline: ``text_encoder`` (a `jdiff.pretrained.text.TextEncoder`)
    into ``text_encoder/`` (CLIPTextModel), the files of ``tokenizer_dir`` copied into ``tokenizer/``, ``vae_dir``
    (required) into ``vae/``, proj_in/proj_out as linear layers with ``linear_projection`` (SD 2.x) else as 1x1
    convolutions, and a DDIMScheduler as the published SD 1.5 / 2.1 ones (steps_offset 1, set_alpha_to_one false,
    which `text_to_image` follows)."""
    from safetensors.numpy import save_file

    from jdiff.models import DiT, UNet, UNetCond

    text = None
    if isinstance(model, UNetCond):
        if text_encoder is None or tokenizer_dir is None or vae_dir is None:
            raise PretrainedError("save: a UNetCond (text-to-image) needs text_encoder=, tokenizer_dir= and vae_dir=")
        name, pipeline = "unet", "StableDiffusionPipeline"
        config = config_from_unet_cond(model, sample_shape, linear_projection)
        tensors = unet_cond_tensors(model, sample_shape, params, linear_projection)
        text = _text_parts(text_encoder, Path(tokenizer_dir))
    elif isinstance(model, UNet):
        name, pipeline = "unet", "DDPMPipeline"
        config, tensors = config_from_unet(model, sample_shape), unet_tensors(model, sample_shape, params)
        if model.num_classes is not None:
            _warn(
                "a class-conditional UNet2DModel: diffusers' DDPMPipeline passes no class labels (it cannot be "
                "called as a pipeline); call pipeline.unet(x, t, class_labels=y), which computes what jdiff computes"
            )
    elif isinstance(model, DiT):
        name, pipeline = "transformer", "DiTPipeline"
        config, tensors = config_from_dit(model, sample_shape), dit_tensors(model, sample_shape, params)
        if config[CONVENTION_KEY] == "reference":
            _warn(
                "a reference-convention DiT (freq_shift 0): diffusers' DiTTransformer2DModel embeds the timestep "
                "with downscale_freq_shift 1, so diffusers' outputs differ from jdiff's; jdiff.pretrained.load "
                "reads it back exactly (train with model.freq_shift 1 for an export diffusers runs identically)"
            )
    else:
        raise PretrainedError(f"save: expected a jdiff UNet or DiT, got {type(model).__name__}")
    c = int(sample_shape[-1])
    learned = config["out_channels"] == 2 * c
    scheduler = config_from_schedule(schedule, prediction, learned_variance=learned)
    if text is not None:
        del scheduler["variance_type"]
        scheduler.update(_class_name="DDIMScheduler", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    vae = read_model_dir(vae_dir) if vae_dir is not None else None  # checks it is a readable model directory
    root = Path(path)
    _check_target(root, overwrite)
    tmp = _temporary(root, "")
    write = lambda p, d: p.write_text(json.dumps({**d, "_diffusers_version": DIFFUSERS_VERSION}, indent=2) + "\n")

    def check_stop() -> None:
        if stop is not None and stop():
            raise KeyboardInterrupt

    try:
        _remove_stale(root)
        (tmp / name).mkdir(parents=True)
        (tmp / "scheduler").mkdir()
        write(tmp / name / "config.json", config)
        save_file(tensors, str(tmp / name / "diffusion_pytorch_model.safetensors"))
        check_stop()
        write(tmp / "scheduler" / "scheduler_config.json", scheduler)
        index = {"_class_name": pipeline, name: ["diffusers", config["_class_name"]]}
        index["scheduler"] = ["diffusers", scheduler["_class_name"]]
        if text is not None:
            text_config, text_tensors, tokenizer_files = text
            (tmp / "text_encoder").mkdir()
            (tmp / "text_encoder" / "config.json").write_text(json.dumps(text_config, indent=2) + "\n")
            save_file(text_tensors, str(tmp / "text_encoder" / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "tokenizer").mkdir()
            for f in tokenizer_files:
                shutil.copyfile(f, tmp / "tokenizer" / f.name)
            index.update(text_encoder=["transformers", "CLIPTextModel"], tokenizer=["transformers", "CLIPTokenizer"])
            index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
        if vae is not None:
            vae_config, vae_tensors = vae
            (tmp / "vae").mkdir()
            write(tmp / "vae" / "config.json", vae_config)
            save_file(vae_tensors, str(tmp / "vae" / "diffusion_pytorch_model.safetensors"))
            index["vae"] = ["diffusers", vae_config.get("_class_name", "AutoencoderKL")]
        elif pipeline == "DiTPipeline":
            index["vae"] = [None, None]
        write(tmp / "model_index.json", index)
        check_stop()
        _put_in_place(tmp, root)
    except OSError as e:
        raise PretrainedError(f"cannot write {root}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; the partial output otherwise
    return root


TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _text_parts(text_encoder: Any, tokenizer_dir: Path) -> tuple[dict, dict, list[Path]]:
    """(text_encoder config.json, its tensors, the tokenizer files to copy) of a text-to-image export; the
    tokenizer directory must load (`load_tokenizer`)."""
    from jdiff.pretrained.text import load_tokenizer, text_encoder_tensors

    m = text_encoder.module
    load_tokenizer(tokenizer_dir, m.max_length)  # one line now rather than a directory that does not load
    config = {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden,
        "num_hidden_layers": m.layers,
        "num_attention_heads": m.heads,
        "intermediate_size": m.intermediate,
        "max_position_embeddings": m.max_length,
        "hidden_act": m.act,
        "layer_norm_eps": m.eps,
        "torch_dtype": "float32",
    }
    files = [tokenizer_dir / n for n in TOKENIZER_FILES if (tokenizer_dir / n).is_file()]
    return config, text_encoder_tensors(m, text_encoder.params), files


def _warn(message: str) -> None:
    warnings.warn(message, PretrainedWarning, stacklevel=3)


def _check_target(root: Path, overwrite: bool) -> None:
    """PretrainedError for an output path that is a file, or a non-empty directory without `overwrite`."""
    if root.is_symlink() or (root.exists() and not root.is_dir()):
        raise PretrainedError(f"cannot write {root}: it exists and is not a directory")
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise PretrainedError(
            f"{root} exists and is not empty; choose a new output directory or overwrite it (overwrite=True, "
            "export --overwrite), which replaces it as a whole"
        )


def _temporary(root: Path, suffix: str) -> Path:
    return root.parent / f".{root.name}{TMP_TAG}{os.getpid()}{suffix}"


def _remove_stale(root: Path) -> None:
    """Removes the temporaries of earlier exports to `root` whose process is gone (a kill -9)."""
    for p in root.parent.glob(f".{root.name}{TMP_TAG}*"):
        pid = p.name[len(f".{root.name}{TMP_TAG}") :].removesuffix("-old")
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _put_in_place(tmp: Path, root: Path) -> None:
    """Renames the finished `tmp` to `root`; an existing `root` (empty, or overwritten) is moved aside first
    and removed after."""
    old = None
    if root.exists():
        old = _temporary(root, "-old")
        os.rename(root, old)
    os.rename(tmp, root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
