"""The run's outputs: JSON (everything), a Markdown table, a PNG chart, and the machine they ran on.

Speedups are ratios of p50 latencies measured in the same run (interleaved), which is what stays
meaningful on a shared machine; absolute times are for this machine only.
"""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("numpy", "onnxruntime", "onnx", "torch", "transformers", "optimum", "optimum-onnx")


def machine() -> dict[str, Any]:
    """CPU model, core count, memory and the versions that matter for these numbers."""
    cpu = platform.processor() or "unknown"
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("unknown", "x86_64", ""):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        pass
    return {
        "cpu": cpu,
        "gpus": _gpus(),
        "cores": os.cpu_count(),
        "memory_gib": round(mem, 1) if mem else None,
        "avx512_vnni": "avx512_vnni" in flags,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def _gpus() -> list[str]:
    """The GPUs nvidia-smi lists (name, memory), none where it is absent or fails."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def machine_line(m: dict[str, Any]) -> str:
    """`machine()` in one line, for every benchmark's Markdown."""
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    gpus = "".join(f", {gpu}" for gpu in m.get("gpus") or [])
    return (
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB{gpus}; Python {m['python']}; "
        f"{versions}"
    )


def load_line(start: float, end: float, cores: int | None, first: bool = False) -> str:
    """How busy the machine was, for every benchmark's Markdown (`first`: opens a sentence)."""
    return (
        f"{'L' if first else 'l'}oad average (1 min) {start:.1f} at the start, {end:.1f} at the "
        f"end, on {cores} cores (above 0: other work shared the CPU)"
    )


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f} ms" if x < 10 else f"{x:.1f} s"


def _mb(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x / 1e6:,.1f} MB" if x < 1e7 else f"{x / 1e6:,.0f} MB"


EXACT = ("fp32",)  # precisions that must give transformers' tokens before a time is compared
# fewest timed runs behind a percentile worth printing: the p99 of 5 runs is their maximum
PERCENTILE_RUNS = {"p90_s": 10, "p99_s": 100}


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{b / a:.2f}x"


def tokens_differ(row: dict, backend: dict) -> bool:
    """An exact-precision row whose tokens are not transformers': its times compare nothing."""
    a = row.get("agreement")
    return backend.get("precision") in EXACT and a is not None and a < 1.0


def _speedup(row: dict, backend: dict, reference_p50: float | None) -> str:
    if tokens_differ(row, backend) and reference_p50:
        return "tokens differ"
    return _ratio(row["p50_s"], reference_p50)


def _percentile(row: dict, key: str) -> str:
    """A tail percentile only from enough runs; `runs_s` absent (older results): as recorded."""
    runs = row.get("runs_s")
    if runs is not None and len(runs) < PERCENTILE_RUNS[key]:
        return "-"
    return _ms(row.get(key))


def mismatches(report: dict) -> list[str]:
    """Every exact-precision row whose tokens differ from the reference's, as one line each."""
    out = []
    for model in report["models"]:
        for row in model["results"]:
            backend = model["backends"].get(row["backend"], {})
            if tokens_differ(row, backend):
                out.append(
                    f"{model['model']}, {_label(row['setting'])}: {row['backend']} tokens "
                    f"{row['agreement']:.0%} identical to transformers'"
                )
    return out


def _efficiency(row: dict) -> str:
    """floor / measured: 100% would be the machine's GEMM rate and bandwidth, all the time."""
    return "-" if row.get("efficiency") is None else f"{row['efficiency']:.0%}"


def _tokens(row: dict) -> str:
    a = row.get("agreement")
    if row["backend"].startswith("transformers"):
        return "reference"
    if a is None:
        return "-"
    return "identical" if a == 1.0 else f"{a:.0%} identical"


def _readme_tokens(by_beams: dict[int, dict]) -> str:
    """One cell for both searches: "identical" only if both are; else each search's share."""
    cells = {beams: _tokens(row) for beams, row in sorted(by_beams.items(), reverse=True)}
    if len(set(cells.values())) == 1:
        return next(iter(cells.values()))
    return ", ".join(f"{'greedy' if k == 1 else f'beam {k}'} {v}" for k, v in cells.items())


def _settings(model: dict) -> list[dict]:
    seen = []
    for row in model["results"]:
        if row["setting"] not in seen:
            seen.append(row["setting"])
    return seen


def _label(s: dict) -> str:
    search = "greedy" if s["beams"] == 1 else f"beam {s['beams']}"
    return f"batch {s['batch']}, {search}, {s['new_tokens']} new tokens"


def _p50(model: dict, setting: dict, prefix: str) -> float | None:
    for row in model["results"]:
        if row["setting"] == setting and row["backend"].startswith(prefix) and "p50_s" in row:
            return row["p50_s"]
    return None


