"""`python -m benchmarks` / `vedrt bench`: vedrt against transformers and Optimum, side by side.

The default run is what 2 cores afford in a few minutes: ViT-base + GPT2-small, batch 1, beam 4
and greedy, 16 new tokens, every backend installed. `--full` runs the whole matrix (ViT-GPT2,
TrOCR-base and the scene model; batch 1, 8 and 32; greedy and beam 4). Every run also measures
the machine's GEMM rates and read bandwidth and reports each row's floor and floor / p50
(`benchmarks/roofline.py`; `--probe-reps 0` skips it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .models import MODELS

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DEFAULT_WORK = Path.home() / ".cache" / "vedrt-bench"


def _ints(text: str) -> list[int]:
    """Comma-separated counts, each at least 1 (a 0 made a run with an empty table)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: comma-separated integers, e.g. 1,8,32"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be at least 1")
    return values


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.splitlines()[0]
    parser.add_argument(
        "--models",
        default="vit-gpt2",
        help=f"comma-separated: {', '.join(MODELS)}, or a checkpoint directory (default vit-gpt2)",
    )
    parser.add_argument("--batch", type=_ints, default=[1], help="batch sizes, e.g. 1,8,32")
    parser.add_argument("--beams", type=_ints, default=[4, 1], help="beam counts (1: greedy)")
    parser.add_argument(
        "--new-tokens",
        type=_positive,
        default=16,
        help="new tokens, forced (min = max; default 16)",
    )
    parser.add_argument(
        "--full", action="store_true", help="every model, batch 1,8,32, beam 4 and greedy"
    )
    parser.add_argument(
        "--backends",
        default="",
        help="only backends whose key contains one of these (comma-separated)",
    )
    parser.add_argument("--precisions", default="fp32,int8", help="vedrt exports to prepare")
    parser.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="cpu (default), or cuda with benchmarks/backends_gpu.py",
    )
    parser.add_argument(
        "--threads", type=_positive, default=2, help="intra-op threads of every backend (default 2)"
    )
    parser.add_argument(
        "--reps", type=_positive, default=5, help="timed repetitions per backend and setting"
    )
    parser.add_argument("--warmups", type=int, default=1, help="untimed runs after the token check")
    parser.add_argument(
        "--settle",
        type=float,
        default=0.2,
        help="seconds before every timed call, so no backend's idle threads spin into the next's",
    )
    parser.add_argument(
        "--work-dir", type=Path, default=DEFAULT_WORK, help="checkpoints and exports cache"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the results")
    parser.add_argument("--stem", default="results", help="file name of the JSON/MD/PNG outputs")
    parser.add_argument(
        "--probe-reps",
        type=int,
        default=5,
        help="repetitions of each roofline probe (GEMM rates, read bandwidth); 0: no roofline",
    )


def _selected(args: argparse.Namespace):
    from .backends import backends_for

    wanted = [w for w in args.backends.split(",") if w.strip()]
    chosen = backends_for(args.device)
    if wanted:
        chosen = [b for b in chosen if any(w in b.key for w in wanted)]
    return chosen


def run(args: argparse.Namespace) -> int:
    from . import report
    from .harness import Setting, run_model
    from .models import prepare

    if args.full:
        args.models, args.batch, args.beams = ",".join(MODELS), [1, 8, 32], [4, 1]
    settings = [Setting(b, k, args.new_tokens) for b in args.batch for k in args.beams]
    precisions = tuple(p for p in args.precisions.split(",") if p)
    backends = _selected(args)
    if not backends:
        raise SystemExit(f"vedrt bench: error: no backend matches --backends {args.backends!r}")
    log_dir = args.work_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    started = time.time()
    load_before = os.getloadavg()
    specs = []
    for name in [m for m in args.models.split(",") if m]:
        try:
            spec = prepare(name, args.work_dir, precisions, log)
        except (ValueError, RuntimeError) as exc:  # not a model; an export that failed
            raise SystemExit(f"vedrt bench: error: {exc}") from None
        if spec is None:
            log(f"{name}: not available here, skipped")
        else:
            specs.append(spec)
    probed, shaped = None, None
    if args.probe_reps > 0 and args.device == "cpu":
        from .roofline import probe

        log("roofline: fp32 and int8 GEMM rates, read bandwidth")
        shaped = next((s.exports["fp32"] for s in specs if "fp32" in s.exports), None)
        probed = probe(args.threads, shaped, reps=args.probe_reps)
    models = []
    for spec in specs:
        models.append(
            run_model(
                spec,
                backends,
                settings,
                reps=args.reps,
                warmups=args.warmups,
                threads=args.threads,
                device=args.device,
                log_dir=log_dir,
                settle=args.settle,
            )
        )
        if spec.name == "scenes" and {"fp32", "int8"} <= set(spec.exports):
            from .agreement import caption_agreement

            log("scenes: int8 vs fp32 captions on held-out scenes")
            models[-1]["caption_agreement"] = caption_agreement(
                spec.exports["fp32"], spec.exports["int8"], threads=args.threads
            )
    if probed is not None:
        from .roofline import annotate, combine, probe

        # the load of a shared machine moves between the probe and the generations: probing again
        # afterwards and keeping each rate's better reading keeps the floor a floor
        log("roofline: probing again after the generations")
        probed = combine(probed, probe(args.threads, shaped, reps=args.probe_reps))
        for spec, model in zip(specs, models, strict=True):
            annotate(model, spec.exports, probed)
    result = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "seconds": time.time() - started,
        "machine": report.machine(),
        # other work on the machine inflates every backend, eager PyTorch most: say how busy it was
        "load_average": {"start": load_before[0], "end": os.getloadavg()[0]},
        "threads": args.threads,
        "reps": args.reps,
        "warmups": args.warmups,
        "settle_s": args.settle,
        "device": args.device,
        "roofline": probed,
        "models": models,
    }
    paths = report.write(result, args.out, args.stem)
    table = report.readme_table(result, stem=args.stem)
    if table is not None:  # a run without ViT-GPT2 at batch 1 leaves the README's table alone
        (args.out / "README-table.md").write_text(table)
        paths.append(args.out / "README-table.md")
    print(report.markdown(result))
    log("wrote " + ", ".join(str(p) for p in paths))
    differ = report.mismatches(result)
    for line in differ:
        log(f"vedrt bench: tokens differ: {line}")
    return 1 if differ else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
