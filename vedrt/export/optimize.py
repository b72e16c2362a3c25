"""Export-time speed work on the written graphs: ONNX Runtime's transformer fusions and int8.

Fusions are done once here and saved, so loading an export does not redo them (ONNX Runtime's own
online optimizations still run at load, but find little left to do). Only exact rewrites are
enabled: LayerNorm, SkipLayerNorm (residual add + LayerNorm), Gelu, FastGelu (GPT-2's tanh form,
which is its exact formula) and the bias adds folded into them. Attention and embedding fusions
are off: ours read a preallocated cache through `past_length` and compute positions from it,
which those kernels do not; the Gelu approximation is off because it changes results. The fused
ops are ONNX Runtime contrib ops (CPU and CUDA kernels), listed in the manifest.

`quantize="int8"` then replaces every weight MatMul/Gemm by a dynamic int8 one
(`quantize_dynamic`, QInt8 weights, activations quantized per call): 4x fewer weight bytes to
stream per decoder step, which is what a step on CPU is bound by. Its results are no longer
within 1e-4 of PyTorch, so its check is how often greedy tokens agree with the fp32 model's.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

GRAPHS = ("encoder", "cross_kv", "decoder")
QUANTIZE_CHOICES = ("int8",)


@contextlib.contextmanager
def _quiet():
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
    options.enable_embed_layer_norm = False
    options.enable_rotary_embeddings = False
    options.enable_gelu_approximation = False
    options.enable_qordered_matmul = False
    return options


def fuse_graph(path: Path) -> dict[str, int]:
    """Rewrite one graph in place with the exact fusions; returns the count of each fused op."""
    from onnxruntime.transformers.optimizer import optimize_model

    with _quiet():
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


def graph_bytes(path: Path) -> int:
    """A graph's size on disk, its external weights included."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


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
    tensor; the arithmetic then feeds nothing and is removed. Exact: the same values are computed.
    """
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(str(path))
    try:
        with _quiet():
            inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # an op it cannot infer: keep the graph as it is
        return {}
    graph = inferred.graph
    shapes = {v.name: _dims(v) for v in [*graph.value_info, *graph.input, *graph.output]}
    stats = {
        "GemmToMatMul": _unwrap_gemms(graph, shapes),
        "ConstReshape": _const_reshapes(graph, shapes),
    }
    stats["NodesRemoved"] = _prune(graph)
    del graph.value_info[:]  # symbolic names such as "batch_beams*new_len" are not for ORT
    onnx.save(inferred, str(path))
    return {k: v for k, v in stats.items() if v}


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


def _prune(graph) -> int:
    """Remove nodes whose outputs reach no graph output, and the initializers nobody reads."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
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
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):  # a cycle or a dangling input: leave the order alone
            return
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def quantize_graph(path: Path) -> None:
    """Dynamic int8 weights (QInt8) for every MatMul/Gemm with a constant weight, in place."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_suffix(".int8.tmp")
    with _quiet():
        quantize_dynamic(
            path,
            tmp,
            op_types_to_quantize=["MatMul", "Gemm"],
            weight_type=QuantType.QInt8,
            per_channel=False,
            # the fused contrib ops defeat shape inference; everything around them is float32
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": TensorProto.FLOAT},
        )
    os.replace(tmp, path)
    _share_quantized_tables(path)


def _share_quantized_tables(path: Path) -> None:
    """Look tokens up in the int8 copy of a tied head, so its fp32 copy is not kept for that.

    A head tied to the token embedding is one [d, vocab] matrix read by a MatMul and a Gather;
    quantizing the MatMul leaves the fp32 matrix behind for the Gather (154 MB for GPT-2).
    Gather from the int8 matrix, then dequantize the few rows looked up.
    """
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    graph = model.graph
    names = {t.name for t in graph.initializer}
    changed = False
    for node in list(graph.node):
        table = node.input[0] if node.op_type == "Gather" else None
        if table is None or f"{table}_quantized" not in names:
            continue
        rows = node.output[0] + "/int8"
        dequant = helper.make_node(
            "DequantizeLinear",
            [rows, f"{table}_scale", f"{table}_zero_point"],
            [node.output[0]],
            node.name + "/Dequantize",
        )
        node.input[0], node.output[0] = f"{table}_quantized", rows
        graph.node.insert(list(graph.node).index(node) + 1, dequant)
        changed = True
    if changed:
        _prune(graph)
        onnx.save(model, str(path))


def quantize_graphs(export_dir: Path, quantize: str) -> None:
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize={quantize!r}: choose one of {', '.join(QUANTIZE_CHOICES)}")
    for name in GRAPHS:
        quantize_graph(export_dir / f"{name}.onnx")


@dataclass(frozen=True)
class TokenAgreement:
    """Greedy tokens of the quantized graphs against the fp32 PyTorch model's, on random images."""

    images: int
    new_tokens: int
    sequences_identical: float  # share of images whose whole sequence matches
    tokens_agreeing: float  # share of positions before each sequence's first difference
    threshold: float = 0.5  # below this share of identical sequences, the export warns

    @property
    def passed(self) -> bool:
        return self.sequences_identical >= self.threshold

    def to_json(self) -> dict:
        return {"passed": self.passed, **asdict(self)}


