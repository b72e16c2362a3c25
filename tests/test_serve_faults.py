"""vedrt serve under faults: full queue, timeouts, disconnects, bad requests, unknown models, drain.

The engine is held (not started) where a test needs requests to stay queued, so each fault is
produced on purpose rather than by racing the machine's speed.
"""

from __future__ import annotations

import signal
import socket
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the serve extra is part of dev")
requests = pytest.importorskip("requests")

from vedrt.runtime import load  # noqa: E402
from vedrt.serve import ServeOptions, build_app  # noqa: E402
from vedrt.serve.local import running  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "vedrt" / "models" / "scenes"
IMAGES = sorted((ROOT / "examples").glob("scene*.*"))
PNG = IMAGES[0].read_bytes()


@pytest.fixture(scope="module")
def reference():
    return load(MODEL, threads=1)


def serve(**options):
    return running(build_app(ServeOptions(model=str(MODEL), **options)))


def wait_until(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def metric(url: str, name: str) -> float:
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        if (
            line.startswith(name + " ")
            or line.startswith(name + "{")
            and line.split(" ")[0] == name
        ):
            return float(line.split()[-1])
    return 0.0


def caption(url: str, data: bytes = PNG, timeout: float = 60, **params):
    return requests.post(f"{url}/v1/caption", params=params, data=data, timeout=timeout)


def test_full_queue_is_503_with_retry_after_at_once(reference):
    with serve(max_queue=2, start_engine=False) as live, ThreadPoolExecutor(2) as pool:
        queued = [pool.submit(caption, live.url) for _ in range(2)]
        wait_until(lambda: live.service.queue_depth == 2)
        start = time.monotonic()
        refused = caption(live.url)
        assert time.monotonic() - start < 5
        assert refused.status_code == 503
        assert "queue is full" in refused.json()["error"]
        assert int(refused.headers["Retry-After"]) >= 1
        live.service.engine.start()
        for future in queued:
            answer = future.result(60)
            assert answer.status_code == 200
            assert answer.json()["captions"] == reference.caption(IMAGES[0])


def test_timeout_is_504_and_frees_the_request(reference):
    with serve(request_timeout=0.5, start_engine=False) as live:
        answer = caption(live.url)
        assert answer.status_code == 504
        assert "longer than" in answer.json()["error"]
        assert metric(live.url, 'vedrt_requests_total{endpoint="caption",outcome="timeout"}') == 1
        engine = live.service.engine
        engine.start()
        wait_until(lambda: engine.pending == 0 and engine.active_rows == 0)
        assert live.service.in_flight == 0


def test_a_failed_engine_is_not_ready_and_answers_503(reference):
    """If the engine's loop dies (a bug), the requests it held fail, readiness turns false so a
    load balancer stops sending, and new requests are 503s naming why, not hangs or 500s."""
    with serve() as live:
        assert caption(live.url).status_code == 200
        engine = live.service.engine

        def broken_step():
            raise RuntimeError("a bug in the step")

        engine.step = broken_step  # the loop calls it on the next request
        failed = caption(live.url)
        assert failed.status_code in (500, 503)
        wait_until(lambda: engine.failure is not None)
        assert requests.get(f"{live.url}/v2/health/ready", timeout=10).status_code == 503
        live_answer = requests.get(f"{live.url}/v2/health/live", timeout=10)
        assert live_answer.status_code == 503 and live_answer.json() == {"live": False}
        refused = caption(live.url)
        assert refused.status_code == 503
        assert "engine is not running" in refused.json()["error"]
        assert "a bug in the step" in refused.json()["error"]


def test_client_disconnect_cancels_the_request(reference):
    with serve(start_engine=False) as live:
        head = (
            f"POST /v1/caption HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(PNG)}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", live.port), timeout=10) as client:
            client.sendall(head + PNG)
            wait_until(lambda: live.service.in_flight == 1)
        name = 'vedrt_requests_total{endpoint="caption",outcome="disconnected"}'
        wait_until(lambda: metric(live.url, name) == 1)
        assert live.service.in_flight == 0
        engine = live.service.engine
        engine.start()
        wait_until(lambda: engine.pending == 0 and engine.active_rows == 0)
        ok = caption(live.url)  # the server goes on serving
        assert ok.json()["captions"] == reference.caption(IMAGES[0])


