"""ONNX Runtime session options against peak RSS and speed, and the encoder against its GEMM rate.

    python -m benchmarks.sessions memory EXPORT_DIR [--rounds 3] [--threads 2]
    python -m benchmarks.sessions encoder EXPORT_DIR [--rounds 5]

`memory`: each option set runs in a fresh process (its RSS is its own): load the export with the
vedrt runtime, every session built with the option set applied on top of vedrt's own options
(`onnxruntime.InferenceSession` wrapped in that process only), one untimed generation, then timed
generations (batch 1, beam 4, 16 new tokens). It reports RSS after load (anonymous and
file-backed), peak RSS (`VmHWM`), the median generation, encoder and decoder-step times, and the
fp32 weight bytes of the export (its `.onnx.data` files). Rounds interleave the option sets so a
shared machine's noise lands on each alike.

`encoder`: encoder.onnx alone at batch 1, for intra-op threads 1 and 2 and thread spinning on and
off; each next to the fp32 GEMM rate of the encoder's own shapes (`benchmarks.roofline`) at the same
setting, so the ratio says how far the encoder graph is from running all its FLOPs at GEMM speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# name -> (SessionOptions attributes, session config entries, shared env allocator)
OPTION_SETS: dict[str, tuple[dict, dict, bool]] = {
    "vedrt default": ({}, {}, False),
    "no CPU arena": ({"enable_cpu_mem_arena": False}, {}, False),
    "no memory pattern": ({"enable_mem_pattern": False}, {}, False),
    "no arena, no pattern": (
        {"enable_cpu_mem_arena": False, "enable_mem_pattern": False},
        {},
        False,
    ),
    "shared env arena": ({}, {"session.use_env_allocators": "1"}, True),
    "initializers via allocator": (
        {},
        {"session.use_device_allocator_for_initializers": "1"},
        False,
    ),
    "no prepacking": ({}, {"session.disable_prepacking": "1"}, False),
}


def _status() -> dict[str, float]:
    """This process's memory counters from /proc/self/status, in MB (10^6 bytes)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) * 1024 / 1e6
    return out


def mapped_rss() -> dict[str, float]:
    """Resident MB per mapped file (weights, libraries) and of anonymous memory, from smaps."""
    out: dict[str, float] = {}
    name = "[anon]"
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            path = head[5] if len(head) > 5 else ""
            name = Path(path).name if path.startswith("/") else "[anon]"
        elif head and head[0] == "Rss:":
            out[name] = out.get(name, 0.0) + int(head[1]) * 1024 / 1e6
    big = {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v >= 5}
    big["other files"] = round(sum(v for k, v in out.items() if k not in big), 1)
    return big


def _patch_sessions(attributes: dict, config: dict, env_arena: bool) -> None:
    """Apply an option set to every InferenceSession this process builds (vedrt's included)."""
    import onnxruntime as ort

    if env_arena:
        info = ort.OrtMemoryInfo(
            "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
        )
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
    real = ort.InferenceSession

    def session(path, sess_options=None, providers=None, **kw):
        options = sess_options or ort.SessionOptions()
        for name, value in attributes.items():
            setattr(options, name, value)
        for name, value in config.items():
            options.add_session_config_entry(name, value)
        return real(path, sess_options=options, providers=providers, **kw)

    ort.InferenceSession = session


def _child(request: dict) -> dict[str, Any]:
    """One option set in this process: load, generate, measure (see the module doc)."""
    attributes, config, env_arena = OPTION_SETS[request["option_set"]]
    _patch_sessions(attributes, config, env_arena)
    from vedrt.runtime import load

    started = time.perf_counter()
    gen = load(request["export"], threads=request["threads"])
    load_s = time.perf_counter() - started
    after_load, after_load_map = _status(), mapped_rss()
    spent: dict[str, list[float]] = {"encode": [], "decode": []}
    # every image encode runs `encode_into` (admission writes into the pool's slots through it)
    for name, method in (("encode", "encode_into"), ("decode", "decode")):
        inner = getattr(gen.executor, method)

        def timed(*a, _inner=inner, _name=name, **k):
            t = time.perf_counter()
            out = _inner(*a, **k)
            spent[_name].append(time.perf_counter() - t)
            return out

        setattr(gen.executor, method, timed)
    size = gen.manifest.image_size
    pixels = np.random.default_rng(0).standard_normal((1, 3, *size), dtype=np.float32)
    options = dict(num_beams=4, min_new_tokens=16, max_new_tokens=16)
    gen.generate(pixels, **options)
    for values in spent.values():
        values.clear()
    totals = []
    for _ in range(request["generations"]):
        t = time.perf_counter()
        gen.generate(pixels, **options)
        totals.append(time.perf_counter() - t)
    return {
        "load_s": load_s,
        "rss_after_load_mb": after_load["VmRSS"],
        "anon_after_load_mb": after_load["RssAnon"],
        "file_after_load_mb": after_load["RssFile"],
        "peak_rss_mb": _status()["VmHWM"],
        "mapped_after_load_mb": after_load_map,
        "mapped_after_run_mb": mapped_rss(),
        "generate_s": float(np.median(totals)),
        "encoder_s": float(np.median(spent["encode"])),
        "step_s": float(np.median(spent["decode"])),
    }


def weight_bytes(export_dir: Path) -> int:
    """The export's fp32 weights: its external-data files (what ORT maps)."""
    return sum(p.stat().st_size for p in Path(export_dir).glob("*.onnx.data"))


