"""`python -m benchmarks.serve`: vedrt serve under load, continuous batching against two baselines.

Closed-loop clients (1, 2, 4, 8, 16, 32 at once, each sending its next request when the last is
answered) against three servers that share the HTTP stack and differ only in the engine:
  continuous  vedrt's engine: requests join the running batch at every decoder step
  one         one request at a time, in arrival order
  dynamic     collect requests for up to --window-ms, run one generate() for the group (Triton's
              and Ray Serve's dynamic batchers)
Each server runs in its own process (the load generator would otherwise share its GIL); all are
up at once and each point runs --repeat times with the modes interleaved, so drift in the
machine's load hits every mode alike. Every answer is checked against the solo answer of its
image; images/s (median run) and p50/p90/p99 (over all runs' requests) go to JSON/MD/PNG under
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .report import load_line, machine, machine_line

REPO = Path(__file__).resolve().parent.parent
PERCENTILE_REQUESTS = {"p90_ms": 10, "p99_ms": 100}  # fewest requests behind a tail percentile
OUT = Path(__file__).resolve().parent / "results"
MODES = ("continuous", "one", "dynamic")


# -- one server process ---------------------------------------------------------------------
def serve_process(args: argparse.Namespace) -> int:
    from vedrt.runtime import load
    from vedrt.serve.app import build_app
    from vedrt.serve.cli import serve
    from vedrt.serve.service import ServeOptions, Service

    options = ServeOptions(
        model=args.model,
        max_rows=args.max_rows,
        admit_every=args.admit_ms / 1000,
        threads=args.threads,
        encode_ahead=args.encode_ahead,
        max_queue=256,
        request_timeout=600,
    )
    generator = load(args.model, threads=args.threads)
    engine = None
    from .serve_baselines import DynamicBatcher, OneAtATime

    if args.serve_mode == "one":
        engine = OneAtATime(generator, args.max_rows)
    elif args.serve_mode == "dynamic":
        DynamicBatcher.window = args.window_ms / 1000
        engine = DynamicBatcher(generator, args.max_rows)
    serve(build_app(service=Service(options, generator, engine)), "127.0.0.1", args.port)
    return 0


# -- the load generator ---------------------------------------------------------------------
async def _one_client(port: int, bodies: list[tuple[bytes, Any]], latencies: list, wrong: list):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for request, expected in bodies:
            start = time.perf_counter()
            writer.write(request)
            await writer.drain()
            status = (await reader.readline()).split()[1]
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            body = await reader.readexactly(length)
            latencies.append(time.perf_counter() - start)
            if status != b"200" or _answer(body) != expected:
                wrong.append(body[:200])
    finally:
        writer.close()


def _answer(body: bytes) -> Any:
    data = json.loads(body)
    if "captions" in data:
        return data["captions"]
    return [o["data"] for o in data["outputs"]]


def _request(path: Path, query: str, tokens_only: bool, model: str) -> bytes:
    """A keep-alive HTTP/1.1 request: /v1/caption, or v2 infer asking for TOKENS (no tokenizer)."""
    data = path.read_bytes()
    if tokens_only:
        import base64

        body = json.dumps(
            {
                "inputs": [
                    {
                        "name": "IMAGE",
                        "datatype": "BYTES",
                        "shape": [1],
                        "data": [base64.b64encode(data).decode()],
                    }
                ],
                "outputs": [{"name": "TOKENS"}],
                "parameters": json.loads(query),
            }
        ).encode()
        target, kind = f"/v2/models/{model}/infer", "application/json"
    else:
        body, kind = data, "image/png"
        target = "/v1/caption?" + "&".join(f"{k}={v}" for k, v in json.loads(query).items())
    head = (
        f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {kind}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def expected_answers(args: argparse.Namespace, images: list[Path]) -> dict[Path, Any]:
    """Solo answers, one image per generate(): what every served answer must equal."""
    from vedrt.runtime import load

    gen = load(args.model, threads=args.threads)
    options = json.loads(args.options)
    if args.tokens_only:
        return {p: [gen.generate(gen.preprocess([p]), **options).ravel().tolist()] for p in images}
    return {p: gen.caption(p, **options) for p in images}


def load_point(port: int, concurrency: int, total: int, requests: list) -> dict[str, Any]:
    per_client = max(2, -(-total // concurrency))
    latencies: list[float] = []
    wrong: list = []
    plans = [
        [requests[(c + i) % len(requests)] for i in range(per_client)] for c in range(concurrency)
    ]

    async def run() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(_one_client(port, p, latencies, wrong) for p in plans))
        return time.perf_counter() - start

    elapsed = asyncio.run(run())
    return {"latencies": latencies, "wrong": len(wrong), "images_per_s": len(latencies) / elapsed}


def summarise(mode: str, concurrency: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Repetitions of one point: the median images/s, percentiles over all their latencies."""
    latencies = [x for run in runs for x in run["latencies"]]
    ms = np.percentile(np.array(latencies) * 1000, [50, 90, 99])
    return {
        "mode": mode,
        "concurrency": concurrency,
        "repetitions": len(runs),
        "requests": len(latencies),
        "wrong": sum(run["wrong"] for run in runs),
        "images_per_s": statistics.median(run["images_per_s"] for run in runs),
        "images_per_s_runs": [round(run["images_per_s"], 1) for run in runs],
        "p50_ms": ms[0],
        "p90_ms": ms[1],
        "p99_ms": ms[2],
    }


