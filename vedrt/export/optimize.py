"""Export-time speed work on the written graphs: ONNX Runtime's transformer fusions and int8.

Fusions are done once here and saved, so loading an export does not redo them (ONNX Runtime's own
online optimizations still run at load, but find little left to do). Only exact rewrites are
enabled: LayerNorm, Gelu, FastGelu (GPT-2's tanh form, which is its exact formula) and the bias
adds folded into them. SkipLayerNorm (residual add + LayerNorm) is off, here and in the runtime's
CPU sessions (`SKIP_LAYER_NORM`): ONNX Runtime 1.32's CPU kernel for it is 3-8x slower than the
Add and LayerNormalization it replaces (measured: 340 vs 58 us at [8, 65, 128], 778 vs 100 us at
ViT-base's [1, 197, 768], 21 vs 8 us at a GPT-2 step's [4, 1, 768]; 1 thread). Attention and
embedding fusions are off: ours read a preallocated cache through `past_length` and compute positions from it,
which those kernels do not; the Gelu approximation is off because it changes results. The fused
ops are ONNX Runtime contrib ops (CPU and CUDA kernels), listed in the manifest.

int8 quantization is `quantize.py`'s.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from . import fold

GRAPHS = ("encoder", "cross_kv", "decoder")


@contextlib.contextmanager
def quiet():
    """The optimizer and quantizer log and warn per node; none of it is for the user."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def _fusion_options():
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions("bert")
    options.enable_attention = False
    options.enable_skip_layer_norm = False  # slower than Add + LayerNormalization on the CPU
    options.enable_bias_skip_layer_norm = False
    options.enable_embed_layer_norm = False
    options.enable_rotary_embeddings = False
    options.enable_gelu_approximation = False
    options.enable_qordered_matmul = False
    return options


def fuse_graph(path: Path) -> dict[str, int]:
    """Rewrite one graph in place with the exact fusions; returns the count of each fused op."""
    from onnxruntime.transformers.optimizer import optimize_model

    with quiet():
        model = optimize_model(
            str(path),
            model_type="bert",
            optimization_options=_fusion_options(),
            opt_level=0,  # python fusions only: the saved graph stays free of CPU-only layouts
        )
        stats = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
        tmp = path.with_suffix(".fused.tmp")
        model.save_model_to_file(str(tmp))
    os.replace(tmp, path)
    return stats


def fuse_graphs(export_dir: Path) -> dict[str, dict[str, int]]:
    """Fuse and simplify the three graphs of an export directory; returns what each pass did."""
    out = {}
    for name in GRAPHS:
        path = export_dir / f"{name}.onnx"
        simplified = simplify_graph(path)  # first: the fusions match MatMul + Add, not Gemm
        out[name] = simplified | fuse_graph(path)
    return out


def externalize(export_dir: Path) -> None:
    """Move each graph's weights into `<graph>.onnx.data` beside it (the last export step).

    ONNX Runtime then reads the weights straight into its tensors instead of parsing them out of
    one big protobuf held in memory alongside: the fp32 ViT-GPT2 export loads in about 40% less
    time with about 20% less peak RSS.
    """
    import onnx

    for name in GRAPHS:
        path = export_dir / f"{name}.onnx"
        model = onnx.load(str(path))
        data = path.with_name(path.name + ".data")
        data.unlink(missing_ok=True)
        onnx.save(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
        )


LEAN_DECODER = "decoder_no_attentions.onnx"


def write_lean_decoder(export_dir: Path) -> str:
    """Write the decoder step without its `cross_attn.{i}` outputs, reading the same weights file.

    Attention probabilities are wanted only with `output_attentions`, but a graph computes every
    output it declares, each step: their transposes, reshapes and writes cost the ViT-GPT2 step
    0.9 ms of 22.5 at 4 rows and 1.9 of 76.7 ms at 32 (2 threads, interleaved, same tokens). The
    CPU runtime steps this graph and loads the full one only when a request asks for attentions.
    Run after `externalize`: the copy names `decoder.onnx.data` for its weights, so only the
    graph's structure (tens of KB) is stored twice. Returns the file's name."""
    import onnx

    model = onnx.load(str(export_dir / "decoder.onnx"), load_external_data=False)
    graph = model.graph
    kept = [o for o in graph.output if not o.name.startswith("cross_attn.")]
    del graph.output[:]
    graph.output.extend(kept)
    prune(graph)
    onnx.save(model, str(export_dir / LEAN_DECODER))
    return LEAN_DECODER


def _dims(value) -> list[int | str] | None:
    if not value.type.tensor_type.HasField("shape"):
        return None
    return [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
        for d in value.type.tensor_type.shape.dim
    ]


