"""Synthetic captioned scenes: the task the shipped model is trained and scored on.

The scene grammar is small enough that a caption is right or wrong (exact match is meaningful),
yet it needs colour, size, shape and spatial relations, so a model that passes has to use its
cross-attention. Everything is seeded: `scene_at(seed, i)` is the same scene on every machine,
which lets training and evaluation use disjoint seeds instead of stored files.

Layout (`Scene`) and drawing (`render`) are separate so that augmentation (image side, JPEG,
shades, blur, anti-aliasing) changes pixels but never the caption.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 40),
}
# Side of the bounding box as a fraction of the image side.
SIZES: dict[str, tuple[float, float]] = {"small": (0.16, 0.24), "large": (0.34, 0.44)}
# Along the named axis the centres must differ by this much more than along the other axis.
AXIS_MARGIN = 0.15
# Seeds: training draws from TRAIN_SEED, periodic validation from VALID_SEED, `vedrt eval` from
# HELDOUT_SEED, which training never touches.
TRAIN_SEED = 0
VALID_SEED = 1
HELDOUT_SEED = 20240917


@dataclass(frozen=True)
class Shape:
    """One filled shape; `cx, cy, side` are fractions of the image side (y grows downwards)."""

    shape: str
    color: str
    size: str
    cx: float
    cy: float
    side: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        h = self.side / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """One or two shapes, in caption order (left/upper shape first), plus the relation word."""

    shapes: tuple[Shape, ...]
    relation: str | None = None  # "to the left of" | "above" | None for one shape

    @property
    def caption(self) -> str:
        if len(self.shapes) == 1:
            return self.shapes[0].phrase()
        return f"{self.shapes[0].phrase()} {self.relation} {self.shapes[1].phrase()}"


def _random_shape(rng: np.random.Generator) -> Shape:
    size = ("small", "large")[int(rng.integers(2))]
    lo, hi = SIZES[size]
    side = float(rng.uniform(lo, hi))
    h = side / 2
    return Shape(
        shape=SHAPES[int(rng.integers(len(SHAPES)))],
        color=tuple(COLORS)[int(rng.integers(len(COLORS)))],
        size=size,
        cx=float(rng.uniform(h, 1 - h)),
        cy=float(rng.uniform(h, 1 - h)),
        side=side,
    )


def _disjoint(a: Shape, b: Shape) -> bool:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0


def random_scene(rng: np.random.Generator) -> Scene:
    """One scene: a third of them with one shape, the rest with two in a clear relation."""
    first = _random_shape(rng)
    if rng.random() < 1 / 3:
        return Scene((first,))
    while True:  # rejection sampling: about a third of the draws are accepted
        second = _random_shape(rng)
        dx, dy = second.cx - first.cx, second.cy - first.cy
        if not _disjoint(first, second):
            continue
        if abs(dx) - abs(dy) >= AXIS_MARGIN:
            pair = (first, second) if dx > 0 else (second, first)
            return Scene(pair, "to the left of")
        if abs(dy) - abs(dx) >= AXIS_MARGIN:
            pair = (first, second) if dy > 0 else (second, first)
            return Scene(pair, "above")


def scene_at(seed: int, index: int) -> Scene:
    """Scene number `index` of the stream `seed` (random access, so datasets need no storage)."""
    return random_scene(np.random.default_rng([seed, index]))


def scenes(seed: int, n: int) -> list[Scene]:
    return [scene_at(seed, i) for i in range(n)]


def _draw_shape(draw: ImageDraw.ImageDraw, s: Shape, side: int, fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = (v * side for v in s.box)
    if s.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif s.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:  # isosceles, pointing up, filling its bounding box
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)


def render(
    scene: Scene,
    side: int = 64,
    *,
    shades: dict[str, tuple[int, int, int]] | None = None,
    background: tuple[int, int, int] = (255, 255, 255),
    supersample: int = 1,
) -> Image.Image:
    """Draw a scene; `shades` overrides colours per shape name-colour (for jittered augmentation)."""
    big = side * supersample
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        _draw_shape(draw, s, big, (shades or {}).get(s.color, COLORS[s.color]))
    if supersample > 1:
        image = image.resize((side, side), Image.Resampling.LANCZOS)
    return image


def augmented(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """The scene as another program might draw it: any side 64-256, shades a few units off,
    sometimes anti-aliased, blurred or JPEG-compressed. Teaches the model invariance to all of
    these, which the acceptance test (scenes drawn by someone else) relies on."""
    side = int(rng.integers(64, 257))
    jitter = lambda c: tuple(int(np.clip(v + rng.integers(-12, 13), 0, 255)) for v in c)  # noqa: E731
    shades = {name: jitter(rgb) for name, rgb in COLORS.items()}
    background = (
        tuple(int(255 - rng.integers(0, 9)) for _ in range(3))
        if rng.random() < 0.3
        else (255, 255, 255)
    )
    image = render(
        scene, side, shades=shades, background=background, supersample=int(rng.choice([1, 1, 2, 4]))
    )
    if rng.random() < 0.2:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
    if rng.random() < 0.5:
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=int(rng.integers(30, 96)))
        buf.seek(0)
        image = Image.open(buf).convert("RGB")
    return image


def augmented_at(seed: int, index: int, epoch: int = 0) -> tuple[Image.Image, str]:
    """Training sample `index`: the scene is fixed by (seed, index), the augmentation also by epoch."""
    scene = scene_at(seed, index)
    return augmented(scene, np.random.default_rng([seed, index, epoch, 7])), scene.caption


_PHRASE = r"a (small|large) (red|green|blue|yellow) (circle|square|triangle)"
_CAPTION = re.compile(rf"^{_PHRASE}(?: (to the left of|above) {_PHRASE})?$")


def parse_caption(caption: str) -> tuple[str | None, list[tuple[str, ...]]] | None:
    """Parse a caption back into `(relation, [(size, color, shape), ...])`; None if ungrammatical.

    Used by tests to check the generator against its own metadata, and by evaluation to tell a
    wrong attribute from a malformed caption."""
    m = _CAPTION.match(caption)
    if not m:
        return None
    g = m.groups()
    objects = [tuple(g[0:3])]
    if g[3] is not None:
        objects.append(tuple(g[4:7]))
    return (g[3], objects)


def all_captions() -> list[str]:
    """Every caption the grammar can produce (1,176 of them): the BPE tokenizer's training text."""
    phrases = [f"a {z} {c} {s}" for z in SIZES for c in COLORS for s in SHAPES]
    out = list(phrases)
    for rel in ("to the left of", "above"):
        out += [f"{p} {rel} {q}" for p in phrases for q in phrases]
    return out
