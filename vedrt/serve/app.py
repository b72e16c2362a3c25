"""The ASGI app: KServe v2 (as Triton serves it), /v1/caption and /v1/generate for curl, /metrics.

Handlers only parse and answer; everything slow runs off the event loop (see service.py).
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
import traceback
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import __version__
from . import bodies, images, protocol
from .errors import ServeError, bad_request
from .service import ServeOptions, Service

# Which process answered: tells Ray Serve replicas (and load-balanced servers) apart.
SERVER_ID = f"{socket.gethostname()}:{os.getpid()}"
SERVER_BYTES = SERVER_ID.encode("latin-1", "replace")


def build_app(options: ServeOptions | None = None, service: Service | None = None) -> Starlette:
    """One app around one service (built from `options` unless given)."""
    service = service or Service(options or ServeOptions())

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        service.start()
        yield
        await asyncio.to_thread(service.close)

    routes = [
        Route("/v2/health/live", lambda r: _live(service.live)),
        Route("/v2/health/ready", lambda r: _ready(service.ready)),
        Route("/v2", lambda r: JSONResponse(_server_metadata())),
        Route("/v2/models/{name}", _model_route(service, _metadata)),
        Route("/v2/models/{name}/versions/{version}", _model_route(service, _metadata)),
        Route("/v2/models/{name}/ready", _model_route(service, _model_ready)),
        Route("/v2/models/{name}/versions/{version}/ready", _model_route(service, _model_ready)),
        Route("/v2/models/{name}/config", _model_route(service, _config)),
        Route("/v2/models/{name}/versions/{version}/config", _model_route(service, _config)),
        Route("/v2/models/{name}/infer", _endpoint(service, "infer", _infer), methods=["POST"]),
        Route(
            "/v2/models/{name}/versions/{version}/infer",
            _endpoint(service, "infer", _infer),
            methods=["POST"],
        ),
        Route("/v1/caption", _endpoint(service, "caption", _caption), methods=["POST"]),
        Route("/v1/generate", _endpoint(service, "generate", _generate), methods=["POST"]),
        Route("/metrics", lambda r: _metrics(service)),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[Middleware(_ServerHeader)],
        exception_handlers={HTTPException: _http_error},
    )
    app.state.service = service
    return app


class _ServerHeader:
    """Every answer names the process that gave it (`X-Vedrt-Server`): health, metadata, errors
    and the router's 404s too, so Ray Serve replicas and load-balanced servers can be told apart."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_named(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                message = {**message, "headers": [*headers, (b"x-vedrt-server", SERVER_BYTES)]}
            await send(message)

        await self.app(scope, receive, send_named)


async def _http_error(_request: Request, exc: Exception) -> Response:
    """The router's own answers (an unknown path 404, a wrong method 405) as `{"error": ...}`."""
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", "") or "error"
    return JSONResponse(
        {"error": str(detail)}, status_code=status, headers=getattr(exc, "headers", None)
    )


def _server_metadata() -> dict[str, Any]:
    return {"name": "vedrt", "version": __version__, "extensions": ["binary_tensor_data"]}


def _live(live: bool) -> Response:
    return JSONResponse({"live": live}, status_code=200 if live else 503)


def _ready(ready: bool) -> Response:
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


def _error(exc: ServeError) -> Response:
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)


def _model_route(service: Service, handler):
    """GET handlers under /v2/models/{name}: 404 for a model this server does not have."""

    async def route(request: Request) -> Response:
        try:
            _check_model(service, request)
        except ServeError as exc:
            return _error(exc)
        return handler(service)

    return route


def _metadata(service: Service) -> Response:
    return JSONResponse(protocol.model_metadata(service.name, service.tensors))


def _model_ready(service: Service) -> Response:
    return _ready(service.ready)


def _config(service: Service) -> Response:
    defaults = dict(service.generator.generation_config)
    config = protocol.model_config(
        service.name, service.options.max_rows, defaults, service.tensors
    )
    return JSONResponse(config)


