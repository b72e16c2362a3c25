"""Torch-based executors: the torch modules (CPU or CUDA) and ONNX Runtime on CUDA.

    import vedrt
    gen = vedrt.load("export-dir", backend="torch", device="cuda", precision="fp16", checkpoint="ckpt/")
    gen = vedrt.load("export-dir", backend="onnxruntime", device="cuda")   # onnxruntime-gpu + torch
    gen = vedrt.load("export-dir", backend="tensorrt", device="cuda")      # after `vedrt build`

`vedrt.runtime.loader` reaches these factories through its registry, only when asked for, so the
CPU runtime never imports torch. Every backend returns the runtime's `Generator`: the search and
the engine run on the executor's device through `vedrt.gpu.ops.TorchOps`. See docs/gpu.md.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any

from ..errors import InputError
from ..manifest import Manifest

PRECISIONS = ("fp32", "fp16")


def _need_torch(backend: str):
    if importlib.util.find_spec("torch") is None:
        raise InputError(f"backend={backend!r} needs torch (pip install torch)")
    import torch

    return torch


def _check_device(torch, device: Any) -> None:
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device={device!r}: no CUDA GPU is visible to torch")


def _check_precision(precision: Any) -> None:
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def torch_backend(
    manifest: Manifest,
    device: str = "cuda",
    threads: int | None = None,
    precision: str = "fp32",
    checkpoint: Any = None,
    cuda_graphs: bool | None = None,
):
    """backend="torch": the exporter's modules over the checkpoint's weights.

    precision: the weights' dtype ("fp32" or "fp16"). checkpoint: a checkpoint directory or an
    in-memory VisionEncoderDecoderModel; by default the export directory itself, if it holds the
    weights (model.safetensors). cuda_graphs: replay decoder steps as CUDA graphs (default: on
    for CUDA).
    """
    torch = _need_torch("torch")
    _check_precision(precision)
    _check_device(torch, device)
    if threads is not None:
        torch.set_num_threads(max(1, threads))
    from .checkpoint import load_checkpoint
    from .torch_executor import TorchExecutor

    model, owned = load_checkpoint(manifest, checkpoint)
    if manifest.raw.get("precision") not in (None, "fp32"):
        warnings.warn(
            f"{manifest.root} is an {manifest.raw['precision']} export; backend='torch' runs the "
            f"checkpoint's weights in {precision}, not the export's quantized graphs",
            stacklevel=3,
        )
    dtype = torch.float16 if precision == "fp16" else torch.float32
    return TorchExecutor(model, device, dtype, cuda_graphs=cuda_graphs, owned=owned)


def ort_cuda_backend(
    manifest: Manifest, device: str = "cuda", threads: int | None = None, precision: str = "fp32"
):
    """backend="onnxruntime", device="cuda": the fp32 graphs with every tensor on the device."""
    torch = _need_torch("onnxruntime on cuda")
    if precision != "fp32":
        raise InputError("backend='onnxruntime' runs the fp32 graphs (precision='fp32')")
    _check_device(torch, device)
    from .ort_cuda import OrtCudaExecutor

    return OrtCudaExecutor(manifest, device, threads)


__all__ = ["PRECISIONS", "ort_cuda_backend", "torch_backend"]
