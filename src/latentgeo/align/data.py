"""(image, condition) pairs for soft-token training: the bundled digits or a folder.

A folder holds images and one JSON-lines file (``metadata.jsonl``, as the Hugging Face
``imagefolder`` layout, or the folder's only ``*.jsonl``), one object per image::

    {"file_name": "0001.png", "text": "a red bicycle"}       text-to-image models
    {"file_name": "0002.png", "label": 7}                      class-conditional models

(``file`` / ``image`` are accepted for the file, ``caption`` / ``prompt`` for the text and
``class`` for the label.) Images are read with :func:`latentgeo.images.load_image` at the model's
size and channels. Every problem is an InputError naming the file and line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from latentgeo.errors import InputError

FILE_KEYS = ("file_name", "file", "image")
TEXT_KEYS = ("text", "caption", "prompt")
LABEL_KEYS = ("label", "class")


def bundled_digits() -> tuple[torch.Tensor, list[int]]:
    """The bundled model's training split (4,500 MNIST digits, (N, 1, 32, 32) in [0, 1]) and
    their classes; the 500 held-out digits are never used."""
    from latentgeo.data import load_mnist_split

    split = load_mnist_split()
    return split.train_images, split.train_labels.tolist()


def metadata_file(folder: Path) -> Path:
    """``metadata.jsonl`` in ``folder``, else its only ``*.jsonl``; InputError otherwise."""
    if (folder / "metadata.jsonl").is_file():
        return folder / "metadata.jsonl"
    found = sorted(folder.glob("*.jsonl"))
    if len(found) != 1:
        raise InputError(f"{folder}: needs metadata.jsonl (one JSON object per image with "
                         f"file_name and text or label); found {len(found)} .jsonl files")
    return found[0]


def read_pairs(folder: str | Path) -> list[tuple[Path, Any]]:
    """(image path, condition) per line of the folder's JSON-lines file; the condition is a
    str (text) or an int (label)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder (DATA is a folder of images with "
                         "metadata.jsonl)")
    meta = metadata_file(folder)
    pairs: list[tuple[Path, Any]] = []
    for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{meta}:{n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{meta}:{n}: expected a JSON object")
        name = next((row[k] for k in FILE_KEYS if k in row), None)
        if not isinstance(name, str):
            raise InputError(f"{meta}:{n}: no file_name")
        text = next((row[k] for k in TEXT_KEYS if k in row), None)
        label = next((row[k] for k in LABEL_KEYS if k in row), None)
        if isinstance(text, str) and label is None:
            cond: Any = text
        elif text is None and isinstance(label, int) and not isinstance(label, bool):
            cond = label
        else:
            raise InputError(f"{meta}:{n}: give either a text (string) or a label (integer)")
        path = folder / name
        if not path.is_file():
            raise InputError(f"{meta}:{n}: {path}: no such image")
        pairs.append((path, cond))
    if len(pairs) < 2:
        raise InputError(f"{meta}: needs at least 2 examples, has {len(pairs)}")
    return pairs


def load_pairs(folder: str | Path, size: tuple[int, int], channels: int
               ) -> tuple[torch.Tensor, list[Any]]:
    """Images (N, channels, *size) in [0, 1] and their conditions from a folder."""
    from latentgeo.images import load_image

    pairs = read_pairs(folder)
    images = torch.stack([load_image(p, size, channels) for p, _ in pairs])
    return images, [c for _, c in pairs]
