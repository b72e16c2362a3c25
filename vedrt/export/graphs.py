"""Trace the three modules to ONNX with their names and dynamic axes.

Uses the dynamo exporter at opset 18: at 17 it writes an invalid `Split`, and the TorchScript
exporter freezes shapes that must stay dynamic. Example inputs use sizes of at least 2 on every
dynamic axis, since torch.export specializes axes it sees at size 0 or 1.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from .modules import CrossKV, DecoderStep, EncoderGraph, decoder_dims

DEFAULT_OPSET = 18


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple  # ints for fixed axes, names for dynamic ones

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphSpec:
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def graph_specs(model, image_size: tuple[int, int], enc_len: int, enc_dim: int) -> dict[str, GraphSpec]:
    """The names and shapes of every graph's inputs and outputs: the contract with the runtime."""
    layers, heads, hd = decoder_dims(model.decoder.config)
    vocab = model.decoder.config.vocab_size
    f32 = "float32"
    cross = tuple(
        TensorSpec(f"cross_{kv}.{i}", f32, ("batch", heads, enc_len, hd))
        for i in range(layers)
        for kv in ("key", "value")
    )
    cache = tuple(
        TensorSpec(f"self_{kv}.{i}", f32, ("batch_beams", heads, "cache_len", hd))
        for i in range(layers)
        for kv in ("key", "value")
    )
    new = tuple(
        TensorSpec(f"new_{kv}.{i}", f32, ("batch_beams", heads, "new_len", hd))
        for i in range(layers)
        for kv in ("key", "value")
    )
    attn = tuple(
        TensorSpec(f"cross_attn.{i}", f32, ("batch_beams", heads, "new_len", enc_len)) for i in range(layers)
    )
    states = TensorSpec("encoder_hidden_states", f32, ("batch", enc_len, enc_dim))
    return {
        "encoder": GraphSpec(
            "encoder.onnx", (TensorSpec("pixel_values", f32, ("batch", 3, *image_size)),), (states,)
        ),
        "cross_kv": GraphSpec("cross_kv.onnx", (states,), cross),
        "decoder": GraphSpec(
            "decoder.onnx",
            (
                TensorSpec("input_ids", "int64", ("batch_beams", "new_len")),
                TensorSpec("past_length", "int64", ()),
                *cache,
                *cross,
            ),
            (TensorSpec("logits", f32, ("batch_beams", vocab)), *new, *attn),
        ),
    }


def _dynamic(spec: TensorSpec) -> dict[int, torch.export.Dim] | None:
    axes = {i: torch.export.Dim.DYNAMIC for i, d in enumerate(spec.shape) if isinstance(d, str)}
    return axes or None


def _export(module, args: tuple, spec: GraphSpec, path: Path, opset: int) -> None:
    flat_inputs = list(spec.inputs)
    if isinstance(module, DecoderStep):  # its forward takes (ids, past_length, cache list, cross list)
        n_cache = (len(flat_inputs) - 2) // 2
        dyn = (
            _dynamic(flat_inputs[0]),
            None,
            [_dynamic(s) for s in flat_inputs[2 : 2 + n_cache]],
            [_dynamic(s) for s in flat_inputs[2 + n_cache :]],
        )
    else:
        dyn = tuple(_dynamic(s) for s in flat_inputs)
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=opset,
            input_names=[s.name for s in flat_inputs],
            output_names=[s.name for s in spec.outputs],
            dynamic_shapes=dyn,
            external_data=False,
            verbose=False,
            optimize=True,
        )
    proto = program.model_proto
    _name_axes(proto.graph.input, spec.inputs)
    _name_axes(proto.graph.output, spec.outputs)
    for node in proto.graph.node:  # the tracer's stack traces: a large share of a small model's file
        node.ClearField("metadata_props")
        node.doc_string = ""
    onnx.save(proto, str(path))


def _name_axes(values, specs: tuple[TensorSpec, ...]) -> None:
    """Give dynamic axes the spec's names (`batch_beams`), not the tracer's (`s34`)."""
    for value, spec in zip(values, specs, strict=True):
        for dim, want in zip(value.type.tensor_type.shape.dim, spec.shape, strict=True):
            if isinstance(want, str):
                dim.dim_param = want


def example_inputs(model, image_size: tuple[int, int], batch: int = 2, beams: int = 2, past: int = 2,
                   new: int = 2, cache_len: int = 5, seed: int = 0):
    """Random inputs for every graph (also used by validation): pixel values, token ids, caches."""
    g = torch.Generator().manual_seed(seed)
    layers, heads, hd = decoder_dims(model.decoder.config)
    pixel_values = torch.randn(batch, 3, *image_size, generator=g)
    vocab = model.decoder.config.vocab_size
    ids = torch.randint(3, vocab, (batch * beams, past + new), generator=g)
    cache = [torch.randn(batch * beams, heads, cache_len, hd, generator=g) for _ in range(2 * layers)]
    return pixel_values, ids, cache


def export_graphs(model, out_dir: Path, image_size: tuple[int, int], opset: int, progress) -> dict[str, GraphSpec]:
    """Write encoder.onnx, cross_kv.onnx and decoder.onnx; returns their specs."""
    encoder, cross_kv, step = EncoderGraph(model).eval(), CrossKV(model).eval(), DecoderStep(model).eval()
    pixel_values, ids, cache = example_inputs(model, image_size)
    with torch.no_grad():
        states = encoder(pixel_values)
        cross = cross_kv(states)
    specs = graph_specs(model, image_size, states.shape[1], states.shape[2])
    progress("encoder.onnx")
    _export(encoder, (pixel_values,), specs["encoder"], out_dir / "encoder.onnx", opset)
    progress("cross_kv.onnx")
    _export(cross_kv, (states.contiguous(),), specs["cross_kv"], out_dir / "cross_kv.onnx", opset)
    progress("decoder.onnx")
    args = (ids[:, :2].contiguous(), torch.tensor(2, dtype=torch.int64), list(cache), [c.contiguous() for c in cross])
    _export(step, args, specs["decoder"], out_dir / "decoder.onnx", opset)
    return specs
