"""Decompose ONNX Runtime's contrib fusions back into standard ONNX ops, for TensorRT's parser.

The export saves graphs fused by `onnxruntime.transformers` (see `vedrt/export/optimize.py`):
SkipLayerNormalization, Gelu, FastGelu, BiasGelu and friends, in the `com.microsoft` domain (and
SimplifiedLayerNormalization, which ONNX Runtime registers in the default domain although ONNX
has no such op). ONNX Runtime runs them; TensorRT's ONNX parser does not know them. Each is
rewritten here into the standard ops that compute the same function (TensorRT fuses those again
on its own), so the parser sees only ops of the ONNX standard. Weights are not touched: a graph
whose tensors live in `<graph>.onnx.data` keeps pointing there.

Every fusion the exporter's options can emit is covered; anything else left outside the standard
is an error naming the op, not a parser failure deep inside TensorRT.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

CONTRIB = "com.microsoft"
STANDARD_DOMAINS = ("", "ai.onnx")
SKIP_LAYER_NORM_EPSILON = 1e-12  # ONNX Runtime's default when the attribute is absent
SIMPLIFIED_LAYER_NORM_EPSILON = 1e-5
QUICK_GELU_ALPHA = 1.702


class StandardizeError(ValueError):
    """A graph holds an op this module cannot express in standard ONNX."""


class _Builder:
    """Emits the replacement nodes of one fused node, with unique names and typed constants."""

    def __init__(self, graph, node, float_type: int, opset: int) -> None:
        self.graph, self.node, self.float_type, self.opset = graph, node, float_type, opset
        self.nodes: list = []
        self.count = 0

    def name(self, what: str) -> str:
        self.count += 1
        return f"{self.node.name or self.node.output[0]}/std/{what}{self.count}"

    def op(self, op_type: str, inputs: list[str], outputs: list[str] | None = None, **attrs) -> str:
        from onnx import helper

        outputs = outputs or [self.name(op_type)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, self.name(op_type), **attrs))
        return outputs[0]

    def const(self, value: float, what: str = "c") -> str:
        import numpy as np
        from onnx import helper, numpy_helper

        dtype = helper.tensor_dtype_to_np_dtype(self.float_type)
        name = self.name(what)
        self.graph.initializer.append(numpy_helper.from_array(np.array(value, dtype), name))
        return name

    def axes(self, axes: list[int]) -> str:
        import numpy as np
        from onnx import numpy_helper

        name = self.name("axes")
        self.graph.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), name))
        return name

    def reduce_mean(self, x: str, axis: int) -> str:
        if self.opset >= 18:  # axes became an input in opset 18
            return self.op("ReduceMean", [x, self.axes([axis])], keepdims=1)
        return self.op("ReduceMean", [x], axes=[axis], keepdims=1)


def _attr(node, name: str, default):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _input(node, index: int) -> str:
    return node.input[index] if len(node.input) > index else ""


def _output(node, index: int) -> str:
    return node.output[index] if len(node.output) > index else ""


def _skip_sum(b: _Builder, node, bias_index: int) -> str:
    """input + skip (+ bias), in ONNX Runtime's order, written to the sum output if it is used."""
    total = b.op("Add", [node.input[0], node.input[1]])
    bias = _input(node, bias_index)
    if bias:
        total = b.op("Add", [total, bias])
    wanted = _output(node, 3)
    if wanted:
        b.op("Identity", [total], [wanted])
    return total


def _skip_layer_norm(b: _Builder, node) -> None:
    """SkipLayerNormalization(input, skip, gamma, beta?, bias?) -> Add(s) + LayerNormalization."""
    if b.opset < 17:
        raise StandardizeError("SkipLayerNormalization needs opset >= 17 for LayerNormalization")
    total = _skip_sum(b, node, 4)
    epsilon = float(_attr(node, "epsilon", SKIP_LAYER_NORM_EPSILON))
    inputs = [total, node.input[2]] + ([_input(node, 3)] if _input(node, 3) else [])
    outputs = [node.output[0], _output(node, 1), _output(node, 2)]
    while outputs and not outputs[-1]:
        outputs.pop()
    b.op("LayerNormalization", inputs, outputs, axis=-1, epsilon=epsilon, stash_type=1)


def _rms_norm(b: _Builder, x: str, scale: str, epsilon: float, y: str, inv_std: str) -> None:
    """y = x / sqrt(mean(x^2) + epsilon) * scale over the last axis (T5/LLaMA's RMSNorm)."""
    mean_square = b.reduce_mean(b.op("Mul", [x, x]), -1)
    root = b.op("Sqrt", [b.op("Add", [mean_square, b.const(epsilon, "epsilon")])])
    b.op("Mul", [b.op("Div", [x, root]), scale], [y])
    if inv_std:
        b.op("Reciprocal", [root], [inv_std])


def _skip_simplified_layer_norm(b: _Builder, node) -> None:
    """SkipSimplifiedLayerNormalization(input, skip, gamma, bias?) -> Add(s) + RMSNorm."""
    if _output(node, 1):
        raise StandardizeError("SkipSimplifiedLayerNormalization: its mean output is not supported")
    total = _skip_sum(b, node, 3)
    epsilon = float(_attr(node, "epsilon", SKIP_LAYER_NORM_EPSILON))
    _rms_norm(b, total, node.input[2], epsilon, node.output[0], _output(node, 2))


