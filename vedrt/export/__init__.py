"""Export VisionEncoderDecoder checkpoints to ONNX graphs with a KV cache (needs `vedrt[export]`)."""

from .architectures import DECODERS, ENCODERS, UnsupportedArchitecture
from .exporter import ExportError, ExportReport, export_model
from .validate import ValidationError

__all__ = [
    "DECODERS",
    "ENCODERS",
    "ExportError",
    "ExportReport",
    "UnsupportedArchitecture",
    "ValidationError",
    "export_model",
]
