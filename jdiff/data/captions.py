"""Captions of training images, and `CaptionedSource`: a source whose batches also hold the captions' token ids.

Where captions come from (`data.captions`):

* an image folder, in the Hugging Face ``imagefolder`` convention: a ``metadata.jsonl`` at its root with one JSON
  object per line, ``{"file_name": "<path relative to the root>", "text": "<caption>"}``; or, without it, a
  same-name ``.txt`` file beside each image (``cat.png`` -> ``cat.txt``). Every image needs a caption (the first
  without one is a ValueError naming it);
* the embedded digits: ``DIGIT_TEMPLATES`` filled with the digit's name ("a handwritten seven"), the template
  chosen by the example's index, so every (digit, template) pair occurs in training. ``HELD_OUT_TEMPLATES`` use
  only words of the training captions in an order never trained on: the test that the model reads the digit's
  name, not a memorised sentence.

The tokenizer is passed in (``tokenize(list of str) -> (n, L) int32``; `jdiff.pretrained.text.Tokenizer`), so this
module does not depend on a tokenizer library.
"""

from __future__ import annotations

import json
import os
import pathlib
import warnings
from typing import Any, Callable, Sequence

import numpy as np

from jdiff.data.sources import DigitsSource, ImageFolderSource

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = (
    "a handwritten {}",
    "the digit {}",
    "a picture of the number {}",
    "{} written by hand",
    "a small drawing of a {}",
)
# Words of DIGIT_TEMPLATES in sentences never trained on (the last: the digit's name alone).
HELD_OUT_TEMPLATES = ("a drawing of the handwritten digit {}", "a small picture of the digit {}", "{}")
METADATA = "metadata.jsonl"
CAPTION_SOURCES = ("digits", "folder")


def digit_caption(label: int, index: int, templates: Sequence[str] = DIGIT_TEMPLATES) -> str:
    """The caption of digits example ``index`` with class ``label``: template ``index % len(templates)``."""
    return templates[int(index) % len(templates)].format(DIGIT_WORDS[int(label)])


def folder_captions(root: str | os.PathLike, files: Sequence[pathlib.Path]) -> list[str]:
    """The caption of each of ``files`` (images under the folder ``root``): from ``root/metadata.jsonl`` when it
    exists, else from the same-name ``.txt`` file of each image. ValueError (one line) for a malformed metadata
    line or an image without a caption."""
    root = pathlib.Path(root).expanduser()
    meta = root / METADATA
    if meta.is_file():
        table: dict[str, str] = {}
        for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name, text = row["file_name"], row["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(
                    f'{meta} line {n}: expected a JSON object with "file_name" and "text", got {line!r:.80}'
                ) from None
            if not isinstance(name, str) or not isinstance(text, str):
                raise ValueError(f"{meta} line {n}: file_name and text must be strings")
            table[pathlib.PurePosixPath(name).as_posix()] = text
        out = []
        for f in files:
            rel = pathlib.Path(f).relative_to(root).as_posix()
            if rel not in table:
                raise ValueError(f"image {rel} has no caption in {meta} (every image needs a line with its file_name)")
            out.append(table[rel])
        return out
    out = []
    for f in files:
        txt = pathlib.Path(f).with_suffix(".txt")
        if not txt.is_file():
            raise ValueError(
                f"image {f} has no caption: add {txt.name} beside it, or a {METADATA} at {root} "
                '(lines {"file_name": ..., "text": ...})'
            )
        out.append(" ".join(txt.read_text(encoding="utf-8").split()))
    return out


class CaptionedSource:
    """``source`` (any `Source`) whose batches also hold ``"tokens"``: (n, L) int32 token ids of each example's
    caption. ``captions(indices) -> list[str]`` gives the captions; ``tokenize`` turns them into ids. Other
    attributes (image_shape, num_classes, flips of a latent cache, ...) are the wrapped source's."""

    def __init__(self, source: Any, captions: Callable[[np.ndarray], list[str]], tokenize: Callable):
        self.source, self.captions, self.tokenize = source, captions, tokenize
        self.warned = False

    def __len__(self) -> int:
        return len(self.source)

    def __getattr__(self, name: str) -> Any:
        if name in ("source", "captions", "tokenize", "warned"):
            raise AttributeError(name)
        return getattr(self.source, name)

    def get(self, indices: np.ndarray, **kw: Any) -> dict[str, np.ndarray]:
        batch = self.source.get(indices, **kw)
        with warnings.catch_warnings(record=True) as caught:  # the tokenizer's truncation warning: once per run
            warnings.simplefilter("always")
            tokens = np.asarray(self.tokenize(self.captions(np.asarray(indices))), np.int32)
        if caught and not self.warned:
            self.warned = True
            warnings.warn(f"{caught[0].message} (said once for the run's captions)", caught[0].category, stacklevel=2)
        return {**batch, "tokens": tokens}

    def all_captions(self) -> list[str]:
        """Every example's caption, in index order (what a tokenizer is learned from)."""
        return self.captions(np.arange(len(self)))


def caption_fn(source: Any, kind: str) -> Callable[[np.ndarray], list[str]]:
    """``indices -> captions`` of ``source`` for ``data.captions`` = ``kind`` ("digits": the templates over
    the digit labels; "folder": `folder_captions` of an image folder source). ValueError otherwise."""
    if kind == "digits":
        if not isinstance(source, DigitsSource):
            raise ValueError('captions "digits" need the embedded digits (data.dataset digits)')
        labels = source.get(np.arange(len(source)))["label"]
        return lambda idx: [digit_caption(labels[i], i) for i in idx]
    if kind == "folder":
        if not isinstance(source, ImageFolderSource):
            raise ValueError('captions "folder" need an image folder dataset (metadata.jsonl or .txt files)')
        table = folder_captions(source.root, source.files)
        return lambda idx: [table[i] for i in idx]
    raise ValueError(f"captions must be one of {CAPTION_SOURCES}, got {kind!r}")