def _vedrt_greedy(export_dir: Path, pixel_values: np.ndarray, start: int, steps: int) -> np.ndarray:
    """Plain argmax decoding (no stopping) through the runtime's own loader and engine."""
    from ..runtime import load

    gen = load(export_dir)
    plain = dict(num_beams=1, do_sample=False, min_length=0, no_repeat_ngram_size=0)
    plain |= dict(repetition_penalty=1.0, bad_words_ids=None, forced_bos_token_id=None)
    ids = gen.generate(
        pixel_values,
        max_new_tokens=steps,
        eos_token_id=None,
        forced_eos_token_id=None,
        decoder_start_token_id=start,
        **plain,
    )
    return ids[:, 1:]


def _torch_greedy(model, pixel_values: np.ndarray, start: int, steps: int) -> np.ndarray:
    """The same plain argmax decoding with transformers' fp32 model (full recompute per step)."""
    import torch

    with torch.no_grad():
        encoded = model.encoder(pixel_values=torch.from_numpy(pixel_values))
        ids = torch.full((pixel_values.shape[0], 1), start, dtype=torch.long)
        for _ in range(steps):
            logits = model(encoder_outputs=encoded, decoder_input_ids=ids).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[:, 1:].numpy()


def token_agreement(
    model,
    export_dir: Path,
    start_token: int,
    images: int = 8,
    new_tokens: int = 16,
    seed: int = 0,
) -> TokenAgreement:
    """Compare greedy tokens of the graphs in `export_dir` with the fp32 model's."""
    from ..manifest import read_manifest

    image_size = read_manifest(export_dir).image_size
    rng = np.random.default_rng(seed)
    pixel_values = rng.standard_normal((images, 3, *image_size), dtype=np.float32)
    max_positions = _max_new(model, new_tokens)
    ours = _vedrt_greedy(export_dir, pixel_values, start_token, max_positions)
    ref = _torch_greedy(model, pixel_values, start_token, max_positions)
    same = ours == ref
    first_diff = np.where(same.all(axis=1), same.shape[1], np.argmin(same, axis=1))
    return TokenAgreement(
        images=images,
        new_tokens=max_positions,
        sequences_identical=float(same.all(axis=1).mean()),
        tokens_agreeing=float(first_diff.mean() / same.shape[1]),
    )


def _max_new(model, wanted: int) -> int:
    """No more tokens than the decoder has positions for (tiny test models have few)."""
    config = model.decoder.config
    positions = getattr(config, "n_positions", None) or getattr(
        config, "max_position_embeddings", wanted + 4
    )
    return max(1, min(wanted, positions - 4))
