"""Text EncoderDecoderModel benchmark: bert2gpt2-base shape, vedrt against transformers.

    python -m benchmarks.text [--reps 5] [--threads 2] [--beams 4] [--new-tokens 16]

A random-weight BERT-base encoder + GPT2-small decoder with cross-attention (the shape of
bert2gpt2 summarizers) is built from configs, saved and exported once under runs/bench. One
32-token text, beam search, new tokens forced (min = max). Tokens are compared first; then warm,
interleaved repetitions, medians. Optimum's ORTModelForSeq2SeqLM runs beside them when optimum-onnx
is installed and exports the checkpoint (if its export fails, the attempt and its message are
recorded instead). Writes benchmarks/results/text.{json,md}.
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

SETTLE_S = 0.2  # as the harness's --settle

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "runs" / "bench" / "bert2gpt2"
RESULTS = Path(__file__).resolve().parent / "results"


def checkpoint(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    import torch
    import transformers as T

    torch.manual_seed(0)
    config = T.EncoderDecoderConfig.from_encoder_decoder_configs(
        T.BertConfig(), T.GPT2Config(add_cross_attention=True)
    )
    model = T.EncoderDecoderModel(config=config)
    for cfg in (model.config, model.generation_config):
        cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = 50256, 50256, 50256
    model.save_pretrained(path)
    return path


def export(ckpt: Path, out: Path) -> Path:
    if not (out / "vedrt.json").is_file():
        from vedrt.export import export_model

        print(f"exporting {ckpt} to {out} (minutes)", flush=True)
        export_model(ckpt, out, overwrite=True)
    return out


def optimum_model(ckpt: Path, threads: int) -> tuple[object | None, str]:
    """(Optimum's ORTModelForSeq2SeqLM or None, what happened), exported once per run."""
    try:
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForSeq2SeqLM
    except ImportError:
        return None, "not installed (pip install '.[peers]')"
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    try:
        model = ORTModelForSeq2SeqLM.from_pretrained(ckpt, export=True, session_options=options)
    except Exception as exc:  # its exporter's own refusal, recorded as it says it
        return None, f"cannot export it: {str(exc).splitlines()[0][:160]}"
    return model, "exported by optimum-onnx"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.text", description=__doc__)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import torch
    import transformers as T

    from vedrt.runtime import load

    torch.set_num_threads(args.threads)
    ckpt = checkpoint(WORK / "checkpoint")
    gen = load(export(ckpt, WORK / "fp32"), threads=args.threads)
    model = T.EncoderDecoderModel.from_pretrained(ckpt).eval()
    ids = np.random.default_rng(0).integers(1000, 20000, (1, 32)).astype(np.int64)
    mask = np.ones_like(ids)
    n = args.new_tokens
    options = {"num_beams": args.beams, "min_new_tokens": n, "max_new_tokens": n}

    def hf():
        with torch.no_grad():
            return model.generate(
                input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **options
            ).numpy()

    def ours():
        return gen.generate(ids, attention_mask=mask, **options)

    optimum, optimum_note = optimum_model(ckpt, args.threads)

    def opt():
        with torch.no_grad():
            return optimum.generate(
                input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **options
            ).numpy()

    reference = hf()  # also the warm-up of each
    identical = np.array_equal(reference, ours())
    runners = [("transformers", hf), ("vedrt", ours)]
    if optimum is not None:
        optimum_identical = np.array_equal(reference, opt())
        runners.append(("optimum", opt))
    times: dict[str, list[float]] = {name: [] for name, _ in runners}
    load_before = os.getloadavg()[0]
    for rep in range(args.reps):  # each backend first in turn, each call after a pause in which
        # the one before's spinning threads stop (PyTorch's OpenMP workers, Optimum's ORT)
        for name, fn in runners[rep % len(runners) :] + runners[: rep % len(runners)]:
            time.sleep(SETTLE_S)
            began = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - began)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": "BERT-base encoder + GPT2-small decoder (random weights), 32-token text",
        "machine": machine(),
        "threads": args.threads,
        "setting": options,
        "tokens_identical": bool(identical),
        "median_s": med,
        "speedup": med["transformers"] / med["vedrt"],
        "reps": args.reps,
        "load_average": load_before,
        "load_average_after": os.getloadavg()[0],
        "optimum": optimum_note,
    }
    if optimum is not None:
        result["optimum_tokens_identical"] = bool(optimum_identical)
        result["optimum_vs_vedrt"] = med["optimum"] / med["vedrt"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "text.json").write_text(json.dumps(result, indent=2) + "\n")
    md = (
        "# bert2gpt2-base shape: vedrt vs transformers\n\n"
        f"{result['model']}; {machine_line(result['machine'])}; {args.threads} threads; beam "
        f"{args.beams}, {n} new tokens (forced); median of {args.reps} interleaved runs after a "
        f"warm-up, each backend first in turn, each call {SETTLE_S:g} s after the one before; "
        f"{load_line(load_before, result['load_average_after'], result['machine']['cores'])}.\n\n"
        "| backend | tokens | median | vs transformers |\n|---|---|---|---|\n"
        f"| transformers fp32 | reference | {med['transformers'] * 1e3:.0f} ms | 1.00x |\n"
        f"| vedrt fp32 | {'identical' if identical else 'DIFFERENT'} | "
        f"{med['vedrt'] * 1e3:.0f} ms | {result['speedup']:.2f}x |\n"
    )
    if optimum is not None:
        md += (
            f"| Optimum ORTModelForSeq2SeqLM | "
            f"{'identical' if optimum_identical else 'DIFFERENT'} | "
            f"{med['optimum'] * 1e3:.0f} ms | {med['transformers'] / med['optimum']:.2f}x |\n"
        )
    md += f"\nOptimum ORTModelForSeq2SeqLM: {result['optimum']}.\n"
    (args.out / "text.md").write_text(md)
    print(md)
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
