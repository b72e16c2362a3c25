"""`vedrt build EXPORT_DIR [--fp16] [--max-batch N] [--max-beams N] [--max-new-tokens N]`.

The defaults fit any export: --max-new-tokens is 32, or fewer where the decoder has fewer positions.

Builds TensorRT engines next to the graphs, then checks them against the fp32 graphs (ONNX
Runtime on the CPU): max logit error on the first step and token agreement of beam search. Without
TensorRT or a GPU it says so in one line and exits 2, before doing anything.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np

from ..errors import UsageError

DEFAULT_MAX_NEW_TOKENS = 32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export_dir", type=Path, help="a directory written by vedrt export")
    parser.add_argument("--fp16", action="store_true", help="FP16 engines (norms/softmax in FP32)")
    parser.add_argument("--max-batch", type=int, default=4, help="most images per call (4)")
    parser.add_argument("--max-beams", type=int, default=4, help="most beams per image (4)")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"longest generation, in new tokens (default {DEFAULT_MAX_NEW_TOKENS}, or as many as "
        "the decoder's positions allow after the start token, if fewer)",
    )
    parser.add_argument(
        "--check-images",
        type=int,
        default=8,
        help="random images to compare the engines with the fp32 graphs on (0: skip the check)",
    )


def _limits(args: argparse.Namespace, max_positions: int | None):
    from .profiles import Limits

    if args.max_new_tokens is None:  # the default must fit the model it is given
        fits = DEFAULT_MAX_NEW_TOKENS if max_positions is None else max_positions - 1
        args.max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, fits)
    for flag, value in (
        ("--max-batch", args.max_batch),
        ("--max-beams", args.max_beams),
        ("--max-new-tokens", args.max_new_tokens),
    ):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if max_positions is not None and args.max_new_tokens + 1 > max_positions:
        raise UsageError(
            f"--max-new-tokens {args.max_new_tokens} exceeds the decoder's {max_positions} positions"
        )
    return Limits(args.max_batch, args.max_beams, args.max_new_tokens)


def require_tensorrt_and_gpu() -> None:
    """One clear line (exit 2) where engines cannot be built, before any work."""
    if importlib.util.find_spec("tensorrt") is None:
        raise UsageError(
            "TensorRT is not installed (pip install 'vedrt[tensorrt]' on a machine with an NVIDIA GPU)"
        )
    if importlib.util.find_spec("torch") is None:
        raise UsageError("building engines needs torch with CUDA (pip install torch)")
    import torch

    if not torch.cuda.is_available():
        raise UsageError(
            "no CUDA GPU is visible: TensorRT engines are built on the GPU they run on"
        )


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..manifest import read_manifest

    try:
        manifest = read_manifest(args.export_dir)
    except InputError as exc:
        raise UsageError(str(exc)) from None
    limits = _limits(args, manifest.max_positions)
    require_tensorrt_and_gpu()
    from .build import BuildError, build_engines

    try:
        report = build_engines(manifest.root, manifest.raw, limits, args.fp16)
    except BuildError as exc:
        raise UsageError(str(exc)) from None
    print(report.summary())
    if args.check_images > 0:
        check(manifest.root, report.precision, limits, args.check_images)
    return 0


def check(export_dir: Path, precision: str, limits, images: int) -> None:
    """Compare the engines with the fp32 graphs and record the result in tensorrt.json."""
    from ..gpu.compare import compare
    from ..runtime import load
    from .profiles import read_index, write_index

    engines = load(export_dir, backend="tensorrt", device="cuda", precision=precision)
    reference = load(export_dir)
    m = reference.manifest
    batch = min(images, limits.max_batch)
    rng = np.random.default_rng(0)
    results = []
    for start in range(0, images, batch):
        n = min(batch, images - start)
        pv = rng.standard_normal((n, m.num_channels, *m.image_size)).astype(np.float32)
        options = {"num_beams": limits.max_beams, "max_new_tokens": limits.max_new_tokens}
        results.append(compare(reference, engines, pv, **options))
    rows = sum(r.rows for r in results)
    summary = {
        "max_logit_error": max(r.max_logit_error for r in results),
        "sequence_agreement": sum(r.sequence_agreement * r.rows for r in results) / rows,
        "token_agreement": sum(r.token_agreement * r.rows for r in results) / rows,
        "rows": rows,
        "images": "random (seed 0)",
    }
    print(
        f"check vs fp32 graphs: max |logit error| {summary['max_logit_error']:.3g}, identical "
        f"sequences {100 * summary['sequence_agreement']:.1f}%, identical tokens "
        f"{100 * summary['token_agreement']:.1f}% ({rows} images, beam {limits.max_beams})"
    )
    index = read_index(export_dir)
    index.setdefault("check", {})[precision] = summary
    write_index(export_dir, index)
