"""Runs the backends side by side: one worker process each, same inputs, interleaved repetitions.

All workers of a model are started one after another (so load times do not overlap) and stay up for
every setting. For each setting the first call per backend returns its tokens, which are compared
with the reference's (transformers fp32) before anything is timed; then warm-ups, then the timed
repetitions round-robin across backends, the starting backend rotating each round, so that the
noise of a shared machine lands on every backend alike and ratios from one run are fair.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .backends import Backend, ModelSpec
from .models import pixel_values
from .progress import Progress


@dataclass(frozen=True)
class Setting:
    batch: int
    beams: int
    new_tokens: int

    @property
    def label(self) -> str:
        search = "greedy" if self.beams == 1 else f"beam {self.beams}"
        return f"batch {self.batch}, {search}, {self.new_tokens} new tokens"

    def options(self) -> dict[str, Any]:
        """The same work for every backend: a fixed number of new tokens, no sampling."""
        return {
            "num_beams": self.beams,
            "do_sample": False,
            "min_new_tokens": self.new_tokens,
            "max_new_tokens": self.new_tokens,
        }


class Worker:
    """A backend's process (see `benchmarks.worker`)."""

    def __init__(self, backend: Backend, spec: ModelSpec, threads: int, device: str, log: Path):
        request = {
            "backend": backend.key,
            "device": device,
            "threads": threads,
            "spec": {
                "name": spec.name,
                "checkpoint": str(spec.checkpoint) if spec.checkpoint else None,
                "exports": {k: str(v) for k, v in spec.exports.items()},
                "image_size": list(spec.image_size),
                "work_dir": str(spec.work_dir),
            },
        }
        self.backend, self.log = backend, log
        self.error: str | None = None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.worker", json.dumps(request)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            tail = self.log.read_text().strip().splitlines()[-1:] or ["no output"]
            self.error = f"worker exited ({tail[0][:300]})"
            return {}
        reply = json.loads(line)
        self.error = reply.get("error")
        return reply

    def generate(self, inputs: Path, options: dict, tokens: bool = False) -> dict:
        if self.error:
            return {}
        self.proc.stdin.write(
            json.dumps({"inputs": str(inputs), "options": options, "tokens": tokens}) + "\n"
        )
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def agreement(tokens: list, reference: list | None) -> float | None:
    """Share of sequences identical to the reference's (None without a reference)."""
    if reference is None or not tokens:
        return None
    ours, ref = np.asarray(tokens), np.asarray(reference)
    if ours.shape != ref.shape:
        return 0.0
    return float((ours == ref).all(axis=1).mean())


def _summarize(runs: list[dict], setting: Setting) -> dict[str, Any]:
    """Latency percentiles, throughput and the per-phase medians of one backend's timed runs."""
    seconds = np.array([r["seconds"] for r in runs])
    out: dict[str, Any] = {
        "runs_s": seconds.round(5).tolist(),
        "p50_s": float(np.percentile(seconds, 50)),
        "p90_s": float(np.percentile(seconds, 90)),
        "p99_s": float(np.percentile(seconds, 99)),
    }
    out["images_per_s"] = setting.batch / out["p50_s"]
    out["tokens_per_s"] = setting.batch * setting.new_tokens / out["p50_s"]
    timed = [r for r in runs if {"encoder_s", "first_step_s"} <= set(r["timings"])]
    if timed:
        enc = [r["timings"]["encoder_s"] for r in timed]
        first = [r["timings"]["first_step_s"] for r in timed]
        rest = [
            (r["seconds"] - r["timings"]["encoder_s"] - r["timings"]["first_step_s"])
            / max(setting.new_tokens - 1, 1)
            for r in timed
        ]
        out |= {
            "encoder_s": float(np.median(enc)),
            "first_step_s": float(np.median(first)),
            "per_token_s": float(np.median(rest)),
        }
    return out


def run_setting(
    workers: list[Worker],
    spec: ModelSpec,
    setting: Setting,
    reps: int,
    warmups: int,
    tmp: Path,
    bar: Progress,
    settle: float = 0.0,
) -> dict[str, dict]:
    """Check tokens, warm up, then time `reps` interleaved rounds; results by backend key.

    `settle` seconds pass before every warm-up and timed call: a backend's threads may go on
    spinning after its call returns (PyTorch's OpenMP workers do, for some milliseconds), and
    the next backend's timing must not pay for them (ViT-GPT2 right after a PyTorch generation:
    encoder 232 vs 226 ms, generation 606 vs 596 ms with 0.3 s between, interleaved)."""
    inputs = tmp / f"{spec.name}-{setting.batch}.npy"
    if not inputs.exists():
        np.save(inputs, pixel_values(spec, setting.batch))
    options = setting.options()
    live = [w for w in workers if not w.error]
    reference = None
    results: dict[str, dict] = {}
    for w in live:  # the reference is first in the list
        reply = w.generate(inputs, options, tokens=True)
        bar.step(f"{w.backend.key} token check")
        if w.backend.reference and "tokens" in reply:
            reference = reply["tokens"]
        results[w.backend.key] = {
            "agreement": agreement(reply.get("tokens", []), reference),
            "runs": [],
        }
    for _ in range(warmups):
        for w in live:
            time.sleep(settle)
            w.generate(inputs, options)
            bar.step(f"{w.backend.key} warm-up")
    for r in range(reps):
        order = live[r % len(live) :] + live[: r % len(live)]
        for w in order:
            time.sleep(settle)
            reply = w.generate(inputs, options)
            bar.step(f"{setting.label}: {w.backend.key}")
            if "seconds" in reply:
                results[w.backend.key]["runs"].append(reply)
    for w in live:
        entry = results[w.backend.key]
        runs = entry.pop("runs")
        if w.error or not runs:
            entry["error"] = w.error or "no successful run"
            continue
        entry |= _summarize(runs, setting)
        entry["peak_rss_mb"] = max(r["rss_mb"] for r in runs)
    return results


def run_model(
    spec: ModelSpec,
    backends: list[Backend],
    settings: list[Setting],
    *,
    reps: int,
    warmups: int,
    threads: int,
    device: str,
    log_dir: Path,
    settle: float = 0.0,
) -> dict[str, Any]:
    """Every setting of one model, every backend; what the report needs."""
    info: dict[str, dict] = {}
    runnable = []
    for b in backends:
        reason = b.skip_reason(spec)
        info[b.key] = {"name": b.name, "precision": b.precision, "device": b.device}
        if reason:
            info[b.key]["skipped"] = reason
        else:
            runnable.append(b)
    calls = len(settings) * len(runnable) * (1 + warmups + reps)
    bar = Progress(calls + len(runnable), f"{spec.name}")
    workers = []
    try:
        for b in runnable:
            w = Worker(b, spec, threads, device, log_dir / f"{spec.name}-{b.key}.log")
            bar.step(f"loaded {b.key}")
            workers.append(w)
            info[b.key]["load_s"] = w.ready.get("load_s")
            info[b.key]["disk_bytes"] = b.disk_bytes(spec) if b.disk_bytes else None
            if w.error:
                info[b.key]["error"] = w.error
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for setting in settings:
                per_backend = run_setting(
                    workers, spec, setting, reps, warmups, Path(tmp), bar, settle
                )
                rows += [
                    {"setting": asdict(setting), "backend": k, **v} for k, v in per_backend.items()
                ]
    finally:
        for w in workers:
            w.close()
        bar.close()
    return {
        "model": spec.name,
        "image_size": list(spec.image_size),
        "backends": info,
        "results": rows,
    }