def _metrics(service: Service) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _endpoint(service: Service, name: str, handler):
    """Times the request, turns a ServeError into `{"error": ...}`, counts the outcome."""

    async def route(request: Request) -> Response:
        start = time.monotonic()
        outcome = None
        try:
            response = await handler(service, request)
        except ServeError as exc:
            response, outcome = _error(exc), exc.outcome
        except Exception as exc:  # a bug of ours: a 500 that says so, counted, the rest go on
            traceback.print_exc(file=sys.stderr)
            response = _error(ServeError(500, f"internal error: {type(exc).__name__}: {exc}"))
        service.metrics.observe(name, response.status_code, time.monotonic() - start, outcome)
        return response

    return route


def _check_model(service: Service, request: Request) -> None:
    """404 for a model, or a version of it, this server does not have (it serves version 1)."""
    service.check_model(request.path_params["name"])
    version = request.path_params.get("version")
    if version is not None and version != "1":
        raise ServeError(
            404, f"model {service.name!r} has no version {version!r} (its versions: 1)"
        )


async def _infer(service: Service, request: Request) -> Response:
    _check_model(service, request)
    service.admit()  # a full queue answers at once, before reading the body
    body = await bodies.read_body(request, service.options.max_body_mb)
    header_length = request.headers.get("inference-header-content-length")
    parsed = protocol.parse_infer(body, header_length, service.tensors)
    if service.tensors.output in parsed.outputs:
        service.check_tokenizer()
    run = service.generate if service.modality == "text" else service.caption
    answer = await run(parsed.items, parsed.options, _disconnected(request), parsed.timeout)
    content, headers = protocol.encode_infer(parsed, service.name, answer.captions, answer.tokens)
    return Response(content, headers=headers)


async def _form_request(
    service: Service, request: Request, field: str, kind: type
) -> tuple[list | None, dict[str, Any], bytes, str]:
    """What /v1/caption and /v1/generate read alike: admission (a full queue answers before the
    body is read), options from the query, the body, and the multipart fields named `field`
    (None when the body is not multipart; their other fields are options too). Returns (items,
    options, body, content type)."""
    service.admit()
    options: dict[str, Any] = {}
    query = request.query_params.multi_items()
    bodies.merge_options(options, [(k, images.parse_text_value(v)) for k, v in query])
    body = await bodies.read_body(request, service.options.max_body_mb)
    content_type = request.headers.get("content-type", "").lower()
    items = None
    if content_type.startswith("multipart/form-data"):
        items, fields = bodies.split_form(await bodies.form(request, body), field, kind)
        bodies.merge_options(options, fields.items())
    return items, options, body, content_type


async def _caption(service: Service, request: Request) -> Response:
    service.check_modality("image")
    service.check_tokenizer()
    blobs, options, body, _ = await _form_request(service, request, "image", bytes)
    if blobs is None:
        blobs = [body] if body else []
    if not blobs:
        raise bad_request("no image: send one as the body, or as multipart fields named 'image'")
    answer = await service.caption(blobs, options, _disconnected(request))
    return JSONResponse({"captions": answer.captions})


async def _generate(service: Service, request: Request) -> Response:
    """Texts as JSON {"texts": [...]} or form fields `text`; options as query parameters."""
    service.check_modality("text")
    service.check_text_tokenizer()
    service.check_tokenizer()
    texts, options, body, content_type = await _form_request(service, request, "text", str)
    if texts is None:
        if content_type.startswith("application/x-www-form-urlencoded") and not bodies.looks_json(
            body
        ):
            texts, fields = bodies.split_form(bodies.urlencoded(body), "text", str)
            bodies.merge_options(options, fields.items())
        else:
            texts, fields = bodies.json_texts(body)
            bodies.merge_options(options, fields.items())
    if not texts:
        raise bad_request("no text: send {\"texts\": [...]} as JSON, or form fields named 'text'")
    answer = await service.generate(texts, options, _disconnected(request))
    return JSONResponse({"outputs": answer.captions})


def _disconnected(request: Request):
    """A waiter that resolves when the client goes away (after the body, `receive` has nothing
    else to say); a factory, so a request refused before waiting leaves no coroutine behind."""

    async def wait() -> bool:
        for _ in range(1_000_000):  # bounded: each pass waits for a message from the server
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return True
        return False

    return wait
