"""TensorRT is handed standard ONNX only: the exporter's contrib fusions are decomposed into the
same math (checked with ONNX Runtime against the fused graphs), and what the builder passes to
TensorRT's parser holds no op outside the standard. Needs onnx + onnxruntime, not TensorRT."""

from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from vedrt.tensorrt import build  # noqa: E402
from vedrt.tensorrt.standard import (  # noqa: E402
    REWRITES,
    StandardizeError,
    nonstandard_ops,
    standardize,
)

SCENES = Path(__file__).resolve().parent.parent / "vedrt" / "models" / "scenes"
GRAPHS = ("encoder", "cross_kv", "decoder")


def assert_standard(model) -> None:
    assert nonstandard_ops(model) == []
    assert {n.domain for n in model.graph.node} <= {""}
    assert "com.microsoft" not in {o.domain for o in model.opset_import}


def session(model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no refusing
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])


DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def random_feeds(sess: ort.InferenceSession, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for any of the export's graphs: symbolic dims 2, ids small, masks open, other
    integers (positions, lengths, slot indices) 0."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in sess.get_inputs():
        shape = [d if isinstance(d, int) else 2 for d in spec.shape]
        dtype = DTYPES[spec.type]
        if "mask" in spec.name:
            feeds[spec.name] = np.ones(shape, dtype)
        elif np.issubdtype(dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif "ids" in spec.name:
            feeds[spec.name] = rng.integers(3, 60, shape).astype(dtype)
        else:
            feeds[spec.name] = np.zeros(shape, dtype)
    return feeds


def assert_same_outputs(fused, standard, seed: int = 0, atol: float = 2e-5) -> None:
    reference, rewritten = session(fused), session(standard)
    feeds = random_feeds(reference, seed)
    names = [o.name for o in reference.get_outputs()]
    for name, a, b in zip(
        names, reference.run(None, feeds), rewritten.run(None, feeds), strict=True
    ):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=atol, err_msg=name)


def load_full(path: Path):
    return onnx.load(str(path))  # weights included, for in-memory sessions


# --- every rewrite, one op at a time, against ONNX Runtime's own contrib kernel -------------


def _single_op_model(op: str, domain: str, inputs: dict, outputs: list[str], **attrs):
    """A graph of one node whose non-first inputs are initializers (as in the export)."""
    first, *rest = inputs.items()
    node = helper.make_node(op, list(inputs), outputs, "fused", domain=domain, **attrs)
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        [node],
        "one",
        [value(first[0], TensorProto.FLOAT, ["b", "s", first[1].shape[-1]])],
        [value(name, TensorProto.FLOAT, None) for name in outputs if name],
        [numpy_helper.from_array(array, name) for name, array in rest],
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=9)


rng = np.random.default_rng(0)
H = 8
X = rng.standard_normal((2, 3, H)).astype(np.float32) * 3


