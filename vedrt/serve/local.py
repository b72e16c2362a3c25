"""A server on a background thread, on 127.0.0.1 and a free port: for tests and the benchmark."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass
class Running:
    url: str  # http://127.0.0.1:PORT
    port: int
    app: Any
    server: Any  # the uvicorn server (cli.DrainingServer)
    thread: threading.Thread

    @property
    def service(self) -> Any:
        return self.app.state.service


@contextmanager
def running(app: Any, start_timeout: float = 60.0) -> Iterator[Running]:
    """Serve `app` until the block ends; the socket is bound before the thread starts (no race)."""
    import uvicorn

    from .cli import DrainingServer

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=30)
    server = DrainingServer(config, app.state.service)
    thread = threading.Thread(
        target=lambda: asyncio.run(server.serve(sockets=[sock])), name="vedrt-serve", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        server.should_exit = True
        raise RuntimeError("the server did not start in time")
    try:
        yield Running(f"http://127.0.0.1:{port}", port, app, server, thread)
    finally:
        server.should_exit = True
        thread.join(start_timeout)
        sock.close()
