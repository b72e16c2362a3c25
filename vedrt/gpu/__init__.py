"""GPU backends: a device-resident search loop over TensorRT, ONNX Runtime CUDA or torch.

    from vedrt.runtime import load
    gen = load("export-dir", backend="tensorrt", device="cuda")              # after `vedrt build`
    gen = load("export-dir", backend="onnxruntime", device="cuda")           # onnxruntime-gpu
    gen = load("export-dir", backend="torch", device="cuda", precision="fp16", checkpoint="ckpt/")

`vedrt.runtime.load` dispatches here for any backend/device other than ONNX Runtime on the CPU,
so the CPU runtime never imports torch. Every backend here needs torch: device memory, the search
loop and CUDA graphs are torch's. See docs/gpu.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..runtime.errors import InputError
from ..runtime.manifest import read_manifest

BACKENDS = ("torch", "tensorrt", "onnxruntime")
PRECISIONS = ("fp32", "fp16")


def load(
    path: str | Path,
    *,
    backend: str = "torch",
    device: str = "cuda",
    threads: int | None = None,
    precision: str = "fp32",
    checkpoint: Any = None,
    cuda_graphs: bool | None = None,
):
    """Load an export directory onto a device backend; see the module docstring.

    precision: "fp32" or "fp16" (torch: the weights' dtype; TensorRT: which built engines to use).
    checkpoint (torch only): a checkpoint directory or an in-memory VisionEncoderDecoderModel; by
    default the export directory itself, if it holds the weights (model.safetensors).
    cuda_graphs (torch only): replay decoder steps as CUDA graphs (default: on for CUDA).
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r} (available: {', '.join(BACKENDS)})")
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise InputError(f"unknown device {device!r} (use 'cpu' or 'cuda')")
    manifest = read_manifest(path)
    if backend == "onnxruntime" and not _has_torch():
        # no torch: the CPU runtime's numpy executor on the CUDA provider still works
        from ..runtime.executor import OrtExecutor
        from ..runtime.generator import Generator

        return Generator(manifest, OrtExecutor(manifest, device="cuda", threads=threads))
    executor = _executor(manifest, backend, device, threads, precision, checkpoint, cuda_graphs)
    from .generator import GpuGenerator

    return GpuGenerator(manifest, executor, backend)


def _has_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def _executor(manifest, backend, device, threads, precision, checkpoint, cuda_graphs):
    if not _has_torch():
        raise InputError(f"backend={backend!r} needs torch (pip install torch)")
    import torch

    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device={device!r}: no CUDA GPU is visible to torch")
    if backend == "torch":
        from .checkpoint import load_checkpoint
        from .torch_executor import TorchExecutor

        model, owned = load_checkpoint(manifest, checkpoint)
        dtype = torch.float16 if precision == "fp16" else torch.float32
        return TorchExecutor(model, device, dtype, cuda_graphs=cuda_graphs, owned=owned)
    if checkpoint is not None or cuda_graphs is not None:
        raise InputError(f"checkpoint and cuda_graphs are torch-backend options, not {backend!r}'s")
    if device == "cpu":
        raise InputError(f"backend={backend!r} runs on device='cuda' only")
    if backend == "onnxruntime":
        if precision != "fp32":
            raise InputError("backend='onnxruntime' runs the fp32 graphs (precision='fp32')")
        from .ort_cuda import OrtCudaExecutor

        return OrtCudaExecutor(manifest, device, threads)
    from ..tensorrt.runtime import TrtExecutor

    return TrtExecutor(manifest, device, precision)


__all__ = ["BACKENDS", "load"]
