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
    assert fused["decoder"].get("LayerNormalization", 0) > 0
    assert fused["encoder"].get("LayerNormalization", 0) > 0
    assert "LayerNormalization" in _op_types(out / "decoder.onnx")
    # ONNX Runtime's CPU SkipLayerNormalization is slower than Add + LayerNormalization
    assert "SkipLayerNormalization" not in _op_types(out / "decoder.onnx")
    assert "SkipLayerNormalization" not in _op_types(out / "encoder.onnx")
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
    from vedrt.manifest import graph_bytes

    _, fp32 = exported("vit", "gpt2")
    assert graph_bytes(int8_export / "decoder.onnx") < graph_bytes(fp32 / "decoder.onnx")
    assert manifest["graphs"]["decoder"]["bytes"] == graph_bytes(int8_export / "decoder.onnx")
    # the tied head's fp32 copy is gone: tokens are looked up in its int8 copy
    import onnx

    decoder = onnx.load(str(int8_export / "decoder.onnx"), load_external_data=False)
    assert "head_weight_t" not in {t.name for t in decoder.graph.initializer}
    vocab = json.loads((int8_export / "config.json").read_text())["decoder"]["vocab_size"]
    fp32_tables = [
        t.name
        for t in decoder.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT and vocab in t.dims and len(t.dims) == 2
    ]
    assert fp32_tables == []  # nor the fp32 lookup table the fp32 export keeps beside it


def _tied_head_readers(out, vocab: int, width: int) -> tuple[list, list, dict]:
    """The decoder's [vocab, d] tables, its [d, *] head blocks in Concat order, and who reads
    each initializer (op types)."""
    import onnx
    from onnx import numpy_helper

    decoder = onnx.load(str(out / "decoder.onnx"))
    init = {t.name: numpy_helper.to_array(t) for t in decoder.graph.initializer}
    readers: dict[str, set[str]] = {}
    for node in decoder.graph.node:
        for name in node.input:
            if name in init:
                readers.setdefault(name, set()).add(node.op_type)
    tables = [init[n] for n in init if init[n].shape == (vocab, width)]
    blocks = [init[n] for n in sorted(init, key=_block_order) if n.startswith("head_blocks.")]
    return tables, blocks, readers


def _block_order(name: str) -> tuple[int, str]:
    tail = name.rsplit(".", 1)[-1]
    return (int(tail), name) if tail.isdigit() else (-1, name)


def test_tied_head_has_its_own_lookup_table(exported):
    """fp32: the token Gather reads a [vocab, d] table and the head MatMul its [d, vocab]
    transpose, never one matrix for both: ONNX Runtime drops a prepacked MatMul weight's
    original only when nothing else reads it, and a row-major table keeps only the looked-up
    rows resident."""
    model, out = exported("vit", "gpt2")
    vocab, width = model.decoder.get_input_embeddings().weight.shape
    tables, blocks, readers = _tied_head_readers(out, vocab, width)
    assert len(tables) == 1 and len(blocks) == 1
    np.testing.assert_array_equal(tables[0].T, blocks[0])
    assert readers["head_blocks.0"] == {"MatMul"}
    table = next(n for n, ops in readers.items() if ops == {"Gather"} and "token" in n)
    assert table == "token_embedding.weight"


def test_tied_head_in_blocks_exports_and_int8_joins_them(tmp_path, monkeypatch):
    """A head wider than HEAD_BLOCK is split (bounds ORT's load-time peak, see modules.py) and
    still validates within 1e-4; int8 joins the blocks into one matrix the lookup shares."""
    import onnx

    from vedrt.export import export_model, modules

    monkeypatch.setattr(modules, "HEAD_BLOCK", 40)
    model = tiny_model("vit", "gpt2")
    vocab, width = model.decoder.get_input_embeddings().weight.shape
    export_model(model, tmp_path / "fp32")
    assert json.loads((tmp_path / "fp32" / "vedrt.json").read_text())["validation"]["passed"]
    tables, blocks, _ = _tied_head_readers(tmp_path / "fp32", vocab, width)
    assert [b.shape[1] for b in blocks] == [40, 40, vocab - 80]
    np.testing.assert_array_equal(tables[0].T, np.concatenate(blocks, axis=1))
    export_model(model, tmp_path / "int8", quantize="int8")
    decoder = onnx.load(str(tmp_path / "int8" / "decoder.onnx"), load_external_data=False)
    names = {t.name for t in decoder.graph.initializer}
    assert "head_weight_t_quantized" in names
    assert not any(n.startswith("head_blocks") or n == "token_embedding.weight" for n in names)


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
    from vedrt.runtime.executor import OUTPUTS, OrtExecutor

    _, out = exported("vit", "gpt2")
    seen = {"slots": set(), "rows": set(), "groups": set(), "pools": set(), "bindings": 0}
    decode = OrtExecutor.decode

    def spy(self, pool, rows, groups, want_attentions=False):
        seen["slots"].add(pool.cross.shape[1])
        seen["rows"].add(rows)
        seen["groups"].add(groups)
        seen["pools"].add((id(pool.cache), pool.version))
        bound = [key for key in pool.bindings if key != OUTPUTS]  # the shared outputs aside
        seen["bindings"] = max(seen["bindings"], len(bound))
        return decode(self, pool, rows, groups, want_attentions)

    monkeypatch.setattr(OrtExecutor, "decode", spy)
    gen = load(out, threads=1)
    pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
    gen.generate(pixels, num_beams=3, min_new_tokens=6, max_new_tokens=6)
    assert seen["slots"] == {2} and seen["rows"] == {6} and seen["groups"] == {2}
    assert len(seen["pools"]) == 1  # one cache, written in place, never reallocated
    assert seen["bindings"] == 1


