"""`quantize="int8"`: dynamic int8 weights, checked by how often greedy tokens still agree.

Every weight MatMul/Gemm becomes a dynamic int8 one (`quantize_dynamic`, QInt8 weights,
activations quantized per call): 4x fewer weight bytes to stream per decoder step, which is what a
step on CPU is bound by. Its results are no longer within 1e-4 of PyTorch, so its check is how
often greedy tokens agree with the fp32 model's, run through the runtime's own loader and engine.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .optimize import GRAPHS, prune, quiet

QUANTIZE_CHOICES = ("int8",)


def quantize_graph(path: Path) -> None:
    """Dynamic int8 weights (QInt8) for every MatMul/Gemm with a constant weight, in place."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _tie_lookup_to_head(path)
    tmp = path.with_suffix(".int8.tmp")
    with quiet():
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


def _tie_lookup_to_head(path: Path) -> None:
    """Look tokens up in the columns of a tied head again, so int8 stores that matrix once.

    fp32 exports keep a tied head's [vocab, d] lookup table beside its [d, vocab] MatMul copy
    (modules.py: then only the looked-up rows become resident). Quantized, the int8 head is a
    quarter of the table's size, so a Gather reading exactly the head's transpose is pointed at
    the head (`Gather(axis=1)` + `Transpose` moving the model dimension last) and
    `_share_quantized_tables` then reads its int8 copy. Token indices of known rank are rewritten
    (DecoderStep.embed emits `[N, 1]`; exports before it, `[N]`); any other Gather keeps its own
    table.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model).graph
    ranks = {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in list(inferred.value_info) + list(inferred.input)
        if v.type.tensor_type.HasField("shape")
    }
    changed = _merge_head_blocks(graph)
    tables = {t.name: t for t in graph.initializer if len(t.dims) == 2}
    heads = {
        node.input[1]
        for node in graph.node
        if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in tables
    }
    for node in list(graph.node):
        if node.op_type != "Gather" or node.input[0] not in tables:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        rank = ranks.get(node.input[1])
        if axis != 0 or not rank:
            continue
        rows = numpy_helper.to_array(tables[node.input[0]])
        head = next((h for h in sorted(heads) if _is_transpose(rows, tables[h])), None)
        if head is None:
            continue
        columns = node.output[0] + "/columns"
        flip = helper.make_node(
            "Transpose",
            [columns],
            [node.output[0]],
            node.name + "/Transpose",
            perm=[*range(1, rank + 1), 0],  # [d, *indices] -> [*indices, d]
        )
        node.input[0], node.output[0] = head, columns
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("axis", 1))
        graph.node.insert(list(graph.node).index(node) + 1, flip)
        changed = True
    if changed:
        prune(graph)
        onnx.save(model, str(path))


def _merge_head_blocks(graph) -> bool:
    """Join a head exported in column blocks back into one MatMul named `head_weight_t`.

    fp32 splits a tied head (modules.HEAD_BLOCK) only to bound ONNX Runtime's load-time peak;
    int8 blocks are a quarter the size, and a token Gather can share one [d, vocab] matrix only.
    A block set is a last-axis Concat of MatMuls that share their input and read 2-D weights.
    """
    from onnx import helper, numpy_helper

    producers = {out: node for node in graph.node for out in node.output}
    weights = {t.name: t for t in graph.initializer if len(t.dims) == 2}
    merged = False
    for concat in [node for node in graph.node if node.op_type == "Concat"]:
        parts = [producers.get(name) for name in concat.input]
        axis = next((a.i for a in concat.attribute if a.name == "axis"), None)
        if axis != -1 or len(parts) < 2 or "head_weight_t" in weights:
            continue
        if any(p is None or p.op_type != "MatMul" or p.input[1] not in weights for p in parts):
            continue
        if len({p.input[0] for p in parts}) != 1:
            continue
        blocks = [numpy_helper.to_array(weights[p.input[1]]) for p in parts]
        if len({b.shape[0] for b in blocks}) != 1:
            continue
        head = numpy_helper.from_array(np.concatenate(blocks, axis=1), "head_weight_t")
        graph.initializer.append(head)
        weights[head.name] = head
        matmul = helper.make_node(
            "MatMul", [parts[0].input[0], head.name], [concat.output[0]], concat.name + "/MatMul"
        )
        graph.node.insert(list(graph.node).index(concat), matmul)
        graph.node.remove(concat)
        merged = True
    return merged


def _is_transpose(rows: np.ndarray, tensor) -> bool:
    from onnx import numpy_helper

    return list(tensor.dims) == list(rows.shape[::-1]) and np.array_equal(
        rows.T, numpy_helper.to_array(tensor)
    )


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
        prune(graph)
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


def _vedrt_greedy(export_dir: Path, inputs: Any, start: int, steps: int) -> np.ndarray:
    """Plain argmax decoding (no stopping) through the runtime's own loader and engine."""
    from ..runtime import load

    gen = load(export_dir)
    plain = dict(num_beams=1, do_sample=False, min_length=0, no_repeat_ngram_size=0)
    plain |= dict(repetition_penalty=1.0, bad_words_ids=None, forced_bos_token_id=None)
    text = isinstance(inputs, dict)
    ids = gen.generate(
        inputs["input_ids"] if text else inputs,
        attention_mask=inputs["attention_mask"] if text else None,
        max_new_tokens=steps,
        eos_token_id=None,
        forced_eos_token_id=None,
        decoder_start_token_id=start,
        **plain,
    )
    return ids[:, 1:]