def test_a_client_gone_mid_body_is_a_disconnect_not_an_error(reference):
    """Headers and part of the body, then the client hangs up: counted as `disconnected`
    (an ordinary abort), not in the `error` outcome that alerts watch."""
    with serve() as live:
        head = (
            f"POST /v1/caption HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(PNG)}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", live.port), timeout=10) as client:
            client.sendall(head + PNG[:100])
        name = 'vedrt_requests_total{endpoint="caption",outcome="disconnected"}'
        wait_until(lambda: metric(live.url, name) == 1)
        assert metric(live.url, 'vedrt_requests_total{endpoint="caption",outcome="error"}') == 0
        assert caption(live.url).json()["captions"] == reference.caption(IMAGES[0])


def test_compressed_bodies_are_inflated_off_the_event_loop(reference, monkeypatch):
    """Inflating a gzip body up to --max-body-mb takes ~100 ms for a 40 KB bomb: on the event
    loop every other request would wait for it. It runs on a worker thread."""
    import threading

    from vedrt.serve import bodies

    threads = []
    decoded = bodies.decoded

    def spy(*args):
        threads.append(threading.current_thread().name)
        return decoded(*args)

    monkeypatch.setattr(bodies, "decoded", spy)
    with serve() as live:
        answer = requests.post(
            f"{live.url}/v1/caption",
            data=zlib.compress(PNG),
            headers={"Content-Type": "image/png", "Content-Encoding": "deflate"},
            timeout=60,
        )
        assert answer.json()["captions"] == reference.caption(IMAGES[0])
        assert threads and "vedrt-serve" not in threads and "MainThread" not in threads


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A few hundred bytes claiming 10 gigapixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1000)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def triton_json(name="IMAGE", datatype="BYTES", shape=None, data=None, **parameters):
    import base64

    data = data if data is not None else [base64.b64encode(PNG).decode()]
    tensor = {"name": name, "datatype": datatype, "shape": shape or [len(data)], "data": data}
    return {"inputs": [tensor], "parameters": parameters}


