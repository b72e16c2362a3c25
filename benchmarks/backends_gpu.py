"""The GPU backends for `--device cuda` (see benchmarks/backends.py for how this is picked up).

- transformers fp32 on CUDA: the baseline the GPU targets are measured against;
- vedrt torch fp32 / fp16: the device search loop over the exporter's modules, CUDA graphs on;
- vedrt onnxruntime fp32: ONNX Runtime's CUDA provider with IO binding (needs onnxruntime-gpu);
- vedrt tensorrt fp32 / fp16: engines built on first load (cached next to the export's graphs).

Every runner returns host token ids, which syncs the device, so wall times are end to end. They
report no per-phase timings: timing phases on a GPU would need syncs that slow the loop itself.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.backends import Backend, ModelSpec, register

# engines serve up to these shapes; opt is one image with all its beams (the latency case)
TRT_LIMITS = {"max_batch": 8, "max_beams": 4, "max_new_tokens": 64}


def _cuda_reason(spec: ModelSpec) -> str | None:
    import torch

    return None if torch.cuda.is_available() else "no CUDA GPU"


def _needs_checkpoint(spec: ModelSpec) -> str | None:
    return _cuda_reason(spec) or (None if spec.checkpoint else "no PyTorch checkpoint")


def _needs_export(spec: ModelSpec) -> str | None:
    path = spec.exports.get("fp32")
    if not path or not (path / "vedrt.json").is_file():
        return "no fp32 export"
    return _cuda_reason(spec)


def _needs_ort_cuda(spec: ModelSpec) -> str | None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider (needs onnxruntime-gpu)"
    return _needs_export(spec)


class TransformersCudaRunner:
    """`model.generate()` in PyTorch eager on the GPU, fp32."""

    def __init__(self, spec: ModelSpec, threads: int):
        import torch
        from transformers import VisionEncoderDecoderModel

        self.torch = torch
        model = VisionEncoderDecoderModel.from_pretrained(spec.checkpoint)
        self.model = model.to("cuda").eval()
        self.timings: dict[str, float] = {}

    def generate(self, pixel_values: np.ndarray, **options: Any) -> np.ndarray:
        pixels = self.torch.from_numpy(pixel_values).to("cuda")
        with self.torch.inference_mode():
            return self.model.generate(pixel_values=pixels, **options).cpu().numpy()


class VedrtGpuRunner:
    """vedrt's device search loop on one executor."""

    def __init__(self, spec: ModelSpec, backend: str, precision: str):
        from vedrt.runtime import load

        export = spec.exports["fp32"]
        extra: dict[str, Any] = {}
        if backend == "torch":
            extra["checkpoint"] = str(spec.checkpoint)
        if backend == "tensorrt":
            export = _engine_dir(spec)
            started = time.perf_counter()
            _ensure_engines(export, precision)
            self.excluded_load_s = time.perf_counter() - started  # a one-off build, not loading
        self.generator = load(export, backend=backend, device="cuda", precision=precision, **extra)
        self.timings: dict[str, float] = {}

    def generate(self, pixel_values: np.ndarray, **options: Any) -> np.ndarray:
        return self.generator.generate(pixel_values, **options)


def _engine_dir(spec: ModelSpec) -> Path:
    """A directory under the work dir linking the export's files, so engines (written next to
    the graphs) never land in a shipped export such as vedrt/models/scenes."""
    export = spec.exports["fp32"].resolve()
    target = spec.work_dir / "tensorrt"
    target.mkdir(parents=True, exist_ok=True)
    for src in export.iterdir():
        link = target / src.name
        if src.is_file() and not link.exists():
            link.symlink_to(src)
    return target


def _ensure_engines(export: Path, precision: str) -> None:
    """Build (or reuse, by cache key) the engines; not part of what is timed."""
    from vedrt.manifest import read_manifest
    from vedrt.tensorrt.build import build_engines
    from vedrt.tensorrt.profiles import Limits

    manifest = read_manifest(export)
    limits = dict(TRT_LIMITS)
    if manifest.max_positions is not None:  # small decoders (the scene model) have fewer
        limits["max_new_tokens"] = min(limits["max_new_tokens"], manifest.max_positions - 1)
    build_engines(export, manifest.raw, Limits(**limits), precision == "fp16", log=print)


def _vedrt(backend: str, precision: str):
    return lambda spec, threads: VedrtGpuRunner(spec, backend, precision)


def _export_bytes(spec: ModelSpec) -> int:
    return sum(p.stat().st_size for p in spec.exports["fp32"].glob("*.onnx"))


register(
    Backend(
        "transformers",
        "fp32",
        "cuda",
        TransformersCudaRunner,
        requires=("torch", "transformers"),
        available=_needs_checkpoint,
    )
)
for _precision in ("fp32", "fp16"):
    register(
        Backend(
            "vedrt-torch",
            _precision,
            "cuda",
            _vedrt("torch", _precision),
            requires=("torch", "transformers"),
            available=_needs_checkpoint,
        )
    )
register(
    Backend(
        "vedrt-ort",
        "fp32",
        "cuda",
        _vedrt("onnxruntime", "fp32"),
        requires=("torch", "onnxruntime"),
        available=_needs_ort_cuda,
        disk_bytes=_export_bytes,
    )
)
for _precision in ("fp16", "fp32"):  # listed as skipped ("tensorrt not installed") without it
    register(
        Backend(
            "vedrt-trt",
            _precision,
            "cuda",
            _vedrt("tensorrt", _precision),
            requires=("tensorrt", "torch"),
            available=_needs_export,
        )
    )
