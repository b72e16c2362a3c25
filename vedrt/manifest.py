"""`vedrt.json`, the export directory's manifest: the one module that writes and reads it.

The exporter builds it with `build_manifest` and writes it with `write_manifest`; every backend
reads it with `read_manifest`, which checks the fields the runtime relies on up front, so a
missing or corrupt file fails at `load()` with one clear line, not deep inside a graph run in the
middle of a generation. Free of torch, numpy and onnx (see docs/export-format.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError

MANIFEST_NAME = "vedrt.json"
FORMAT_VERSION = 2  # 2: the decoder step takes per-row positions, image slots, an encoder mask
GRAPHS = ("encoder", "cross_kv", "decoder")


class ExportDirError(InputError):
    """An export directory that cannot be used: missing, incomplete, corrupt or too new."""


@dataclass(frozen=True)
class Manifest:
    """What the runtime needs from vedrt.json, with the directory it came from."""

    root: Path
    modality: str  # "image" (VisionEncoderDecoderModel) or "text" (EncoderDecoderModel)
    image_size: tuple[int, int] | None  # images: (height, width)
    num_channels: int | None
    enc_len: int | None  # images: the encoder's output length; text: per input
    encoder: dict[str, Any]  # the manifest's encoder section as written
    num_layers: int
    num_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int | None
    top_k: int  # the decoder graph's per-row best log-probabilities (`top_ids`), 0 if none
    special_tokens: dict[str, Any]
    generation_config: dict[str, Any]
    graph_files: dict[str, Path]
    raw: dict[str, Any] = field(repr=False)
    # the decoder step without its cross-attention outputs, stepped unless attentions are wanted
    # (exports from 2026-12-06 on; None before)
    decoder_without_attentions: Path | None = None

    @property
    def gathers_in_graph(self) -> bool:
        """An export from before 2026-12-06: its decoder takes the whole slot pool and a
        `group_slots` index and gathers each group's cross K/V itself, every step."""
        inputs = self.raw.get("graphs", {}).get("decoder", {}).get("inputs", [])
        return any(isinstance(i, dict) and i.get("name") == "group_slots" for i in inputs)

    def generation_defaults(self) -> dict[str, Any]:
        """The checkpoint's generation config, with the special ids filled in where it lacks them."""
        config = {k: v for k, v in self.special_tokens.items() if v is not None}
        config.update({k: v for k, v in self.generation_config.items() if v is not None})
        return config


def _get(data: dict, *keys: str) -> Any:
    node: Any = data
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            raise ExportDirError(f"vedrt.json: missing {'.'.join(keys)}")
        node = node[key]
    return node


def _int(data: dict, *keys: str) -> int:
    value = _get(data, *keys)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ExportDirError(f"vedrt.json: {'.'.join(keys)} must be an integer, got {value!r}")
    return value


def _read_json(root: Path) -> dict[str, Any]:
    if root.exists() and not root.is_dir():
        raise ExportDirError(f"{root} is a file, not an export directory")
    if not root.is_dir():
        raise ExportDirError(f"export directory not found: {root}")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ExportDirError(
            f"{root} is not a vedrt export directory (no {MANIFEST_NAME}); create one with `vedrt export`"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportDirError(f"corrupt manifest {path}: {exc}") from None
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != FORMAT_VERSION:
        raise ExportDirError(
            f"{path}: format_version {version!r} is not supported (this vedrt reads "
            f"{FORMAT_VERSION}); re-export the model with this version's `vedrt export`"
        )
    return data


def read_manifest(export_dir: str | Path) -> Manifest:
    """Parse vedrt.json and check that every graph it names is there."""
    root = Path(export_dir)
    data = _read_json(root)
    try:
        return _parse(root, data)
    except (AttributeError, TypeError, KeyError) as exc:  # valid JSON, wrong structure
        raise ExportDirError(
            f"corrupt manifest {root / MANIFEST_NAME}: {type(exc).__name__}: {exc}"
        ) from None


def _parse(root: Path, data: dict[str, Any]) -> Manifest:
    encoder = _get(data, "encoder")
    modality = encoder.get("modality", "image") if isinstance(encoder, dict) else None
    if modality not in ("image", "text"):
        raise ExportDirError(
            f"vedrt.json: encoder.modality must be image or text, got {modality!r}"
        )
    image_size = _image_size(data) if modality == "image" else None
    files = {}
    for name in GRAPHS:
        path = root / str(_get(data, "graphs", name, "file"))
        if not path.is_file():
            raise ExportDirError(
                f"export directory {root} is incomplete: {path.name} is missing (re-export the model)"
            )
        files[name] = path
    lean = _lean_decoder(root, data, files["decoder"])
    max_positions = _get(data, "decoder").get("max_positions")
    generation_config = data.get("generation_config") or {}
    special = data.get("special_tokens") or {}
    if not isinstance(generation_config, dict) or not isinstance(special, dict):
        raise ExportDirError("vedrt.json: generation_config and special_tokens must be objects")
    image = modality == "image"
    return Manifest(
        root=root,
        modality=modality,
        image_size=image_size,
        num_channels=_int(data, "encoder", "num_channels") if image else None,
        enc_len=_int(data, "encoder", "enc_len") if image else None,
        encoder=encoder,
        num_layers=_int(data, "decoder", "num_layers"),
        num_heads=_int(data, "decoder", "num_heads"),
        head_dim=_int(data, "decoder", "head_dim"),
        vocab_size=_int(data, "decoder", "vocab_size"),
        max_positions=max_positions if isinstance(max_positions, int) else None,
        top_k=_int(data, "decoder", "top_k"),
        special_tokens=special,
        generation_config=generation_config,
        graph_files=files,
        raw=data,
        decoder_without_attentions=lean,
    )


def graph_bytes(path: Path) -> int:
    """A graph's size on disk, its external weights included (what `graphs.*.bytes` records)."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def _lean_decoder(root: Path, data: dict[str, Any], decoder: Path) -> Path | None:
    """The step graph without attention outputs, if the export has one. The runtime then loads
    decoder.onnx only when attentions are asked for, so its size is checked against the
    manifest's now: a corrupt or truncated file fails at load, not in the middle of a generation."""
    name = _get(data, "graphs", "decoder").get("file_without_attentions")
    if name is None:
        return None
    lean = root / str(name)
    if not lean.is_file():
        raise ExportDirError(
            f"export directory {root} is incomplete: {lean.name} is missing (re-export the model)"
        )
    expected = _get(data, "graphs", "decoder").get("bytes")
    size = graph_bytes(decoder)
    if isinstance(expected, int) and size != expected:
        raise ExportDirError(
            f"{decoder}: {size} bytes with its weights, vedrt.json says {expected}: a corrupt or "
            "modified export (re-export the model)"
        )
    return lean


def _image_size(data: dict[str, Any]) -> tuple[int, int]:
    image_size = _get(data, "encoder", "image_size")
    if not (
        isinstance(image_size, list)
        and len(image_size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in image_size)
    ):
        raise ExportDirError(
            f"vedrt.json: encoder.image_size must be [height, width], got {image_size!r}"
        )
    return image_size[0], image_size[1]


def write_manifest(export_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Write `manifest` (a dict in this module's schema) as the directory's vedrt.json."""
    if manifest.get("format_version") != FORMAT_VERSION:
        manifest = {"format_version": FORMAT_VERSION, **manifest}
    path = Path(export_dir) / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path
