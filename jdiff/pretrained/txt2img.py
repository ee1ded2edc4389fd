"""``text_to_image(p, prompts, ...)``: Stable Diffusion sampling of a loaded text-to-image pipeline, as
diffusers' StableDiffusionPipeline computes it, in one jitted program (text encoder, sampler loop, VAE decode).

Classifier-free guidance (Ho & Salimans 2022) exactly as StableDiffusionPipeline: the UNet runs on the batch
of the prompts' states and the negative prompts' states ("" when none are given),
``out = uncond + w (cond - uncond)`` on the raw UNet output (eps or v), every step, for ``w > 1``; for ``w <= 1``
diffusers runs no guidance and takes the prompts' output, and so does jdiff (the batch of both is still
evaluated, so that ``w`` stays a traced value). The guidance
scale, prompts, start latents and key are traced: changing them never recompiles; the sampler, its steps, the
prompt count and ``clip_skip`` are static.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jdiff.pretrained.files import PretrainedUsageError
from jdiff.sampling import SPACINGS
from jdiff.sampling import sample as run_sampler


@dataclasses.dataclass(frozen=True)
class GuidedUNet:
    """``(params, x (N, h, w, c), t (N,)) -> out``: the UNet on [x; x] with ``params["context"]`` (2N, L, D) =
    [prompt states; negative-prompt states], combined as ``uncond + w (cond - uncond)`` for ``w =
    params["guidance"] > 1`` and ``cond`` otherwise (StableDiffusionPipeline's ``guidance_scale > 1`` rule).
    Hashable (a static argument of `jdiff.sample`)."""

    model: Any

    def __call__(self, params: Mapping[str, Any], x: jax.Array, t: jax.Array) -> jax.Array:
        n = x.shape[0]
        out = self.model.apply(
            {"params": params["unet"]}, jnp.concatenate([x, x]), jnp.concatenate([t, t]), params["context"]
        )
        cond, uncond = out[:n], out[n:]
        w = params["guidance"]  # StableDiffusionPipeline guides only for w > 1, else takes the prompts' output
        return jnp.where(w > 1, uncond + w * (cond - uncond), cond)


SD_STEPS_OFFSET = 1  # StableDiffusionPipeline.__init__ rewrites any other scheduler steps_offset to 1
STATIC = ("unet", "text", "vae", "latent_scale", "sampler", "num_steps", "static_options", "spacing", "prediction")
STATIC += ("steps_offset", "final_level")


@functools.partial(jax.jit, static_argnames=(*STATIC, "clip_skip"))
def _txt2img(
    params,
    schedule,
    ids,
    neg_ids,
    guidance,
    rng,
    x_init,
    traced_options,
    *,
    unet,
    text,
    vae,
    latent_scale,
    sampler,
    num_steps,
    static_options,
    spacing,
    prediction,
    steps_offset,
    final_level,
    clip_skip,
):
    cond = text.apply({"params": params["text"]}, ids, skip=clip_skip)
    uncond = text.apply({"params": params["text"]}, neg_ids)  # diffusers applies clip_skip to the prompts only
    unet_params = {"unet": params["unet"], "context": jnp.concatenate([cond, uncond]), "guidance": guidance}
    latents = run_sampler(
        GuidedUNet(unet),
        schedule,
        x_init.shape,
        rng,
        sampler=sampler,
        num_steps=num_steps,
        options={**dict(static_options), **traced_options},
        prediction=prediction,
        params=unet_params,
        spacing=spacing,
        steps_offset=steps_offset,
        final_level=final_level,
        x_init=x_init,
    )
    scaling, shift = latent_scale
    images = vae.apply({"params": params["vae"]}, latents / scaling + shift, method="decode")
    return jnp.clip(images, -1.0, 1.0), latents


def grid_options(
    scheduler: Mapping[str, Any], sampler: str, spacing: str, num_steps: int, num_timesteps: int
) -> tuple[int, str]:
    """(steps_offset, final_level) of `jdiff.sample` that StableDiffusionPipeline runs with this scheduler config:
    steps_offset 1 on "leading" (its ``__init__`` rewrites the config's to 1); for "ddim" (and "pndm", which ends
    as PNDMScheduler does, the same way), DDIMScheduler.step's
    last step goes from timestep steps_offset to steps_offset - T // N, which is timestep 0 when T // N == 1 and
    otherwise its final alpha: alphas_cumprod[0] (final_level "first") unless ``set_alpha_to_one`` (default
    true: "clean")."""
    from jdiff.sampling.base import get_sampler

    steps_offset = SD_STEPS_OFFSET if spacing == "leading" else 0
    if not get_sampler(sampler).final_level_first:  # ddim, pndm: their last step is a DDIM transfer
        return steps_offset, "clean"
    valid = isinstance(num_steps, (int, np.integer)) and 1 <= num_steps <= num_timesteps
    lands_on_zero = valid and steps_offset == num_timesteps // num_steps
    to_one = bool(scheduler.get("set_alpha_to_one", True))
    return steps_offset, "first" if lands_on_zero or not to_one else "clean"


def _prompt_list(value: Any, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{name} must be a string or a non-empty list of strings, got {value!r:.80}")


def text_to_image(
    p: Any,
    prompts: str | Sequence[str],
    *,
    negative_prompts: str | Sequence[str] | None = None,
    sampler: str = "ddim",
    num_steps: int = 50,
    guidance_scale: float = 7.5,
    rng: jax.Array,
    x_init: Optional[jax.Array] = None,
    options: Optional[Mapping[str, Any]] = None,
    spacing: Optional[str] = None,
    clip_skip: int = 0,
    return_latents: bool = False,
):
    """Images (N, H, W, 3) in [-1, 1] for N prompts from a loaded Stable Diffusion pipeline ``p``
    (`jdiff.pretrained.load`).

    Args:
      prompts: a prompt or a list of N; each is tokenized as StableDiffusionPipeline does (padded to the
        tokenizer's model_max_length, truncated with one warning).
      negative_prompts: None (the empty prompt for every image), one string for all, or a list of N.
      sampler / num_steps / options: any registered jdiff sampler (`jdiff.sampling.SAMPLERS`), its steps and
        options (e.g. ``{"eta": 0.0}`` for ddim).
      guidance_scale: classifier-free guidance scale w (traced); w <= 1: the prompts' prediction alone, as
        StableDiffusionPipeline.
      rng: PRNG key of the start latents (unless ``x_init``) and of stochastic samplers.
      x_init: (N, h, w, c) start latents x_T in place of x_T ~ N(0, I).
      spacing: timestep spacing; None: the scheduler config's timestep_spacing ("leading" when it has none, the
        default of DDIMScheduler and PNDMScheduler). "leading" runs with steps_offset 1, the value
        StableDiffusionPipeline.__init__ writes into every scheduler config; with sampler "ddim" the last step
        ends where the config's ``set_alpha_to_one`` (default true) says: alpha 1, or with false the first
        training level alphas_cumprod[0] (`jdiff.sampling.make_grid`'s final_level), as DDIMScheduler.
      clip_skip: text-encoder layers left out from the end for the prompts' states (diffusers' ``clip_skip``;
        0: the last layer).
      return_latents: also return the final latents (N, h, w, c).
    """
    if p.text_encoder is None or p.tokenizer is None or p.vae is None:
        raise PretrainedUsageError(
            "text_to_image needs a text-to-image pipeline (unet, text_encoder, tokenizer, vae); this checkpoint is "
            f"a {p.kind} model" + (" without them" if p.kind == "unet_cond" else "")
        )
    prompts = _prompt_list(prompts, "prompts")
    n = len(prompts)
    negatives = [""] * n if negative_prompts is None else _prompt_list(negative_prompts, "negative_prompts")
    if len(negatives) == 1 and n > 1:
        negatives = negatives * n
    if len(negatives) != n:
        raise ValueError(f"negative_prompts has {len(negatives)} entries but prompts has {n}; give one or {n}")
    g = np.asarray(guidance_scale, np.float64) if not isinstance(guidance_scale, jax.Array) else None
    if g is not None and (g.shape != () or not np.isfinite(g)):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    layers = p.text_encoder.module.layers
    if not isinstance(clip_skip, int) or not 0 <= clip_skip < layers:
        raise ValueError(
            f"clip_skip must be an int in [0, {layers - 1}] (the text encoder's layers), got {clip_skip!r}"
        )
    if spacing is None:
        spacing = p.scheduler.get("timestep_spacing", "leading")
        spacing = spacing if spacing in SPACINGS else "leading"
    shape = (n, *p.sample_shape)
    if x_init is not None and tuple(jnp.shape(x_init)) != shape:
        raise ValueError(
            f"x_init must have shape {shape} (prompts, latent height, width, channels), got {tuple(jnp.shape(x_init))}"
        )
    if x_init is None:
        rng, init_key = jax.random.split(rng)
        x_init = jax.random.normal(init_key, shape, jnp.float32)
    from jdiff.sampling.base import get_sampler, split_options

    smp = get_sampler(sampler)
    steps_offset, final_level = grid_options(p.scheduler, smp.name, spacing, num_steps, p.schedule.num_timesteps)
    static_opts, traced_opts = split_options(smp.name, dict(options or {}))
    params = {"unet": p.params, "text": p.text_encoder.params, "vae": p.vae.params}
    images, latents = _txt2img(
        params,
        p.schedule,
        jnp.asarray(p.tokenizer(prompts)),
        jnp.asarray(p.tokenizer(negatives)),
        jnp.asarray(guidance_scale, jnp.float32),
        rng,
        jnp.asarray(x_init, jnp.float32),
        traced_opts,
        unet=p.model,
        text=p.text_encoder.module,
        vae=p.vae.module,
        latent_scale=(float(p.vae.scaling_factor), float(p.vae.shift_factor or 0.0)),
        sampler=smp.name,
        num_steps=int(num_steps),
        static_options=tuple(sorted(static_opts.items())),
        spacing=spacing,
        prediction=p.prediction,
        steps_offset=steps_offset,
        final_level=final_level,
        clip_skip=clip_skip,
    )
    return (images, latents) if return_latents else images
