"""The benchmark harness end to end on a tiny model: one repetition, valid JSON and Markdown."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_models import tiny_model

# `benchmarks` lives beside the package, not in it (it is not installed): run from the checkout
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

pytest.importorskip("torch")
pytest.importorskip("transformers")


def test_harness_runs_backends_side_by_side(tmp_path):
    from benchmarks.__main__ import main

    tiny_model("vit", "gpt2").save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "out"
    argv = [
        "--models", str(tmp_path / "ckpt"),
        "--backends", "transformers,vedrt",
        "--beams", "2,1",
        "--new-tokens", "4",
        "--reps", "1",
        "--warmups", "0",
        "--threads", "1",
        "--work-dir", str(tmp_path / "work"),
        "--out", str(out),
        "--probe-reps", "1",
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["machine"]["cores"] >= 1 and report["machine"]["versions"]["onnxruntime"]
    (model,) = report["models"]
    assert set(model["backends"]) >= {"transformers-fp32-cpu", "vedrt-fp32-cpu", "vedrt-int8-cpu"}
    rows = {(r["backend"], r["setting"]["beams"]): r for r in model["results"]}
    for beams in (2, 1):
        vedrt = rows["vedrt-fp32-cpu", beams]
        assert vedrt["agreement"] == 1.0  # the fp32 export's tokens are transformers' tokens
        assert vedrt["p50_s"] > 0 and vedrt["peak_rss_mb"] > 0
        assert {"encoder_s", "first_step_s", "per_token_s"} <= set(vedrt)
        assert rows["transformers-fp32-cpu", beams]["p50_s"] > 0
        # one returned sequence per image: a share of identical sequences is 0 or 1, never None
        assert rows["vedrt-int8-cpu", beams]["agreement"] in (0.0, 1.0)
        for key in ("vedrt-fp32-cpu", "vedrt-int8-cpu"):
            row = rows[key, beams]
            parts = row["floor"]["encoder_floor_s"] + row["floor"]["decoder_floor_s"]
            assert row["floor"]["floor_s"] == pytest.approx(parts)
            # no generation beats the machine's floor; a tiny model is far from it
            assert 0.0 < row["efficiency"] <= 1.0
            assert row["efficiency"] == pytest.approx(row["floor"]["floor_s"] / row["p50_s"])
    rates = report["roofline"]["rates"]
    assert min(rates.values()) > 0
    probes = report["roofline"]["probes"]  # before and after the generations: the better reading
    assert len(probes) == 2 and rates == {k: max(p["rates"][k] for p in probes) for k in rates}
    assert model["backends"]["vedrt-int8-cpu"]["disk_bytes"] > 0
    table = (out / "results.md").read_text()
    assert "| vedrt fp32 (cpu) | identical |" in table and "batch 1, beam 2" in table
    assert "Roofline, measured in this run" in table and "floor / p50" in table
    assert (out / "results.png").stat().st_size > 0
    # the README's table is ViT-GPT2's: a run of another model leaves it alone (it was emptied)
    assert not (out / "README-table.md").exists()


def test_cli_reaches_the_harness(capsys):
    from vedrt.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    assert "--full" in capsys.readouterr().out


def test_missing_backends_are_skipped_with_a_reason(tmp_path):
    from benchmarks.backends import Backend, ModelSpec

    spec = ModelSpec("m", None, {}, (32, 32), tmp_path)
    needs = Backend("x", "fp32", "cpu", lambda s, t: None, requires=("no_such_module_here.sub",))
    assert "not installed" in needs.skip_reason(spec)


def test_agreement_counts_identical_sequences():
    from benchmarks.harness import agreement

    reference = [[1, 5, 7, 2], [1, 6, 6, 2]]
    assert agreement([list(r) for r in reference], reference) == 1.0
    perturbed = [[1, 5, 7, 2], [1, 6, 9, 2]]  # one token of one sequence differs
    assert agreement(perturbed, reference) == 0.5
    assert agreement([[1, 5, 7]], reference) == 0.0  # another shape: nothing agrees
    assert agreement(reference, None) is None


def _report(agreements: dict[str, float | None], runs: int = 5) -> dict:
    """A results JSON as the harness writes it: transformers plus vedrt rows at batch 1."""
    setting = {"batch": 1, "beams": 4, "new_tokens": 16}
    backends, results = {}, []
    for key, agreement in agreements.items():
        name, precision, device = key.split("-")
        backends[key] = {"name": name, "precision": precision, "device": device}
        times = [0.5 + i / 100 for i in range(runs)] if name == "vedrt" else [2.0] * runs
        results.append(
            {"setting": setting, "backend": key, "agreement": agreement, "runs_s": times,
             "p50_s": float(np.median(times)), "p90_s": float(np.percentile(times, 90)),
             "p99_s": float(np.percentile(times, 99)), "images_per_s": 1.0, "peak_rss_mb": 1.0}
        )  # fmt: skip
    versions = {"onnxruntime": "1", "torch": "2"}
    machine = {"cpu": "cpu", "cores": 2, "memory_gib": 1, "python": "3", "versions": versions}
    return {"models": [{"model": "vit-gpt2", "image_size": [224, 224], "backends": backends,
                        "results": results}], "machine": machine, "threads": 2, "reps": runs,
            "warmups": 1}  # fmt: skip


def test_no_speedup_for_fp32_tokens_that_differ_and_no_tail_percentile_from_five_runs():
    """Tokens are checked before any time is compared: an fp32 row that differs from
    transformers gets no ratio and the run names it (exit 1); int8 rows keep their ratio beside
    their agreement. A p99 of 5 runs is their maximum: not printed."""
    from benchmarks import report

    exact = _report({"transformers-fp32-cpu": None, "vedrt-fp32-cpu": 1.0, "vedrt-int8-cpu": 0.5})
    assert report.mismatches(exact) == []
    table = report.markdown(exact)
    assert "| vedrt fp32 (cpu) | identical | 520 ms | - | - | 3.85x |" in table
    assert "| vedrt int8 (cpu) | 50% identical | 520 ms | - | - | 3.85x |" in table
    differ = _report({"transformers-fp32-cpu": None, "vedrt-fp32-cpu": 0.5})
    assert report.mismatches(differ) == [
        "vit-gpt2, batch 1, beam 4, 16 new tokens: vedrt-fp32-cpu tokens 50% identical to "
        "transformers'"
    ]
    assert "| vedrt fp32 (cpu) | 50% identical | 520 ms | - | - | tokens differ |" in (
        report.markdown(differ)
    )
    assert "| 520 ms (tokens differ) |" in report.readme_table(differ)
    many = report.markdown(_report({"transformers-fp32-cpu": None, "vedrt-fp32-cpu": 1.0}, 120))
    assert "| vedrt fp32 (cpu) | identical | 1095 ms | 1571 ms | 1678 ms |" in many
    alone = _report({"vedrt-fp32-cpu": None})
    assert "no transformers reference in this run" in report.markdown(alone)
    assert report.readme_table({**alone, "models": []}) is None  # the README's table left alone


def _hand_count(model) -> dict[str, int]:
    """ViT + GPT-2 FLOPs and decoder GEMM weights, written out from the configs by hand."""
    enc, dec = model.config.encoder, model.config.decoder
    h, inner, layers = enc.hidden_size, enc.intermediate_size, enc.num_hidden_layers
    patches = (enc.image_size // enc.patch_size) ** 2
    seq = patches + 1  # + [CLS]
    per_layer = 2 * seq * (4 * h * h + 2 * h * inner)  # q, k, v, out; MLP up and down
    per_layer += 2 * (2 * seq * seq * h)  # QK^T and AV over all heads
    patch_embed = 2 * patches * h * enc.num_channels * enc.patch_size**2
    d = dec.n_embd
    cross_kv = dec.n_layer * 2 * seq * (2 * h * d)  # K and V of every decoder layer
    # self c_attn (3 d^2), c_proj, cross q and c_proj, MLP (4d up and down); the tied head
    decoder = dec.n_layer * (3 * d * d + 3 * d * d + 2 * d * 4 * d) + d * dec.vocab_size
    return {"encoder": layers * per_layer + patch_embed + cross_kv, "decoder": decoder}


def test_flop_count_of_a_tiny_model_is_the_hand_count(exported):
    from benchmarks.roofline import encoder_flops, model_cost

    model, out = exported("vit", "gpt2")
    cost = model_cost(out)
    hand = _hand_count(model)
    assert encoder_flops(cost) == {"fp32": hand["encoder"], "int8": 0}
    assert cost.decoder.fp32_weight_elems == hand["decoder"]
    # a step streams every GEMM weight once (the tied head too) and at most the other decoder
    # parameters but the position table (a lookup) and the cross K/V projections (cross_kv.onnx);
    # the export stores identical tensors (fresh LayerNorm weights) once, hence not an equality
    params = sum(p.numel() for p in model.decoder.parameters())
    lookup = model.decoder.transformer.wpe.weight.numel()
    cross = sum(
        p.numel() for b in model.decoder.transformer.h for p in b.crossattention.c_attn.parameters()
    )
    assert 4 * hand["decoder"] < cost.decoder.weight_bytes <= 4 * (params - lookup - cross)


def test_floor_counts_rows_batch_and_steps(exported):
    from benchmarks.roofline import Rates, encoder_flops, floor, model_cost, step_work

    _, out = exported("vit", "gpt2")
    cost = model_cost(out)
    compute = Rates(fp32_flops=1e9, int8_flops=1e9, read_bytes=1e30)  # compute-bound
    one, two = floor(cost, compute, 1, 1, 3), floor(cost, compute, 2, 1, 3)
    assert one["encoder_floor_s"] == pytest.approx(encoder_flops(cost)["fp32"] / 1e9)
    assert two["encoder_floor_s"] == pytest.approx(2 * one["encoder_floor_s"])
    beams = floor(cost, compute, 1, 4, 3)
    assert beams["decoder_floor_s"] == pytest.approx(4 * one["decoder_floor_s"])
    steps = sum(step_work(cost, 4, 1, past)["fp32"] for past in range(3))
    assert beams["decoder_floor_s"] == pytest.approx(steps / 1e9)
    memory = Rates(fp32_flops=1e30, int8_flops=1e30, read_bytes=1e9)  # bandwidth-bound
    streamed = floor(cost, memory, 1, 4, 5)
    weights = 5 * cost.decoder.weight_bytes / 1e9
    assert weights < streamed["decoder_floor_s"] < weights * 1.5  # + the K/V caches


def test_roofline_probe_measures_positive_rates_of_correct_products():
    import onnxruntime  # noqa: F401

    from benchmarks.roofline import _gemm_model, _session, gemm_rate, read_bandwidth

    fp32 = gemm_rate(64, 128, 256, threads=1, reps=2)
    int8 = gemm_rate(64, 128, 256, threads=1, int8=True, reps=2)
    assert fp32["median"] > 0 and int8["median"] > 0 and fp32["shape"] == [64, 128, 256]
    read = read_bandwidth(threads=1, mebibytes=8, reps=3)
    assert 0 < read["min"] <= read["median"] <= read["max"] and read["reads"] == 3
    assert set(read["readers"]) == {"ReduceMax", "GEMV"}
    assert read["median"] == max(read["readers"].values()) == read["readers"][read["reader"]]
    # the int8 probe runs the product the int8 export runs: dequantized weights times activations
    model = _gemm_model(16, 8, int8=True)
    weights = {t.name: t for t in model.graph.initializer}
    from onnx import numpy_helper

    w = numpy_helper.to_array(weights["w"]).astype(np.float32) * 0.01
    a = np.random.default_rng(3).standard_normal((4, 16), dtype=np.float32)
    (y,) = _session(model, 1).run(None, {"a": a})
    assert np.allclose(y, a @ w, atol=0.05 * np.abs(a @ w).max())


def test_session_option_study_runs_every_option_set(exported):
    from benchmarks.sessions import OPTION_SETS, memory, weight_bytes

    _, out = exported("vit", "gpt2")
    result = memory(out, rounds=1, threads=1, generations=1)
    assert result["weights_mb"] == pytest.approx(weight_bytes(out) / 1e6) and weight_bytes(out) > 0
    assert set(result["option_sets"]) == set(OPTION_SETS)
    for name, row in result["option_sets"].items():
        assert "error" not in row, f"{name}: {row.get('error')}"  # ORT accepted every option
        assert row["peak_rss_mb"] >= row["rss_after_load_mb"] > 0
        assert row["generate_s"] > 0 and row["step_s"] > 0
        assert row["mapped_after_run_mb"]["[anon]"] > 0


def test_profile_runs_on_the_shipped_model():
    """`python -m benchmarks.profile` (what PROFILE.md is written from) feeds the decoder only the
    inputs it declares (it fed `group_slots`, which exports since 2026-12-06 lack, and failed)."""
    from benchmarks.profile import profile_decoder, split_generate

    scenes = Path(__file__).resolve().parents[1] / "vedrt" / "models" / "scenes"
    split = split_generate(scenes, beams=2, new_tokens=3, threads=1)
    assert split["total_s"] > 0 and split["decode_s"] > 0
    step = profile_decoder(scenes, beams=2, past=4, threads=1, steps=2)
    assert step["kernel_total_s"] > 0 and "Gemm" in step["kernel_s_by_op"]


def test_a_cached_export_is_used_only_for_the_checkpoint_it_came_from(tmp_path, monkeypatch):
    """Exports are cached by folder: another checkpoint of the same folder name, or this one
    retrained, was benchmarked against the old export (and reported 0% identical)."""
    import shutil
    import subprocess

    from benchmarks import models

    shipped = Path(models.__file__).resolve().parent.parent / "vedrt" / "models" / "scenes"
    exports = []

    def fake_export(command, **_kwargs):  # the shipped export stands in for a real one
        out = Path(command[5])
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(shipped, out)
        exports.append(Path(command[4]))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(models.subprocess, "run", fake_export)
    first, second = tmp_path / "a" / "ck", tmp_path / "b" / "ck"
    for checkpoint in (first, second):
        checkpoint.mkdir(parents=True)
        (checkpoint / "config.json").write_text(json.dumps({"encoder": {"image_size": 32}}))
    out = tmp_path / "cache" / "fp32"
    log = lambda _message: None  # noqa: E731
    models.ensure_export(first, out, "fp32", log)
    models.ensure_export(first, out, "fp32", log)  # cached
    models.ensure_export(second, out, "fp32", log)  # same folder name, another checkpoint
    (second / "model.safetensors").write_bytes(b"retrained")
    models.ensure_export(second, out, "fp32", log)  # changed since
    assert exports == [first, second, second]
    roots = {
        models.prepare(str(c), tmp_path / "work", ("fp32",), log).work_dir for c in (first, second)
    }
    assert len(roots) == 2  # and the two get caches of their own


def test_serve_report_prints_tail_percentiles_only_from_enough_requests():
    from benchmarks import serve

    def point(mode: str, requests: int) -> dict:
        return {"mode": mode, "concurrency": 8, "requests": requests, "wrong": 0,
                "images_per_s": 2.0, "p50_ms": 10.0, "p90_ms": 20.0, "p99_ms": 30.0}  # fmt: skip

    report = {"model": "m", "options": {}, "threads": 1, "max_rows": 32, "window_ms": 5.0,
              "points": [point("continuous", 16), point("one", 100)]}  # fmt: skip
    table = serve.markdown(report)
    assert "| 8 | continuous | 2.000 | 10.0 | 20.0 | - | 0 |" in table
    assert "| 8 | one | 2.000 | 10.0 | 20.0 | 30.0 | 0 |" in table
    assert "each first in turn" not in table  # results from before the order rotated


def test_serving_benchmark_runs_all_three_servers(tmp_path):
    """The serving benchmark end to end, tiny: its baselines plug into the real server (a
    change to what the server asks of an engine broke them once) and every answer is right."""
    pytest.importorskip("starlette", reason="the serve extra is part of dev")
    from benchmarks import serve

    argv = ["--concurrency", "1,2", "--requests", "4", "--repeat", "1",
            "--out", str(tmp_path), "--stem", "tiny"]  # fmt: skip
    assert serve.main(argv) == 0
    report = json.loads((tmp_path / "tiny.json").read_text())
    modes = {point["mode"] for point in report["points"]}
    assert modes == {"continuous", "one", "dynamic"}
    assert all(point["wrong"] == 0 and point["requests"] == 4 for point in report["points"])
