"""The torch executor: the exporter's own wrapper modules, run eagerly or replayed as CUDA graphs.

It runs `EncoderGraph`, `CrossKV` and `DecoderStep` (vedrt.export.modules) over the checkpoint's
weights, so it computes exactly what the ONNX graphs compute, on any torch device and dtype. A
decoder step's shapes are fixed while the engine's active rows do not change (the pool is
preallocated, positions are a tensor), so on CUDA one step, including the write of its new keys
and values into the pool, is captured once per pool buffer and row layout as a
`torch.cuda.CUDAGraph` and replayed: one launch instead of hundreds of small kernels.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ..errors import InputError
from ..export.modules import CrossKV, DecoderStep, EncoderGraph, TextEncoderGraph, decoder_dims
from ..runtime.executor import Encoded, StepOutput
from ..runtime.pool import KVPool
from .device import to_device
from .ops import TorchOps


class TorchExecutor:
    """Runs the three graphs' torch modules; `cuda_graphs` (default: on for CUDA) replays steps."""

    def __init__(
        self,
        model: Any,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        cuda_graphs: bool | None = None,
        owned: bool = False,
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        self.ops = TorchOps(self.device)
        model, owned = _placed(model, self.device, dtype, owned)
        self.encoder = EncoderGraph(model).eval()
        self.text_encoder = TextEncoderGraph(model).eval()
        self.cross_kv = CrossKV(model).eval()
        # one copy of every weight on the device: a tied head stays the embedding's matrix, and
        # separate q/k/v weights, once fused, are freed when the model is ours to change
        self.step = DecoderStep(model, split_head=False).eval()
        if owned:
            self.step.release_unfused()
        self.layers, self.heads, self.head_dim = decoder_dims(model.decoder.config)
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        if cuda_graphs and self.device.type != "cuda":
            raise InputError("cuda_graphs=True needs device='cuda'")
        self.cuda_graphs = cuda_graphs
        self._graph_pool = None

    @torch.no_grad()
    def encode(self, inputs: Any) -> Encoded:
        """Pixel values [n, C, H, W], or a text model's {"input_ids", "attention_mask"}."""
        if isinstance(inputs, dict):
            ids, mask = (
                torch.from_numpy(inputs[n]).to(self.device) for n in ("input_ids", "attention_mask")
            )
            states = self.text_encoder(ids, mask)
        else:
            states = self.encoder(to_device(inputs, self.device, self.dtype))
            mask = torch.ones(states.shape[:2], dtype=torch.int64, device=self.device)
        return Encoded(list(self.cross_kv(states)), mask)

    def new_pool(self, rows: int, slots: int, cache_len: int, enc_len: int) -> KVPool:
        dims = (self.layers, self.heads, self.head_dim)
        return KVPool(self.ops, dims, rows, slots, cache_len, enc_len, self.dtype)

    @torch.no_grad()
    def decode(
        self, pool: KVPool, rows: int, groups: int, want_attentions: bool = False
    ) -> StepOutput:
        if not self.cuda_graphs:
            logits, attn, top = self.step_and_write(pool, rows, groups)
        else:
            logits, attn, top = self._graph(pool, rows, groups).replay()
        return StepOutput(logits, list(attn) if want_attentions else None, *top)

    def step_and_write(self, pool: KVPool, rows: int, groups: int):
        """One step over the pool's first rows, then its new K/V written at each row's
        position (device tensors only, so the whole of it can be captured)."""
        views = [pool.cache[i, j, :rows] for i in range(self.layers) for j in range(2)]
        cross, mask = pool.group_inputs(groups)
        out = self.step(pool.input_ids[:rows], pool.past_lengths[:rows], views, cross, mask)
        n = 2 * self.layers
        pool.write_new(list(out[1 : 1 + n]), rows)
        return out[0], out[1 + n : 1 + n + self.layers], out[-2:]

    def _graph(self, pool: KVPool, rows: int, groups: int) -> _StepGraph:
        """The captured step for this pool buffer and row layout, built once."""
        key = ("cuda_graph", pool.version, rows, groups, pool.in_place)
        graph = pool.bindings.get(key)
        if graph is None:
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            graph = pool.bindings[key] = _StepGraph(self, pool, rows, groups, self._graph_pool)
        return graph


class _StepGraph:
    """One captured decoder step over the pool's fixed buffers."""

    def __init__(self, executor: TorchExecutor, pool: KVPool, rows: int, groups: int, handle):
        def run():
            return executor.step_and_write(pool, rows, groups)

        # warm up on a side stream (allocator and cuBLAS state), as capture requires; the step
        # only writes each row's position `past_lengths[row]` and reads positions below it
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=handle):
            self.logits, self.attn, self.top = run()

    def replay(self):
        self.graph.replay()
        return self.logits, self.attn, self.top


def _placed(model: Any, device: torch.device, dtype: torch.dtype, owned: bool) -> tuple[Any, bool]:
    """The model on `device` in `dtype` and whether it is ours to change: converting a caller's
    model works on a copy of it."""
    param = next(model.parameters())
    if param.device != device or param.dtype != dtype:
        if not owned:
            model, owned = copy.deepcopy(model), True
        model = model.to(device=device, dtype=dtype)
    return model.eval(), owned
