"""Ray Serve scale-out: the same ASGI app as a deployment, one engine per replica.

    from vedrt.serve import ServeOptions
    from vedrt.serve.ray import deployment
    from ray import serve
    serve.run(deployment(ServeOptions(), replicas=2), route_prefix="/")

or `vedrt serve --ray --replicas 2`. Ray's proxy spreads requests over the replicas; each replica
batches its own requests continuously. Needs the `ray` extra (`pip install 'vedrt[ray]'`).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from ray import serve

from .service import ServeOptions


@serve.ingress()
class VedrtReplica:
    """A replica builds its own app (and so its own engine) when Ray starts it."""

    def __init__(self, options: ServeOptions):
        self.options = options

    def __serve_build_asgi_app__(self) -> Any:
        from .app import build_app

        self.vedrt_app = build_app(self.options)  # (`app` is the Ray wrapper's own property)
        return self.vedrt_app

    def check_health(self) -> None:
        """Ray Serve calls this every few seconds; raising makes it replace the replica, as a
        replica whose engine loop died (a bug) would otherwise answer 503 for ever."""
        app = getattr(self, "vedrt_app", None)
        if app is not None and not app.state.service.live:
            failure = app.state.service.engine.failure
            raise RuntimeError(f"the engine's loop failed ({failure!r})")


def deployment(options: ServeOptions, replicas: int = 1, **ray_options: Any) -> Any:
    """A bound Ray Serve application; `ray_options` go to `serve.deployment` (e.g. max_ongoing_requests).

    Replicas ask Ray for no CPU of their own by default: ONNX Runtime threads are set by
    `options.threads`, and reserving whole CPUs would stop 2 replicas fitting a 2-core machine.
    """
    settings: dict[str, Any] = {
        "name": "vedrt",
        "num_replicas": replicas,
        "ray_actor_options": {"num_cpus": 0},
        "max_ongoing_requests": options.max_queue + options.max_rows,
    }
    settings.update(ray_options)
    return serve.deployment(**settings)(VedrtReplica).bind(options)


def run_ray(options: ServeOptions, host: str, port: int, replicas: int) -> int:
    """Start a local Ray (or join RAY_ADDRESS), serve until SIGINT/SIGTERM, then shut down."""
    import ray

    ray.init(ignore_reinit_error=True, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(deployment(options, replicas), name="vedrt", route_prefix="/")
    print(f"vedrt serve: {replicas} Ray Serve replicas on http://{host}:{port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    serve.shutdown()
    ray.shutdown()
    return 0
