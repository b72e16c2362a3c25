"""The machine's floor for a generation: what its GEMM rate and memory bandwidth allow.

A ratio against a peer moves with the peer and with the machine's load; the hardware is the fixed
yardstick. `probe()` measures, in the run that reports it, three rates with ONNX Runtime (the engine
vedrt runs on, same intra-op threads):

- fp32 GEMM: `MatMul` with the weight as an initializer (prepacked by MLAS, as in the model) at the
  encoder's own shapes (`[enc_len, K] x [K, N]` for every distinct weight shape of encoder.onnx,
  plus the fused-QKV `[h, 3h]`) and a square 2048; the rate of the best shape;
- int8 GEMM: the same through `com.microsoft.DynamicQuantizeMatMul` (int8 weights, the activation
  quantized per call), which is the operator vedrt's int8 export runs; FLOPs counted as 2*M*K*N;
- memory read bandwidth: 256 MiB streamed by a `ReduceMax` over an array and by a one-row GEMV
  over a weight initializer; the better reader's median of repeated reads (single readings jump on
  a shared machine), with its spread.

`GraphCost` counts a graph's work from its ONNX file: every GEMM-like node (`MatMul`, `Gemm`,
`Conv`, `FusedMatMul`, the int8 ones) that has an initializer operand costs 2 FLOPs per weight
element per token (per output position for `Conv`); a `MatMul` of two activations is attention:
2 * seq * seq * hidden FLOPs each (`QK^T` and `AV`, all heads; global attention as in ViT). The
bytes a call must stream are those of every initializer read by a node other than `Gather` (a
lookup table is read a few rows at a time; GPT-2's tied head is also a `MatMul` operand, so it
counts), each once. The decoder's attention FLOPs and K/V cache bytes come from the manifest
(layers, heads x head_dim, positions so far, encoder length).

The harness probes before and after the generations and keeps each rate's better reading
(`combine`): a floor must not rise because the machine was busier while it was probed.

`floor()` then sums, per phase, max(FLOPs / rate, bytes / bandwidth): the encoder and the cross
K/V once per image, then each of the `new_tokens` decoder steps for `batch x beams` rows (weights
once per step, each row's self-attention cache, each image's cross-attention K/V once, since the
beams of an image share it). It is a lower bound: no step can take less, whatever the engine does.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

GEMM_OPS = {"MatMul", "Gemm", "FusedMatMul", "Conv"}
INT8_OPS = {"DynamicQuantizeMatMul", "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat"}
LOOKUP_OPS = {"Gather"}
CACHE_BYTES = 4  # the K/V caches are fp32 at every precision


# ------------------------------------------------------------------------------- graph counting


@dataclass(frozen=True)
class GraphCost:
    """The work of one call of a graph for one token (GEMMs) or one sequence (attention)."""

    fp32_weight_elems: int  # fp32 GEMM weight elements: 2 FLOPs each per token
    int8_weight_elems: int  # the same for int8 GEMMs
    conv_flops: int  # Conv FLOPs per image (patch embedding), computed at the export's image size
    attention_matmuls: int  # MatMuls of two activations (2 per attention layer)
    weight_bytes: int  # bytes of every initializer a non-lookup node reads, each once


def _tensors(model) -> dict[str, tuple[list[int], int]]:
    """Initializers and Constant-node tensors: name -> (dims, bytes per element)."""
    from onnx import helper

    out = {}
    for t in model.graph.initializer:
        out[t.name] = (list(t.dims), _itemsize(helper.tensor_dtype_to_np_dtype(t.data_type)))
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].type == 4:
            t = node.attribute[0].t
            out[node.output[0]] = (
                list(t.dims),
                _itemsize(helper.tensor_dtype_to_np_dtype(t.data_type)),
            )
    return out


def _itemsize(dtype) -> int:
    return np.dtype(dtype).itemsize


def _conv_positions(node, dims: list[int], image_size: tuple[int, int]) -> int:
    """Output positions of a Conv over the image (the patch embedding), from its attributes."""
    attrs = {a.name: list(a.ints) for a in node.attribute}
    kernel = dims[2:]
    strides = attrs.get("strides") or [1] * len(kernel)
    pads = attrs.get("pads") or [0] * (2 * len(kernel))
    positions = 1
    for axis, (size, k, s) in enumerate(zip(image_size, kernel, strides, strict=True)):
        positions *= (size + pads[axis] + pads[axis + len(kernel)] - k) // s + 1
    return positions


def graph_cost(path: Path, image_size: tuple[int, int] = (224, 224)) -> GraphCost:
    """Count a graph's GEMM weights, attention MatMuls and streamed bytes (see module doc)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    tensors = _tensors(model)
    fp32 = int8 = conv = attention = 0
    read: set[str] = set()
    for node in model.graph.node:
        weights = [x for x in node.input if x in tensors and len(tensors[x][0]) >= 2]
        if node.op_type not in LOOKUP_OPS:
            read.update(x for x in node.input if x in tensors)
        if node.op_type == "Conv" and weights:
            dims = tensors[weights[0]][0]
            conv += 2 * int(np.prod(dims)) * _conv_positions(node, dims, image_size)
        elif node.op_type in INT8_OPS and weights:
            int8 += int(np.prod(tensors[weights[0]][0]))
        elif node.op_type in GEMM_OPS and weights:
            fp32 += int(np.prod(tensors[weights[0]][0]))
        elif node.op_type in ("MatMul", "FusedMatMul"):
            attention += 1
    nbytes = sum(int(np.prod(tensors[x][0])) * tensors[x][1] for x in read)
    return GraphCost(fp32, int8, conv, attention, nbytes)


