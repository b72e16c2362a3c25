"""Training and evaluation data: synthetic scenes, or a user's captioned images.

Both become a list-like of `(PIL image, caption)` so the trainer, the periodic validation and
`vedrt eval` share one path. Users' data is checked up front (every line parsed, every image
present) so a typo fails in a second with the line number, not an hour into training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vedrt.data import scenes
from vedrt.errors import UsageError


@dataclass
class CaptionItem:
    image: Path
    caption: str


def _load_jsonl(path: Path) -> list[CaptionItem]:
    root = path.parent
    items = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if (
                not isinstance(row, dict)
                or not isinstance(row.get("image"), str)
                or not isinstance(row.get("caption"), str)
            ):
                raise UsageError(f'{path}:{n}: expected {{"image": "...", "caption": "..."}}')
            items.append(CaptionItem(root / row["image"], row["caption"].strip()))
    return items


def _coco_caption(annotation: dict, path: Path) -> str:
    caption = annotation["caption"]
    if not isinstance(caption, str):  # a null scored against the text "None"
        raise UsageError(f"{path}: annotation {annotation.get('id')!r} has caption {caption!r}")
    return caption.strip()


def _load_coco(path: Path, images_dir: Path | None) -> list[CaptionItem]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise UsageError(f"{path}: not a COCO captions file (needs 'images' and 'annotations')")
    root = images_dir or path.parent
    try:
        files = {img["id"]: img["file_name"] for img in data["images"]}
        items = [
            CaptionItem(root / files[a["image_id"]], _coco_caption(a, path))
            for a in data["annotations"]
        ]
    except KeyError as exc:
        raise UsageError(f"{path}: malformed COCO entry (missing {exc})") from None
    except TypeError:
        raise UsageError(
            f"{path}: malformed COCO entry (images and annotations are objects)"
        ) from None
    return items


def load_captions(path: str | Path, images_dir: str | Path | None = None) -> list[CaptionItem]:
    """A folder with `captions.jsonl`, a `.jsonl` file, or a COCO captions `.json` file."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file or folder")
    try:
        if path.is_dir():
            if not (path / "captions.jsonl").is_file():
                raise UsageError(f"{path}: folder has no captions.jsonl")
            items = _load_jsonl(path / "captions.jsonl")
        elif path.suffix == ".jsonl":
            items = _load_jsonl(path)
        else:
            items = _load_coco(path, Path(images_dir) if images_dir else None)
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not items:
        raise UsageError(f"{path}: no captions")
    missing = [it.image for it in items if not it.image.is_file()]
    if missing:
        raise UsageError(f"{len(missing)} image(s) not found, first: {missing[0]}")
    return items


class SceneImages:
    """Scenes `seed` as `(image, caption)`; augmented (the default) or drawn plainly at `side`."""

    def __init__(self, seed: int, n: int, *, augment: bool = True, side: int = 64) -> None:
        self.seed, self.n, self.augment, self.side = seed, n, augment, side

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Image.Image, str]:
        if i >= self.n:
            raise IndexError(i)
        if self.augment:
            return scenes.augmented_at(self.seed, i)
        scene = scenes.scene_at(self.seed, i)
        return scenes.render(scene, self.side), scene.caption


def check_images(items: list[CaptionItem]) -> None:
    """Every image opens and its data checks out (`Image.verify`), before training starts: one
    unreadable file used to end a run hours in, with a traceback from a data loader worker."""
    bad = []
    for item in dict.fromkeys(it.image for it in items):
        try:
            with Image.open(item) as image:
                image.verify()
        except Exception as exc:  # noqa: BLE001  (any decoder's failure is this file's)
            bad.append(f"{item} ({type(exc).__name__})")
    if bad:
        raise UsageError(
            f"{len(bad)} image(s) cannot be read, first: {bad[0]} (remove them from the data)"
        )


class FolderImages:
    def __init__(self, items: list[CaptionItem]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Image.Image, str]:
        it = self.items[i]
        with Image.open(it.image) as im:
            return im.convert("RGB"), it.caption


class Encoded:
    """A torch-style dataset of model inputs: pixel values from the checkpoint's own image
    processor (the one saved next to it, so training sees exactly what inference will) and
    labels ending in EOS."""

    def __init__(self, source: Any, processor: Any, tokenizer: Any, max_tokens: int) -> None:
        self.source, self.processor, self.tokenizer, self.max_tokens = (
            source,
            processor,
            tokenizer,
            max_tokens,
        )

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, caption = self.source[i]
        pixels = self.processor(images=image, return_tensors="np")["pixel_values"][0]
        ids = self.tokenizer(caption, add_special_tokens=False)["input_ids"][: self.max_tokens - 1]
        return {
            "pixel_values": pixels.astype(np.float32),
            "labels": ids + [self.tokenizer.eos_token_id],
        }


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    width = max(len(b["labels"]) for b in batch)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, b in enumerate(batch):
        labels[row, : len(b["labels"])] = torch.tensor(b["labels"])
    pixels = torch.from_numpy(np.stack([b["pixel_values"] for b in batch]))
    return {"pixel_values": pixels, "labels": labels}


def split_items(items: list[CaptionItem], valid: int, seed: int = 0) -> tuple[list, list]:
    """A fixed validation split of a user's data (never more than a fifth of it)."""
    valid = min(valid, len(items) // 5)
    order = np.random.default_rng(seed).permutation(len(items))
    held = set(order[:valid].tolist())
    return (
        [it for i, it in enumerate(items) if i not in held],
        [it for i, it in enumerate(items) if i in held],
    )
