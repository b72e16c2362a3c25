"""`vedrt caption`: one line per image, `path<TAB>caption` or JSON lines (a path holding a tab or a
line break is written JSON-quoted, so the columns hold).

A bad image (unreadable, truncated, a decompression bomb) is reported on stderr in one line and
the others are still captioned; the exit status is 1 at the end if any image failed, 2 for a
usage error. An attention map that cannot be written is reported after the captions it explains.
Imports nothing heavy: ONNX Runtime, PIL and tokenizers only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "scenes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "images",
        nargs="*",
        metavar="IMAGE",
        help="image files to caption; a folder stands for the image files in it (by name, "
        "not its subfolders)",
    )
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
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="ONNX Runtime intra-op threads, at most this machine's cores "
        "(default 1: measured fastest here for small and base-sized models)",
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


def plain_field(text: str) -> str:
    """A field of the tab-separated output: as it is, or JSON-quoted when a tab or a line break
    in it would break the columns (a file named "a\tb.png")."""
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in "\t\r\n") else text


def _print(path: str, caption: str, as_json: bool) -> None:
    # a file name that is not UTF-8 holds surrogate escapes: \u-escape them, or the JSON line
    # would carry raw non-UTF-8 bytes
    ascii_only = any("\udc80" <= ch <= "\udcff" for ch in path)
    line = (
        json.dumps({"image": path, "caption": caption}, ensure_ascii=ascii_only)
        if as_json
        else f"{plain_field(path)}\t{caption}"
    )
    write_line(line, "captions")


def require_stdout(what: str) -> None:
    """Started with stdout closed (`>&-`), print() writes nowhere: every result would be lost
    with exit 0, so say it before any work."""
    from ..errors import UsageError

    if sys.stdout is None:
        raise UsageError(f"stdout is closed: there is nowhere to write the {what}")


def write_line(line: str, what: str) -> None:
    """One result line to stdout; a failed write is one error line (`what` names the results)."""
    from ..cli import discard_stdout
    from ..errors import UsageError

    try:
        print(line, flush=True)
    except BrokenPipeError:
        raise  # the reader went away (`| head`): vedrt.cli stops quietly
    except OSError as exc:  # `> /dev/full`, a full disk: one line, and no second failed flush
        discard_stdout()
        raise UsageError(f"cannot write the {what}: {exc.strerror or exc}") from None


def _model_dir(args: argparse.Namespace, usage_error) -> Path:
    if args.model:
        return Path(args.model)
    if not (DEFAULT_MODEL / "vedrt.json").is_file():
        raise usage_error(
            f"no --model given and the default scene model is not installed ({DEFAULT_MODEL} is missing)"
        )
    return DEFAULT_MODEL


def _options(args: argparse.Namespace) -> dict:
    """The generation options given; checked by `Generator.options`, as in the Python API."""
    names = ("num_beams", "max_new_tokens")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def explain_path(out: str, index: int) -> Path:
    """OUT.png for the first image, OUT-2.png, OUT-3.png ... for the next ones."""
    path = Path(out)
    return path if index == 0 else path.with_name(f"{path.stem}-{index + 1}{path.suffix}")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def expand_folders(paths: list[str]) -> tuple[list[str], list[str]]:
    """(images, errors): each folder replaced by its image files in name order (by suffix, so a
    folder's README or captions.jsonl is not an error); a folder without any is an error."""
    images, errors = [], []
    for path in paths:
        folder = Path(path)
        if not folder.is_dir():
            images.append(path)
            continue
        found = sorted(
            str(f) for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
        )
        if not found:
            errors.append(f"{path}: a folder without image files ({', '.join(IMAGE_SUFFIXES)})")
        images += found
    return images, errors


def check_explain_paths(out: str, images: list[str]) -> None:
    """Attention maps never replace a file: not an image being captioned (it would be read after
    its map was written over it), not anything else the user has."""
    from ..errors import UsageError

    for index in range(len(images)):
        path = explain_path(out, index)
        if path.exists() or path.is_symlink():
            raise UsageError(
                f"--explain would write {path}, which exists: vedrt does not overwrite files "
                "(remove it, or choose another --explain name)"
            )


def read_image(generator, path: str, keep: int | None, explain: bool) -> tuple:
    """(path, the image if it is to be explained, its pixel values): one image's own errors."""
    from .errors import InputError
    from .preprocess import load_image

    image = load_image(path, keep_short_side=keep)
    try:
        pixels = generator.processor([image])[0]
    except (ValueError, TypeError, OSError) as exc:  # a mode or shape the processor cannot take
        raise InputError(f"{path}: cannot preprocess this image ({exc})") from None
    return path, image if explain else None, pixels


def caption_and_explain(generator, good: list, options: dict) -> tuple[list[str], list]:
    """Caption a batch and keep what its attention maps need, written after the captions print."""
    from .errors import InputError

    encoder = generator.manifest.raw["encoder"]
    if "patch_grid" not in encoder:
        raise InputError("--explain needs encoder.patch_grid in vedrt.json (re-export the model)")
    result = generator.generate(
        np.stack([pixels for _, _, pixels in good]),
        **options,
        return_dict=True,
        output_attentions=True,
    )
    eos = set(generator.options(**options).eos_token_id or ())
    vocab = generator.detokenizer.tokenizer
    maps = []
    for i, (_, image, _) in enumerate(good):
        ids = [int(t) for t in result.sequences[i, 1:]]
        steps = next((k for k, t in enumerate(ids) if t in eos), len(ids))
        tokens = [vocab.id_to_token(t) or str(t) for t in ids[:steps]]
        rows = (
            i if result.beam_indices is None else [int(r) for r in result.beam_indices[i, :steps]]
        )
        maps.append((image, tokens, rows))
    return generator.decode(result.sequences), [(result.cross_attentions, maps)]


def write_maps(generator, pending: list, out: str, first_index: int) -> int:
    """Write the attention maps of one batch (greedy: the image's row; beams: the chosen beam's)."""
    from .explain import write_attention_map

    encoder = generator.manifest.raw["encoder"]
    index = first_index
    for cross_attentions, maps in pending:
        for image, tokens, rows in maps:
            write_attention_map(
                image,
                tokens,
                cross_attentions,
                explain_path(out, index),
                grid=tuple(encoder["patch_grid"]),
                prefix_tokens=int(encoder.get("prefix_tokens", 1)),
                rows=rows,
            )
            index += 1
    return index


def run(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from .errors import InputError
    from .loader import load

    if not args.images:
        raise UsageError("no images given (vedrt caption IMAGE ... [--model EXPORT_DIR])")
    require_stdout("captions")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    options = _options(args)
    try:
        generator = load(_model_dir(args, UsageError), threads=args.threads)
        if generator.manifest.modality == "text":
            raise InputError(f"{args.model} is a text model: use `vedrt generate`")
        generator.options(**options)  # reject bad options before reading any image
        generator.detokenizer  # noqa: B018  (fail early on an export without a tokenizer)
        keep = generator.processor.keep_short_side
    except InputError as exc:
        raise UsageError(str(exc)) from None

    images, errors = expand_folders(args.images)
    if args.explain:
        check_explain_paths(args.explain, images)
    for error in errors:
        print(f"vedrt caption: error: {error}", file=sys.stderr, flush=True)
    failed, map_failed = len(errors), False
    explain = args.explain  # None once a map could not be written: the captions go on
    explained = 0
    for start in range(0, len(images), args.batch_size):
        good: list[tuple] = []
        for path in images[start : start + args.batch_size]:
            try:
                good.append(read_image(generator, path, keep, bool(explain)))
            except InputError as exc:
                print(f"vedrt caption: error: {exc}", file=sys.stderr, flush=True)
                failed += 1
        if not good:
            continue
        pending: list = []
        try:
            if explain:
                captions, pending = caption_and_explain(generator, good, options)
            else:
                pixel_values = np.stack([pixels for _, _, pixels in good])
                captions = generator.decode(generator.generate(pixel_values, **options))
        except InputError as exc:
            raise UsageError(str(exc)) from None
        for (path, _, _), caption in zip(good, captions, strict=True):
            _print(path, caption, args.json)
        if pending:
            try:
                explained = write_maps(generator, pending, explain, explained)
            except OSError as exc:
                print(
                    f"vedrt caption: error: cannot write the attention map "
                    f"{explain_path(explain, explained)}: {exc.strerror or exc}",
                    file=sys.stderr,
                    flush=True,
                )
                explain, map_failed = None, True
    if failed:
        total = len(images) + len(errors)
        print(f"vedrt caption: {failed} of {total} images failed", file=sys.stderr)
    return 1 if failed or map_failed else 0