@dataclass(frozen=True)
class ModelCost:
    """What a floor needs of one export: its graphs' costs and the manifest's shapes."""

    encoder: GraphCost
    cross_kv: GraphCost
    decoder: GraphCost
    enc_len: int
    enc_hidden: int
    layers: int
    dec_hidden: int  # heads x head_dim


def model_cost(export_dir: Path) -> ModelCost:
    """Count an export's graphs once (the ONNX files without their weights: fast)."""
    manifest = json.loads((Path(export_dir) / "vedrt.json").read_text())
    enc, dec = manifest["encoder"], manifest["decoder"]
    size = tuple(int(x) for x in enc["image_size"])
    costs = {
        name: graph_cost(Path(export_dir) / manifest["graphs"][name]["file"], size)
        for name in ("encoder", "cross_kv", "decoder")
    }
    return ModelCost(
        **costs,
        enc_len=int(enc["enc_len"]),
        enc_hidden=int(enc["hidden_size"]),
        layers=int(dec["num_layers"]),
        dec_hidden=int(dec["num_heads"]) * int(dec["head_dim"]),
    )


def encoder_flops(cost: ModelCost) -> dict[str, int]:
    """fp32 and int8 FLOPs of encoder + cross K/V for one image."""
    seq = cost.enc_len
    fp32 = (
        2 * seq * (cost.encoder.fp32_weight_elems + cost.cross_kv.fp32_weight_elems)
        + cost.encoder.conv_flops
        + cost.encoder.attention_matmuls * 2 * seq * seq * cost.enc_hidden
    )
    int8 = 2 * seq * (cost.encoder.int8_weight_elems + cost.cross_kv.int8_weight_elems)
    return {"fp32": fp32, "int8": int8}


def step_work(cost: ModelCost, rows: int, images: int, past: int) -> dict[str, int]:
    """FLOPs and bytes of one decoder step: `rows` tokens, `past` cached positions before it."""
    seen = past + 1
    attention = cost.layers * 2 * 2 * cost.dec_hidden * (seen + cost.enc_len)
    self_kv = cost.layers * 2 * cost.dec_hidden * seen * CACHE_BYTES
    cross_kv = cost.layers * 2 * cost.dec_hidden * cost.enc_len * CACHE_BYTES
    return {
        "fp32": rows * (2 * cost.decoder.fp32_weight_elems + attention),
        "int8": rows * 2 * cost.decoder.int8_weight_elems,
        "bytes": cost.decoder.weight_bytes + rows * self_kv + images * cross_kv,
    }


# ------------------------------------------------------------------------------------- floors