def _simplified_layer_norm(b: _Builder, node) -> None:
    """SimplifiedLayerNormalization(X, scale) over the last axis -> RMSNorm in standard ops."""
    if int(_attr(node, "axis", -1)) != -1:
        raise StandardizeError("SimplifiedLayerNormalization: only axis=-1 is supported")
    epsilon = float(_attr(node, "epsilon", SIMPLIFIED_LAYER_NORM_EPSILON))
    _rms_norm(b, node.input[0], node.input[1], epsilon, node.output[0], _output(node, 1))


def _erf_gelu(b: _Builder, x: str, y: str) -> None:
    """y = 0.5 * x * (1 + erf(x / sqrt(2))), the exact GELU."""
    erf = b.op("Erf", [b.op("Mul", [x, b.const(1 / math.sqrt(2), "rsqrt2")])])
    b.op("Mul", [b.op("Mul", [x, b.op("Add", [erf, b.const(1.0, "one")])]), b.const(0.5)], [y])


def _with_bias(b: _Builder, node) -> str:
    bias = _input(node, 1)
    return b.op("Add", [node.input[0], bias]) if bias else node.input[0]


def _gelu(b: _Builder, node) -> None:
    _erf_gelu(b, node.input[0], node.output[0])


def _bias_gelu(b: _Builder, node) -> None:
    _erf_gelu(b, _with_bias(b, node), node.output[0])


def _fast_gelu(b: _Builder, node) -> None:
    """FastGelu(X, bias?): 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))), x = X + bias."""
    x = _with_bias(b, node)
    cube = b.op("Mul", [b.op("Mul", [x, x]), x])
    inner = b.op("Add", [x, b.op("Mul", [cube, b.const(0.044715, "k")])])
    tanh = b.op("Tanh", [b.op("Mul", [inner, b.const(math.sqrt(2 / math.pi), "sqrt2pi")])])
    half_x = b.op("Mul", [x, b.const(0.5, "half")])
    b.op("Mul", [half_x, b.op("Add", [tanh, b.const(1.0, "one")])], [node.output[0]])


def _quick_gelu(b: _Builder, node) -> None:
    """QuickGelu(X; alpha) = X * sigmoid(alpha * X)."""
    x = node.input[0]
    alpha = float(_attr(node, "alpha", QUICK_GELU_ALPHA))
    gate = b.op("Sigmoid", [b.op("Mul", [x, b.const(alpha, "alpha")])])
    b.op("Mul", [x, gate], [node.output[0]])


REWRITES: dict[tuple[str, str], Callable] = {
    (CONTRIB, "SkipLayerNormalization"): _skip_layer_norm,
    (CONTRIB, "SkipSimplifiedLayerNormalization"): _skip_simplified_layer_norm,
    (CONTRIB, "SimplifiedLayerNormalization"): _simplified_layer_norm,
    ("", "SimplifiedLayerNormalization"): _simplified_layer_norm,
    (CONTRIB, "Gelu"): _gelu,
    (CONTRIB, "BiasGelu"): _bias_gelu,
    (CONTRIB, "FastGelu"): _fast_gelu,
    (CONTRIB, "QuickGelu"): _quick_gelu,
}


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), 0)


def _float_type(graph) -> int:
    """The graph's float element type (an export is one precision): its weights' commonest."""
    from onnx import TensorProto

    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
    kinds = Counter(t.data_type for t in graph.initializer if t.data_type in floats)
    return kinds.most_common(1)[0][0] if kinds else TensorProto.FLOAT


def nonstandard_ops(model) -> list[str]:
    """`domain::op` of every node TensorRT's parser would meet outside the ONNX standard."""
    from onnx import defs

    found = set()
    for node in model.graph.node:
        if node.domain not in STANDARD_DOMAINS or not defs.has(node.op_type):
            found.add(f"{node.domain or 'ai.onnx'}::{node.op_type}")
    return sorted(found)


def standardize(model) -> dict[str, int]:
    """Rewrite every contrib fusion of `model` (in place) into standard ops; returns the counts.

    Raises StandardizeError if any op outside the standard remains, naming it.
    """
    graph = model.graph
    opset = _opset(model)
    float_type = _float_type(graph)
    done: Counter[str] = Counter()
    nodes = []
    for node in graph.node:
        rewrite = REWRITES.get((node.domain, node.op_type))
        if rewrite is None:
            nodes.append(node)
            continue
        builder = _Builder(graph, node, float_type, opset)
        rewrite(builder, node)
        nodes.extend(builder.nodes)
        done[node.op_type] += 1
    del graph.node[:]
    graph.node.extend(nodes)  # each replacement sits where its node was: still in order
    if done:
        kept = [o for o in model.opset_import if o.domain != CONTRIB]
        del model.opset_import[:]
        model.opset_import.extend(kept)
    left = nonstandard_ops(model)
    if left:
        raise StandardizeError(f"ops outside the ONNX standard remain: {', '.join(left)}")
    return dict(done)
