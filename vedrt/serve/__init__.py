"""`vedrt serve`: a KServe v2 / Triton-protocol HTTP server over the continuous-batching engine.

    from vedrt.serve import ServeOptions, build_app     # an ASGI app (Starlette)
    app = build_app(ServeOptions(model="vedrt/models/scenes", max_rows=32))

Needs the `serve` extra (starlette, uvicorn, prometheus-client, python-multipart); Ray Serve
scale-out (`vedrt.serve.ray`) needs the `ray` extra.
"""

from __future__ import annotations

from .service import ServeOptions, Service


def build_app(options: ServeOptions | None = None, service: Service | None = None):
    from .app import build_app as _build

    return _build(options, service)


__all__ = ["ServeOptions", "Service", "build_app"]