@dataclass(frozen=True)
class Rates:
    fp32_flops: float  # FLOP/s
    int8_flops: float  # OP/s
    read_bytes: float  # bytes/s


def _phase_s(flops: dict[str, int], nbytes: int, rates: Rates) -> float:
    compute = flops["fp32"] / rates.fp32_flops + flops["int8"] / rates.int8_flops
    return max(compute, nbytes / rates.read_bytes)


def floor(cost: ModelCost, rates: Rates, batch: int, beams: int, new_tokens: int) -> dict:
    """The least time one generate() can take on this machine (see module doc), with its parts."""
    enc = {k: batch * v for k, v in encoder_flops(cost).items()}
    enc_bytes = cost.encoder.weight_bytes + cost.cross_kv.weight_bytes
    encoder_s = _phase_s(enc, enc_bytes, rates)
    rows = batch * beams
    decoder_s, flops, nbytes = 0.0, enc["fp32"] + enc["int8"], enc_bytes
    for past in range(new_tokens):
        work = step_work(cost, rows, batch, past)
        decoder_s += _phase_s(work, work["bytes"], rates)
        flops += work["fp32"] + work["int8"]
        nbytes += work["bytes"]
    return {
        "floor_s": encoder_s + decoder_s,
        "encoder_floor_s": encoder_s,
        "decoder_floor_s": decoder_s,
        "flops": flops,
        "bytes": nbytes,
    }


# --------------------------------------------------------------------------------------- probe


def _session(model, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _gemm_model(k: int, n: int, int8: bool):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    if int8:
        weights = [
            numpy_helper.from_array(rng.integers(-63, 64, (k, n), dtype=np.int8), "w"),
            numpy_helper.from_array(np.array(0.01, np.float32), "scale"),
            numpy_helper.from_array(np.array(0, np.int8), "zero"),
        ]
        node = helper.make_node(
            "DynamicQuantizeMatMul", ["a", "w", "scale", "zero"], ["y"], domain="com.microsoft"
        )
    else:
        weights = [numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "w")]
        node = helper.make_node("MatMul", ["a", "w"], ["y"])
    graph = helper.make_graph([node], "gemm", [a], [y], initializer=weights)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def _times(run, reps: int, budget_s: float) -> list[float]:
    """`reps` timings after one warm-up, fewer if `budget_s` runs out (bounded on a busy machine)."""
    run()
    out, deadline = [], time.perf_counter() + budget_s
    for _ in range(reps):
        started = time.perf_counter()
        run()
        out.append(time.perf_counter() - started)
        if time.perf_counter() > deadline:
            break
    return out


def gemm_rate(m: int, k: int, n: int, threads: int, int8: bool = False, reps: int = 5) -> dict:
    """Median rate of an `[m, k] x [k, n]` product in ONNX Runtime (fp32 or int8)."""
    session = _session(_gemm_model(k, n, int8), threads)
    a = np.random.default_rng(1).standard_normal((m, k), dtype=np.float32)
    seconds = _times(lambda: session.run(None, {"a": a}), reps, budget_s=10.0)
    rates = [2 * m * k * n / s for s in seconds]
    return {"shape": [m, k, n], "median": float(np.median(rates)), "max": float(max(rates))}