def memory(
    export_dir: Path,
    rounds: int,
    threads: int,
    generations: int,
    names: tuple[str, ...] = tuple(OPTION_SETS),
) -> dict[str, Any]:
    """Every option set, `rounds` fresh processes each, interleaved; medians per option set."""
    runs: dict[str, list[dict]] = {name: [] for name in names}
    names = list(names)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            request = {
                "option_set": name,
                "export": str(export_dir),
                "threads": threads,
                "generations": generations,
            }
            done = subprocess.run(
                [sys.executable, "-m", "benchmarks.sessions", "child", json.dumps(request)],
                capture_output=True,
                text=True,
                timeout=600,
                cwd=Path(__file__).resolve().parent.parent,
            )
            if done.returncode:
                runs[name].append({"error": done.stderr.strip().splitlines()[-1:]})
                continue
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}: {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
    weights = weight_bytes(export_dir) / 1e6
    table = {}
    for name, results in runs.items():
        good = [x for x in results if "error" not in x]
        if not good:
            table[name] = {"error": results[0]["error"] if results else "no run"}
            continue
        numbers = [k for k, v in good[0].items() if isinstance(v, float)]
        med = {k: float(np.median([x[k] for x in good])) for k in numbers}
        med |= {k: v for k, v in good[-1].items() if k not in numbers}  # smaps: the last run's
        med["peak_over_weights"] = med["peak_rss_mb"] / weights
        table[name] = med
    return {"weights_mb": weights, "rounds": rounds, "threads": threads, "option_sets": table}


def _encoder_session(path: Path, threads: int, spinning: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    from vedrt.runtime.executor import SKIP_LAYER_NORM  # as the runtime's sessions

    return ort.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=SKIP_LAYER_NORM
    )


def encoder(export_dir: Path, rounds: int) -> dict[str, Any]:
    """encoder.onnx time vs its FLOPs at the GEMM rate of its shapes, per thread setting."""
    from .roofline import GraphCost, graph_cost, model_shapes

    manifest = json.loads((export_dir / "vedrt.json").read_text())
    seq, hidden = manifest["encoder"]["enc_len"], manifest["encoder"]["hidden_size"]
    size = tuple(manifest["encoder"]["image_size"])
    cost: GraphCost = graph_cost(export_dir / "encoder.onnx", size)
    flops = 2 * seq * cost.fp32_weight_elems + cost.conv_flops
    flops += cost.attention_matmuls * 2 * seq * seq * hidden
    shapes = [s for s in model_shapes(export_dir) if s[0] == seq]
    pixels = np.random.default_rng(0).standard_normal((1, 3, *size), dtype=np.float32)
    settings = [(t, s) for t in (1, 2) for s in (True, False)]
    sessions = {k: _encoder_session(export_dir / "encoder.onnx", *k) for k in settings}
    gemms = {k: _gemm_sessions(shapes, *k) for k in settings}
    times: dict[tuple, list[float]] = {k: [] for k in settings}
    rates: dict[tuple, list[float]] = {k: [] for k in settings}
    for key in settings:  # warm-up: the encoders and the GEMMs alike (first runs allocate)
        sessions[key].run(None, {"pixel_values": pixels})
        _shaped_rate(gemms[key], seq)
    for r in range(rounds):
        for key in settings[r % 4 :] + settings[: r % 4]:
            started = time.perf_counter()
            sessions[key].run(None, {"pixel_values": pixels})
            times[key].append(time.perf_counter() - started)
            rates[key].append(_shaped_rate(gemms[key], seq))
    out = []
    for key in settings:
        seconds, rate = float(np.median(times[key])), float(np.median(rates[key]))
        out.append(
            {
                "threads": key[0],
                "spinning": key[1],
                "encoder_s": seconds,
                "gflop_per_s": flops / seconds / 1e9,
                "shaped_gemm_gflop_per_s": rate / 1e9,
                "encoder_over_gemm_rate": flops / seconds / rate,
            }
        )
    return {
        "encoder_gflop": flops / 1e9,
        "rounds": rounds,
        "load_average": os.getloadavg()[0],
        "settings": out,
    }


def _gemm_sessions(shapes: list[tuple[int, int, int]], threads: int, spinning: bool) -> list:
    """fp32 MatMul sessions of the encoder's shapes at one thread setting."""
    import onnxruntime as ort

    from .roofline import _gemm_model

    out = []
    for m, k, n in shapes:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if spinning else "0"
        )
        session = ort.InferenceSession(
            _gemm_model(k, n, int8=False).SerializeToString(),
            options,
            providers=["CPUExecutionProvider"],
        )
        a = np.random.default_rng(1).standard_normal((m, k), dtype=np.float32)
        out.append((session, a, 2 * m * k * n))
    return out


def _shaped_rate(gemms: list, seq: int) -> float:
    """FLOP/s of the encoder's shapes run once each (one of each, as a layer would)."""
    flops, started = 0, time.perf_counter()
    for session, a, count in gemms:
        session.run(None, {"a": a})
        flops += count
    return flops / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "child":
        print(json.dumps(_child(json.loads(args[1]))))
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.sessions", description=__doc__.splitlines()[0]
    )
    parser.add_argument("what", choices=["memory", "encoder"])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--generations", type=int, default=3)
    ns = parser.parse_args(args)
    print(f"load average {os.getloadavg()}", file=sys.stderr)
    if ns.what == "memory":
        result = memory(ns.export_dir, ns.rounds, ns.threads, ns.generations)
    else:
        result = encoder(ns.export_dir, ns.rounds)
    result["load_average_end"] = os.getloadavg()[0]
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
