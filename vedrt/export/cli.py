"""`vedrt export MODEL_DIR OUT_DIR`: the exporter's command line."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from ..errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Export a saved VisionEncoderDecoderModel (or text EncoderDecoderModel) to an export "
        "directory: encoder.onnx, cross_kv.onnx (cross-attention keys/values, once per input), "
        "decoder.onnx (one KV-cached step), the tokenizer, image processor and generation configs, "
        "and vedrt.json. The graphs are checked against PyTorch."
    )
    parser.add_argument(
        "model_dir",
        metavar="MODEL_DIR",
        help="a directory saved with VisionEncoderDecoderModel.save_pretrained "
        "(or EncoderDecoderModel.save_pretrained)",
    )
    parser.add_argument(
        "out_dir",
        metavar="OUT_DIR",
        help="where to write the export directory (must be empty or absent, or with --overwrite "
        "a previous vedrt export)",
    )
    parser.add_argument(
        "--opset", type=int, default=None, help="ONNX opset, 18 (the default and minimum) to 23"
    )
    parser.add_argument(
        "--no-validate",
        action="store_true",
        help="skip the comparison with PyTorch (not recommended)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT_DIR if it is a previous vedrt export (has vedrt.json); "
        "anything else is refused",
    )
    parser.add_argument(
        "--quantize",
        choices=["int8"],
        default=None,
        help="dynamic int8 weights for the MatMuls (checked by greedy-token agreement with fp32)",
    )


class _Stages:
    """Prints each stage with the time the previous one took: export takes from seconds to minutes."""

    def __init__(self, stages: tuple[str, ...]):
        self.stages, self.current, self.started = stages, None, time.perf_counter()

    def __call__(self, stage: str) -> None:
        self._finish()
        self.current, self.started = stage, time.perf_counter()
        index = self.stages.index(stage) + 1 if stage in self.stages else 0
        print(f"[{index}/{len(self.stages)}] {stage} ...", end="", file=sys.stderr, flush=True)

    def _finish(self) -> None:
        if self.current is not None:
            print(f" {time.perf_counter() - self.started:.1f}s", file=sys.stderr, flush=True)
            self.current = None

    def close(self) -> None:
        self._finish()


@contextmanager
def _sigterm_as_exit():
    """SIGTERM unwinds like Ctrl-C, so the export's cleanup removes its temporary directory."""

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace) -> int:
    from .exporter import ExportError, export_model
    from .exporter import stages as export_stages
    from .validate import ValidationError

    if not Path(args.model_dir).is_dir():  # before the progress lines and torch's import
        raise UsageError(f"model directory not found: {args.model_dir}")
    stages = _Stages(export_stages(args.quantize))
    try:
        with _sigterm_as_exit():
            report = export_model(
                args.model_dir,
                args.out_dir,
                opset=args.opset,
                validate=not args.no_validate,
                quantize=args.quantize,
                overwrite=args.overwrite,
                progress=stages,
            )
    except (ExportError, ValidationError, NotImplementedError) as exc:
        stages.close()
        raise UsageError(str(exc)) from None
    except OSError as exc:  # disk full, permissions: nothing was left behind, say why in one line
        stages.close()
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        raise UsageError(f"export failed, nothing written: {exc.strerror or exc}{where}") from None
    except SystemExit:
        stages.close()
        print("vedrt export: terminated, nothing written", file=sys.stderr)
        raise
    stages.close()
    print(report.summary())
    return 0