def _reduce_reader(threads: int, elements: int):
    """`ReduceMax` over a flat array: every byte read once, one float out."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("ReduceMax", ["x"], ["y"], keepdims=0)
    model = helper.make_model(
        helper.make_graph([node], "read", [x], [y]), opset_imports=[helper.make_opsetid("", 17)]
    )
    session = _session(model, threads)
    big = np.random.default_rng(2).standard_normal(elements, dtype=np.float32)
    return lambda: session.run(None, {"x": big})


def _gemv_reader(threads: int, elements: int):
    """One activation row times a weight initializer: the decoder step's own access pattern
    (every weight streamed once through MLAS's prepacked layout, next to no arithmetic)."""
    k = 2048
    session = _session(_gemm_model(k, max(elements // k, 1), int8=False), threads)
    row = np.random.default_rng(1).standard_normal((1, k), dtype=np.float32)
    return lambda: session.run(None, {"a": row})


READERS = {"ReduceMax": _reduce_reader, "GEMV": _gemv_reader}


def read_bandwidth(threads: int, mebibytes: int = 256, reps: int = 9) -> dict:
    """Streaming read of `mebibytes` (far larger than the caches) by each of `READERS`; the rate
    is the best reader's median. Each reader only proves the machine reads at least that fast:
    on this 2-core EPYC `ReduceMax` alone reached 8-10 GB/s where the GEMV read 16-18 GB/s, and
    a floor from the slower reader put measured decoder steps above 100% of it."""
    elements = mebibytes * 2**18
    readers = {}
    for name, make in READERS.items():
        seconds = _times(make(threads, elements), reps, budget_s=10.0)
        rates = [elements * 4 / s for s in seconds]
        readers[name] = {
            "median": float(np.median(rates)),
            "min": float(min(rates)),
            "max": float(max(rates)),
            "reads": len(rates),
        }
    best = max(readers, key=lambda name: readers[name]["median"])
    return readers[best] | {
        "reader": best,
        "readers": {name: r["median"] for name, r in readers.items()},
        "mebibytes": mebibytes,
    }


def model_shapes(export_dir: Path | None) -> list[tuple[int, int, int]]:
    """The encoder's GEMM shapes at one image (plus the fused QKV), and a square 2048."""
    shapes = {(2048, 2048, 2048)}
    if export_dir is None:
        return sorted(shapes)
    import onnx

    manifest = json.loads((Path(export_dir) / "vedrt.json").read_text())
    seq, hidden = int(manifest["encoder"]["enc_len"]), int(manifest["encoder"]["hidden_size"])
    shapes.add((seq, hidden, 3 * hidden))
    model = onnx.load(str(Path(export_dir) / "encoder.onnx"), load_external_data=False)
    tensors = _tensors(model)
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in tensors:
            dims = tensors[node.input[1]][0]
            if len(dims) == 2:
                shapes.add((seq, dims[0], dims[1]))
    return sorted(shapes)


def probe(threads: int, export_dir: Path | None = None, reps: int = 5) -> dict[str, Any]:
    """fp32 and int8 GEMM rates and read bandwidth of this machine, now (see module doc)."""
    shapes = model_shapes(export_dir)
    started = time.perf_counter()
    fp32 = [gemm_rate(*s, threads=threads, reps=reps) for s in shapes]
    int8 = [gemm_rate(*s, threads=threads, int8=True, reps=reps) for s in shapes]
    read = read_bandwidth(threads, reps=2 * reps - 1)
    rates = Rates(
        fp32_flops=max(r["median"] for r in fp32),
        int8_flops=max(r["median"] for r in int8),
        read_bytes=read["median"],
    )
    return {
        "rates": asdict(rates),
        "fp32_gemm": fp32,
        "int8_gemm": int8,
        "read": read,
        "threads": threads,
        "load_average": os.getloadavg()[0],
        "seconds": time.perf_counter() - started,
    }


def combine(first: dict, second: dict) -> dict[str, Any]:
    """Two probes of one run (before and after the generations): each rate's better median."""
    rates = {k: max(first["rates"][k], second["rates"][k]) for k in first["rates"]}
    read = max((first["read"], second["read"]), key=lambda r: r["median"])
    best = max((first, second), key=lambda p: p["rates"]["fp32_flops"])
    return best | {"rates": rates, "read": read, "probes": [first, second]}


def annotate(model: dict, exports: dict[str, Path], probed: dict) -> None:
    """Add `floor` and `efficiency` (floor / p50) to every row whose precision has an export."""
    rates = Rates(**probed["rates"])
    costs = {p: model_cost(d) for p, d in exports.items() if (Path(d) / "vedrt.json").is_file()}
    for row in model["results"]:
        precision = model["backends"][row["backend"]]["precision"]
        if "p50_s" not in row or precision not in costs:
            continue
        s = row["setting"]
        row["floor"] = floor(costs[precision], rates, s["batch"], s["beams"], s["new_tokens"])
        row["efficiency"] = row["floor"]["floor_s"] / row["p50_s"]