def _w(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


CASES = {
    "SkipLayerNormalization": (
        "com.microsoft",
        {"x": X, "skip": _w(2, 3, H), "gamma": _w(H), "beta": _w(H)},
        ["y", "", "", "sum"],
        {"epsilon": 0.3},  # large, so a dropped epsilon shows
    ),
    "SkipLayerNormalization+bias": (
        "com.microsoft",
        {"x": X, "skip": _w(2, 3, H), "gamma": _w(H), "beta": _w(H), "bias": _w(H)},
        ["y", "mean", "inv_std", "sum"],
        {"epsilon": 1e-12},
    ),
    "SkipLayerNormalization-beta": (
        "com.microsoft",
        {"x": X, "skip": _w(2, 3, H), "gamma": _w(H)},
        ["y"],
        {},  # ONNX Runtime's default epsilon
    ),
    "SkipSimplifiedLayerNormalization": (
        "com.microsoft",
        {"x": X, "skip": _w(2, 3, H), "gamma": _w(H), "bias": _w(H)},
        ["y", "", "inv_std", "sum"],
        {"epsilon": 0.2},
    ),
    "SimplifiedLayerNormalization": (
        "",
        {"x": X, "scale": _w(H)},
        ["y"],
        {"epsilon": 0.1, "axis": -1, "stash_type": 1},
    ),
    "Gelu": ("com.microsoft", {"x": X}, ["y"], {}),
    "BiasGelu": ("com.microsoft", {"x": X, "bias": _w(H)}, ["y"], {}),
    "FastGelu": ("com.microsoft", {"x": X}, ["y"], {}),
    "FastGelu+bias": ("com.microsoft", {"x": X, "bias": _w(H)}, ["y"], {}),
    "QuickGelu": ("com.microsoft", {"x": X}, ["y"], {"alpha": 1.5}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_rewrite_computes_the_contrib_kernel(case: str) -> None:
    domain, inputs, outputs, attrs = CASES[case]
    op = case.split("+")[0].split("-")[0]
    fused = _single_op_model(op, domain, inputs, outputs, **attrs)
    standard = onnx.ModelProto()
    standard.CopyFrom(fused)
    assert standardize(standard) == {op: 1}
    assert_standard(standard)
    reference = session(fused).run(None, {"x": X})
    ours = session(standard).run(None, {"x": X})
    for name, a, b in zip([o for o in outputs if o], reference, ours, strict=True):
        a = a.reshape(b.shape) if a.size == b.size else a  # statistics: [..., 1] either way
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=f"{case}: {name}")


def test_every_rewrite_has_a_case() -> None:
    assert {op for _, op in REWRITES} == {c.split("+")[0].split("-")[0] for c in CASES}


def test_unknown_contrib_op_is_named() -> None:
    model = _single_op_model("Attention", "com.microsoft", {"x": X}, ["y"])
    with pytest.raises(StandardizeError, match="com.microsoft::Attention"):
        standardize(model)


# --- whole exported graphs: the same outputs as the fused ones ------------------------------


@pytest.mark.parametrize("graph", GRAPHS)
def test_shipped_scene_model_standard_graphs_match_fused(graph: str) -> None:
    fused = load_full(SCENES / f"{graph}.onnx")
    standard = load_full(SCENES / f"{graph}.onnx")
    rewritten = standardize(standard)
    if graph != "cross_kv":  # the encoder and decoder carry the fusions
        assert rewritten, "no fusion found: the test would check nothing"
    assert_standard(standard)
    assert_same_outputs(fused, standard)


@pytest.mark.parametrize("pair", [("vit", "gpt2"), ("deit", "trocr")], ids="-".join)
def test_tiny_export_standard_graphs_match_fused(exported, pair) -> None:
    pytest.importorskip("torch")
    _, out = exported(*pair)
    seen = {}
    for graph in GRAPHS:
        fused = load_full(out / f"{graph}.onnx")
        standard = load_full(out / f"{graph}.onnx")
        seen[graph] = standardize(standard)
        assert_standard(standard)
        for seed in range(2):
            assert_same_outputs(fused, standard, seed)
    assert seen["encoder"] and seen["decoder"], seen


# --- exactly what the builder hands TensorRT -------------------------------------------------


def test_parser_input_is_standard_and_keeps_weights_external(tmp_path: Path) -> None:
    export = tmp_path / "scenes"
    shutil.copytree(SCENES, export)
    for graph in GRAPHS:
        handed = build.parser_input(export / f"{graph}.onnx")
        model = onnx.load_from_string(handed.model_bytes)
        assert_standard(model)
        assert handed.path == export / f"{graph}.onnx"
        assert len(handed.model_bytes) < 2 * (export / f"{graph}.onnx").stat().st_size + 10_000
        onnx.load_external_data_for_model(model, str(export))  # resolvable from the graph's folder
        assert_same_outputs(load_full(export / f"{graph}.onnx"), model)


def test_build_engines_hands_each_graph_standardized(tmp_path: Path, monkeypatch) -> None:
    """build_engines, with TensorRT and the GPU faked: every graph reaches build_one standardized."""
    export = tmp_path / "scenes"
    shutil.copytree(SCENES, export)
    handed = {}

    def fake_build_one(trt, logger, graph, shapes, fp16, cache_path):
        handed[graph.path.stem] = graph
        return b"plan"

    fake_trt = types.SimpleNamespace(__version__="0.fake", Logger=lambda level: None)
    fake_trt.Logger.WARNING = 0
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt)
    monkeypatch.setattr(build, "build_one", fake_build_one)
    monkeypatch.setattr(build, "gpu_identity", lambda: "fake GPU sm_00")
    import json

    from vedrt.tensorrt.profiles import Limits

    manifest = json.loads((export / "vedrt.json").read_text())
    report = build.build_engines(export, manifest, Limits(1, 2, 4), fp16=True, log=lambda _: None)
    assert set(handed) == set(GRAPHS) == set(report.engines)
    for graph in handed.values():
        assert_standard(onnx.load_from_string(graph.model_bytes))
    assert handed["decoder"].rewritten.get("FastGelu", 0) > 0


def test_build_one_parses_the_standard_bytes(tmp_path: Path) -> None:
    """build_one gives the parser the standardized bytes and the graph's path (for its weights)."""
    parsed = []

    class Parser:
        num_errors = 1

        def __init__(self, network, logger):
            pass

        def parse(self, model_bytes, path=None):
            parsed.append((model_bytes, path))
            return False

        def get_error(self, index):
            return "stop here"

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return object()

    fake_trt = types.SimpleNamespace(Builder=Builder, OnnxParser=Parser)
    graph = build.parser_input(SCENES / "decoder.onnx")
    with pytest.raises(build.BuildError, match="decoder.onnx: TensorRT cannot parse it"):
        build.build_one(fake_trt, None, graph, {}, False, tmp_path / "cache")
    ((model_bytes, path),) = parsed
    assert model_bytes == graph.model_bytes and path == str(SCENES / "decoder.onnx")
    assert_standard(onnx.load_from_string(model_bytes))
