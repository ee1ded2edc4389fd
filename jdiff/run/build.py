"""Builds what a `TrainConfig` describes: the data source, the model and the noise schedule. Errors are
`ConfigError`s with one-line messages."""

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp

import jdiff
from jdiff._logs import one_line
from jdiff.config import ConfigError, TrainConfig
from jdiff.schedules import Schedule

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_source(config: TrainConfig):
    """`jdiff.data.make_source` for the config's data section."""
    from jdiff.data import make_source

    d = config.data
    try:
        return make_source(
            d.dataset,
            split=d.split,
            image_size=d.image_size,
            channels=d.channels,
            data_dir=d.data_dir,
            on_bad_image=d.on_bad_image,
            workers=d.workers,
        )
    except (ValueError, FileNotFoundError, OSError) as e:
        raise ConfigError(f"cannot open dataset {d.dataset!r}: {one_line(e)}") from None


def model_num_classes(config: TrainConfig, source_classes: Optional[int]) -> Optional[int]:
    """Label count the model is conditioned on: the dataset's, unless unconditional or a text model (None)."""
    if not config.data.class_conditional or not source_classes or config.model.is_text():
        return None
    return int(source_classes)


def build_model(
    config: TrainConfig, num_classes: Optional[int], text_fields: Optional[Mapping[str, Any]] = None
) -> nn.Module:
    """`jdiff.models.get_model(model.name, **model.fields)` with num_classes and the compute dtype; a text model
    also takes `text_fields` (`TextSetup.fields`, recorded as config.json's derived "text_fields": the vocabulary
    size of the run's tokenizer and a loaded text encoder's architecture) and model.freeze_text."""
    from jdiff.models import get_model

    fields = dict(config.model.fields)
    if config.model.is_text():
        if text_fields is None:
            raise ConfigError(
                f"model {config.model.name} is a text model: its text_fields (vocabulary size) are needed"
            )
        fields.update(text_fields, freeze_text=config.model.freeze_text)
    else:
        fields.setdefault("num_classes", num_classes)
    fields["dtype"] = COMPUTE_DTYPES[config.model.dtype]
    try:
        return get_model(config.model.name, **fields)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"cannot build model {config.model.name!r}: {one_line(e)}") from None


def build_run_model(run: Any) -> nn.Module:
    """The model of a trained run (`jdiff.run.RunInfo`): `build_model` with what its config.json records."""
    return build_model(run.config, run.num_classes, run.derived.get("text_fields"))


def build_schedule(config: TrainConfig) -> Schedule:
    """The noise schedule (a pytree; pass it to jitted code as an argument)."""
    d = config.diffusion
    try:
        if d.schedule == "flow":
            return jdiff.get_schedule("flow", d.num_timesteps, shift=d.shift)
        return jdiff.get_schedule(d.schedule, d.num_timesteps, zero_terminal_snr=d.zero_terminal_snr)
    except ValueError as e:
        raise ConfigError(one_line(e)) from None


# ---------------------------------------------------------------------------------------------------------------
# Text models: captions, tokenizer, text encoder.

TOKENIZER_DIR = "tokenizer"  # the run directory's copy of its tokenizer


@dataclasses.dataclass(frozen=True)
class TextSetup:
    """What a text run adds: its `tokenizer` (`jdiff.pretrained.text.Tokenizer`), the model `fields` it fixes
    (vocab_size; a loaded encoder's architecture) and `encoder_dir`, the CLIPTextModel directory whose weights
    initialise the text encoder (None: from scratch)."""

    tokenizer: Any
    fields: Mapping[str, Any]
    encoder_dir: Optional[str] = None


