"""How often int8 captions equal fp32 captions on held-out scenes (the int8 acceptance check).

    python -m benchmarks.agreement FP32_EXPORT INT8_EXPORT [--images 200] [--beams 4]

Random-weight models say little about int8 (their logits are nearly flat, so tiny errors flip
argmaxes); the trained scene model on scenes it never saw is the meaningful test. The harness
runs this for the scene model when both of its exports are there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def caption_agreement(
    fp32_dir: Path, int8_dir: Path, images: int = 200, beams: int = 4, threads: int = 2
) -> dict:
    """Share of held-out scene captions identical between the two exports (and their accuracy)."""
    from vedrt.data.scenes import HELDOUT_SEED, render, scene_at
    from vedrt.runtime import load

    scenes = [scene_at(HELDOUT_SEED, i) for i in range(images)]
    pictures = [render(s) for s in scenes]
    truth = [s.caption for s in scenes]
    out: dict = {"images": images, "beams": beams}
    ids, texts = {}, {}
    for name, path in (("fp32", fp32_dir), ("int8", int8_dir)):
        gen = load(path, threads=threads)
        ids[name], texts[name] = [], []
        for start in range(0, images, 16):
            pixels = gen.preprocess(pictures[start : start + 16])
            rows = gen.generate(pixels, num_beams=beams)
            ids[name] += [tuple(r) for r in rows.tolist()]
            if (Path(path) / "tokenizer.json").is_file():
                texts[name] += [c.strip() for c in gen.decode(rows)]
        if texts[name]:
            hits = sum(a == b for a, b in zip(texts[name], truth, strict=True))
            out[f"{name}_exact_match"] = hits / images
    # identical token ids: identical captions, whatever the tokenizer does with them
    same = sum(a == b for a, b in zip(ids["fp32"], ids["int8"], strict=True))
    out["identical"] = same / images
    if texts["fp32"] and texts["int8"]:
        pairs = zip(truth, texts["fp32"], texts["int8"], strict=True)
        out["differing_examples"] = [
            {"truth": t, "fp32": a, "int8": b} for t, a, b in pairs if a != b
        ][:5]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.agreement")
    parser.add_argument("fp32", type=Path)
    parser.add_argument("int8", type=Path)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    result = caption_agreement(args.fp32, args.int8, args.images, args.beams, args.threads)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
