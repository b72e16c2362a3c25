"""The scene generator says what it draws: captions parse back to the drawn shapes' metadata."""

from __future__ import annotations

import numpy as np
import pytest

from vedrt.data import scenes
from vedrt.data.scenes import AXIS_MARGIN, COLORS, SIZES, parse_caption, render, scene_at

pytestmark = pytest.mark.runtime  # also run in CI's runtime-only stage (no torch)

SAMPLE = [
    (seed, i)
    for seed in (scenes.TRAIN_SEED, scenes.VALID_SEED, scenes.HELDOUT_SEED)
    for i in range(150)
]


@pytest.mark.parametrize("seed,i", SAMPLE[::10])
def test_caption_matches_metadata(seed: int, i: int) -> None:
    scene = scene_at(seed, i)
    parsed = parse_caption(scene.caption)
    assert parsed is not None, scene.caption
    relation, objects = parsed
    assert relation == scene.relation
    assert objects == [(s.size, s.color, s.shape) for s in scene.shapes]
    for s in scene.shapes:
        lo, hi = SIZES[s.size]
        assert lo <= s.side <= hi
        x0, y0, x1, y1 = s.box
        assert 0 <= x0 and 0 <= y0 and x1 <= 1 and y1 <= 1
    if len(scene.shapes) == 2:
        a, b = scene.shapes
        dx, dy = b.cx - a.cx, b.cy - a.cy
        if relation == "to the left of":  # the left shape is named first, clearly horizontal
            assert dx > 0 and abs(dx) - abs(dy) >= AXIS_MARGIN
        else:  # the upper shape is named first (y grows downwards)
            assert dy > 0 and abs(dy) - abs(dx) >= AXIS_MARGIN
        ax0, ay0, ax1, ay1 = a.box
        bx0, by0, bx1, by1 = b.box
        assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, "shapes overlap"


def test_all_sample_captions_parse_and_cover_the_grammar() -> None:
    caps = [scene_at(s, i).caption for s, i in SAMPLE]
    assert all(parse_caption(c) for c in caps)
    assert {len(scene_at(s, i).shapes) for s, i in SAMPLE} == {1, 2}
    assert any("to the left of" in c for c in caps) and any(" above " in c for c in caps)
    assert all(c == c.lower() and not c.endswith(".") for c in caps)


def test_parse_rejects_ungrammatical() -> None:
    for bad in (
        "a red small circle",
        "a small red circle.",
        "a small red circle below a large blue square",
        "a small purple circle",
        "A small red circle",
        "a small red circle to the left of",
    ):
        assert parse_caption(bad) is None, bad
    assert len(scenes.all_captions()) == 24 + 2 * 24 * 24
    assert all(parse_caption(c) for c in scenes.all_captions())


@pytest.mark.parametrize("seed,i", SAMPLE[:40:4])
def test_pixels_are_the_shapes(seed: int, i: int) -> None:
    """Each shape's colour is at its centre (inside circles, squares and upward triangles alike)
    and the background is white away from every box."""
    side = 128
    scene = scene_at(seed, i)
    px = np.asarray(render(scene, side))
    for s in scene.shapes:
        y, x = int(s.cy * side), int(s.cx * side)
        assert tuple(px[y, x]) == COLORS[s.color]
    free = np.ones((side, side), bool)
    for s in scene.shapes:
        x0, y0, x1, y1 = (v * side for v in s.box)
        free[max(0, int(y0) - 1) : int(y1) + 2, max(0, int(x0) - 1) : int(x1) + 2] = False
    assert (px[free] == 255).all()


def test_triangle_points_up() -> None:
    scene = scenes.Scene((scenes.Shape("triangle", "red", "large", 0.5, 0.5, 0.4),))
    px = np.asarray(render(scene, 100))
    red = (px == COLORS["red"]).all(axis=-1)
    top_row, bottom_row = red[32], red[68]
    assert 0 < top_row.sum() < 8 and bottom_row.sum() > 30


def test_deterministic_and_augmented_sizes() -> None:
    assert scene_at(3, 7) == scene_at(3, 7) and scene_at(3, 7) != scene_at(4, 7)
    a, cap_a = scenes.augmented_at(0, 11)
    b, cap_b = scenes.augmented_at(0, 11)
    assert cap_a == cap_b == scene_at(0, 11).caption
    assert np.array_equal(np.asarray(a), np.asarray(b))
    sides = {scenes.augmented_at(0, i)[0].size for i in range(30)}
    assert all(64 <= w == h <= 256 for w, h in sides) and len(sides) > 10


def test_examples_follow_the_grammar() -> None:
    import json
    from pathlib import Path

    from PIL import Image

    root = Path(__file__).resolve().parent.parent / "examples"
    rows = [json.loads(line) for line in (root / "captions.jsonl").read_text().splitlines()]
    assert len(rows) >= 6
    for row in rows:
        assert parse_caption(row["caption"]), row
        with Image.open(root / row["image"]) as im:
            assert 64 <= im.size[0] <= 256


def test_shipped_model_captions_the_examples() -> None:
    """The packaged export directory is present and right on every example (runtime only)."""
    import json
    from pathlib import Path

    from vedrt.runtime import load

    root = Path(__file__).resolve().parent.parent
    model = root / "vedrt" / "models" / "scenes"
    rows = [
        json.loads(line) for line in (root / "examples" / "captions.jsonl").read_text().splitlines()
    ]
    gen = load(model, threads=1)
    images = [root / "examples" / r["image"] for r in rows]
    for beams in (1, 4):
        assert gen.caption(images, num_beams=beams) == [r["caption"] for r in rows]
