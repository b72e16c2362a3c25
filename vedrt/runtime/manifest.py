"""The runtime's typed view of an export directory's `vedrt.json` (see docs/export-format.md).

`vedrt.manifest` reads the file; this checks the fields the runtime relies on, up front, so that
a missing or corrupt file fails at `load()` with one clear line, not deep inside ONNX Runtime in
the middle of a generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import manifest as shared
from .errors import InputError


@dataclass(frozen=True)
class Manifest:
    """What the runtime needs from vedrt.json, with the directory it came from."""

    root: Path
    image_size: tuple[int, int]
    num_channels: int
    enc_len: int
    num_layers: int
    num_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int | None
    special_tokens: dict[str, Any]
    generation_config: dict[str, Any]
    graph_files: dict[str, Path]
    raw: dict[str, Any] = field(repr=False)

    def generation_defaults(self) -> dict[str, Any]:
        """The checkpoint's generation config, with the special ids filled in where it lacks them."""
        config = {k: v for k, v in self.special_tokens.items() if v is not None}
        config.update({k: v for k, v in self.generation_config.items() if v is not None})
        return config


def _get(data: dict, *keys: str) -> Any:
    node: Any = data
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            raise InputError(f"vedrt.json: missing {'.'.join(keys)}")
        node = node[key]
    return node


def _int(data: dict, *keys: str) -> int:
    value = _get(data, *keys)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InputError(f"vedrt.json: {'.'.join(keys)} must be an integer, got {value!r}")
    return value


def read_manifest(export_dir: str | Path) -> Manifest:
    """Parse vedrt.json and check that every graph it names is there."""
    root = Path(export_dir)
    try:
        data = shared.read_manifest(root)
    except shared.ExportDirError as exc:
        raise InputError(str(exc)) from None
    except (AttributeError, TypeError, KeyError, OSError) as exc:  # valid JSON, wrong structure
        raise InputError(
            f"corrupt manifest {root / shared.MANIFEST_NAME}: {type(exc).__name__}: {exc}"
        ) from None
    image_size = _get(data, "encoder", "image_size")
    if not (
        isinstance(image_size, list)
        and len(image_size) == 2
        and all(isinstance(v, int) for v in image_size)
    ):
        raise InputError(
            f"vedrt.json: encoder.image_size must be [height, width], got {image_size!r}"
        )
    files = {}
    for name in shared.GRAPHS:
        path = root / str(_get(data, "graphs", name, "file"))
        if not path.is_file():
            raise InputError(f"{root}: missing graph {path.name} (re-export the model)")
        files[name] = path
    max_positions = _get(data, "decoder").get("max_positions")
    generation_config = data.get("generation_config") or {}
    special = data.get("special_tokens") or {}
    if not isinstance(generation_config, dict) or not isinstance(special, dict):
        raise InputError("vedrt.json: generation_config and special_tokens must be objects")
    return Manifest(
        root=root,
        image_size=(image_size[0], image_size[1]),
        num_channels=_int(data, "encoder", "num_channels"),
        enc_len=_int(data, "encoder", "enc_len"),
        num_layers=_int(data, "decoder", "num_layers"),
        num_heads=_int(data, "decoder", "num_heads"),
        head_dim=_int(data, "decoder", "head_dim"),
        vocab_size=_int(data, "decoder", "vocab_size"),
        max_positions=max_positions if isinstance(max_positions, int) else None,
        special_tokens=special,
        generation_config=generation_config,
        graph_files=files,
        raw=data,
    )
