"""Export-time fusions and int8: exact fusions keep the 1e-4 bound, int8 reports token agreement."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_models import tiny_model

pytest.importorskip("torch")
pytest.importorskip("transformers")


def _op_types(path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def test_fp32_graphs_are_saved_fused_and_still_validate(exported):
    _, out = exported("vit", "gpt2")
    manifest = json.loads((out / "vedrt.json").read_text())
    fused = manifest["optimization"]["fused"]
    assert fused["decoder"].get("SkipLayerNormalization", 0) > 0
    assert fused["encoder"].get("SkipLayerNormalization", 0) > 0
    assert "SkipLayerNormalization" in _op_types(out / "decoder.onnx")
    assert manifest["precision"] == "fp32" and manifest["validation"]["passed"]
    assert manifest["validation"]["cached_step_max_abs_diff"] <= 1e-4


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory):
    from vedrt.cli import main

    root = tmp_path_factory.mktemp("int8")
    tiny_model("vit", "gpt2").save_pretrained(root / "ckpt")
    assert main(["export", str(root / "ckpt"), str(root / "int8"), "--quantize", "int8"]) == 0
    return root / "int8"


def test_int8_export_quantizes_every_weight_matmul(int8_export, exported, capsys):
    manifest = json.loads((int8_export / "vedrt.json").read_text())
    assert manifest["precision"] == "int8"
    assert manifest["quantization"]["weight_type"] == "QInt8"
    for name in ("encoder", "cross_kv", "decoder"):
        ops = _op_types(int8_export / f"{name}.onnx")
        assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"}, name
    from vedrt.export.optimize import graph_bytes

    _, fp32 = exported("vit", "gpt2")
    assert graph_bytes(int8_export / "decoder.onnx") < graph_bytes(fp32 / "decoder.onnx")
    assert manifest["graphs"]["decoder"]["bytes"] == graph_bytes(int8_export / "decoder.onnx")
    # the tied head's fp32 copy is gone: tokens are looked up in its int8 copy
    import onnx

    decoder = onnx.load(str(int8_export / "decoder.onnx"), load_external_data=False)
    assert "head_weight_t" not in {t.name for t in decoder.graph.initializer}


def test_weights_are_stored_beside_the_graphs(exported):
    _, out = exported("vit", "gpt2")
    for name in ("encoder", "cross_kv", "decoder"):
        assert (out / f"{name}.onnx.data").stat().st_size > (out / f"{name}.onnx").stat().st_size


def test_int8_validation_reports_token_agreement(int8_export):
    validation = json.loads((int8_export / "vedrt.json").read_text())["validation"]
    agreement = validation["token_agreement"]
    assert agreement["images"] == 8 and agreement["new_tokens"] >= 1
    assert 0.0 <= agreement["sequences_identical"] <= agreement["tokens_agreeing"] <= 1.0
    assert validation["first_step_max_abs_diff"] <= 1e-4  # the fp32 graphs, before quantizing


def test_int8_export_generates_with_the_runtime(int8_export):
    from vedrt.runtime import load

    gen = load(int8_export, threads=1)
    pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
    ids = gen.generate(pixels, num_beams=2, min_new_tokens=5, max_new_tokens=5)
    assert ids.shape == (2, 6) and ids.dtype == np.int64


def test_token_agreement_is_one_for_the_fp32_graphs(exported):
    from vedrt.export.quantize import token_agreement

    model, out = exported("vit", "gpt2")
    agreement = token_agreement(model, out, start_token=1, images=3, new_tokens=6)
    assert agreement.sequences_identical == 1.0 and agreement.passed


def test_runtime_shares_cross_kv_and_never_reallocates_the_cache(exported, monkeypatch):
    """Beams read their image's cross K/V (one slot per image, beams in one group); the pool is
    allocated once and the decoder bound once per row layout."""
    from vedrt.runtime import load
    from vedrt.runtime.executor import OrtExecutor

    _, out = exported("vit", "gpt2")
    seen = {"slots": set(), "rows": set(), "groups": set(), "pools": set(), "bindings": 0}
    decode = OrtExecutor.decode

    def spy(self, pool, rows, groups, want_attentions=False):
        seen["slots"].add(pool.cross.shape[1])
        seen["rows"].add(rows)
        seen["groups"].add(groups)
        seen["pools"].add((id(pool.cache), pool.version))
        seen["bindings"] = max(seen["bindings"], len(pool.bindings))
        return decode(self, pool, rows, groups, want_attentions)

    monkeypatch.setattr(OrtExecutor, "decode", spy)
    gen = load(out, threads=1)
    pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
    gen.generate(pixels, num_beams=3, min_new_tokens=6, max_new_tokens=6)
    assert seen["slots"] == {2} and seen["rows"] == {6} and seen["groups"] == {2}
    assert len(seen["pools"]) == 1  # one cache, written in place, never reallocated
    assert seen["bindings"] == 1
