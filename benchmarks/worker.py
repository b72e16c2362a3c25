"""One backend in its own process, driven over a pipe, so its peak RSS and load time are its own.

The parent starts `python -m benchmarks.worker '<json>'` and exchanges one JSON object per line:
the worker answers `{"ready": ..., "load_s": ...}` once loaded, then one reply per request
`{"inputs": "x.npy", "options": {...}, "tokens": bool}` with the wall time, the backend's timings
and the peak RSS so far; an empty line or EOF ends it. Libraries print to stdout, so the protocol
gets its own copy of the original stdout and everything else goes to stderr.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

import numpy as np


def peak_rss_mb() -> float:
    """This process's peak resident set in MB (10^6 bytes).

    `VmHWM` belongs to the process's own memory map, which exec starts afresh; `ru_maxrss` would
    carry over the parent's peak from the fork (Linux keeps it across exec), so it is the fallback.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def _spec(data: dict):
    from .backends import ModelSpec

    return ModelSpec(
        name=data["name"],
        checkpoint=Path(data["checkpoint"]) if data["checkpoint"] else None,
        exports={k: Path(v) for k, v in data["exports"].items()},
        image_size=tuple(data["image_size"]),
        work_dir=Path(data["work_dir"]),
    )


def _serve(request: dict, reply) -> None:
    from .backends import REGISTRY, load_device_modules

    load_device_modules(request["device"])
    backend = REGISTRY[request["backend"]]
    spec = _spec(request["spec"])
    started = time.perf_counter()
    runner = backend.load(spec, request["threads"])
    load_s = time.perf_counter() - started - getattr(runner, "excluded_load_s", 0.0)
    reply({"ready": True, "load_s": load_s, "rss_mb": peak_rss_mb()})
    for line in sys.stdin:
        if not line.strip():
            break
        job = json.loads(line)
        pixel_values = np.load(job["inputs"])
        started = time.perf_counter()
        tokens = runner.generate(pixel_values, **job["options"])
        seconds = time.perf_counter() - started
        out = {
            "seconds": seconds,
            "timings": dict(getattr(runner, "timings", {}) or {}),
            "rss_mb": peak_rss_mb(),
        }
        if job.get("tokens"):
            out["tokens"] = np.asarray(tokens).tolist()
        reply(out)


def main() -> int:
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything printed by libraries, C or Python, lands on stderr
    sys.stdout = sys.stderr

    def reply(obj: dict) -> None:
        channel.write(json.dumps(obj) + "\n")
        channel.flush()

    try:
        _serve(json.loads(sys.argv[1]), reply)
    except Exception as exc:  # the parent reports it and goes on with the other backends
        traceback.print_exc()
        reply(
            {"error": f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"}
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
