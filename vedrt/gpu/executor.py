"""What a device executor must do for the device search loop, and the cache they all share.

The interface is the CPU runtime's `Executor` (encode / new_cache / decode / reorder) with torch
tensors on the device instead of numpy arrays, so the search loop (`vedrt.gpu.search`) never
knows whether a TensorRT engine, an ONNX Runtime CUDA session or the torch modules ran the step.

`DeviceCache` is the self-attention cache of one generation, allocated once for its whole length:
one tensor `[layers, 2, batch_beams, heads, cache_len, head_dim]` (every `[layer, k/v]` slice is a
contiguous view the step reads in place) plus a spare of the same shape. A step's new keys/values
are written by position; a beam reorder is one gather into the spare, then the two swap roles
(ping-pong), so nothing is reallocated and a CUDA graph can be captured once per buffer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch


@dataclass
class DeviceStep:
    """One decoder step's results, still on the device."""

    logits: torch.Tensor  # [batch_beams, vocab], the executor's dtype; read before the next step
    cross_attn: list[torch.Tensor] | None  # per layer [batch_beams, heads, new_len, enc_len]


class DeviceExecutor(Protocol):
    """A graph runner the device search loop drives (see the module docstring)."""

    device: torch.device

    def encode(self, pixel_values: np.ndarray) -> Any:
        """Encoder + cross K/V once per image; an opaque handle the decoder steps read."""

    def new_cache(self, batch_beams: int, cache_len: int) -> DeviceCache:
        """A cache for `cache_len` positions, allocated once per generation."""

    def decode(
        self,
        input_ids: torch.Tensor,
        past_length: int,
        cache: DeviceCache,
        cross: Any,
        want_attentions: bool = False,
    ) -> DeviceStep:
        """Run one step on `input_ids` [batch_beams, new_len] and write its K/V at `past_length`."""

    def reorder(self, cache: DeviceCache, beam_idx: torch.Tensor, length: int) -> None:
        """Gather the cache rows `beam_idx` (a device tensor) for the next step."""


class DeviceCache:
    """Ping-pong self-attention cache; see the module docstring."""

    def __init__(
        self,
        layers: int,
        batch_beams: int,
        heads: int,
        cache_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        shape = (layers, 2, batch_beams, heads, cache_len, head_dim)
        # zeros, not empty: masked positions are multiplied by a probability of exactly 0, and
        # 0 * NaN from uninitialised memory would poison the step
        self.data = torch.zeros(shape, dtype=dtype, device=device)
        self.spare = torch.zeros_like(self.data)
        self.layers = layers
        self.batch_beams = batch_beams
        self.cache_len = cache_len

    def views(self) -> list[torch.Tensor]:
        """The decoder inputs `self_key.0, self_value.0, self_key.1, ...` as views of `data`."""
        return [self.data[i, j] for i in range(self.layers) for j in range(2)]

    def check_room(self, past_length: int, new_len: int) -> None:
        if past_length + new_len > self.cache_len:
            raise ValueError(
                f"cache of {self.cache_len} positions cannot hold {past_length + new_len}"
            )

    def write(self, new_kv: torch.Tensor, past_length: int) -> None:
        """Write a step's `[layers, 2, batch_beams, heads, new_len, head_dim]` keys/values."""
        end = past_length + new_kv.shape[4]
        self.data[:, :, :, :, past_length:end].copy_(new_kv)

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """One gather of every row into the spare (the whole static buffer: one kernel, and the
        positions past the filled length are masked anyway), then swap."""
        torch.index_select(self.data, 2, beam_idx, out=self.spare)
        self.data, self.spare = self.spare, self.data


def to_device(pixel_values: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Host pixels -> the device in the executor's dtype (one copy, pinned when it is a GPU)."""
    tensor = torch.from_numpy(np.ascontiguousarray(pixel_values))
    if device.type == "cuda":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device=device, dtype=dtype)


class CachePool:
    """Caches kept per shape and handed out again: a generation allocates nothing after the first
    one of its shape, and captured CUDA graphs (keyed by buffer address) stay valid."""

    def __init__(
        self, layers: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ):
        self.dims = (layers, heads, head_dim)
        self.dtype = dtype
        self.device = device
        self.caches: dict[tuple[int, int], DeviceCache] = {}

    def get(self, batch_beams: int, cache_len: int) -> DeviceCache:
        key = (batch_beams, cache_len)
        cache = self.caches.get(key)
        if cache is None:
            layers, heads, head_dim = self.dims
            cache = DeviceCache(
                layers, batch_beams, heads, cache_len, head_dim, self.dtype, self.device
            )
            self.caches[key] = cache
        return cache

    def clear(self) -> None:
        self.caches.clear()
