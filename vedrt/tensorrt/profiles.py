"""Optimization-profile shapes, engine cache keys and the `tensorrt.json` index, in pure Python.

An engine is only valid for the GPU, TensorRT version, precision and shape ranges it was built
for, so its file name carries a key hashed from all of them plus the graph's bytes: a rebuild is
skipped only when nothing that matters changed, and a stale engine is never picked up.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

INDEX_NAME = "tensorrt.json"
TIMING_CACHE_NAME = "tensorrt.timing_cache"
GRAPHS = ("encoder", "cross_kv", "decoder")
Shape = tuple[int, ...]


@dataclass(frozen=True)
class Limits:
    """The largest generation the engines serve (the profiles' max shapes)."""

    max_batch: int = 4
    max_beams: int = 4
    max_new_tokens: int = 32

    def check(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


def dim_ranges(limits: Limits) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of each symbolic dimension; opt is one image with all its beams."""
    return {
        "batch": (1, 1, limits.max_batch),
        "batch_beams": (1, limits.max_beams, limits.max_batch * limits.max_beams),
        "slots": (1, 1, limits.max_batch * limits.max_beams),  # an engine's image slots
        "groups": (1, 1, limits.max_batch * limits.max_beams),
        "enc_len": (1, 64, 512),  # text encoders: tokens per input (images have a fixed length)
        "new_len": (1, 1, 1),  # the prompt is the start token alone, then one token per step
        "cache_len": (1, limits.max_new_tokens, limits.max_new_tokens),
    }


def profile_shapes(
    inputs: list[dict[str, Any]], limits: Limits
) -> dict[str, tuple[Shape, Shape, Shape]]:
    """{input: (min, opt, max)} for a graph's inputs as listed in vedrt.json (fixed dims kept)."""
    ranges = dim_ranges(limits)
    shapes = {}
    for spec in inputs:
        dims = spec["shape"]
        if not dims:  # scalars need no profile
            continue
        if any(isinstance(d, str) and d not in ranges for d in dims):
            raise ValueError(f"input {spec['name']}: unknown symbolic dimension in {dims}")
        triple = [[d if isinstance(d, int) else ranges[d][k] for d in dims] for k in range(3)]
        shapes[spec["name"]] = tuple(tuple(t) for t in triple)
    return shapes


def file_digest(path: Path) -> str:
    """sha256 of a graph (and its external-data file, if any): the engine depends on its bytes."""
    h = hashlib.sha256()
    for p in (path, path.with_name(path.name + ".data")):
        if p.is_file():
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
    return h.hexdigest()


def engine_key(
    gpu: str, trt_version: str, precision: str, digest: str, shapes: dict[str, Any]
) -> str:
    """16 hex digits identifying an engine build: GPU, TensorRT, precision, graph, profile."""
    blob = json.dumps([gpu, trt_version, precision, digest, shapes], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def engine_file(graph: str, precision: str, key: str) -> str:
    return f"{graph}.{precision}.{key}.engine"


def read_index(export_dir: Path) -> dict[str, Any]:
    path = export_dir / INDEX_NAME
    if not path.is_file():
        return {"engines": {}}
    return json.loads(path.read_text())


def write_index(export_dir: Path, index: dict[str, Any]) -> None:
    tmp = export_dir / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    tmp.replace(export_dir / INDEX_NAME)
