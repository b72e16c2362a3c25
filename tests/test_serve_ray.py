"""Ray Serve scale-out: a local Ray instance, 2 replicas of the vedrt app, both answering right."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

requests = pytest.importorskip("requests")
# The `ray` extra is part of dev; this guard only keeps a lighter `serve`-only install green.
serve = pytest.importorskip("ray.serve", reason="needs the ray extra (pip install 'vedrt[ray]')")

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "vedrt" / "models" / "scenes"
IMAGES = sorted((ROOT / "examples").glob("scene*.*"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_replicas_answer_correctly():
    import ray

    from vedrt.runtime import load
    from vedrt.serve import ServeOptions
    from vedrt.serve.ray import deployment

    reference = load(MODEL, threads=1)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment(ServeOptions(model=str(MODEL)), replicas=2), route_prefix="/")
        cases = [(IMAGES[i % len(IMAGES)], {"num_beams": 1 + 3 * (i % 2)}) for i in range(40)]

        def ask(case):
            path, options = case
            answer = requests.post(
                f"{url}/v1/caption", params=options, data=path.read_bytes(), timeout=120
            )
            return answer.status_code, answer.json(), answer.headers.get("X-Vedrt-Server")

        servers = set()
        deadline = time.monotonic() + 120
        for _ in range(5):  # rounds of concurrent requests until both replicas have answered
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(ask, cases))
            for (path, options), (status, body, server) in zip(cases, answers, strict=True):
                assert status == 200, body
                assert body["captions"] == reference.caption(path, **options)
                servers.add(server)
            if len(servers) >= 2 or time.monotonic() > deadline:
                break
        assert len(servers) == 2, servers
    finally:
        serve.shutdown()
        ray.shutdown()


def test_a_replica_whose_engine_died_fails_its_health_check():
    """Ray Serve replaces a replica whose `check_health` raises: one with a dead engine loop
    must, or it would answer 503 for ever (no Ray instance is needed to call the method)."""
    from types import SimpleNamespace

    from vedrt.serve.ray import VedrtReplica

    engine = SimpleNamespace(failure=None)
    service = SimpleNamespace(engine=engine, live=True)
    # the method alone, on a stand-in: a real replica object needs Ray's replica context
    replica = SimpleNamespace(vedrt_app=SimpleNamespace(state=SimpleNamespace(service=service)))
    VedrtReplica.check_health(replica)  # healthy: returns
    engine.failure, service.live = RuntimeError("a bug"), False
    with pytest.raises(RuntimeError, match="a bug"):
        VedrtReplica.check_health(replica)