BAD_CAPTION = [
    ("not an image", {}, b"hello, not an image", "not an image"),
    ("truncated", {}, PNG[: len(PNG) // 2], "truncated"),
    ("unknown option", {"beams": 4}, PNG, "unknown option 'beams'"),
    ("out of range", {"num_beams": 0}, PNG, "num_beams"),
    ("bad value", {"num_beams": "four"}, PNG, "num_beams"),
    ("too many rows", {"num_beams": 64}, PNG, "rows"),
    ("server-owned option", {"return_dict": "true"}, PNG, "return_dict"),
    ("decompression bomb", {}, bomb_png(), "decompression bomb"),
    ("empty body", {}, b"", "no image"),
    # a fuzzed DDS on which Pillow raises NotImplementedError (it was a 500)
    ("malformed DDS", {}, (ROOT / "tests" / "data" / "mutated.dds").read_bytes(), "unreadable"),
]

BAD_INFER = [
    ("tensor name", triton_json(name="PIXELS"), "unknown input tensor 'PIXELS'"),
    ("datatype", triton_json(datatype="FP32"), "datatype BYTES"),
    ("shape", triton_json(shape=[2]), "carries 1 elements"),
    ("rank", triton_json(shape=[1, 3]), "shape [n]"),
    ("base64", triton_json(data=["***"]), "base64"),
    ("option", triton_json(top_k="x"), "top_k"),
    # parseable but malformed: each was a 500 (AttributeError, RecursionError) or silently taken
    ("parameters a list", {**triton_json(), "parameters": [1]}, "must be a JSON object"),
    (
        "input parameters",
        {"inputs": [{**triton_json()["inputs"][0], "parameters": "x"}]},
        "of input IMAGE must be a JSON object",
    ),
    (
        "output parameters",
        {**triton_json(), "outputs": [{"name": "CAPTION", "parameters": [1]}]},
        "of output CAPTION must be a JSON object",
    ),
    ("binary flag a string", triton_json(binary_data_output="false"), "true or false"),
    ("timeout not a number", triton_json(timeout="x"), "timeout must be a positive"),
    ("timeout negative", triton_json(timeout=-5), "timeout must be a positive"),
]


def test_bad_requests_are_400_before_the_engine_and_spare_their_neighbours(reference):
    with serve(max_body_mb=1) as live:
        good_expected = reference.caption(IMAGES[1], num_beams=4)
        images_before = metric(live.url, "vedrt_images_total")
        with ThreadPoolExecutor(4) as pool:
            good = [
                pool.submit(caption, live.url, IMAGES[1].read_bytes(), num_beams=4)
                for _ in range(4)
            ]
            for label, params, body, words in BAD_CAPTION:
                answer = caption(live.url, body, **params)
                assert answer.status_code == 400, label
                assert words in answer.json()["error"], (label, answer.json())
            for label, body, words in BAD_INFER:
                answer = requests.post(f"{live.url}/v2/models/scenes/infer", json=body, timeout=60)
                assert answer.status_code == 400, label
                assert words in answer.json()["error"], (label, answer.json())
            big = caption(live.url, b"\0" * (1024 * 1024 + 1))
            assert big.status_code == 400 and "max-body-mb" in big.json()["error"]
            header = requests.post(
                f"{live.url}/v2/models/scenes/infer",
                data=b'{"inputs": []}',
                headers={"Inference-Header-Content-Length": "999"},
                timeout=60,
            )
            assert header.status_code == 400
            for future in good:
                answer = future.result(120)
                assert answer.status_code == 200
                assert answer.json()["captions"] == good_expected
        assert metric(live.url, "vedrt_images_total") == images_before + 4  # only the good ones


def test_unknown_model_is_404():
    with serve() as live:
        for path in ("/v2/models/nope", "/v2/models/nope/config", "/v2/models/nope/ready"):
            answer = requests.get(live.url + path, timeout=10)
            assert answer.status_code == 404 and "nope" in answer.json()["error"]
        answer = requests.post(f"{live.url}/v2/models/nope/infer", json=triton_json(), timeout=10)
        assert answer.status_code == 404 and "unknown model" in answer.json()["error"]


def test_drain_finishes_admitted_requests_and_refuses_new_ones(reference):
    with serve(start_engine=False) as live, ThreadPoolExecutor(3) as pool:
        admitted = [pool.submit(caption, live.url, p.read_bytes()) for p in IMAGES[:3]]
        wait_until(lambda: live.service.in_flight == 3)
        live.server.handle_exit(signal.SIGTERM, None)  # what the signal handler does
        assert requests.get(f"{live.url}/v2/health/ready", timeout=10).status_code == 503
        assert requests.get(f"{live.url}/v2/health/live", timeout=10).status_code == 200
        refused = caption(live.url)
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]
        live.service.engine.start()
        answers = [future.result(60) for future in admitted]
        assert [a.json()["captions"] for a in answers] == [reference.caption(p) for p in IMAGES[:3]]
        live.thread.join(30)  # a drained server stops by itself
        assert not live.thread.is_alive()


@pytest.mark.parametrize(
    "argv, words",
    [(["--max-rows", "0"], "--max-rows"), (["--model", "/nonexistent/export"], "not found")],
)
def test_cli_bad_flags_are_one_line_and_exit_2(argv, words, capsys):
    from vedrt.cli import main

    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1


def test_protocol_edges(reference):
    """What a QA pass found: unknown versions, router errors as JSON with the server header,
    JSON nested past the parser, compressed requests, an option given twice, truncated
    multipart, and a request's own timeout named in its 504."""
    import tritonclient.http as httpclient

    with serve() as live:
        url, infer = live.url, f"{live.url}/v2/models/scenes/infer"
        assert requests.get(f"{url}/v2/models/scenes/versions/1", timeout=10).status_code == 200
        for path in ("versions/7", "versions/7/ready", "versions/7/config"):
            answer = requests.get(f"{url}/v2/models/scenes/{path}", timeout=10)
            assert answer.status_code == 404 and "no version '7'" in answer.json()["error"]
        answer = requests.post(f"{url}/v2/models/scenes/versions/7/infer", json=triton_json())
        assert answer.status_code == 404
        live_answer = requests.get(f"{url}/v2/health/live", timeout=10)
        assert live_answer.headers["X-Vedrt-Server"]  # every answer names its process
        for path, status in (("/nope", 404), ("/v1/caption", 405)):  # the router's own answers
            answer = requests.get(url + path, timeout=10)
            assert answer.status_code == status and "error" in answer.json()
            assert answer.headers["X-Vedrt-Server"] == live_answer.headers["X-Vedrt-Server"]

        empty = requests.post(infer, json={**triton_json(), "outputs": []}, timeout=60)
        assert [o["name"] for o in empty.json()["outputs"]] == ["CAPTION"]  # it answered nothing

        deep = requests.post(infer, data=b"[" * 100_000, timeout=10)
        assert deep.status_code == 400 and "too deeply" in deep.json()["error"]

        client = httpclient.InferenceServerClient(url=f"127.0.0.1:{live.port}")
        image = httpclient.InferInput("IMAGE", [1], "BYTES")
        image.set_data_from_numpy(np.array([PNG], dtype=object))
        for algorithm in ("gzip", "deflate"):
            result = client.infer("scenes", [image], request_compression_algorithm=algorithm)
            assert [c.decode() for c in result.as_numpy("CAPTION")] == reference.caption(PNG)
        weird = requests.post(infer, data=b"x", headers={"Content-Encoding": "br"}, timeout=10)
        assert weird.status_code == 400 and "not supported" in weird.json()["error"]

        twice = requests.post(f"{url}/v1/caption?num_beams=4&num_beams=1", data=PNG, timeout=60)
        assert twice.status_code == 400 and "given twice" in twice.json()["error"]
        same = requests.post(f"{url}/v1/caption?num_beams=2&num_beams=2", data=PNG, timeout=60)
        assert same.json()["captions"] == reference.caption(PNG, num_beams=2)

        part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        kind = {"Content-Type": "Multipart/Form-Data; boundary=b"}  # any case
        whole = requests.post(f"{url}/v1/caption", data=part + PNG + b"\r\n--b--\r\n", headers=kind)
        assert whole.json()["captions"] == reference.caption(PNG)
        cut = requests.post(f"{url}/v1/caption", data=part + PNG[:40], headers=kind, timeout=60)
        assert cut.status_code == 400 and "truncated" in cut.json()["error"]

        late = requests.post(infer, json=triton_json(timeout=1), timeout=60)
        assert late.status_code == 504 and "1e-06 s" in late.json()["error"]


def test_a_very_large_photo_is_captioned_as_the_library_captions_it(reference, tmp_path):
    """Over 16.7 megapixels the library decodes a JPEG reduced; the server did not, and its
    caption differed."""
    from PIL import Image

    side = 4200
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    pixels = np.stack(
        [
            ramp[:, None] + 0 * ramp,
            ramp[None, :] + 0 * ramp[:, None],
            255 - ramp[:, None] + 0 * ramp,
        ],
        -1,
    )
    path = tmp_path / "big.jpg"
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=80)
    with serve() as live:
        served = live.service._prepare([path.read_bytes()])  # what the server feeds the engine
        np.testing.assert_array_equal(served, reference.preprocess([path]))
        answer = caption(live.url, path.read_bytes())
        assert answer.status_code == 200, answer.text
        assert answer.json()["captions"] == reference.caption(path)
