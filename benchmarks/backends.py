"""What the harness can run, and how another module adds backends to it.

A `Backend` is a name, a precision, a device and a `load(spec, threads) -> Runner`. The harness
starts one worker process per backend (so its peak RSS is its own), calls `load` there once, then
`runner.generate(pixel_values, **options)` for the warm-ups, the token check and every timed
repetition. A `Runner` returns token ids like transformers' `generate()` (int64 `[rows, length]`)
and, if it can tell, `runner.timings` for its last call: `encoder_s` (vedrt: the encoder and the
cross K/V; transformers and Optimum compute the cross K/V inside their first step, so theirs is
the encoder alone) and `first_step_s` (the first decoder step); the harness derives the time per
further token from those and the total, the same way for every backend.

Registering more backends (the GPU ones live in `benchmarks/backends_gpu.py`):

    # benchmarks/backends_gpu.py
    from benchmarks.backends import Backend, register

    def _load_trt_fp16(spec, threads):
        ...  # build or reuse an engine under spec.work_dir; return an object with
        ...  # .generate(pixel_values, **options) -> np.ndarray and .timings (a dict)

    register(Backend("vedrt-trt", "fp16", "cuda", _load_trt_fp16, requires=("tensorrt",)))

`--device cuda` makes the harness (and every worker) import `benchmarks.backends_cuda` if it
exists, else `benchmarks.backends_gpu`; their import-time `register` calls are all it takes. A
backend whose `requires` modules are missing, or whose `available()` returns a reason, is skipped
with that reason in the report instead of failing the run.
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model: its transformers checkpoint and its vedrt exports."""

    name: str  # "vit-gpt2", "trocr-base", "scenes"
    checkpoint: Path | None  # a save_pretrained directory (None: no PyTorch reference)
    exports: dict[str, Path]  # precision ("fp32", "int8") -> export directory
    image_size: tuple[int, int]
    work_dir: Path  # where a backend may cache what it builds (engines, Optimum exports)


class Runner(Protocol):
    """A loaded model that generates; see the module docstring."""

    timings: dict[str, float]

    def generate(self, pixel_values: np.ndarray, **options: Any) -> np.ndarray: ...


@dataclass(frozen=True)
class Backend:
    name: str  # "transformers", "optimum", "vedrt"
    precision: str  # "fp32", "int8", "fp16"
    device: str  # "cpu", "cuda"
    load: Callable[[ModelSpec, int], Runner]
    requires: tuple[str, ...] = ()  # importable modules it needs
    available: Callable[[ModelSpec], str | None] = field(default=lambda spec: None)
    reference: bool = False  # its tokens are what the others are checked against
    disk_bytes: Callable[[ModelSpec], int] | None = None  # size on disk of what it loads

    @property
    def key(self) -> str:
        return f"{self.name}-{self.precision}-{self.device}"

    def skip_reason(self, spec: ModelSpec) -> str | None:
        """Why this backend cannot run on this machine and model, or None."""
        missing = [m for m in self.requires if not _importable(m)]
        if missing:
            return f"{', '.join(missing)} not installed"
        return self.available(spec)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a dotted name whose parent package is missing
        return False


REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add (or replace) a backend under its key; returns it."""
    REGISTRY[backend.key] = backend
    return backend


def load_device_modules(device: str) -> None:
    """Import the module that registers `device`'s backends (see the module docstring)."""
    if device == "cpu":
        return
    for name in (f"benchmarks.backends_{device}", "benchmarks.backends_gpu"):
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
            return


def backends_for(device: str) -> list[Backend]:
    """Every registered backend on `device`, the reference first."""
    load_device_modules(device)
    chosen = [b for b in REGISTRY.values() if b.device == device or b.reference]
    return sorted(chosen, key=lambda b: not b.reference)


# ---------------------------------------------------------------------------------- CPU backends


