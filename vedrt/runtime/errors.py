"""The one exception type for bad input, so callers (the CLI) can report it as a single line."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input: an image, pixel values, options, or an export directory that cannot be used."""
