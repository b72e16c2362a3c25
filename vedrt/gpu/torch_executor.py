"""The torch executor: the exporter's own wrapper modules, run eagerly or replayed as CUDA graphs.

It runs `EncoderGraph`, `CrossKV` and `DecoderStep` (vedrt.export.modules) over the checkpoint's
weights, so it computes exactly what the ONNX graphs compute, on any torch device and dtype. The
decoder step's shapes are fixed for a whole generation (the cache is preallocated for its full
length, `past_length` is a tensor), so on CUDA one step, including the write of its new keys and
values into the cache, is captured once per cache buffer as a `torch.cuda.CUDAGraph` and replayed
every step: one launch instead of hundreds of small kernels.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from ..export.modules import CrossKV, DecoderStep, EncoderGraph, decoder_dims
from .executor import CachePool, DeviceCache, DeviceStep, to_device


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
        model = _placed(model, self.device, dtype, owned)
        self.encoder = EncoderGraph(model).eval()
        self.cross_kv = CrossKV(model).eval()
        self.step = DecoderStep(model).eval()
        self.layers, self.heads, self.head_dim = decoder_dims(model.decoder.config)
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs device='cuda'")
        self.cuda_graphs = cuda_graphs
        self._caches = CachePool(self.layers, self.heads, self.head_dim, dtype, self.device)
        self._static_cross: dict[int, list[torch.Tensor]] = {}
        self._graphs: dict[tuple, _StepGraph] = {}
        self._pool = None

    @torch.no_grad()
    def encode(self, pixel_values: np.ndarray) -> list[torch.Tensor]:
        states = self.encoder(to_device(pixel_values, self.device, self.dtype))
        cross = list(self.cross_kv(states))
        if not self.cuda_graphs:
            return cross
        # graphs read fixed addresses: copy into this batch size's static buffers
        static = self._static_cross.get(len(pixel_values))
        if static is None:
            static = self._static_cross[len(pixel_values)] = [torch.empty_like(c) for c in cross]
        for dst, src in zip(static, cross, strict=True):
            dst.copy_(src)
        return static

    def new_cache(self, batch_beams: int, cache_len: int) -> DeviceCache:
        return self._caches.get(batch_beams, cache_len)

    @torch.no_grad()
    def decode(
        self,
        input_ids: torch.Tensor,
        past_length: int,
        cache: DeviceCache,
        cross: list[torch.Tensor],
        want_attentions: bool = False,
    ) -> DeviceStep:
        cache.check_room(past_length, input_ids.shape[1])
        if not self.cuda_graphs:
            past = torch.tensor(past_length, dtype=torch.int64, device=self.device)
            logits, attn = self.step_and_write(input_ids, past, cache.data, cross)
        else:
            logits, attn = self._graph(input_ids, cache, cross).replay(input_ids, past_length)
        return DeviceStep(logits, list(attn) if want_attentions else None)

    def step_and_write(
        self,
        input_ids: torch.Tensor,
        past: torch.Tensor,
        data: torch.Tensor,
        cross: list[torch.Tensor],
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """One step, then its keys/values written at `past` (a device scalar, so capturable)."""
        views = [data[i, j] for i in range(self.layers) for j in range(2)]
        out = self.step(input_ids, past, views, cross)
        n = 2 * self.layers
        new = torch.stack(out[1 : 1 + n]).unflatten(0, (self.layers, 2))
        positions = past + torch.arange(input_ids.shape[1], device=self.device)
        data.index_copy_(4, positions, new)
        return out[0], out[1 + n :]

    def _graph(self, input_ids: torch.Tensor, cache: DeviceCache, cross) -> _StepGraph:
        """The captured step for this cache buffer (two per cache: ping-pong), built once."""
        key = (cache.data.data_ptr(), tuple(input_ids.shape), cross[0].data_ptr())
        graph = self._graphs.get(key)
        if graph is None:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = _StepGraph(self, input_ids, cache.data, cross, self._pool)
            self._graphs[key] = graph
        return graph

    def reorder(self, cache: DeviceCache, beam_idx: torch.Tensor, length: int) -> None:
        cache.reorder(beam_idx)

    def release_graphs(self) -> None:
        """Drop captured graphs and pooled buffers; the next generation allocates and recaptures."""
        self._graphs.clear()
        self._caches.clear()
        self._static_cross.clear()


class _StepGraph:
    """One captured decoder step over fixed input, cache, cross K/V and output buffers."""

    def __init__(self, executor: TorchExecutor, input_ids, data, cross, pool):
        self.ids = input_ids.clone()
        self.past = torch.zeros((), dtype=torch.int64, device=input_ids.device)
        self.data = data  # held so the captured addresses stay valid

        def run():
            return executor.step_and_write(self.ids, self.past, data, cross)

        # warm up on a side stream (allocator and cuBLAS state), as capture requires; the step is
        # idempotent for fixed inputs (it writes position `past`, it reads only positions below)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits, self.attn = run()

    def replay(self, input_ids: torch.Tensor, past_length: int):
        self.ids.copy_(input_ids)
        self.past.fill_(past_length)
        self.graph.replay()
        return self.logits, self.attn


def _placed(model: Any, device: torch.device, dtype: torch.dtype, owned: bool) -> Any:
    """The model on `device` in `dtype`; converting a caller's model works on a copy of it."""
    param = next(model.parameters())
    if param.device != device or param.dtype != dtype:
        if not owned:
            model = copy.deepcopy(model)
        model = model.to(device=device, dtype=dtype)
    return model.eval()