def test_bindings_of_every_row_count_share_one_set_of_outputs(exported):
    """An engine steps many row counts; each binding binds the first rows of one set of output
    buffers sized for the pool, so keeping a binding per row count costs no output memory."""
    from vedrt.runtime import load
    from vedrt.runtime.executor import OUTPUTS

    _, out = exported("vit", "gpt2")
    gen = load(out, threads=1)
    pixels = np.random.default_rng(1).standard_normal((3, 3, 32, 32), dtype=np.float32)
    engine = gen.engine(max_rows=12)
    handles = []
    for i, beams in enumerate((1, 3, 2)):  # rows 1, 4, 6, then fewer as requests finish
        handles.append(engine.submit(pixels[i : i + 1], num_beams=beams, max_new_tokens=3 + i))
        engine.step()
    while not engine.idle():
        engine.step()
    for i, (handle, beams) in enumerate(zip(handles, (1, 3, 2), strict=True)):
        solo = gen.generate(pixels[i : i + 1], num_beams=beams, max_new_tokens=3 + i)
        np.testing.assert_array_equal(handle.result(), solo)
    pool = engine._rows.pool
    shared = pool.bindings[OUTPUTS]
    bound = [value for key, value in pool.bindings.items() if key != OUTPUTS]
    assert len({outputs["logits"].shape[0] for _, outputs in bound}) >= 3
    for _, outputs in bound:
        for name in ("logits", "top_ids", "new_kv"):
            assert np.shares_memory(outputs[name], shared[name])


@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_the_step_runs_without_attention_outputs_until_a_request_wants_them(
    which, exported, int8_export
):
    """The export keeps a copy of the decoder without its `cross_attn` outputs (and the nodes
    only they needed) that reads the same weights file; the runtime steps it and loads the full
    graph only for `output_attentions`, whose results are unchanged."""
    import onnx

    from vedrt.runtime import load

    out = exported("vit", "gpt2")[1] if which == "fp32" else int8_export
    manifest = json.loads((out / "vedrt.json").read_text())
    lean_name = manifest["graphs"]["decoder"]["file_without_attentions"]
    full = onnx.load(str(out / "decoder.onnx"), load_external_data=False)
    lean = onnx.load(str(out / lean_name), load_external_data=False)
    outputs = [o.name for o in full.graph.output]
    assert [o.name for o in lean.graph.output] == [
        n for n in outputs if not n.startswith("cross_attn.")
    ]
    assert len(lean.graph.node) < len(full.graph.node)
    stored = {
        t.name for t in lean.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL
    }
    weights = [t for t in lean.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert weights and all(  # the weights are read from the full graph's file, not copied
        {e.key: e.value for e in t.external_data}["location"] == "decoder.onnx.data"
        for t in weights
    )
    assert all(np.prod(t.dims) <= 256 for t in lean.graph.initializer if t.name in stored)

    gen = load(out, threads=1)
    assert gen.executor._with_attentions is None  # not loaded until asked for
    pixels = np.random.default_rng(3).standard_normal((2, 3, 32, 32), dtype=np.float32)
    options = {"num_beams": 2, "min_new_tokens": 4, "max_new_tokens": 4, "return_dict": True}
    plain = gen.generate(pixels, **options)
    with_attn = gen.generate(pixels, output_attentions=True, **options)
    assert gen.executor._with_attentions is not None
    np.testing.assert_array_equal(plain.sequences, with_attn.sequences)
    np.testing.assert_array_equal(plain.sequences_scores, with_attn.sequences_scores)
    assert plain.cross_attentions is None and len(with_attn.cross_attentions) == 4


def test_folding_drops_constant_nodes_that_nothing_reads():
    """A constant computation whose result no node and no output reads is removed, not handed to
    ONNX Runtime as a model with no outputs (which it refuses)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from vedrt.export import fold

    c = numpy_helper.from_array(np.ones((2, 3), np.float32), "c")
    graph = helper.make_graph(
        [
            helper.make_node("Shape", ["c"], ["unused"]),
            helper.make_node("Add", ["x", "c"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [c],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    shapes = {"c": [2, 3], "unused": [2], "x": [2, 3], "y": [2, 3]}
    types = {"c": 1, "unused": 7, "x": 1, "y": 1}
    assert fold.constant_subgraphs(model, shapes, types) == 1
    assert [n.op_type for n in model.graph.node] == ["Add"]
    onnx.checker.check_model(model)