def simplify_graph(path: Path) -> dict[str, int]:
    """Drop the shape arithmetic the tracer leaves around every Reshape and Linear, in place.

    TorchScript spells `x.view(b, t, heads, hd)` as Shape -> Gather -> Unsqueeze -> Concat ->
    Reshape and every Linear on a 3-D input as Reshape -> Gemm -> Reshape. A GPT2-small step has
    about 1,600 such tiny kernels besides ~150 real ones: several milliseconds a step, as much as
    the int8 MatMuls. With the symbolic shapes known, each Reshape gets a constant target (0 keeps
    a dimension, one -1 infers a product) and each Gemm sandwich becomes MatMul + Add on the 3-D
    tensor; the arithmetic then feeds nothing and is removed. What the image size fixes is
    folded to constants (`fold.py`). Exact: the same values are computed.
    """
    import onnx

    model = onnx.load(str(path))
    try:
        inferred = _infer(model)
    except Exception:  # an op it cannot infer: keep the graph as it is
        return {}
    graph = inferred.graph
    shapes, types = _shapes(graph)
    stats = Counter(
        GemmToMatMul=_unwrap_gemms(graph, shapes), ConstReshape=_const_reshapes(graph, shapes)
    )
    for round_ in range(3):
        if round_:  # a folded padding gave the next shapes numbers (Swin): infer, fold again
            del graph.value_info[:]
            try:
                inferred = _infer(inferred)
            except Exception:  # keep what is folded so far
                break
            graph = inferred.graph
            shapes, types = _shapes(graph)
        shaped = fold.static_shapes(graph, shapes)
        stats["StaticShape"] += shaped
        stats["ConstantFolded"] += fold.constant_subgraphs(inferred, shapes, types)
        stats["ConstantIf"] += fold.constant_ifs(graph)
        _toposort(graph)  # an inlined branch reads values produced after the If it replaced
        stats["NodesRemoved"] += prune(graph)
        if not shaped:
            break
    del graph.value_info[:]  # symbolic names such as "batch_beams*new_len" are not for ORT
    onnx.save(inferred, str(path))
    return {k: v for k, v in stats.items() if v}


def _infer(model):
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    with quiet():
        return SymbolicShapeInference.infer_shapes(model, auto_merge=True)


def _shapes(graph) -> tuple[dict, dict]:
    """Each tensor's dims (ints where known) and element type, from the inferred value infos."""
    values = [*graph.value_info, *graph.input, *graph.output]
    return {v.name: _dims(v) for v in values}, {
        v.name: v.type.tensor_type.elem_type for v in values
    }


def _consumers(graph) -> dict[str, list]:
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _unwrap_gemms(graph, shapes: dict) -> int:
    """Reshape(3-D -> 2-D) -> Gemm(x, W, b) -> Reshape(-> 3-D): MatMul(x, W) + b."""
    from onnx import helper, numpy_helper

    producers = {o: n for n in graph.node for o in n.output}
    users = _consumers(graph)
    inits = {t.name: t for t in graph.initializer}
    done = 0
    for gemm in [n for n in graph.node if n.op_type == "Gemm"]:
        attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
        before = producers.get(gemm.input[0])
        after = users.get(gemm.output[0], [])
        if (
            len(gemm.input) != 3
            or gemm.input[1] not in inits
            or attrs.get("alpha", 1.0) != 1.0
            or attrs.get("beta", 1.0) != 1.0
            or attrs.get("transA", 0)
            or before is None
            or before.op_type != "Reshape"
            or len(after) != 1
            or after[0].op_type != "Reshape"
            or len(users.get(before.output[0], [])) != 1
        ):
            continue
        x_dims, y_dims = shapes.get(before.input[0]), shapes.get(after[0].output[0])
        if not x_dims or not y_dims or len(x_dims) != 3 or x_dims[:-1] != y_dims[:-1]:
            continue
        weight = inits[gemm.input[1]]
        if attrs.get("transB", 0):
            w = numpy_helper.to_array(weight).T.copy()
            weight.CopyFrom(numpy_helper.from_array(w, weight.name))
        product = gemm.output[0] + "/matmul"
        matmul = helper.make_node(
            "MatMul", [before.input[0], gemm.input[1]], [product], gemm.name + "/MatMul"
        )
        add = helper.make_node(
            "Add", [product, gemm.input[2]], [after[0].output[0]], gemm.name + "/Add"
        )
        index = list(graph.node).index(gemm)
        for node in (before, gemm, after[0]):
            graph.node.remove(node)
        graph.node.insert(min(index, len(graph.node)), add)
        graph.node.insert(min(index, len(graph.node)), matmul)
        done += 1
    _toposort(graph)
    return done


def _const_reshapes(graph, shapes: dict) -> int:
    """Give each Reshape with a computed target a constant one, where the shapes allow it."""
    from onnx import numpy_helper

    constant = {t.name for t in graph.initializer}
    constant |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    done = 0
    for node in [n for n in graph.node if n.op_type == "Reshape"]:
        x, y = shapes.get(node.input[0]), shapes.get(node.output[0])
        if node.input[1] in constant or not x or not y:
            continue
        target = []
        for i, d in enumerate(y):
            if isinstance(d, int) and d > 0:
                target.append(d)
            elif i < len(x) and x[i] == d and d != "?":
                target.append(0)
            else:
                target.append(-1)
        if target.count(-1) > 1:
            continue
        name = f"{node.output[0]}/const_shape"
        graph.initializer.append(numpy_helper.from_array(np.array(target, np.int64), name))
        node.input[1] = name
        done += 1
    return done


def prune(graph) -> int:
    """Remove nodes whose outputs reach no graph output, and the initializers nobody reads."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in fold.reads(node) if i)
    removed = len(graph.node) - len(keep)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    unused = [t for t in graph.initializer if t.name not in needed]
    for t in unused:
        graph.initializer.remove(t)
    return removed


def _toposort(graph) -> None:
    """Order nodes so each comes after its inputs' producers (the rewrites insert out of order)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in fold.reads(node)):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):  # a cycle or a dangling input: leave the order alone
            return
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