def start_server(args: argparse.Namespace, mode: str, port: int) -> subprocess.Popen:
    import requests

    command = [
        sys.executable,
        "-m",
        "benchmarks.serve",
        "--serve-mode",
        mode,
        "--port",
        str(port),
        "--model",
        args.model,
        "--threads",
        str(args.threads),
        "--max-rows",
        str(args.max_rows),
        "--window-ms",
        str(args.window_ms),
        "--admit-ms",
        str(args.admit_ms),
        "--encode-ahead" if args.encode_ahead else "--no-encode-ahead",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    process = subprocess.Popen(command, cwd=REPO, env=env)
    for _ in range(600):
        time.sleep(0.2)
        if process.poll() is not None:
            raise RuntimeError(f"the {mode} server exited with {process.returncode}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).ok:
                return process
        except requests.ConnectionError:
            pass
    process.kill()
    raise RuntimeError(f"the {mode} server did not start")


def bench(args: argparse.Namespace) -> dict[str, Any]:
    import socket

    images = sorted((REPO / "examples").glob("scene*.*"))
    expected = expected_answers(args, images)
    model = Path(args.model).resolve().name
    requests = [(_request(p, args.options, args.tokens_only, model), expected[p]) for p in images]
    points, servers = [], {}
    try:  # every mode's server up at once, idle while another is measured
        for mode in args.modes:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            servers[mode] = (start_server(args, mode, port), port)
            load_point(port, 2, 8, requests)  # warm-up
        load_before = os.getloadavg()[0]
        for concurrency in args.concurrency:
            runs: dict[str, list] = {mode: [] for mode in args.modes}
            for rep in range(args.repeat):  # interleaved, each mode first in turn: drift in the
                # machine's load hits every mode alike
                k = rep % len(args.modes)
                for mode in args.modes[k:] + args.modes[:k]:
                    run = load_point(servers[mode][1], concurrency, args.requests, requests)
                    runs[mode].append(run)
            for mode in args.modes:
                point = summarise(mode, concurrency, runs[mode])
                print(json.dumps(point), flush=True)
                points.append(point)
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(60)
    return {
        "model": args.model,
        "options": json.loads(args.options),
        "threads": args.threads,
        "max_rows": args.max_rows,
        "window_ms": args.window_ms,
        "encode_ahead": args.encode_ahead,
        "repeat": args.repeat,
        "points": points,
        "machine": machine(),
        "load_average": {"start": load_before, "end": os.getloadavg()[0]},
        "rotated": True,  # each mode first in turn (results before 2026-12-06 evening: fixed order)
    }


# -- reporting ------------------------------------------------------------------------------
def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# vedrt serve under load: `{Path(report['model']).name}`, options "
        f"`{json.dumps(report['options'])}`, {report['threads']} engine thread(s), "
        f"max_rows {report['max_rows']}, dynamic window {report['window_ms']} ms",
        "",
        f"Each point: {report.get('repeat', 1)} runs, the modes interleaved"
        + (" (each first in turn)" if report.get("rotated") else "")
        + "; images/s is the median run, latency percentiles are over all runs' requests "
        f"(p90 from {PERCENTILE_REQUESTS['p90_ms']} requests, p99 from "
        f"{PERCENTILE_REQUESTS['p99_ms']}). continuous encodes ahead: "
        f"{report.get('encode_ahead', False)}"
        + (
            " (its encoder runs on a second thread with ONNX Runtime threads of its own, so it "
            "may keep two cores busy where one and dynamic run one generate() at a time)"
            if report.get("encode_ahead")
            else ""
        )
        + ".",
        *_machine_lines(report),
        "",
        *([report["note"], ""] if report.get("note") else []),
        "| concurrency | mode | images/s | p50 ms | p90 ms | p99 ms | wrong |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for p in sorted(report["points"], key=lambda p: (p["concurrency"], MODES.index(p["mode"]))):
        lines.append(
            f"| {p['concurrency']} | {p['mode']} | {_rate(p['images_per_s'])} | "
            f"{p['p50_ms']:.1f} | {_tail(p, 'p90_ms')} | {_tail(p, 'p99_ms')} | {p['wrong']} |"
        )
    return "\n".join(lines) + "\n"


def _tail(point: dict[str, Any], key: str) -> str:
    """A tail percentile only from enough requests (the p99 of 16 is their maximum)."""
    return "-" if point["requests"] < PERCENTILE_REQUESTS[key] else f"{point[key]:.1f}"


def _machine_lines(report: dict[str, Any]) -> list[str]:
    m, load = report.get("machine") or {}, report.get("load_average")
    if "versions" not in m:  # results written before the machine was recorded
        return []
    lines = ["", f"Machine: {machine_line(m)}."]
    if load:
        lines[-1] += f" {load_line(load['start'], load['end'], m['cores'], first=True)}."
    return lines


def _rate(images_per_s: float) -> str:
    return f"{images_per_s:.1f}" if images_per_s >= 10 else f"{images_per_s:.3f}"


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in MODES:
        points = [p for p in report["points"] if p["mode"] == mode]
        if points:
            xs = [p["concurrency"] for p in points]
            left.plot(xs, [p["images_per_s"] for p in points], marker="o", label=mode)
            right.plot(xs, [p["p99_ms"] for p in points], marker="o", label=mode)
    for axis, label in ((left, "images/s"), (right, "p99 latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(f"vedrt serve, {Path(report['model']).name} {json.dumps(report['options'])}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__)
    parser.add_argument("--model", default=str(REPO / "vedrt" / "models" / "scenes"))
    parser.add_argument(
        "--options", default="{}", help="generation options as JSON, e.g. '{\"num_beams\": 4}'"
    )
    parser.add_argument("--concurrency", default="1,2,4,8,16,32")
    parser.add_argument(
        "--requests", type=int, default=96, help="requests per point (at least 2 per client)"
    )
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per point, the modes interleaved (median)"
    )
    parser.add_argument("--threads", type=int, default=1, help="engine ONNX Runtime threads")
    parser.add_argument("--max-rows", type=int, default=32)
    parser.add_argument("--window-ms", type=float, default=5.0, help="dynamic batcher's window")
    parser.add_argument(
        "--admit-ms", type=float, default=0.0, help="engine: ms between admissions (vedrt serve)"
    )
    parser.add_argument(
        "--encode-ahead",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continuous: the engine encodes on a second thread (vedrt serve's default)",
    )
    parser.add_argument(
        "--tokens-only",
        action="store_true",
        help="compare token ids over v2 (exports without a tokenizer, e.g. the ViT-GPT2 shape)",
    )
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--stem", default="serve")
    parser.add_argument("--note", default="", help="a line for the report (the engine's state...)")
    parser.add_argument("--render", type=Path, help="only rewrite MD/PNG from this results JSON")
    parser.add_argument("--serve-mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_mode:
        return serve_process(args)
    if args.render:
        report = json.loads(args.render.read_text())
        report["note"] = args.note or report.get("note", "")
        args.stem = args.render.stem
    else:
        if args.repeat < 1:
            parser.error("--repeat must be at least 1")
        args.concurrency = [int(c) for c in args.concurrency.split(",")]
        args.modes = [m for m in args.modes.split(",") if m]
        report = {**bench(args), "note": args.note}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{args.stem}.md").write_text(markdown(report))
    chart(report, args.out / f"{args.stem}.png")
    print(markdown(report))
    return 0 if all(p["wrong"] == 0 for p in report["points"]) else 1


if __name__ == "__main__":
    sys.exit(main())
