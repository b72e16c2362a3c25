"""Where a generation's time goes: ONNX Runtime's per-operator profile plus the time between steps.

    python -m benchmarks.profile EXPORT_DIR [--beams 4] [--new-tokens 16] [--threads 2]

Runs one `generate()` with the vedrt runtime to split wall time into graph time and everything
else (search, copies, Python), then profiles the decoder step (`SessionOptions.enable_profiling`)
at the same shapes and sums kernel time by operator type. What PROFILE.md is written from.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from vedrt.manifest import read_manifest


def _session(path: Path, threads: int, profile_prefix: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.force_spinning_stop", "1")  # as the runtime's
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    from vedrt.runtime.executor import SKIP_LAYER_NORM  # as the runtime's sessions

    return ort.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=SKIP_LAYER_NORM
    )


def split_generate(
    export_dir: Path, beams: int, new_tokens: int, threads: int, reps: int = 3
) -> dict:
    """Median wall time of generate() and how much of it the graphs themselves took."""
    from vedrt.runtime import load

    gen = load(export_dir, threads=threads)
    ex = gen.executor
    spent = defaultdict(float)
    # every image encode runs `encode_into` (admission writes into the pool's slots through it)
    for name, method in (("encode", "encode_into"), ("decode", "decode")):
        inner = getattr(ex, method)

        def timed(*a, _inner=inner, _name=name, **k):
            t = time.perf_counter()
            out = _inner(*a, **k)
            spent[_name] += time.perf_counter() - t
            return out

        setattr(ex, method, timed)
    size = gen.manifest.image_size
    pixels = np.random.default_rng(0).standard_normal((1, 3, *size), dtype=np.float32)
    options = dict(num_beams=beams, min_new_tokens=new_tokens, max_new_tokens=new_tokens)
    gen.generate(pixels, **options)
    runs = []
    for _ in range(reps):
        spent.clear()
        t = time.perf_counter()
        gen.generate(pixels, **options)
        total = time.perf_counter() - t
        runs.append({"total_s": total, **{f"{k}_s": v for k, v in spent.items()}})
    keys = runs[0].keys()
    med = {k: float(np.median([r.get(k, 0.0) for r in runs])) for k in keys}
    med["search_and_rest_s"] = med["total_s"] - sum(v for k, v in med.items() if k != "total_s")
    return med


def profile_decoder(export_dir: Path, beams: int, past: int, threads: int, steps: int = 10) -> dict:
    """Kernel time per operator type for one decoder step (beam rows, `past` cached positions)."""
    manifest = json.loads((export_dir / "vedrt.json").read_text())
    dec = manifest["decoder"]
    layers, heads, hd = dec["num_layers"], dec["num_heads"], dec["head_dim"]
    enc_len = manifest["encoder"]["enc_len"]
    rng = np.random.default_rng(0)
    feed = {
        "input_ids": np.full((beams, 1), 5, np.int64),
        "past_lengths": np.full(beams, past, np.int64),
        "group_slots": np.zeros(1, np.int64),  # exports before 2026-12-06: one slot, one group
        "encoder_mask": np.ones((1, enc_len), np.int64),
    }
    for i in range(layers):
        for kv in ("key", "value"):
            feed[f"self_{kv}.{i}"] = rng.standard_normal(
                (beams, heads, past + 8, hd), dtype=np.float32
            )
            feed[f"cross_{kv}.{i}"] = rng.standard_normal((1, heads, enc_len, hd), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        # the graph the runtime steps: the one without attention outputs where the export has it
        parsed = read_manifest(export_dir)
        step = parsed.decoder_without_attentions or parsed.graph_files["decoder"]
        session = _session(step, threads, str(Path(tmp) / "decoder"))
        declared = {i.name for i in session.get_inputs()}
        feed = {name: value for name, value in feed.items() if name in declared}
        for _ in range(3):
            session.run(None, feed)
        started = time.perf_counter()
        for _ in range(steps):
            session.run(None, feed)
        wall = (time.perf_counter() - started) / steps
        events = json.loads(Path(session.end_profiling()).read_text())
    by_op: dict[str, float] = defaultdict(float)
    runs = 0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"].get("op_name", "?")] += e["dur"] / 1e6
        if e.get("cat") == "Session" and e["name"] == "model_run":
            runs += 1
    per_step = {op: t / max(runs, 1) for op, t in sorted(by_op.items(), key=lambda kv: -kv[1])}
    return {
        "step_wall_s": wall,
        "kernel_s_by_op": per_step,
        "kernel_total_s": sum(per_step.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.profile", description=__doc__.splitlines()[0]
    )
    parser.add_argument("export_dirs", nargs="+", type=Path)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    for export_dir in args.export_dirs:  # before any work: one line, not a traceback mid-run
        if not (export_dir / "vedrt.json").is_file():
            parser.error(f"{export_dir}: not a vedrt export (no vedrt.json)")
    result = {}
    for export_dir in args.export_dirs:
        result[str(export_dir)] = {
            "generate": split_generate(export_dir, args.beams, args.new_tokens, args.threads),
            "decoder_step": profile_decoder(export_dir, args.beams, 8, args.threads),
        }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
