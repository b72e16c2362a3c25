"""vedrt's exceptions: one base class, so the CLI reports any of them as one line (exit 2).

Every error a user can cause (bad options, images, export directories, checkpoints, command
lines) derives from `VedrtError`; anything else reaching the CLI is a bug and keeps its traceback.
"""

from __future__ import annotations


class VedrtError(Exception):
    """Base of every error vedrt reports to its user as a single line."""


class InputError(VedrtError, ValueError):
    """Bad user input: an image, pixel values, options, or an export directory that cannot be used."""


class UsageError(VedrtError):
    """A problem with a command line: printed as one line, exit code 2, no traceback."""
