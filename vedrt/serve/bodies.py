"""Request bodies for `app.py`: read within --max-body-mb, inflated off the event loop, and
split into inputs and options (JSON texts, urlencoded and multipart forms, query strings).
Each problem is a 400 naming it, before anything reaches the engine."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Iterable
from typing import Any
from urllib.parse import parse_qsl

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from . import images, protocol
from .errors import ServeError, bad_request

MAX_FORM_FILES = 256


def looks_json(body: bytes) -> bool:
    """`curl -d '{"texts": ...}'` without -H labels JSON as a form: take it as the JSON it is."""
    return body.lstrip().startswith(b"{")


def json_texts(body: bytes) -> tuple[list[str], dict[str, Any]]:
    """{"texts": [...], option: value, ...}: the texts, and the body's other keys as options (so
    {"texts": [...], "num_beams": 4} is not a silent greedy run; unknown names are 400s)."""
    payload = protocol.load_json(body, "the body") if body else {}
    texts = payload.get("texts") if isinstance(payload, dict) else None
    if texts is None:
        raise bad_request('the JSON body must be {"texts": ["...", ...]}')
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise bad_request("'texts' must be a list of strings")
    return texts, {k: v for k, v in payload.items() if k != "texts"}


def merge_options(options: dict[str, Any], more: Iterable[tuple[str, Any]]) -> None:
    """(name, value) pairs into `options` (the query's, form fields, JSON keys): a name given
    twice with two values is a 400, not the last one silently winning."""
    for name, value in more:
        if name in options and options[name] != value:
            raise bad_request(f"option {name!r} is given twice, as {options[name]!r} and {value!r}")
        options[name] = value


def urlencoded(body: bytes) -> list[tuple[str, Any]]:
    try:
        return parse_qsl(  # strict: a %ff is an error, not a U+FFFD in someone's text
            body.decode("utf-8"),
            keep_blank_values=True,
            max_num_fields=MAX_FORM_FILES,
            errors="strict",
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad_request(f"bad form body ({exc})") from None


async def read_body(request: Request, max_mb: float) -> bytes:
    """The whole body, refused with a 400 as soon as it passes the limit (before it is all read)."""
    limit = int(max_mb * 1024 * 1024)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise bad_request(f"the body ({int(declared)} bytes) is over --max-body-mb={max_mb:g}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise bad_request(f"the body is over --max-body-mb={max_mb:g}")
            chunks.append(chunk)
    except ClientDisconnect:  # an ordinary client abort, not an error of ours (no one reads it)
        raise ServeError(
            499, "the client disconnected before sending its whole body", outcome="disconnected"
        ) from None
    body = b"".join(chunks)
    encoding = (request.headers.get("content-encoding") or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise bad_request(f"Content-Encoding {encoding!r} is not supported (gzip and deflate are)")
    # inflating up to the limit takes ~100 ms for a small gzip bomb: off the event loop, so the
    # other requests go on meanwhile (zlib lets go of the GIL while it inflates)
    return await asyncio.to_thread(decoded, body, encoding, limit, max_mb)


def decoded(body: bytes, encoding: str, limit: int, max_mb: float) -> bytes:
    """The body inflated for `Content-Encoding: gzip` / `deflate` (what tritonclient's
    request_compression_algorithm sends), never past the body limit."""
    inflater = zlib.decompressobj(32 + zlib.MAX_WBITS)  # a gzip or zlib header, either
    try:
        plain = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise bad_request(f"the {encoding} body does not decompress ({exc})") from None
    if len(plain) > limit or inflater.unconsumed_tail:
        raise bad_request(f"the body, decompressed, is over --max-body-mb={max_mb:g}")
    return plain


class _StrictFields(MultiPartParser):
    """Starlette's parser reads a text field that is not valid in its charset as Latin-1 (a
    text of mojibake answered 200); here it is a bad multipart body, as invalid UTF-8 is in
    every other way a text can arrive. (Reads the part the parser holds; should a Starlette
    release rename it, the check is skipped and the parser behaves as before.)"""

    def on_part_end(self) -> None:
        part = getattr(self, "_current_part", None)
        if part is not None and getattr(part, "file", 0) is None:
            charset = getattr(self, "_charset", "") or "utf-8"
            try:
                bytes(getattr(part, "data", b"")).decode(charset)
            except UnicodeDecodeError:
                name = getattr(part, "field_name", "?")
                raise MultiPartException(f"field {name!r} is not valid {charset} text") from None
            except LookupError:
                pass
        super().on_part_end()


async def form(request: Request, body: bytes) -> list[tuple[str, Any]]:
    """Multipart fields in order: (name, UploadFile or str)."""

    async def stream() -> AsyncIterator[bytes]:
        yield body

    parser = _StrictFields(
        request.headers, stream(), max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FILES
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise bad_request(f"bad multipart body: {exc.message}") from None
    _, _, boundary = request.headers.get("content-type", "").partition("boundary=")
    boundary = boundary.split(";")[0].strip().strip('"')
    if boundary and b"--" + boundary.encode("latin-1", "replace") + b"--" not in body:
        raise bad_request("bad multipart body: truncated (it has no closing boundary)")
    items = []
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            data = await value.read()
            await value.close()
            items.append((key, data))
        else:
            items.append((key, value))
    return items


def split_form(items: list[tuple[str, Any]], field: str, kind: type) -> tuple[list, dict]:
    """Fields named `field` are the inputs (files for images, text for texts); other text fields
    are options. A file under another name is refused, so a typo is not silently ignored."""
    inputs, options = [], {}
    for key, value in items:
        if isinstance(value, bytes) and key != field:
            raise bad_request(
                f"unexpected file field {key!r}: {field}s go in fields named {field!r}"
            )
        if key == field:
            if kind is str and isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError:
                    raise bad_request(f"{field} {len(inputs)}: not valid UTF-8") from None
            elif kind is bytes and isinstance(value, str):
                raise bad_request(f"field {key!r} must be a file upload")
            inputs.append(value)
        else:
            merge_options(options, [(key, images.parse_text_value(value))])
    return inputs, options
