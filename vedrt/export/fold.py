"""Fold at export what the tracer computes at run time although the image size fixes it.

TorchScript records `pixel_values.shape[2]` as `Shape -> Gather`, so everything derived from the
image size is a run-time computation on an input with a dynamic batch axis, which neither the
exporter nor ONNX Runtime can fold. BEiT's relative position bias is the large case: each layer
rebuilds its bias table from the patch grid (Range, ScatterND, Resize, Gather: about 1,500 of the
scene model's 1,700 computing encoder nodes, 0.6 ms of a 2.5 ms batch-1 encode); Swin's window
padding is another. With the symbolic shapes known, a `Shape` (or a `Gather` of one) whose dims are
numbers becomes a constant, and the constant subgraphs it fed are evaluated once by ONNX Runtime's
own kernels and stored as initializers: the same values, computed once at export.
"""

from __future__ import annotations

import numpy as np

# a folded tensor larger than this stays a computation: folding must never duplicate weights
# (a transposed copy of a tied embedding would double the head's bytes on disk and in memory)
MAX_FOLDED_BYTES = 1 << 22
_NEVER = {
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
}
_BYTES = {1: 4, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 16: 2}  # ONNX element types the graphs use


def _static(dims) -> bool:
    return dims is not None and all(isinstance(d, int) and d >= 0 for d in dims)


def static_shapes(graph, shapes: dict) -> int:
    """Replace each `Shape(x)` and `Gather(Shape(x), const)` whose dims are numbers by a constant
    (`shapes`: tensor name -> dims, ints where known). Returns how many were replaced."""
    from onnx import helper, numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.data_type == 7}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            if node.attribute[0].t.data_type == 7:
                values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    producers = {o: n for n in graph.node for o in n.output}
    inner = _read_in_subgraphs(graph)
    replaced = {}
    for index, node in enumerate(graph.node):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        value = None
        if node.op_type == "Shape":
            dims = shapes.get(node.input[0])
            if dims is not None:
                dims = dims[attrs.get("start", 0) : attrs.get("end", len(dims))]
                value = np.array(dims, np.int64) if _static(dims) else None
        elif node.op_type == "Gather" and node.input[1] in values and attrs.get("axis", 0) == 0:
            shape = producers.get(node.input[0])
            if shape is not None and shape.op_type == "Shape" and not shape.attribute:
                dims = shapes.get(shape.input[0])
                at = values[node.input[1]]
                if dims is not None and np.all((at < len(dims)) & (at >= -len(dims))):
                    picked = np.array(dims, dtype=object)[at]
                    if _static(np.atleast_1d(picked).tolist()):
                        value = np.array(picked, dtype=np.int64)
        if value is not None and node.output[0] not in inner:
            replaced[index] = numpy_helper.from_array(value, node.output[0])
    _remove(graph, replaced)
    graph.initializer.extend(replaced.values())
    return len(replaced)


def reads(node) -> list[str]:
    """The names a node reads from its graph: its inputs and, for If/Loop/Scan, the outer names
    its subgraphs read (a node runs after their producers too)."""
    names = list(node.input)
    for attr in node.attribute:
        for sub in [attr.g] if attr.type == 5 else list(attr.graphs) if attr.type == 10 else []:
            local = {i.name for i in sub.input} | {t.name for t in sub.initializer}
            local |= {o for inner in sub.node for o in inner.output}
            names += [i for inner in sub.node for i in reads(inner) if i not in local]
    return names


def _read_in_subgraphs(graph) -> set[str]:
    """Names read inside If/Loop/Scan bodies. They stay computed: ONNX Runtime's quantizer
    drops outer-scope initializers that only a subgraph reads, and then rejects the model."""
    return {name for n in graph.node for name in reads(n)[len(n.input) :]}


def _remove(graph, indices) -> None:
    kept = [n for i, n in enumerate(graph.node) if i not in indices]
    del graph.node[:]
    graph.node.extend(kept)


