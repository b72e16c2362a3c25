"""The `vedrt` command: one subcommand per module, each imported only when it runs.

Lazy imports keep `vedrt caption` free of torch and transformers, and `--help` fast.
Each subcommand module exposes `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "caption": (
        "vedrt.runtime.cli",
        "caption images with an export directory (default: the shipped scene model)",
    ),
    "export": (
        "vedrt.export.cli",
        "export a VisionEncoderDecoder checkpoint to ONNX graphs with a KV cache",
    ),
    "train": ("vedrt.train.cli", "train a captioning model (synthetic scenes or your own data)"),
    "eval": (
        "vedrt.train.eval_cli",
        "exact-match and BLEU-4 of an export directory on held-out data",
    ),
    "bench": ("benchmarks.__main__", "benchmark vedrt against transformers and Optimum"),
    "build": ("vedrt.tensorrt.cli", "build TensorRT FP16 engines from an export directory"),
    "serve": ("vedrt.serve.cli", "serve captions over HTTP: KServe v2 / Triton, /v1/caption"),
}


class UsageError(Exception):
    """A problem with the user's input: printed as one line, exit code 2, no traceback."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vedrt",
        description="Fast, exact inference for encoder-decoder image captioning and OCR models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        parser = _parser()
        if not argv:
            parser.print_help()
            return 2
        parser.parse_args(argv)  # prints the usage error for an unknown command and exits 2
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in ("vedrt", "benchmarks"):
            raise  # our own module missing is a bug, not a missing extra
        print(
            f"vedrt {name}: needs the package {exc.name!r}, which is not installed "
            f"(pip install 'vedrt[export]' for export/train, 'vedrt[serve]' for serve, "
            f"'vedrt[tensorrt]' for build)",
            file=sys.stderr,
        )
        return 2
    parser = argparse.ArgumentParser(prog=f"vedrt {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except UsageError as exc:
        print(f"vedrt {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vedrt {name}: interrupted", file=sys.stderr)
        return 130


if (
    __name__ == "__main__"
):  # `python -m vedrt.cli`: run the importable copy, whose UsageError subcommands raise
    from vedrt.cli import main as _main

    sys.exit(_main())