def model_table(model: dict) -> list[str]:
    """One Markdown table per setting of one model."""
    lines = [f"## {model['model']} ({model['image_size'][0]} px)", ""]
    info = model["backends"]
    for key, b in info.items():
        if "skipped" in b or "error" in b:
            lines.append(
                f"- {key}: {'skipped' if 'skipped' in b else 'failed'}: {b.get('skipped') or b.get('error')}"
            )
    agree = model.get("caption_agreement")
    if agree:
        lines.append(
            f"- int8 vs fp32 captions on {agree['images']} held-out scenes (beam {agree['beams']}): "
            f"{agree['identical']:.1%} identical"
            + (
                f"; exact match with the truth fp32 {agree['fp32_exact_match']:.1%}, "
                f"int8 {agree['int8_exact_match']:.1%}"
                if "int8_exact_match" in agree
                else ""
            )
        )
    if not any(r["backend"].startswith("transformers") for r in model["results"]):
        lines.append("- no transformers reference in this run: tokens not checked, no speedups")
    for s in _settings(model):
        ref, opt = _p50(model, s, "transformers"), _p50(model, s, "optimum")
        lines += [
            "",
            f"### {_label(s)}",
            "",
            "| backend | tokens | p50 | p90 | p99 | vs transformers | vs Optimum | floor | floor / p50 | images/s | encoder | first step | per token | peak RSS | load | on disk |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in model["results"]:
            if row["setting"] != s or "p50_s" not in row:
                continue
            b = info[row["backend"]]
            lines.append(
                f"| {b['name']} {b['precision']} ({b['device']}) | {_tokens(row)} | {_ms(row['p50_s'])} | "
                f"{_percentile(row, 'p90_s')} | {_percentile(row, 'p99_s')} | {_speedup(row, b, ref)} | "
                f"{_speedup(row, b, opt)} | {_ms((row.get('floor') or {}).get('floor_s'))} | "
                f"{_efficiency(row)} | {row['images_per_s']:.2f} | {_ms(row.get('encoder_s'))} | "
                f"{_ms(row.get('first_step_s'))} | {_ms(row.get('per_token_s'))} | "
                f"{row['peak_rss_mb']:,.0f} MB | {_ms(b.get('load_s'))} | {_mb(b.get('disk_bytes'))} |"
            )
    return lines


def _load_line(report: dict) -> str:
    load = report.get("load_average")
    if not load:
        return ""
    return load_line(load["start"], load["end"], report["machine"]["cores"], first=True) + "."


def _others(read: dict) -> str:
    """The slower readers' medians, so a reader far below the best stands out."""
    others = {k: v for k, v in read.get("readers", {}).items() if k != read.get("reader")}
    return "".join(f"; {name} {rate / 1e9:.1f}" for name, rate in others.items())


def roofline_line(report: dict) -> str:
    """The machine's rates measured in this run, which every floor is computed from."""
    probed = report.get("roofline")
    if not probed:
        return ""
    rates, read = probed["rates"], probed["read"]
    best = max(probed["fp32_gemm"], key=lambda r: r["median"])["shape"]
    return (
        f"Roofline, measured in this run ({probed['threads']} threads, ONNX Runtime): fp32 GEMM "
        f"{rates['fp32_flops'] / 1e9:.0f} GFLOP/s (best median, shape {best[0]}x{best[1]}x{best[2]}), "
        f"int8 GEMM {rates['int8_flops'] / 1e9:.0f} GOP/s, read bandwidth "
        f"{read['median'] / 1e9:.1f} GB/s ({read.get('reader', 'ReduceMax')}, median of "
        f"{read['reads']} reads, spread {read['min'] / 1e9:.1f}-{read['max'] / 1e9:.1f}"
        f"{_others(read)}). Floor: per phase max(FLOPs / GEMM rate, "
        "bytes / bandwidth), encoder + cross K/V once per image, then every decoder step "
        "(`benchmarks/roofline.py`); floor / p50 is the efficiency."
    )


def _settle(report: dict) -> str:
    settle = report.get("settle_s")
    return f", each call {settle:g} s after the one before" if settle else ""


def markdown(report: dict) -> str:
    lines = [
        "# vedrt benchmark",
        "",
        f"Machine: {machine_line(report['machine'])}; {report['threads']} threads per backend.",
        f"{report['reps']} timed repetitions per backend and setting after {report['warmups']} warm-up(s), "
        f"interleaved across backends{_settle(report)}; each backend in its own process (its own peak RSS). Speedups are "
        "ratios of p50 latencies from this run, given only where the tokens were checked: an fp32 row whose "
        "tokens differ from transformers' says so instead (int8 rows give their agreement). p90 is shown "
        f"from {PERCENTILE_RUNS['p90_s']} timed runs, p99 from {PERCENTILE_RUNS['p99_s']}. Per token: "
        "(total - encoder - first step) / (new tokens - 1); vedrt's encoder includes the cross K/V "
        "projections, which transformers and Optimum compute in their first step. Peak RSS: the "
        "process's peak so far, loading included (settings run in the order listed, so a row shows at "
        "least the peak of the rows above it). Load: a fresh process's imports and model load.",
        _load_line(report),
        "",
        roofline_line(report),
        "",
    ]
    for model in report["models"]:
        lines += model_table(model) + [""]
    return "\n".join(lines)


def readme_table(report: dict, model_name: str = "vit-gpt2", stem: str = "results") -> str | None:
    """The short table for the project README: one row per backend of one model at batch 1, beam
    4 and greedy; None when the run has no such rows (it then leaves the README's table alone)."""
    rows: dict[str, dict[int, dict]] = {}
    backends: dict[str, dict] = {}
    model = next((m for m in report["models"] if m["model"] == model_name), None)
    for row in model["results"] if model else []:
        if row["setting"]["batch"] == 1 and "p50_s" in row:
            rows.setdefault(row["backend"], {})[row["setting"]["beams"]] = row
            backends[row["backend"]] = model["backends"][row["backend"]]
    if not rows:
        return None
    new_tokens = next(iter(next(iter(rows.values())).values()))["setting"]["new_tokens"]
    lines = [
        f"| ViT-base + GPT2-small, batch 1, {new_tokens} new tokens, {report['threads']} threads "
        "| tokens | beam 4 | greedy | peak RSS | load |",
        "|---|---|---|---|---|---|",
    ]
    for key, by_beams in rows.items():
        b = backends[key]
        cells = []
        for beams in (4, 1):
            row = by_beams.get(beams)
            if row is None:
                cells.append("-")
                continue
            ref = _p50(model, row["setting"], "transformers")
            floor = "" if "efficiency" not in row else f", {_efficiency(row)} of floor"
            cells.append(f"{_ms(row['p50_s'])} ({_speedup(row, b, ref)}{floor})")
        lines.append(
            f"| {b['name']} {b['precision']} | {_readme_tokens(by_beams)} | {cells[0]} | {cells[1]} | "
            f"{max(r['peak_rss_mb'] for r in by_beams.values()):,.0f} MB | {_ms(b.get('load_s'))} |"
        )
    m, load = report["machine"], report.get("load_average") or {}
    lines += [
        "",
        f"{m['cpu']}, {m['cores']} cores, {report['threads']} threads, onnxruntime "
        f"{m['versions']['onnxruntime']}, torch {m['versions']['torch']}; p50 of {report['reps']} "
        f"interleaved runs, (speedup vs transformers, floor / p50) from the same run"
        + (f"; load average {load['start']:.1f}-{load['end']:.1f} (shared machine)" if load else "")
        + f". Details: benchmarks/results/{stem}.md.",
    ]
    probed = report.get("roofline")
    if probed:
        rates = probed["rates"]
        lines[-1] += (
            f" Floor from this run's fp32 GEMM {rates['fp32_flops'] / 1e9:.0f} GFLOP/s, int8 "
            f"{rates['int8_flops'] / 1e9:.0f} GOP/s, read {rates['read_bytes'] / 1e9:.1f} GB/s."
        )
    return "\n".join(lines) + "\n"


def chart(report: dict, path: Path) -> None:
    """p50 latency per backend, grouped by setting, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in report["models"] if m["results"]]
    fig, axes = plt.subplots(
        len(models) or 1, 1, figsize=(10, 3.2 * max(len(models), 1)), squeeze=False
    )
    for ax, model in zip(axes[:, 0], models, strict=False):
        settings = _settings(model)
        keys = list(dict.fromkeys(r["backend"] for r in model["results"] if "p50_s" in r))
        width = 0.8 / max(len(keys), 1)
        for j, key in enumerate(keys):
            values = []
            for s in settings:
                row = next(
                    (r for r in model["results"] if r["setting"] == s and r["backend"] == key), {}
                )
                values.append(row.get("p50_s", 0.0))
            xs = [i + j * width for i in range(len(settings))]
            ax.bar(xs, values, width, label=key)
        ax.set_xticks([i + width * (len(keys) - 1) / 2 for i in range(len(settings))])
        ax.set_xticklabels([_label(s) for s in settings], fontsize=8)
        ax.set_ylabel("p50 latency (s)")
        ax.set_title(f"{model['model']}: lower is better")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(report: dict, out_dir: Path, stem: str = "results") -> list[Path]:
    """JSON, Markdown and (where matplotlib is installed) PNG; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    paths[0].write_text(json.dumps(report, indent=1) + "\n")
    paths[1].write_text(markdown(report) + "\n")
    try:
        chart(report, out_dir / f"{stem}.png")
        paths.append(out_dir / f"{stem}.png")
    except ImportError:
        pass
    return paths


def main(argv: list[str] | None = None) -> int:
    """Rewrite the Markdown, chart and README table from a results JSON (no re-run)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0] if args else Path(__file__).parent / "results" / "results.json")
    report = json.loads(path.read_text())
    write(report, path.parent, path.stem)
    table = readme_table(report, stem=path.stem)
    if table is not None:
        (path.parent / "README-table.md").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