def _size(dims, elem_type: int | None) -> int | None:
    if not _static(dims) or elem_type not in _BYTES:
        return None
    return int(np.prod(dims, dtype=np.int64)) * _BYTES[elem_type]


def constant_subgraphs(model, shapes: dict, types: dict) -> int:
    """Evaluate the nodes whose inputs are all constant (ONNX Runtime's kernels, once) and store
    their results that the rest of the graph reads as initializers. Returns the nodes folded."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    known = set(initializers) | {""}
    constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    known |= set(constants)
    inner = _read_in_subgraphs(graph)
    folded: dict[int, object] = {}
    # Identity of a constant is evaluated through but kept, never folded: the tracer shares equal
    # parameters (fresh LayerNorm weights) through it, which ONNX Runtime resolves without a
    # copy, and folding it would store each copy again
    aliases: dict[int, object] = {}
    for index, node in enumerate(graph.node):
        if node.op_type == "Identity" and node.input[0] in known:
            aliases[index] = node
            known.update(node.output)
            continue
        if (
            node.op_type == "Constant"
            or node.op_type in _NEVER
            or node.domain not in ("", "ai.onnx")
        ):
            continue
        if any(a.type in (5, 10) for a in node.attribute):  # subgraphs: If, Loop, Scan
            continue
        if not all(i in known for i in node.input) or inner.intersection(node.output):
            continue
        sizes = [_size(shapes.get(o), types.get(o)) for o in node.output]
        if any(s is None or s > MAX_FOLDED_BYTES for s in sizes):
            continue
        folded[index] = node
        known.update(node.output)
    if not folded:
        return 0
    made = {o for n in folded.values() for o in n.output}
    read_later = {i for k, n in enumerate(graph.node) if k not in folded for i in reads(n)}
    read_later |= {o.name for o in graph.output}
    frontier = sorted(made & read_later)
    if not frontier:  # nothing reads what they make: dead nodes, nothing to evaluate
        _remove(graph, folded)
        return len(folded)
    steps = [node for _, node in sorted((folded | aliases).items())]
    needed = {i for n in steps for i in n.input}
    sub = onnx.helper.make_graph(
        [constants[i] for i in sorted(needed & set(constants))] + steps,
        "fold",
        [],
        [onnx.helper.make_empty_tensor_value_info(name) for name in frontier],
        [initializers[i] for i in sorted(needed & set(initializers))],
    )
    submodel = onnx.helper.make_model(sub, opset_imports=model.opset_import)
    submodel.ir_version = model.ir_version
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(
        submodel.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    results = session.run(frontier, {})
    _remove(graph, folded)
    for name, value in zip(frontier, results, strict=True):
        graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return len(folded)


def constant_ifs(graph) -> int:
    """Replace each `If` whose condition is now a constant by the branch it takes (the tracer
    spells `squeeze(dim)` as an If on that dim's size). A kept If would run before the nodes its
    branches read once its condition is constant, which ONNX Runtime's fusions reorder it to."""
    from onnx import helper, numpy_helper

    values = {t.name: t for t in graph.initializer}
    names = {o for n in graph.node for o in n.output}
    nodes, done = [], 0
    for node in graph.node:
        bodies = [a.g for a in node.attribute if a.type == 5]
        inner = {o for body in bodies for n in body.node for o in n.output}
        if node.op_type != "If" or node.input[0] not in values or inner & names:
            nodes.append(node)
            continue
        taken = (
            "then_branch" if numpy_helper.to_array(values[node.input[0]]).all() else "else_branch"
        )
        branch = next(a.g for a in node.attribute if a.name == taken)
        nodes += list(branch.node)
        graph.initializer.extend(branch.initializer)
        for result, outer in zip(branch.output, node.output, strict=True):
            nodes.append(
                helper.make_node("Identity", [result.name], [outer], f"{node.name}/{taken}")
            )
        done += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return done