class _Clock:
    """Marks the end of the encoder and of the first decoder step inside one generate()."""

    def __init__(self) -> None:
        self.start = self.encoded = self.first = None

    def begin(self) -> None:
        self.start, self.encoded, self.first = time.perf_counter(), None, None

    def mark_encoded(self) -> None:
        self.encoded = time.perf_counter()

    def mark_step(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    def timings(self) -> dict[str, float]:
        if self.start is None or self.encoded is None or self.first is None:
            return {}
        return {"encoder_s": self.encoded - self.start, "first_step_s": self.first - self.encoded}


class TransformersRunner:
    """`model.generate()` in PyTorch eager, timed with forward hooks."""

    def __init__(self, spec: ModelSpec, threads: int):
        import torch
        from transformers import VisionEncoderDecoderModel

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = VisionEncoderDecoderModel.from_pretrained(spec.checkpoint).eval()
        self.clock = _Clock()
        self.model.encoder.register_forward_hook(lambda *a: self.clock.mark_encoded())
        self.model.decoder.register_forward_hook(lambda *a: self.clock.mark_step())
        self.timings: dict[str, float] = {}

    def generate(self, pixel_values: np.ndarray, **options: Any) -> np.ndarray:
        self.clock.begin()
        with self.torch.inference_mode():
            out = self.model.generate(pixel_values=self.torch.from_numpy(pixel_values), **options)
        self.timings = self.clock.timings()
        return out.numpy()


class OptimumRunner:
    """Optimum's `ORTModelForVision2Seq` (its own export, cached under the work dir)."""

    def __init__(self, spec: ModelSpec, threads: int):
        import onnxruntime as ort
        import torch
        from optimum.onnxruntime import ORTModelForVision2Seq

        torch.set_num_threads(threads)
        self.torch = torch
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        exported = spec.work_dir / "optimum"
        started = time.perf_counter()
        if not (exported / "config.json").is_file():
            _optimum_export(spec.checkpoint, exported)
        self.excluded_load_s = time.perf_counter() - started  # a one-off, not loading
        self.model = ORTModelForVision2Seq.from_pretrained(exported, session_options=options)
        self.clock = _Clock()
        _wrap(self.model.encoder, "forward", self.clock.mark_encoded)
        _wrap(self.model.decoder, "forward", self.clock.mark_step)
        self.timings: dict[str, float] = {}

    def generate(self, pixel_values: np.ndarray, **options: Any) -> np.ndarray:
        self.clock.begin()
        with self.torch.inference_mode():
            out = self.model.generate(pixel_values=self.torch.from_numpy(pixel_values), **options)
        self.timings = self.clock.timings()
        return out.numpy()


def _optimum_export(checkpoint: Path, out: Path) -> None:
    """Optimum's own export, once, in another process so the worker's peak RSS stays its own."""
    code = (
        "import sys; from optimum.onnxruntime import ORTModelForVision2Seq as M; "
        "M.from_pretrained(sys.argv[1], export=True).save_pretrained(sys.argv[2])"
    )
    subprocess.run([sys.executable, "-c", code, str(checkpoint), str(out)], check=True)


def _wrap(obj: Any, method: str, after: Callable[[], None]) -> None:
    inner = getattr(obj, method)

    def wrapped(*args, **kwargs):
        result = inner(*args, **kwargs)
        after()
        return result

    setattr(obj, method, wrapped)


class VedrtRunner:
    """vedrt's torch-free runtime on ONNX Runtime CPU, timed by wrapping its executor."""

    def __init__(self, spec: ModelSpec, threads: int, precision: str):
        from vedrt.runtime import load

        self.generator = load(spec.exports[precision], threads=threads)
        self.clock = _Clock()
        executor = self.generator.executor
        _wrap(executor, "encode", self.clock.mark_encoded)
        _wrap(executor, "encode_into", self.clock.mark_encoded)  # admission into pool slots
        _wrap(executor, "decode", self.clock.mark_step)
        self.timings: dict[str, float] = {}

    def generate(self, pixel_values: np.ndarray, **options: Any) -> np.ndarray:
        self.clock.begin()
        out = self.generator.generate(pixel_values, **options)
        self.timings = self.clock.timings()
        return out


def _has_export(precision: str) -> Callable[[ModelSpec], str | None]:
    def check(spec: ModelSpec) -> str | None:
        path = spec.exports.get(precision)
        return None if path and (path / "vedrt.json").is_file() else f"no {precision} export"

    return check


def _bytes(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def _checkpoint_bytes(spec: ModelSpec) -> int:
    return _bytes([*spec.checkpoint.glob("*.safetensors"), *spec.checkpoint.glob("*.bin")])


def _optimum_bytes(spec: ModelSpec) -> int:
    return _bytes((spec.work_dir / "optimum").glob("*.onnx*"))


def _export_bytes(precision: str) -> Callable[[ModelSpec], int]:
    return lambda spec: _bytes(spec.exports[precision].glob("*.onnx*"))


def _has_checkpoint(spec: ModelSpec) -> str | None:
    return None if spec.checkpoint else "no PyTorch checkpoint for this model"


register(
    Backend(
        "transformers",
        "fp32",
        "cpu",
        TransformersRunner,
        requires=("torch", "transformers"),
        available=_has_checkpoint,
        reference=True,
        disk_bytes=_checkpoint_bytes,
    )
)
register(
    Backend(
        "optimum",
        "fp32",
        "cpu",
        OptimumRunner,
        requires=("optimum.onnxruntime", "torch"),
        available=_has_checkpoint,
        disk_bytes=_optimum_bytes,
    )
)
for _precision in ("fp32", "int8"):
    register(
        Backend(
            "vedrt",
            _precision,
            "cpu",
            lambda spec, threads, p=_precision: VedrtRunner(spec, threads, p),
            requires=("onnxruntime",),
            available=_has_export(_precision),
            disk_bytes=_export_bytes(_precision),
        )
    )
