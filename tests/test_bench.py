"""The benchmark harness end to end on a tiny model: one repetition, valid JSON and Markdown."""

from __future__ import annotations

import json
import sys
from pathlib import Path

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
        assert 0.0 <= rows["vedrt-int8-cpu", beams]["agreement"] <= 1.0
    assert model["backends"]["vedrt-int8-cpu"]["disk_bytes"] > 0
    table = (out / "results.md").read_text()
    assert "| vedrt fp32 (cpu) | identical |" in table and "batch 1, beam 2" in table
    assert (out / "README-table.md").is_file() and (out / "results.png").stat().st_size > 0


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
