"""What the torch-based executors share: host-to-device copies and the bound step tensors."""

from __future__ import annotations

import numpy as np
import torch

from ..runtime.pool import KVPool


def to_device(pixel_values: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Host pixels -> the device in the executor's dtype (one copy, pinned when it is a GPU)."""
    tensor = torch.from_numpy(np.ascontiguousarray(pixel_values))
    if device.type == "cuda":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device=device, dtype=dtype)


def step_tensors(
    pool: KVPool, rows: int, groups: int, vocab: int, top_k: int, gathers_in_graph: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The decoder graph's inputs (views of the pool) and outputs (allocated once per pool
    buffer and row layout, so engines bound by address need no rebinding), by graph name.
    `gathers_in_graph`: an older export's decoder, which takes the slot pool and `group_slots`."""
    key = ("tensors", pool.version, rows, groups, pool.in_place)
    found = pool.bindings.get(key)
    if found is not None:
        return found
    layers, heads, head_dim = pool.layers, pool.heads, pool.head_dim
    inputs = {
        "input_ids": pool.input_ids[:rows],
        "past_lengths": pool.past_lengths[:rows],
        **pool.cross_inputs(groups, gathers_in_graph),  # each group's K/V (`KVPool.set_groups`)
    }
    device = pool.cache.device
    outputs = {"logits": torch.empty((rows, vocab), dtype=pool.dtype, device=device)}
    for i in range(layers):
        for j, kv in enumerate(("key", "value")):
            inputs[f"self_{kv}.{i}"] = pool.cache[i, j, :rows]
            outputs[f"new_{kv}.{i}"] = torch.empty(
                (rows, heads, 1, head_dim), dtype=pool.dtype, device=device
            )
        outputs[f"cross_attn.{i}"] = torch.empty(
            (rows, heads, 1, pool.enc_len), dtype=pool.dtype, device=device
        )
    outputs["top_logprobs"] = torch.empty((rows, top_k), dtype=torch.float32, device=device)
    outputs["top_ids"] = torch.empty((rows, top_k), dtype=torch.int64, device=device)
    pool.bindings[key] = (inputs, outputs)
    return inputs, outputs


def finish_step(pool: KVPool, rows: int, outputs: dict[str, torch.Tensor], want: bool):
    """Write a bound step's new K/V into the pool; its logits and (if wanted) attentions."""
    from ..runtime.executor import StepOutput

    layers = pool.layers
    pool.write_new(
        [outputs[f"new_{kv}.{i}"] for i in range(layers) for kv in ("key", "value")], rows
    )
    attn = [outputs[f"cross_attn.{i}"] for i in range(layers)] if want else None
    return StepOutput(outputs["logits"], attn, outputs["top_logprobs"], outputs["top_ids"])
