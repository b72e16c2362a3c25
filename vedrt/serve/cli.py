"""`vedrt serve`: the app on uvicorn, with SIGTERM draining (or on Ray Serve with --ray)."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from ..runtime.threads import machine_cores
from . import images
from .options import DEFAULT_MODEL, ServeOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=str(DEFAULT_MODEL),
        help="export directory (default: the shipped scene model)",
    )
    parser.add_argument(
        "--name", default=None, help="model name in URLs (default: the export directory's name)"
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 for every interface)",
    )
    parser.add_argument("--port", type=int, default=8000, help="(default: 8000; 0: any free port)")
    parser.add_argument(
        "--max-rows",
        type=int,
        default=32,
        help="decoder rows stepped together: a beam-4 request of one image takes 4 (default: 32)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="requests waiting for rows beyond which new ones get 503 (default: 64)",
    )
    parser.add_argument(
        "--max-body-mb",
        type=float,
        default=32.0,
        help="larger request bodies get 400 before they are read in full (default: 32)",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=images.DEFAULT_MAX_PIXELS,
        help="images with more pixels get 400 before they are decoded: decompression bombs "
        f"(default: {images.DEFAULT_MAX_PIXELS:,})",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=60.0,
        help="seconds; past it a request gets 504 and its rows are freed (default: 60)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="ONNX Runtime threads of the engine (default 1: measured best on 2 cores, see README)",
    )
    parser.add_argument(
        "--encode-ahead",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="encode waiting requests on a second thread while the decoder steps (default: on "
        "when the two sessions' threads fit the cores, 2 x --threads <= cores; on 2 cores 1.4x "
        "the scene model's images/s at beam 4 with 1 thread, 0.8x ViT-GPT2's with 2: see README)",
    )
    parser.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment")
    parser.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (with --ray)")


def options_from(args: argparse.Namespace) -> ServeOptions:
    from ..cli import UsageError

    for flag in ("max_rows", "max_queue", "port", "replicas", "max_pixels"):
        if getattr(args, flag) < (0 if flag == "port" else 1):
            raise UsageError(f"--{flag.replace('_', '-')} must be positive")
    for flag in ("max_body_mb", "request_timeout"):
        if not getattr(args, flag) > 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive")
    if args.threads < 0:
        raise UsageError("--threads must be 0 (ONNX Runtime's choice) or more")
    encode_ahead = args.encode_ahead
    if encode_ahead is None:
        encode_ahead = args.threads > 0 and 2 * args.threads <= machine_cores()
    return ServeOptions(
        model=args.model,
        name=args.name,
        max_rows=args.max_rows,
        max_queue=args.max_queue,
        max_body_mb=args.max_body_mb,
        request_timeout=args.request_timeout,
        threads=args.threads,
        encode_ahead=encode_ahead,
        max_pixels=args.max_pixels,
    )


def run(args: argparse.Namespace) -> int:
    from ..cli import UsageError
    from ..runtime.errors import InputError

    options = options_from(args)
    check_address(args.host, args.port, UsageError)  # before the model loads, in one line
    if args.ray:
        from .ray import run_ray

        return run_ray(options, host=args.host, port=args.port, replicas=args.replicas)
    from .app import build_app

    try:
        app = build_app(options)
    except InputError as exc:
        raise UsageError(str(exc)) from None
    serve(app, host=args.host, port=args.port)
    return 0


def check_address(host: str, port: int, error: Any) -> None:
    """Can this process listen there? uvicorn would otherwise log a raw errno and exit 3."""
    import socket

    if port == 0:
        return
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except OSError as exc:
        raise error(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def serve(app: Any, host: str, port: int) -> None:
    """uvicorn, but SIGTERM drains: readiness false, new requests 503, admitted ones answered."""
    import uvicorn

    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", lifespan="on", access_log=False
    )
    server = DrainingServer(config, app.state.service)
    server.run()
    if server.drained_by_sigterm:
        print("vedrt serve: drained after SIGTERM, exiting", file=sys.stderr)


class DrainingServer:
    """A uvicorn.Server whose SIGTERM waits for every admitted request before stopping."""

    def __new__(cls, config: Any, service: Any):
        import uvicorn

        class _Server(uvicorn.Server):
            drained_by_sigterm = False

            def handle_exit(self, sig: int, frame: Any) -> None:
                if sig == signal.SIGTERM and not service.draining:
                    service.begin_drain()  # on_tick stops the server once it has drained
                    self.drained_by_sigterm = True
                    return
                super().handle_exit(sig, frame)

            async def startup(self, sockets: Any = None) -> None:
                await super().startup(sockets=sockets)
                if self.started:  # uvicorn logs only warnings: say where to send requests
                    print(listening_line(service, self.servers), file=sys.stderr, flush=True)

            async def on_tick(self, counter: int) -> bool:
                should_exit = await super().on_tick(counter)
                return bool(should_exit) or service.drained()

        return _Server(config)


def listening_line(service: Any, servers: list[Any]) -> str:
    """Where the server listens (the bound port, so `--port 0` is usable) and with what."""
    addresses = []
    for server in servers:
        for sock in server.sockets:
            host, port = sock.getsockname()[:2]
            host = f"[{host}]" if ":" in host else host
            addresses.append(f"http://{host}:{port}")
    o = service.options
    ahead = ", encoding ahead" if o.encode_ahead else ""
    return (
        f"vedrt serve: model {service.name!r} on {', '.join(addresses)} "
        f"(max {o.max_rows} rows, {o.threads} engine thread(s){ahead}); "
        "SIGTERM drains and exits, Ctrl-C stops"
    )
