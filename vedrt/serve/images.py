"""Request payloads -> what the engine takes: image bytes -> PIL images, text options -> values.

Everything here runs before a request reaches the engine, so a bad image or option costs only its
own request; decoding runs on a worker thread, never on the event loop.
"""

from __future__ import annotations

import io
import json
from typing import Any

from ..runtime.errors import InputError
from .errors import bad_request

# Options a server decides for itself: the answer is always captions (and tokens on request).
SERVER_OWNED_OPTIONS = (
    "return_dict",
    "return_dict_in_generate",
    "output_scores",
    "output_attentions",
)
# 64 megapixels: far beyond any caption model's input, far below what a bomb decompresses to.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024


def open_image(
    blob: bytes,
    index: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    keep_short_side: int | None = None,
):
    """The decoded, upright image exactly as `Generator.caption` reads the same bytes
    (`vedrt.runtime.preprocess.load_image`: a very large photo decoded reduced), or a 400 naming
    the image and the problem. The pixel count is checked from the header, before decompression,
    so a small file that would inflate to gigabytes (a decompression bomb) costs nothing."""
    from ..runtime.preprocess import load_image

    if not blob:
        raise bad_request(f"image {index}: empty")
    stream = io.BytesIO(blob)
    stream.name = f"image {index}"  # what load_image's messages call it
    try:
        return load_image(stream, max_pixels=max_pixels, keep_short_side=keep_short_side)
    except InputError as exc:
        raise bad_request(str(exc)) from None


def total_pixels(blobs: list[bytes]) -> int | None:
    """Pixels of all the images, read from their headers (nothing decoded); None if a header
    does not read (the full decode will say why)."""
    from PIL import Image

    total = 0
    for blob in blobs:
        try:
            with Image.open(io.BytesIO(blob)) as image:
                width, height = image.size
        except Exception:  # noqa: BLE001  (any failure: open_image reports it properly)
            return None
        total += width * height
    return total


def parse_text_value(text: str) -> Any:
    """A query-string value as JSON when it parses (4, 0.8, true, [[1, 2]]), else the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # not JSON (or nested past the parser): the string
        return text


def generation_options(generator: Any, raw: dict[str, Any]) -> Any:
    """The request's options resolved as `generate()` resolves them (`GenerationOptions`), once
    for the whole request; a 400 for an unknown name, a bad value, or an option the server owns.
    """
    for name in SERVER_OWNED_OPTIONS:
        if name in raw:
            raise bad_request(f"option {name!r} is not available through the server")
    try:
        return generator.options(**raw)
    except TypeError as exc:
        if "unexpected keyword argument" in str(exc):
            name = str(exc).split("unexpected keyword argument ", 1)[1]  # repr: spaces and all
            raise bad_request(f"unknown option {name} (options are generate()'s names)") from None
        raise bad_request(f"bad option value: {_culprit(generator, raw)}{exc}") from None
    except InputError as exc:
        raise bad_request(str(exc)) from None
    except ValueError as exc:
        raise bad_request(f"bad option value: {_culprit(generator, raw)}{exc}") from None


def _culprit(generator: Any, raw: dict[str, Any]) -> str:
    """'name=value: ' of the first option that fails on its own (conversion errors name none)."""
    for name, value in raw.items():
        try:
            generator.options(**{name: value})
        except (TypeError, ValueError):
            return f"{name}={value!r}: "
    return ""
