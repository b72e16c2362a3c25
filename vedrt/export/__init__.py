"""Export VisionEncoderDecoder checkpoints to ONNX graphs with a KV cache (needs `vedrt[export]`).

The names below are imported on first use, so `vedrt export --help` (which imports this package
for its command line) works without torch or onnx installed.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DECODERS": "architectures",
    "ENCODERS": "architectures",
    "UnsupportedArchitecture": "architectures",
    "ExportError": "exporter",
    "ExportReport": "exporter",
    "export_model": "exporter",
    "ValidationError": "validate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
