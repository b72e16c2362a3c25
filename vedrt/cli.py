"""The `vedrt` command: one subcommand per module, each imported only when it runs.

Lazy imports keep `vedrt caption` free of torch and transformers, and `--help` fast.
Each subcommand module exposes `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

from . import __version__
from .errors import UsageError, VedrtError  # noqa: F401  (UsageError: importable from here too)

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "caption": (
        "vedrt.runtime.cli",
        "caption images with an export directory (default: the shipped scene model)",
    ),
    "generate": (
        "vedrt.runtime.generate_cli",
        "generate text from text with a text EncoderDecoderModel export",
    ),
    "export": (
        "vedrt.export.cli",
        "export a VisionEncoderDecoder or text EncoderDecoder checkpoint to ONNX graphs",
    ),
    "train": ("vedrt.train.cli", "train a captioning model (synthetic scenes or your own data)"),
    "eval": (
        "vedrt.train.eval_cli",
        "exact-match and BLEU-4 of an export directory on held-out data",
    ),
    "bench": ("benchmarks.__main__", "benchmark vedrt against transformers and Optimum"),
    "build": (
        "vedrt.tensorrt.cli",
        "build TensorRT engines (FP32, or FP16 with --fp16) from an export directory",
    ),
    "serve": ("vedrt.serve.cli", "serve captions over HTTP: KServe v2 / Triton, /v1/caption"),
}


# name -> (packages its run() needs beyond the runtime's, the extra that installs them); checked
# after the arguments are parsed, so --help always works and the message comes before any work.
# `vedrt eval` checks its own, which depend on its arguments.
REQUIRES: dict[str, tuple[tuple[str, ...], str]] = {
    "export": (("torch", "transformers", "onnx", "onnxscript"), "export"),
    "train": (("torch", "transformers", "accelerate", "sacrebleu"), "train"),
    "bench": (("torch", "transformers", "psutil"), "export,bench"),
    "serve": (("starlette", "uvicorn", "prometheus_client"), "serve"),
}


def missing_packages(packages: tuple[str, ...]) -> list[str]:
    """Which of `packages` cannot be imported (a module set to None in sys.modules counts)."""
    missing = []
    for name in packages:
        if name in sys.modules:
            if sys.modules[name] is None:
                missing.append(name)
            continue
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):
            missing.append(name)
    return missing


def require(packages: tuple[str, ...], extra: str) -> None:
    """One line naming the extra to install, instead of a ModuleNotFoundError halfway through."""
    missing = missing_packages(packages)
    if missing:
        raise UsageError(
            f"needs {', '.join(missing)}, not installed in this (runtime-only?) environment: "
            f"{install_hint(extra)}"
        )


def install_hint(extra: str) -> str:
    """How to install an extra: in a clone, with the pins CI uses (without them pip picks the
    newest torch, a CUDA build of several GB); see the README's install notes."""
    torch = any(part in ("export", "train", "bench", "dev") for part in extra.split(","))
    wheel = ", adding --find-links to a folder holding the CPU torch wheel" if torch else ""
    return (
        f"pip install 'vedrt[{extra}]' (in a clone: pip install -c .ci/constraints.txt "
        f"'.[{extra}]'{wheel}, as the README says)"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vedrt",
        description="Fast, exact inference for encoder-decoder image captioning and OCR models.",
    )
    parser.add_argument("--version", action="version", version=f"vedrt {__version__}")
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
        print(_missing_message(name, exc.name), file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"vedrt {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        if name in REQUIRES:
            require(*REQUIRES[name])
        return int(module.run(args) or 0)
    except VedrtError as exc:
        print(f"vedrt {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vedrt {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `vedrt caption ... | head -1`: the reader is gone, stop quietly
        discard_stdout()
        return 141
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in ("vedrt", "benchmarks"):
            raise
        print(_missing_message(name, exc.name), file=sys.stderr)
        return 2


def _missing_message(command: str, package: str | None) -> str:
    fallback = {"build": "tensorrt", "serve": "serve"}.get(command, "export")
    extra = REQUIRES.get(command, ((), fallback))[1]
    if package == "ray":  # `vedrt serve --ray`: Ray Serve is its own extra
        extra = "ray"
    return (
        f"vedrt {command}: error: needs the package {package!r}, which is not installed: "
        f"{install_hint(extra)}"
    )


def discard_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (tests): nothing to do
        pass


if (
    __name__ == "__main__"
):  # `python -m vedrt.cli`: run the importable copy, whose UsageError subcommands raise
    from vedrt.cli import main as _main

    sys.exit(_main())