def _torch_greedy(model, inputs: Any, start: int, steps: int) -> np.ndarray:
    """The same plain argmax decoding with transformers' fp32 model (full recompute per step)."""
    import torch

    with torch.no_grad():
        if isinstance(inputs, dict):  # a text encoder, its padding masked throughout
            mask = torch.from_numpy(inputs["attention_mask"])
            encoded = model.encoder(
                input_ids=torch.from_numpy(inputs["input_ids"]), attention_mask=mask
            )
            batch = mask.shape[0]
        else:
            mask = None
            encoded = model.encoder(pixel_values=torch.from_numpy(inputs))
            batch = inputs.shape[0]
        ids = torch.full((batch, 1), start, dtype=torch.long)
        for _ in range(steps):
            out = model(encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=ids)
            ids = torch.cat([ids, out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, 1:].numpy()


def _random_inputs(model, export_dir: Path, count: int, seed: int) -> Any:
    """Random images of the export's size and channels, or random texts of the encoder's
    vocabulary (the last ones shorter, padded and masked)."""
    from ..manifest import read_manifest

    manifest = read_manifest(export_dir)
    rng = np.random.default_rng(seed)
    if manifest.modality == "text":
        length = max(2, min(12, int(manifest.encoder.get("max_positions") or 12)))
        vocab = model.encoder.config.vocab_size
        ids = rng.integers(min(5, vocab - 1), vocab, (count, length))
        mask = np.ones_like(ids)
        mask[count // 2 :, length // 2 :] = 0
        ids[mask == 0] = model.encoder.config.pad_token_id or 0
        return {"input_ids": ids, "attention_mask": mask}
    shape = (count, manifest.num_channels or 3, *manifest.image_size)
    return rng.standard_normal(shape, dtype=np.float32)


def token_agreement(
    model,
    export_dir: Path,
    start_token: int,
    images: int = 8,
    new_tokens: int = 16,
    seed: int = 0,
) -> TokenAgreement:
    """Compare greedy tokens of the graphs in `export_dir` with the fp32 model's, on `images`
    random images (or texts, for a text model)."""
    inputs = _random_inputs(model, export_dir, images, seed)
    max_positions = _max_new(model, new_tokens)
    ours = _vedrt_greedy(export_dir, inputs, start_token, max_positions)
    ref = _torch_greedy(model, inputs, start_token, max_positions)
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
