"""`vedrt caption`: one line per image, `path<TAB>caption` or JSON lines.

A bad image is reported on stderr and the others are still captioned; the exit status is 2 at
the end if any image failed. Imports nothing heavy: ONNX Runtime, PIL and tokenizers only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "scenes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="image files to caption")
    parser.add_argument(
        "--model",
        metavar="EXPORT_DIR",
        help=f"export directory (default: the shipped scene model, {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--num-beams",
        type=int,
        default=None,
        metavar="N",
        help="beam search with N beams (default: the model's)",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, metavar="N", help="at most N tokens per caption"
    )
    parser.add_argument(
        "--json", action="store_true", help='print JSON lines {"image": ..., "caption": ...}'
    )
    parser.add_argument(
        "--threads", type=int, default=None, metavar="N", help="ONNX Runtime intra-op threads"
    )
    parser.add_argument(
        "--explain",
        metavar="OUT.png",
        help="also write a cross-attention map per image (OUT.png; OUT-2.png ... for more images)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        metavar="N",
        help="images per generate() call (default 8)",
    )


def _print(path: str, caption: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"image": path, "caption": caption}, ensure_ascii=False), flush=True)
    else:
        print(f"{path}\t{caption}", flush=True)


def _model_dir(args: argparse.Namespace, usage_error) -> Path:
    if args.model:
        return Path(args.model)
    if not (DEFAULT_MODEL / "vedrt.json").is_file():
        raise usage_error(
            f"no --model given and the default scene model is not installed ({DEFAULT_MODEL} is missing)"
        )
    return DEFAULT_MODEL


def _options(args: argparse.Namespace, usage_error) -> dict:
    options = {}
    for name in ("num_beams", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise usage_error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
            options[name] = value
    return options


def explain_path(out: str, index: int) -> Path:
    """OUT.png for the first image, OUT-2.png, OUT-3.png ... for the next ones."""
    path = Path(out)
    return path if index == 0 else path.with_name(f"{path.stem}-{index + 1}{path.suffix}")


def caption_and_explain(
    generator, good: list, options: dict, out: str, first_index: int
) -> list[str]:
    """Caption a batch and write each image's attention map (greedy: its row; beams: the chosen beam's)."""
    from .errors import InputError
    from .explain import write_attention_map

    encoder = generator.manifest.raw["encoder"]
    if "patch_grid" not in encoder:
        raise InputError("--explain needs encoder.patch_grid in vedrt.json (re-export the model)")
    result = generator.generate(
        generator.preprocess([image for _, image in good]),
        **options,
        return_dict=True,
        output_attentions=True,
    )
    eos = set(generator.options(**options).eos_token_id or ())
    vocab = generator.detokenizer.tokenizer
    for i, (_, image) in enumerate(good):
        ids = [int(t) for t in result.sequences[i, 1:]]
        steps = next((k for k, t in enumerate(ids) if t in eos), len(ids))
        tokens = [vocab.id_to_token(t) or str(t) for t in ids[:steps]]
        rows = (
            i if result.beam_indices is None else [int(r) for r in result.beam_indices[i, :steps]]
        )
        write_attention_map(
            image,
            tokens,
            result.cross_attentions,
            explain_path(out, first_index + i),
            grid=tuple(encoder["patch_grid"]),
            prefix_tokens=int(encoder.get("prefix_tokens", 1)),
            rows=rows,
        )
    return generator.decode(result.sequences)


def run(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from .errors import InputError
    from .generator import load
    from .preprocess import load_image

    if not args.images:
        raise UsageError("no images given (vedrt caption IMAGE ... [--model EXPORT_DIR])")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    options = _options(args, UsageError)
    try:
        generator = load(_model_dir(args, UsageError), threads=args.threads)
        generator.options(**options)  # reject bad options before reading any image
        generator.detokenizer  # noqa: B018  (fail early on an export without a tokenizer)
    except InputError as exc:
        raise UsageError(str(exc)) from None

    failed = 0
    explained = 0
    for start in range(0, len(args.images), args.batch_size):
        good: list[tuple[str, object]] = []
        for path in args.images[start : start + args.batch_size]:
            try:
                good.append((path, load_image(path)))
            except InputError as exc:
                print(f"vedrt caption: error: {exc}", file=sys.stderr, flush=True)
                failed += 1
        if not good:
            continue
        try:
            if args.explain:
                captions = caption_and_explain(generator, good, options, args.explain, explained)
                explained += len(good)
            else:
                captions = generator.caption([image for _, image in good], **options)
        except (InputError, OSError) as exc:
            raise UsageError(str(exc)) from None
        for (path, _), caption in zip(good, captions, strict=True):
            _print(path, caption, args.json)
    if failed:
        print(f"vedrt caption: {failed} of {len(args.images)} images failed", file=sys.stderr)
        return 2
    return 0
