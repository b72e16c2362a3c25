"""Engine benchmark: continuous batching against one request at a time, and the host's share.

    python -m benchmarks.engine [--models scenes vit-gpt2] [--threads 1] [--reps 5]

For each model, in one process:
1. throughput: 8 single-image beam-4 requests submitted together to one engine, against the same
   8 run one after another through `generate()`; images/s, median of interleaved repetitions;
   every caption from the engine is checked against its solo run before any time is reported;
2. host share: an engine holding 32 active rows (8 requests x beam 4, lengths forced so none
   leaves), the time of each steady step outside the decoder graph (search, reorders, writes,
   bookkeeping) as a share of the whole step.
Writes benchmarks/results/engine.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from .report import load_line, machine, machine_line

RESULTS = Path(__file__).resolve().parent / "results"
WORK = Path(__file__).resolve().parent.parent / "runs" / "bench"


def _generator(name: str, threads: int):
    from vedrt.runtime import load

    from .models import prepare

    spec = prepare(name, WORK, ("fp32",), print)
    if spec is None:
        raise SystemExit(f"model {name} is not available")
    return spec, load(spec.exports["fp32"], threads=threads)


def _pixels(spec, count: int) -> np.ndarray:
    from .models import pixel_values

    return pixel_values(spec, count, seed=1)


def _engine_run(gen, pixels: np.ndarray, options: dict) -> tuple[float, list[np.ndarray]]:
    engine = gen.engine(max_rows=32)
    began = time.perf_counter()
    handles = [engine.submit(pixels[i : i + 1], **options) for i in range(len(pixels))]
    while not engine.idle():
        engine.step()
    return time.perf_counter() - began, [h.result() for h in handles]


def _solo_run(gen, pixels: np.ndarray, options: dict) -> tuple[float, list[np.ndarray]]:
    began = time.perf_counter()
    out = [gen.generate(pixels[i : i + 1], **options) for i in range(len(pixels))]
    return time.perf_counter() - began, out


def throughput(gen, pixels: np.ndarray, reps: int, max_new: int) -> dict:
    options = {"num_beams": 4, "max_new_tokens": max_new}
    _, solo = _solo_run(gen, pixels, options)  # warm-up, and the reference captions
    _, batched = _engine_run(gen, pixels, options)
    identical = sum(np.array_equal(a, b) for a, b in zip(solo, batched, strict=True))
    engine_s, solo_s = [], []
    for rep in range(reps):  # interleaved, each going first in turn: drift hits both alike
        for run in (_engine_run, _solo_run) if rep % 2 == 0 else (_solo_run, _engine_run):
            (engine_s if run is _engine_run else solo_s).append(run(gen, pixels, options)[0])
    n = len(pixels)
    return {
        "requests": n,
        "identical_to_solo": f"{identical}/{n}",
        "engine_images_per_s": n / statistics.median(engine_s),
        "solo_images_per_s": n / statistics.median(solo_s),
        "speedup": statistics.median(solo_s) / statistics.median(engine_s),
    }


def host_share(gen, pixels: np.ndarray, steps: int, staggered: bool) -> dict:
    """Steady steps at 32 active rows: (step - decoder graph) / step, median over the steps.

    Together: the 8 requests arrive at once and share one search (a cohort). Staggered: one
    arrives per step; with these options each joins the running search at its own length, so
    the host still runs one search (the count is reported, not assumed)."""
    engine = gen.engine(max_rows=32)
    length = steps + 10
    options = {"num_beams": 4, "max_new_tokens": length, "eos_token_id": None}  # none leaves
    for i in range(8):
        engine.submit(pixels[i % len(pixels) : i % len(pixels) + 1], **options)
        if staggered:
            engine.step()
    engine.step()  # the last admission (encoder) and its first step, not counted
    shares, step_ms = [], []
    for _ in range(steps):
        before = dict(engine.stats)
        engine.step()
        step = engine.stats["step_seconds"] - before["step_seconds"]
        graph = engine.stats["decode_seconds"] - before["decode_seconds"]
        assert engine.stats["rows_last_step"] == 32
        shares.append((step - graph) / step)
        step_ms.append(step * 1e3)
    searches = engine.active_requests
    engine.stop(drain=False)
    return {
        "arrival": "staggered" if staggered else "together",
        "searches": searches,
        "rows": 32,
        "step_ms": statistics.median(step_ms),
        "host_ms": statistics.median(s * t for s, t in zip(shares, step_ms, strict=True)),
        "host_share": statistics.median(shares),
    }


def _markdown(results: dict) -> str:
    lines = [
        "# Engine: continuous batching vs one request at a time",
        "",
        f"{machine_line(results['machine'])}; {results['threads']} ONNX Runtime thread(s); "
        f"{load_line(results['load_average'], results['load_average_after'], results['machine']['cores'])}; "
        f"median of {results['reps']} interleaved repetitions, each mode first in turn.",
        "",
        "| model | 8 x beam-4 requests: engine | one at a time | speedup | identical "
        "| step at 32 rows, arrived together | outside the graph | arrived one per step "
        "| outside the graph | searches then |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["models"].items():
        t, h, g = r["throughput"], r["host"], r["host_staggered"]
        lines.append(
            f"| {name} | {t['engine_images_per_s']:.1f} img/s | {t['solo_images_per_s']:.1f} "
            f"img/s | {t['speedup']:.2f}x | {t['identical_to_solo']} | {h['step_ms']:.1f} ms "
            f"| {h['host_ms']:.2f} ms ({100 * h['host_share']:.1f}%) | {g['step_ms']:.1f} ms "
            f"| {g['host_ms']:.2f} ms ({100 * g['host_share']:.1f}%) | {g.get('searches', 8)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__)
    parser.add_argument("--models", nargs="+", default=["scenes", "vit-gpt2"])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    results = {
        "machine": machine(),
        "threads": args.threads,
        "reps": args.reps,
        "load_average": os.getloadavg()[0],
        "models": {},
    }
    for name in args.models:
        spec, gen = _generator(name, args.threads)
        pixels = _pixels(spec, 8)
        print(f"{name}: throughput ...", flush=True)
        result = {"throughput": throughput(gen, pixels, args.reps, args.max_new_tokens)}
        print(f"{name}: host share ...", flush=True)
        result["host"] = host_share(gen, pixels, steps=12, staggered=False)
        result["host_staggered"] = host_share(gen, pixels, steps=12, staggered=True)
        results["models"][name] = result
        print(json.dumps(result, indent=1), flush=True)
    results["load_average_after"] = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "engine.md").write_text(_markdown(results))
    print(_markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