def text_encoder_dirs(path: str) -> tuple[str, Optional[str]]:
    """(CLIPTextModel directory, tokenizer directory or None) of model.text_encoder: a StableDiffusionPipeline
    directory (its text_encoder/ and tokenizer/) or a text encoder directory (a tokenizer/ beside it is used)."""
    path = os.path.expanduser(path)
    if os.path.isdir(os.path.join(path, "text_encoder")):
        enc = os.path.join(path, "text_encoder")
    elif os.path.isfile(os.path.join(path, "config.json")):
        enc = path
    else:
        raise ConfigError(
            f"model.text_encoder {path}: neither a StableDiffusionPipeline directory (text_encoder/) nor a "
            "CLIPTextModel directory (config.json)"
        )
    tok = os.path.join(os.path.dirname(os.path.normpath(enc)), "tokenizer")
    return enc, tok if os.path.isdir(tok) else None


def build_text(
    config: TrainConfig, captions: Optional[list] = None, saved_tokenizer: Optional[str] = None
) -> TextSetup:
    """The tokenizer and text fields of a text run: the run directory's `saved_tokenizer` (a resumed run), else
    data.tokenizer, else the text encoder's tokenizer, else a BPE tokenizer learned from `captions` (the training
    captions, `jdiff.pretrained.text.train_tokenizer`). With model.text_encoder the encoder's architecture comes
    from its config.json. ConfigError (one line) otherwise."""
    from jdiff.models import model_config
    from jdiff.pretrained.files import PretrainedError, read_json
    from jdiff.pretrained.text import load_tokenizer, text_encoder_from_config, train_tokenizer

    fields: dict[str, Any] = {}
    enc_dir, tok_dir = (None, None)
    try:
        if config.model.text_encoder:
            enc_dir, tok_dir = text_encoder_dirs(config.model.text_encoder)
            m = text_encoder_from_config(read_json(Path(enc_dir) / "config.json", "text encoder config"))
            fields = dict(vocab_size=m.vocab_size, max_length=m.max_length, text_hidden=m.hidden, text_layers=m.layers)
            fields.update(text_heads=m.heads, text_intermediate=m.intermediate, text_act=m.act)
        max_length = fields.get("max_length", {**model_config(config.model.name), **config.model.fields}["max_length"])
        tok_dir = saved_tokenizer or config.data.tokenizer or tok_dir
        if tok_dir:
            tokenizer = load_tokenizer(tok_dir, max_length)
        elif captions is None:
            raise ConfigError("a text run without data.tokenizer learns its tokenizer from the captions")
        else:
            tokenizer = train_tokenizer(captions, max_length)
    except PretrainedError as e:
        raise ConfigError(one_line(e)) from None
    fields.setdefault("max_length", max_length)
    vocab = fields.setdefault("vocab_size", tokenizer.vocab_size)
    if tokenizer.vocab_size > vocab:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the text encoder's {vocab}")
    return TextSetup(tokenizer, fields, enc_dir)


def captioned_source(config: TrainConfig, source: Any) -> Any:
    """(source with captions, `TextSetup`) of a text run: `jdiff.data.CaptionedSource` over `source` with the
    captions data.captions names, tokenized by the run's tokenizer."""
    from jdiff.data.captions import CaptionedSource, caption_fn

    try:
        captions = caption_fn(source, config.data.captions)
    except ValueError as e:
        raise ConfigError(f"data.captions {config.data.captions}: {one_line(e)}") from None
    saved = os.path.join(config.run.workdir, TOKENIZER_DIR)  # a resumed run keeps the tokenizer it trained with
    saved = saved if os.path.isfile(os.path.join(saved, "tokenizer.json")) else None
    learn = not (saved or config.data.tokenizer)
    text = build_text(config, captions(range(len(source))) if learn else None, saved_tokenizer=saved)
    return CaptionedSource(source, captions, text.tokenizer), text


def run_tokenizer(workdir: str, text_fields: Mapping[str, Any]) -> Any:
    """The tokenizer a text run saved in its directory (`TOKENIZER_DIR`); text_fields: config.json's."""
    from jdiff.pretrained.files import PretrainedError
    from jdiff.pretrained.text import load_tokenizer

    try:
        return load_tokenizer(os.path.join(workdir, TOKENIZER_DIR), int(text_fields["max_length"]))
    except PretrainedError as e:
        raise ConfigError(f"text run {workdir}: {one_line(e)}") from None
