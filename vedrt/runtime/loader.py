"""`load()`: an export directory onto a backend, through a registry of executor factories.

The registry names each factory by module path, imported only when that backend is asked for, so
the CPU runtime imports nothing of `vedrt.gpu` or `vedrt.tensorrt` (nor torch), and every backend
returns the same `Generator` class: only its executor differs.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..manifest import Manifest, read_manifest
from .generator import Generator
from .threads import check_threads

# (backend, device kind) -> "module:function(manifest, device, threads, **options) -> Executor"
REGISTRY: dict[tuple[str, str], str] = {
    ("onnxruntime", "cpu"): "vedrt.runtime.executor:ort_executor",
    ("onnxruntime", "cuda"): "vedrt.gpu:ort_cuda_backend",
    ("torch", "cpu"): "vedrt.gpu:torch_backend",
    ("torch", "cuda"): "vedrt.gpu:torch_backend",
    ("tensorrt", "cuda"): "vedrt.tensorrt.runtime:trt_executor",
}


def _device_kind(device: Any) -> str:
    text = str(device)
    if text == "cpu" or text == "cuda" or text.startswith("cuda:"):
        return text.split(":")[0]
    raise InputError(f"unknown device {device!r} (use 'cpu', 'cuda' or 'cuda:N')")


def _factory(backend: str, device: Any):
    backends = sorted({b for b, _ in REGISTRY})
    if backend not in backends:
        raise InputError(f"unknown backend {backend!r} (available: {', '.join(backends)})")
    kind = _device_kind(device)
    target = REGISTRY.get((backend, kind))
    if target is None:
        kinds = sorted(k for b, k in REGISTRY if b == backend)
        raise InputError(f"backend={backend!r} runs on device {' or '.join(map(repr, kinds))}")
    module, name = target.split(":")
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] == "vedrt":
            raise  # our own module missing is a bug
        raise InputError(
            f"backend={backend!r} on {kind} needs the package {exc.name!r}, which is not installed"
        ) from None


def load(
    path: str | Path,
    *,
    backend: str = "onnxruntime",
    device: str = "cpu",
    threads: int | None = None,
    **backend_options: Any,
) -> Generator:
    """Load an export directory once; the model then serves any number of calls.

    backend: "onnxruntime" (CPU, or CUDA with onnxruntime-gpu and torch), "torch" (CPU or CUDA;
    `precision`, `checkpoint`, `cuda_graphs`) or "tensorrt" (CUDA, after `vedrt build`;
    `precision`). threads: ONNX Runtime's intra-op threads. See docs/gpu.md for the GPU options.
    """
    threads = check_threads(threads)  # None: each backend's default (ONNX Runtime: measured)
    factory = _factory(backend, device)
    manifest: Manifest = read_manifest(path)
    executor = factory(manifest, device=device, threads=threads, **backend_options)
    return Generator(manifest, executor)
