"""`vedrt generate`: text in, text out with a text EncoderDecoderModel export.

    vedrt generate --model EXPORT_DIR "a text" "another text" [--num-beams 4] [--json]
    cat texts.txt | vedrt generate --model EXPORT_DIR          # one text per line

One line per input, `text<TAB>output` (or JSON lines); with `--num-return-sequences K`, K lines
per input. Usage errors exit 2 in one line; imports nothing heavy.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "texts", nargs="*", metavar="TEXT", help="texts to generate from (default: stdin lines)"
    )
    parser.add_argument(
        "--model", metavar="EXPORT_DIR", required=True, help="a text model's export directory"
    )
    for flag, helptext in (
        ("--num-beams", "beam search with N beams (default: the model's)"),
        ("--max-new-tokens", "at most N new tokens per output"),
        ("--num-return-sequences", "N outputs per text (at most --num-beams)"),
    ):
        parser.add_argument(flag, type=int, default=None, metavar="N", help=helptext)
    parser.add_argument("--json", action="store_true", help='JSON lines {"text", "output"}')
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="ONNX Runtime intra-op threads (default 1)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, metavar="N", help="texts per generate() call (8)"
    )


def _texts(args: argparse.Namespace) -> list[str]:
    if args.texts and args.texts != ["-"]:
        return list(args.texts)
    return [line.rstrip("\n") for line in sys.stdin if line.strip()]


def run(args: argparse.Namespace) -> int:
    from ..cli import discard_stdout
    from ..errors import InputError, UsageError
    from .loader import load

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    names = ("num_beams", "max_new_tokens", "num_return_sequences")
    options = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    try:
        generator = load(args.model, threads=args.threads)
        generator.options(**options)  # bad options fail before any text is read
        if generator.manifest.modality != "text":
            raise InputError(f"{args.model} is an image model: use `vedrt caption`")
    except InputError as exc:
        raise UsageError(str(exc)) from None
    texts = _texts(args)
    if not texts:
        raise UsageError("no texts given (as arguments or one per line on stdin)")
    per_text = options.get("num_return_sequences", 1)
    for start in range(0, len(texts), args.batch_size):
        chunk = texts[start : start + args.batch_size]
        try:
            outputs = generator.generate_text(chunk, **options)
        except InputError as exc:
            raise UsageError(str(exc)) from None
        for i, output in enumerate(outputs):
            text = chunk[i // per_text]
            line = json.dumps({"text": text, "output": output}, ensure_ascii=False)
            try:
                print(line if args.json else f"{text}\t{output}", flush=True)
            except BrokenPipeError:
                raise
            except OSError as exc:
                discard_stdout()
                raise UsageError(f"cannot write the outputs: {exc.strerror or exc}") from None
    return 0
