"""A Stable Diffusion pipeline's ``tokenizer/`` and ``text_encoder/`` (transformers' CLIPTokenizer and
CLIPTextModel) as a `Tokenizer` and a jdiff `CLIPText` with its parameters.

The tokenizer is the ``tokenizers`` library's byte-level BPE, set up exactly as transformers' CLIPTokenizer sets
it up (NFC, whitespace runs to one space, lower case; CLIP's split pattern; end-of-word suffix ``</w>``) from the
directory's ``vocab.json`` + ``merges.txt``, or read from its ``tokenizer.json``. It needs the optional extra
``jdiff[text]``; without it, loading is one `PretrainedError` line naming the extra. Prompts are encoded as
StableDiffusionPipeline encodes them: ``<bos> tokens <eos>``, padded with the pad token to
``model_max_length`` and truncated to it with one `PromptTruncatedWarning` naming the removed text.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import numpy as np

from jdiff.models.clip import ACTIVATIONS, CLIPText
from jdiff.pretrained.files import PretrainedError, check_regular_file, read_json, read_model_dir
from jdiff.pretrained.mapping import build_links, params_from_tensors, tensors_from_params

EXTRA = "pip install 'jdiff[text]'"  # the optional extra with the tokenizer library
SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CLIP_SPECIAL = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
TEXT_ENCODERS = ("CLIPTextModel",)


class PromptTruncatedWarning(UserWarning):
    """A prompt longer than the text encoder's context was cut (as StableDiffusionPipeline does)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Tokenizer:
    """CLIP tokenizer: ``tokenizer(prompts) -> (N, max_length) int32`` token ids."""

    backend: Any  # tokenizers.Tokenizer
    bos_id: int
    eos_id: int
    pad_id: int
    max_length: int

    @property
    def vocab_size(self) -> int:
        """Token ids are 0 .. vocab_size - 1 (the text encoder's embedding rows)."""
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def save(self, path: str | Path) -> None:
        """Writes ``tokenizer.json`` and ``tokenizer_config.json`` (special tokens, model_max_length) to the
        directory ``path``: `load_tokenizer` and transformers' CLIPTokenizer read them back."""
        import json

        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(d / "tokenizer.json"))
        tokens = {k: self.backend.id_to_token(getattr(self, k.replace("_token", "_id"))) for k in CLIP_SPECIAL}
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length, **tokens}
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        """Token ids of ``prompts`` as transformers' ``tokenizer(prompts, padding="max_length",
        max_length=max_length, truncation=True)``; a prompt with more than ``max_length - 2`` tokens is cut to
        them, with one warning for the call."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a list of strings, got {prompts!r:.80}")
        n = self.max_length - 2
        out = np.full((len(prompts), self.max_length), self.pad_id, np.int32)
        cut = []
        for i, enc in enumerate(self.backend.encode_batch(list(prompts), add_special_tokens=False)):
            ids = enc.ids
            if len(ids) > n:
                cut.append(self.backend.decode(ids[n:]).replace("</w>", " ").strip())
            out[i, : min(len(ids), n) + 2] = [self.bos_id, *ids[:n], self.eos_id]
        if cut:
            warnings.warn(
                f"{len(cut)} prompt(s) longer than the text encoder's {self.max_length} tokens were truncated, "
                f"as StableDiffusionPipeline does; removed: {cut[0]!r}",
                PromptTruncatedWarning,
                stacklevel=2,
            )
        return out


def _clip_backend(bpe: Any) -> Any:
    """A tokenizers.Tokenizer around the BPE model `bpe` with CLIP's text pipeline, as transformers' CLIPTokenizer
    (tokenizers backend) builds it: NFC, whitespace runs to one space, lower case; CLIP's split pattern, then
    byte-level symbols."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    backend = Backend(bpe)
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def train_tokenizer(captions: Sequence[str], max_length: int, vocab_size: int = 8192) -> Tokenizer:
    """A CLIP-style byte-level BPE `Tokenizer` learned from ``captions`` with the tokenizers library's BpeTrainer
    (Sennrich et al. 2016): the 256 byte symbols, the two special tokens, and merges up to ``vocab_size`` entries
    (a small caption set ends with every word a single token); the same ids in every process for the same
    captions. For a text
    encoder trained from scratch; `Tokenizer.save` writes it for `load_tokenizer` and diffusers' CLIPTokenizer."""
    try:
        from tokenizers import pre_tokenizers, trainers
        from tokenizers.models import BPE
    except ImportError:
        raise PretrainedError(f"the tokenizer needs the tokenizers package: {EXTRA}") from None
    if not captions:
        raise ValueError("captions must hold at least one caption to learn a tokenizer from")
    specials = [CLIP_SPECIAL["bos_token"], CLIP_SPECIAL["eos_token"]]
    backend = _clip_backend(BPE(continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    backend.train_from_iterator(sorted(set(captions)), trainer)
    # The trainer's merges are reproducible, its token ids are not (they follow a hash map's order, which changes
    # from process to process): number the tokens canonically (specials, the initial symbols sorted, then the
    # merges' products in merge order) so every process of a run, and a resumed run, has the same ids; every byte
    # has a symbol, alone and word-final, so no character of a prompt is dropped.
    import json

    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    merged = list(dict.fromkeys(a + b for a, b in merges))
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    symbols = set(model["vocab"]) | set(alphabet) | {c + "</w>" for c in alphabet}
    base = sorted(symbols - set(merged) - set(specials))
    vocab = {t: i for i, t in enumerate([*specials, *base, *merged])}
    backend = _clip_backend(BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False))
    backend.add_special_tokens(specials)
    return Tokenizer(backend, 0, 1, 1, max_length)


def _token(value: Any) -> Optional[str]:
    return value.get("content") if isinstance(value, dict) else value


def load_tokenizer(path: str | Path, text_max_length: int) -> Tokenizer:
    """The CLIP `Tokenizer` of a pipeline's ``tokenizer/`` directory; ``text_max_length``: the text encoder's
    positions, used when tokenizer_config.json has no usable model_max_length."""
    try:
        from tokenizers import Tokenizer as Backend
        from tokenizers.models import BPE
    except ImportError:
        raise PretrainedError(f"the tokenizer needs the tokenizers package: {EXTRA}") from None
    d = Path(path)
    if not d.is_dir():
        raise PretrainedError(f"tokenizer directory {d} not found")
    config: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (d / name).is_file():
            config.update(read_json(d / name, f"tokenizer {name}"))
    special = {k: _token(config.get(k)) or v for k, v in CLIP_SPECIAL.items()}
    if (d / "tokenizer.json").is_file():
        check_regular_file(d / "tokenizer.json", "tokenizer file")
        try:
            backend = Backend.from_file(str(d / "tokenizer.json"))
        except Exception as e:  # the library's own error types
            raise PretrainedError(f"tokenizer file {d / 'tokenizer.json'} cannot be read ({e})") from None
        backend.no_padding()  # padding and truncation are `Tokenizer.__call__`'s, as the pipeline asks for them
        backend.no_truncation()
    else:
        missing = [n for n in ("vocab.json", "merges.txt") if not (d / n).is_file()]
        if missing:
            raise PretrainedError(f"tokenizer directory {d} lacks {' and '.join(missing)} (and has no tokenizer.json)")
        vocab = read_json(d / "vocab.json", "tokenizer vocab.json")
        lines = (d / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
        if any(len(m) != 2 for m in merges):
            raise PretrainedError(f"tokenizer merges {d / 'merges.txt'}: every line must hold two symbols")
        bpe = BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False)
        backend = _clip_backend(bpe)
        backend.add_special_tokens(sorted({special["bos_token"], special["eos_token"]}))
    ids = {}
    for key, token in special.items():
        ids[key] = backend.token_to_id(token)
        if ids[key] is None:
            raise PretrainedError(f"tokenizer {d}: its {key} {token!r} is not in the vocabulary")
    max_length = config.get("model_max_length")
    if not isinstance(max_length, int) or not 2 < max_length <= text_max_length:
        max_length = text_max_length  # transformers' "no limit" sentinel 1e30, or none given
    return Tokenizer(backend, ids["bos_token"], ids["eos_token"], ids["pad_token"], max_length)


@dataclasses.dataclass(frozen=True, eq=False)
class TextEncoder:
    """A loaded CLIP text encoder: ``module.apply({'params': params}, ids, skip)`` -> states (N, L, hidden)."""

    module: CLIPText
    params: Any


def text_encoder_from_config(config: dict) -> CLIPText:
    """The jdiff `CLIPText` a transformers CLIPTextModel config.json describes."""
    arch = config.get("architectures") or ["CLIPTextModel"]
    if arch != ["CLIPTextModel"]:
        raise PretrainedError(
            f"text encoder architectures={arch} is not supported; supported: {', '.join(TEXT_ENCODERS)} "
            "(CLIPTextModelWithProjection is SDXL's second encoder)"
        )
    if config.get("use_attention_mask"):
        raise PretrainedError("text encoder config use_attention_mask=true is not supported; supported: false")
    fields = dict(
        vocab_size="vocab_size",
        hidden="hidden_size",
        layers="num_hidden_layers",
        heads="num_attention_heads",
        intermediate="intermediate_size",
        max_length="max_position_embeddings",
    )
    defaults = CLIPText()
    kw: dict[str, Any] = {}
    for field, key in fields.items():
        v = config.get(key, getattr(defaults, field))
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise PretrainedError(f"text encoder config {key}={v!r} is not supported; supported: an int >= 1")
        kw[field] = v
    act = config.get("hidden_act", "quick_gelu")
    if act not in ACTIVATIONS:
        raise PretrainedError(
            f"text encoder config hidden_act={act!r} is not supported; supported: {list(ACTIVATIONS)}"
        )
    eps = config.get("layer_norm_eps", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise PretrainedError(f"text encoder config layer_norm_eps={eps!r} is not supported; supported: a number > 0")
    if kw["hidden"] % kw["heads"]:
        raise PretrainedError(f"text encoder config hidden_size={kw['hidden']} is not a multiple of its heads")
    return CLIPText(act=act, eps=float(eps), **kw)


def _translate(path: tuple[str, ...]):
    *mods, leaf = path
    suffix = "weight" if leaf in ("kernel", "scale", "embedding") else "bias"
    if mods == [] and leaf == "position_embedding":
        return (("embeddings.position_embedding.weight",),), "same"
    if mods[0] == "token_embedding":
        return (("embeddings.token_embedding.weight",),), "same"
    if mods[0] == "final_layer_norm":
        return ((f"final_layer_norm.{suffix}",),), "same"
    i = re.fullmatch(r"layer_(\d+)", mods[0]).group(1)
    sub = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj"}
    sub.update(out_proj="self_attn.out_proj", fc1="mlp.fc1", fc2="mlp.fc2")
    name = f"encoder.layers.{i}.{sub.get(mods[1], mods[1])}.{suffix}"
    return ((name,),), "dense" if leaf == "kernel" else "same"


def _abstract(module: CLIPText) -> Any:
    import jax.numpy as jnp

    return jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]


def text_encoder_params(module: CLIPText, tensors: dict[str, np.ndarray]) -> Any:
    """jdiff CLIPText params (numpy float32) from a CLIPTextModel state dict (names with or without transformers
    4's ``text_model.`` prefix; the ``position_ids`` buffer of older checkpoints is not a weight)."""
    flat = {k.removeprefix("text_model."): v for k, v in tensors.items()}
    flat.pop("embeddings.position_ids", None)
    abstract = _abstract(module)
    return params_from_tensors(build_links(abstract, _translate), abstract, flat, "CLIPTextModel")


def text_encoder_tensors(module: CLIPText, params: Any) -> dict[str, np.ndarray]:
    """The CLIPTextModel state dict (names under ``text_model.``, as the published SD checkpoints) of params."""
    links = build_links(_abstract(module), _translate)
    return {"text_model." + k: v for k, v in tensors_from_params(links, jax.device_get(params)).items()}


def load_text_encoder(path: str | Path) -> TextEncoder:
    """A pipeline's ``text_encoder/`` (config.json + model.safetensors, sharded or not; float16/bfloat16 upcast)."""
    config, tensors = read_model_dir(path, weights="model.safetensors")
    module = text_encoder_from_config(config)
    params = text_encoder_params(module, tensors)
    return TextEncoder(module, jax.tree.map(jax.numpy.asarray, params))


def read_prompts_file(path: str | Path) -> list[str]:
    """The prompts of a text file, one per non-empty line (surrounding whitespace removed)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"prompts file {path} cannot be read ({getattr(e, 'strerror', None) or e})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompt (one per line)")
    return prompts
