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

from .cli import plain_field, require_stdout, write_line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "texts", nargs="*", metavar="TEXT", help="texts to generate from (default: stdin lines)"
    )
    parser.add_argument(
        "--model",
        metavar="EXPORT_DIR",
        help="a text model's export directory (default: the shipped text model, "
        "vedrt/models/text, as `vedrt caption` defaults to the scene model)",
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


def _texts(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(texts, errors): the arguments, or stdin's non-blank lines; a line or argument that is not
    UTF-8 is an error of its own (tokenizers refuse the escapes Python decodes it to)."""
    if args.texts and args.texts != ["-"]:
        raw = [
            (f"argument {i + 1}", t.encode("utf-8", "surrogateescape"))
            for i, t in enumerate(args.texts)
        ]
    else:
        stream = getattr(sys.stdin, "buffer", sys.stdin) or []  # None: started with stdin closed
        raw = [(f"line {i + 1}", line) for i, line in enumerate(stream)]
    texts, errors = [], []
    for where, data in raw:
        try:
            text = data.decode("utf-8") if isinstance(data, bytes) else data
        except UnicodeDecodeError:
            errors.append(f"{where}: not valid UTF-8")
            continue
        text = text.rstrip("\r\n") if where.startswith("line") else text
        if text.strip() or not where.startswith("line"):  # blank stdin lines are skipped
            texts.append(text)
    return texts, errors


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError, UsageError
    from .loader import load

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    names = ("num_beams", "max_new_tokens", "num_return_sequences")
    options = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    try:
        if args.model is None:
            from .. import models

            args.model = str(models.path("text"))
        generator = load(args.model, threads=args.threads)
        generator.options(**options)  # bad options fail before any text is read
        if generator.manifest.modality != "text":
            raise InputError(f"{args.model} is an image model: use `vedrt caption`")
    except InputError as exc:
        raise UsageError(str(exc)) from None
    texts, errors = _texts(args)
    for error in errors:
        print(f"vedrt generate: error: {error}", file=sys.stderr, flush=True)
    if not texts and not errors:
        raise UsageError("no texts given (as arguments or one per line on stdin)")
    require_stdout("outputs")
    per_text = options.get("num_return_sequences", 1)
    failed = len(errors)
    for start in range(0, len(texts), args.batch_size):
        chunk = texts[start : start + args.batch_size]
        for done, outputs in _generate(generator, chunk, options):
            if isinstance(outputs, InputError):  # this text alone: the others go on
                print(f"vedrt generate: error: text {start + done + 1}: {outputs}", file=sys.stderr)
                failed += 1
                continue
            for i, output in enumerate(outputs):
                _print(chunk[done + i // per_text], output, args.json)
    if failed:
        print(
            f"vedrt generate: {failed} of {len(texts) + len(errors)} texts failed", file=sys.stderr
        )
    return 1 if failed else 0


def _generate(generator, chunk: list[str], options: dict):
    """(index in chunk, outputs) for the chunk in one call; when the call fails (one text is
    empty or too long), each text alone, a failure standing in for that text's outputs."""
    from ..errors import InputError

    try:
        outputs = generator.generate_text(chunk, **options)
    except InputError as exc:
        if len(chunk) == 1:
            yield 0, exc
            return
    else:
        yield 0, outputs
        return
    for index, text in enumerate(chunk):
        try:
            yield index, generator.generate_text([text], **options)
        except InputError as exc:
            yield index, exc


def _print(text: str, output: str, as_json: bool) -> None:
    if as_json:
        line = json.dumps({"text": text, "output": output}, ensure_ascii=False)
    else:
        line = f"{plain_field(text)}\t{plain_field(output)}"
    write_line(line, "outputs")
