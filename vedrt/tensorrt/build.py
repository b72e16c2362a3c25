"""Build TensorRT engines from an export directory's ONNX graphs (what `vedrt build` runs).

One engine per graph, each with one optimization profile spanning 1..max batch x beams and
1..max new tokens of cache (opt: one image with all its beams, the latency case). FP16 engines
keep normalisation, softmax, reductions and the attention masking in FP32 (layer precision
constraints under OBEY_PRECISION_CONSTRAINTS): those are where half precision loses the tokens.
A timing cache shared by every build makes rebuilds fast; an engine whose key (GPU, TensorRT
version, precision, graph bytes, profile) is unchanged is not rebuilt at all.

The parser is handed `parser_input()`: the saved graph with ONNX Runtime's contrib fusions
rewritten into standard ONNX ops (`standard.py`), its weights still read from `<graph>.onnx.data`.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .profiles import (
    GRAPHS,
    TIMING_CACHE_NAME,
    Limits,
    engine_file,
    engine_key,
    file_digest,
    profile_shapes,
    read_index,
    write_index,
)

WORKSPACE_BYTES = 4 << 30


class BuildError(RuntimeError):
    """TensorRT could not parse or build a graph: reported as one line."""


@dataclass
class BuildReport:
    precision: str
    engines: dict[str, Path] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"TensorRT {self.precision} engines:"]
        for graph, path in self.engines.items():
            how = "cached" if graph in self.reused else f"built in {self.seconds[graph]:.1f}s"
            lines.append(f"  {graph:<9} {path.name} ({path.stat().st_size / 1e6:.1f} MB, {how})")
        return "\n".join(lines)


def gpu_identity() -> str:
    """The GPU the engines are for: name and compute capability (engines are not portable)."""
    import torch

    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return f"{torch.cuda.get_device_name(index)} sm_{major}{minor}"


def build_engines(
    export_dir: Path,
    manifest: dict[str, Any],
    limits: Limits,
    fp16: bool,
    log: Callable[[str], None] = print,
) -> BuildReport:
    """Build (or reuse) the three engines and record them in tensorrt.json."""
    import tensorrt as trt

    precision = "fp16" if fp16 else "fp32"
    gpu = gpu_identity()
    logger = trt.Logger(trt.Logger.WARNING)
    cache_path = export_dir / TIMING_CACHE_NAME
    index = read_index(export_dir)
    entries = index.setdefault("engines", {}).setdefault(precision, {})
    report = BuildReport(precision)
    for graph in GRAPHS:
        spec = manifest["graphs"][graph]
        onnx_path = export_dir / spec["file"]
        shapes = profile_shapes(spec["inputs"], limits)
        prepared = parser_input(onnx_path)
        digest = hashlib.sha256(f"{file_digest(onnx_path)}:{prepared.digest}".encode()).hexdigest()
        key = engine_key(gpu, trt.__version__, precision, digest, shapes)
        path = export_dir / engine_file(graph, precision, key)
        if path.is_file():
            report.reused.append(graph)
        else:
            log(f"building {graph} ({precision}) ...")
            start = time.perf_counter()
            plan = build_one(trt, logger, prepared, shapes, fp16, cache_path)
            _write_atomically(path, plan)
            report.seconds[graph] = time.perf_counter() - start
            old = entries.get(graph, {}).get("file")
            if old and old != path.name and (export_dir / old).is_file():
                (export_dir / old).unlink()  # superseded by this build
        report.engines[graph] = path
        entries[graph] = {"file": path.name, "key": key, "shapes": shapes}
    index["gpu"] = gpu
    index["tensorrt_version"] = trt.__version__
    index.setdefault("limits", {})[precision] = vars(limits)
    write_index(export_dir, index)
    return report


@dataclass(frozen=True)
class ParserInput:
    """What TensorRT's ONNX parser reads for one graph: standard ops only, weights by reference."""

    model_bytes: bytes  # the serialized ModelProto; large tensors still point at .onnx.data
    path: Path  # the saved graph: the parser resolves external weights relative to it
    rewritten: dict[str, int]  # contrib op -> how many were decomposed

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.model_bytes).hexdigest()


def parser_input(onnx_path: Path) -> ParserInput:
    """The graph at `onnx_path` as TensorRT must see it: contrib fusions decomposed.

    Pure ONNX (no TensorRT needed), so the exact bytes the builder parses are testable anywhere.
    """
    import onnx

    from .standard import StandardizeError, standardize

    model = onnx.load(str(onnx_path), load_external_data=False)
    try:
        rewritten = standardize(model)
    except StandardizeError as exc:
        raise BuildError(f"{onnx_path.name}: {exc}") from None
    return ParserInput(model.SerializeToString(), onnx_path, rewritten)


def build_one(trt, logger, graph: ParserInput, shapes, fp16: bool, cache_path: Path) -> bytes:
    """Parse one standardized ONNX graph and build a serialized engine, updating the timing cache."""
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(graph.model_bytes, str(graph.path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"{graph.path.name}: TensorRT cannot parse it ({errors[:300]})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        keep_fp32(trt, network)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    blob = cache_path.read_bytes() if cache_path.is_file() else b""
    timing_cache = config.create_timing_cache(blob)
    config.set_timing_cache(timing_cache, ignore_mismatch=True)  # a stale cache is just slower
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError(f"{graph.path.name}: TensorRT failed to build an engine (see its log)")
    _write_atomically(cache_path, bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


def keep_fp32(trt, network) -> int:
    """Pin the numerically sensitive float layers to FP32; returns how many were pinned."""
    sensitive = {
        trt.LayerType.NORMALIZATION,  # LayerNorm: variance of large activations
        trt.LayerType.SOFTMAX,
        trt.LayerType.REDUCE,  # decomposed norms, means
        trt.LayerType.SELECT,  # masking with float32's lowest value, -inf in half
    }
    floats = (trt.float32, trt.float16)
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type not in sensitive:
            continue
        if not all(layer.get_output(j).dtype in floats for j in range(layer.num_outputs)):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)
