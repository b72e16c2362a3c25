"""`vedrt serve`: a KServe v2 / Triton-protocol HTTP server over the continuous-batching engine.

    from vedrt.serve import ServeOptions, build_app     # an ASGI app (Starlette)
    app = build_app(ServeOptions(model="vedrt/models/scenes", max_rows=32))

Needs the `serve` extra (starlette, uvicorn, prometheus-client, python-multipart); Ray Serve
scale-out (`vedrt.serve.ray`) needs the `ray` extra.
"""

from __future__ import annotations

from typing import Any

from .options import ServeOptions


def build_app(options: ServeOptions | None = None, service: Any = None):
    from .app import build_app as _build

    return _build(options, service)


def __getattr__(name: str) -> Any:  # the server's classes load the serve extra: on first use
    if name == "Service":
        from .service import Service

        return Service
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ServeOptions", "Service", "build_app"]
