"""Cross-attention maps: where in the image the decoder looked while writing each token.

A debugging aid for captioners (is "left" really looking at the left shape?), drawn with numpy
and PIL only so it works in the torch-free runtime install. Input is the runtime's
`generate(..., return_dict=True, output_attentions=True).cross_attentions`, which has the same
layout as transformers' (per step, per layer, `[batch*beams, heads, new_len, enc_len]`), so a
transformers output works too once converted to numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LABEL_H = 16  # pixels under each panel for its label
PAD = 4  # pixels around and between panels


def token_maps(
    cross_attentions: Sequence[Sequence[Any]],
    *,
    grid: tuple[int, int],
    prefix_tokens: int = 1,
    layer: int = -1,
    rows: int | Sequence[int] = 0,
) -> np.ndarray:
    """Per generated token, attention over the patch grid: float32 `[steps, grid_h, grid_w]`.

    Uses one layer (the last by default: the one closest to the word choice), the mean over heads
    and the last query position of each step (a first step may hold a longer prompt). `rows`
    picks the batch*beams row per step; for beam search pass the chosen beam's row per step
    (`beam_indices`, as long as its sequence: steps after it are ignored), for greedy the image
    index. CLS/distillation tokens are dropped and the rest renormalised, since they have no place
    in the image."""
    gh, gw = grid
    maps = []
    if not isinstance(rows, int):  # a chosen beam's rows end where its sequence ended
        cross_attentions = cross_attentions[: len(rows)]
    for step, layers in enumerate(cross_attentions):
        row = rows if isinstance(rows, int) else int(rows[step])
        att = np.asarray(layers[layer], dtype=np.float32)[row]  # [heads, new_len, enc_len]
        a = att[:, -1, :].mean(axis=0)[prefix_tokens:]
        if a.size != gh * gw:
            raise ValueError(
                f"step {step}: {a.size} patch positions after dropping {prefix_tokens} "
                f"prefix token(s), but the grid {gh}x{gw} has {gh * gw}"
            )
        maps.append(a.reshape(gh, gw) / max(float(a.sum()), 1e-12))
    return np.stack(maps) if maps else np.zeros((0, gh, gw), np.float32)


def _hot(x: np.ndarray) -> np.ndarray:
    """A black-red-yellow-white colour ramp for values in [0, 1] (matplotlib's "hot", roughly)."""
    r = np.clip(3 * x, 0, 1)
    g = np.clip(3 * x - 1, 0, 1)
    b = np.clip(3 * x - 2, 0, 1)
    return np.stack([r, g, b], axis=-1) * 255


def panel_size(image_size: tuple[int, int], cell: int) -> tuple[int, int]:
    """The image fitted into `cell` x `cell`, aspect kept (the attention grid covers it all)."""
    w, h = image_size
    scale = cell / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def overlay(image: Image.Image, heat: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """The image dimmed to grey, with the attention (normalised to its maximum) on top."""
    base = np.asarray(image.convert("L").resize(size, Image.Resampling.BILINEAR), np.float32)
    base = np.repeat(base[..., None], 3, axis=-1) * 0.6 + 40
    h = heat / max(float(heat.max()), 1e-12)
    up = Image.fromarray((h * 255).astype(np.uint8)).resize(size, Image.Resampling.BILINEAR)
    h = np.asarray(up, np.float32)[..., None] / 255
    out = base * (1 - 0.8 * h) + _hot(h[..., 0]) * 0.8 * h
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def write_attention_map(
    image: Image.Image | str | Path,
    tokens: Sequence[str],
    cross_attentions: Sequence[Sequence[Any]],
    out_path: str | Path,
    *,
    grid: tuple[int, int],
    prefix_tokens: int = 1,
    layer: int = -1,
    rows: int | Sequence[int] = 0,
    cell: int = 128,
    columns: int = 6,
) -> Path:
    """Write one PNG: the image, then one panel per token with that token's attention.

    `tokens[i]` is the text of the token generated at step `i` (extra steps are ignored, so
    passing tokens without the final EOS drops its panel). `grid` and `prefix_tokens` come from
    the export manifest (`encoder.patch_grid`, `encoder.prefix_tokens`). Panels are `cell` px on
    their long side and wrap after `columns`; the PNG is
    `columns' * (panel_w + PAD) + PAD` wide and `lines * (panel_h + LABEL_H + PAD) + PAD` high,
    where `columns' = min(columns, 1 + len(tokens))`."""
    if isinstance(image, str | Path):
        with Image.open(image) as im:
            image = im.convert("RGB")
    image = image.convert("RGB")
    maps = token_maps(
        cross_attentions, grid=grid, prefix_tokens=prefix_tokens, layer=layer, rows=rows
    )
    n = min(len(tokens), len(maps))
    pw, ph = panel_size(image.size, cell)
    panels = [(image.resize((pw, ph), Image.Resampling.BILINEAR), "image")]
    panels += [(overlay(image, maps[i], (pw, ph)), tokens[i]) for i in range(n)]
    cols = max(1, min(columns, len(panels)))
    lines = -(-len(panels) // cols)
    sheet = Image.new("RGB", (cols * (pw + PAD) + PAD, lines * (ph + LABEL_H + PAD) + PAD), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for k, (panel, label) in enumerate(panels):
        x = PAD + (k % cols) * (pw + PAD)
        y = PAD + (k // cols) * (ph + LABEL_H + PAD)
        sheet.paste(panel, (x, y))
        text = label.replace("\u0120", " ").strip() or repr(label)
        draw.text((x + 2, y + ph + 2), text, fill="black", font=font)
    out_path = Path(out_path)
    sheet.save(out_path, format="PNG")
    return out_path
