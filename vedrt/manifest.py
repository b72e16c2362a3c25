"""Reading and writing `vedrt.json`, the export directory's manifest (see docs/export-format.md).

Shared by the exporter (which writes it) and every runtime backend (which reads it), so it stays
free of torch, numpy and onnx.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MANIFEST_NAME = "vedrt.json"
FORMAT_VERSION = 1
GRAPHS = ("encoder", "cross_kv", "decoder")


class ExportDirError(ValueError):
    """An export directory that cannot be used: missing, incomplete, corrupt or too new."""


def read_manifest(export_dir: str | Path) -> dict[str, Any]:
    """The manifest of an export directory, after checking that the directory is complete."""
    root = Path(export_dir)
    if not root.is_dir():
        raise ExportDirError(f"export directory not found: {root}")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ExportDirError(
            f"{root} is not a vedrt export directory (no {MANIFEST_NAME}); create one with `vedrt export`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportDirError(f"corrupt manifest {path}: {exc}") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise ExportDirError(
            f"{path}: format_version {version!r} is not supported (this vedrt reads {FORMAT_VERSION})"
        )
    for name in GRAPHS:
        graph = manifest.get("graphs", {}).get(name)
        if not graph or not (root / graph["file"]).is_file():
            missing = graph["file"] if graph else f"{name} graph entry"
            raise ExportDirError(f"export directory {root} is incomplete: {missing} is missing")
    return manifest


def write_manifest(export_dir: str | Path, manifest: dict[str, Any]) -> Path:
    path = Path(export_dir) / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path
