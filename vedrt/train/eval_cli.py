"""`vedrt eval`: exact match and BLEU-4 of an export directory, per backend and decoding.

By default it scores held-out scenes from a seed training never draws from, augmented the way
other programs might draw them. With `--checkpoint` the PyTorch model is scored on the same
images and its captions are compared one by one with the runtime's: the acceptance test of the
shipped model is that they agree.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vedrt.data import scenes
from vedrt.errors import UsageError

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "scenes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        metavar="EXPORT_DIR",
        default=None,
        help=f"export directory (default: the shipped scene model, {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="also score this PyTorch checkpoint and compare captions",
    )
    parser.add_argument(
        "--data",
        help="folder with captions.jsonl, a .jsonl file, or a COCO captions .json "
        "(default: held-out synthetic scenes)",
    )
    parser.add_argument(
        "--images", help="image folder for a COCO file (default: the file's folder)"
    )
    parser.add_argument(
        "-n", "--num-scenes", type=int, default=500, help="held-out scenes (default 500)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=scenes.HELDOUT_SEED,
        help=f"scene seed (default {scenes.HELDOUT_SEED}, never used in training)",
    )
    parser.add_argument(
        "--plain",
        action="store_true",
        help="draw scenes plainly at --side px instead of augmented (sizes, JPEG, shades)",
    )
    parser.add_argument(
        "--side", type=int, default=128, help="image side for --plain (default 128)"
    )
    parser.add_argument(
        "--backend", action="append", help="runtime backend, repeatable (default onnxruntime)"
    )
    parser.add_argument(
        "--beams", type=int, nargs="+", default=[1, 4], help="beam widths (default: 1 4)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=50, help="images per generate() call (default 50)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads (ONNX Runtime and torch)"
    )
    parser.add_argument(
        "--show-errors", type=int, default=5, metavar="N", help="print N wrong captions per row"
    )
    parser.add_argument("--json", metavar="OUT", help="also write the scores as JSON")


def _dataset(args: argparse.Namespace) -> tuple[list[Any], list[list[str]]]:
    """Images and their references (several per image for COCO-style data)."""
    if args.data:
        from vedrt.train.data import load_captions

        grouped: dict[Path, list[str]] = {}
        for it in load_captions(args.data, args.images):
            grouped.setdefault(it.image, []).append(it.caption)
        return list(grouped), list(grouped.values())
    from vedrt.train.data import SceneImages

    if args.num_scenes < 1:
        raise UsageError(f"--num-scenes must be >= 1, got {args.num_scenes}")
    src = SceneImages(args.seed, args.num_scenes, augment=not args.plain, side=args.side)
    pairs = [src[i] for i in range(len(src))]
    return [im for im, _ in pairs], [[c] for _, c in pairs]


def _batched(images: list[Any], size: int, fn: Callable[[list[Any]], list[str]]) -> list[str]:
    out: list[str] = []
    for start in range(0, len(images), size):
        out += [c.strip() for c in fn(images[start : start + size])]
    return out


def _runtime_captioner(
    model_dir: Path, backend: str, threads: int | None, failed: set[str]
) -> Callable[..., list[str]]:
    """The runtime's captions; an image it cannot read is reported once, captioned "" (so it
    scores as wrong), and the others go on: one corrupt file used to end the whole evaluation."""
    from vedrt.runtime import InputError, load

    try:
        gen = load(model_dir, backend=backend, threads=threads)
    except InputError as exc:
        raise UsageError(str(exc)) from None

    def caption(images: list[Any], beams: int) -> list[str]:
        try:
            return gen.caption(images, num_beams=beams)
        except InputError:
            pass
        out = []
        for image in images:
            try:
                out += gen.caption([image], num_beams=beams)
            except InputError as exc:
                if str(exc) not in failed:
                    print(f"vedrt eval: error: {exc}", file=sys.stderr, flush=True)
                    failed.add(str(exc))
                out.append("")
        return out

    return caption


def _torch_captioner(checkpoint: str, threads: int | None) -> Callable[..., list[str]]:
    """transformers' own preprocessing and generate(): the reference the runtime must match."""
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel

    if not (Path(checkpoint) / "config.json").is_file():
        raise UsageError(f"--checkpoint {checkpoint}: not a checkpoint folder (no config.json)")
    if threads:
        torch.set_num_threads(threads)
    try:
        model = VisionEncoderDecoderModel.from_pretrained(checkpoint).eval()
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        processor = AutoImageProcessor.from_pretrained(checkpoint, use_fast=False)
    except (OSError, ValueError, KeyError) as exc:  # a text model, a partial folder, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"--checkpoint {checkpoint}: cannot load ({first[:200]})") from None

    def caption(images: list[Any], beams: int) -> list[str]:
        from PIL import Image

        pil = [Image.open(p).convert("RGB") if isinstance(p, str | Path) else p for p in images]
        pixels = processor(images=pil, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            ids = model.generate(pixel_values=pixels, num_beams=beams)
        return tokenizer.batch_decode(ids, skip_special_tokens=True)

    return caption


def _run_text(model_dir: Path, args: argparse.Namespace) -> int:
    """Exact match on the text model's own held-out captions: the runtime alone, no sacrebleu or
    torch (it runs in a runtime-only install)."""
    from vedrt.train.text import evaluate_export

    image_only = [f"--{n}" for n in ("data", "images", "checkpoint", "json") if getattr(args, n)]
    if image_only:  # they were silently ignored
        raise UsageError(
            f"{model_dir} is a text model, scored on its own held-out set: "
            f"{', '.join(image_only)} are for image models"
        )
    scores, count = evaluate_export(model_dir, tuple(args.beams))
    for name, share in scores.items():
        print(f"{model_dir}: held-out exact match {share:.3f} ({name}, {count} captions)")
    return 0


def run(args: argparse.Namespace) -> int:
    from vedrt.cli import require

    model_dir = Path(args.model) if args.model else DEFAULT_MODEL
    if not (model_dir / "vedrt.json").is_file():
        raise UsageError(f"{model_dir}: not an export directory (no vedrt.json)")
    from vedrt.manifest import read_manifest

    if read_manifest(model_dir).modality == "text":  # the text model's own held-out set
        return _run_text(model_dir, args)
    # before any inference: the scores need sacrebleu, the PyTorch reference torch/transformers
    require(("sacrebleu",) + (("torch", "transformers") if args.checkpoint else ()), "train")
    from vedrt.train.metrics import caption_scores

    if any(b < 1 for b in args.beams) or args.batch_size < 1:
        raise UsageError("--beams and --batch-size must be >= 1")
    if args.side < 8:
        raise UsageError(f"--side must be at least 8 pixels, got {args.side}")
    if args.json:  # found out before the scoring, not after it
        target = Path(args.json)
        if target.is_dir() or not target.parent.is_dir():
            raise UsageError(f"--json {target}: not a file in an existing folder")
    images, refs = _dataset(args)
    style = f"plain, {args.side} px" if args.plain else "augmented"
    what = args.data or f"{len(images)} held-out scenes (seed {args.seed}, {style})"
    print(f"evaluating {model_dir} on {what}")

    failed: set[str] = set()  # images the runtime could not read, each reported once
    captioners = {
        f"runtime:{b}": _runtime_captioner(model_dir, b, args.threads, failed)
        for b in (args.backend or ["onnxruntime"])
    }
    if args.checkpoint:
        captioners["pytorch"] = _torch_captioner(args.checkpoint, args.threads)

    rows: list[dict[str, Any]] = []
    captions: dict[tuple[str, int], list[str]] = {}
    print(f"{'source':<22} {'decoding':<8} {'exact':>7} {'BLEU-4':>7} {'img/s':>7}")
    for name, fn in captioners.items():
        for beams in args.beams:
            start = time.perf_counter()
            hyp = _batched(images, args.batch_size, lambda ims, b=beams, f=fn: f(ims, b))
            seconds = time.perf_counter() - start
            captions[name, beams] = hyp
            s = caption_scores(hyp, refs)
            decoding = "greedy" if beams == 1 else f"beam{beams}"
            rows.append({"source": name, "decoding": decoding, **s, "seconds": round(seconds, 2)})
            print(
                f"{name:<22} {decoding:<8} {s['exact_match']:>7.1%} {s['bleu4']:>7.2f} "
                f"{len(images) / seconds:>7.1f}"
            )
            wrong = [(i, h) for i, h in enumerate(hyp) if h not in refs[i]]
            for i, h in wrong[: args.show_errors]:
                print(f"    #{i}: got {h!r}, expected {refs[i][0]!r}")

    agreement = {}
    if args.checkpoint:
        for name in captioners:
            if name == "pytorch":
                continue
            for beams in args.beams:
                a, b = captions[name, beams], captions["pytorch", beams]
                same = sum(x == y for x, y in zip(a, b, strict=True))
                agreement[f"{name} beam{beams}"] = same / len(a)
                print(f"{name} vs pytorch, {beams} beam(s): {same}/{len(a)} captions identical")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"model": str(model_dir), "data": what, "rows": rows, "same_as_pytorch": agreement},
                indent=2,
            )
            + "\n"
        )
    if failed:
        print(
            f"vedrt eval: {len(failed)} image(s) could not be read; scored as wrong",
            file=sys.stderr,
        )
    return 1 if failed else 0
