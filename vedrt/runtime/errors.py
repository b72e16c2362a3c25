"""The runtime's error type (`vedrt.errors.InputError`), kept importable from here."""

from __future__ import annotations

from ..errors import InputError, VedrtError

__all__ = ["InputError", "VedrtError"]
