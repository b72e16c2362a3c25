"""Admitted requests through the encoder and cross K/V: one batch for the images admitted
together, each text request alone, and, on the CPU runtime, straight into the pool's image slots.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .cohort import cohort_key
from .handle import Handle


def encode_requests(
    executor: Any, taken: list[Handle]
) -> tuple[list[Any], dict[int, tuple[int, int]]]:
    """Encoder + cross K/V for what is admitted: images in one batch, texts one request at a
    time (their own lengths, as their solo runs). Returns the encoded parts and, per request,
    (part, first index in it)."""
    if isinstance(taken[0].inputs, dict):
        encoded = [executor.encode(h.inputs) for h in taken]
        return encoded, {id(h): (i, 0) for i, h in enumerate(taken)}
    pixels = taken[0].inputs
    if len(taken) > 1:  # one encoder batch for everything admitted together
        pixels = np.concatenate([h.inputs for h in taken])
    where, index = {}, 0
    for h in taken:
        where[id(h)] = (0, index)
        index += h.batch
    return [executor.encode(pixels)], where


def encodes_into_slots(executor: Any, manifest: Any, taken: list[Handle]) -> bool:
    """Whether the encoder can write these requests' cross K/V straight into the pool's image
    slots (images on the CPU runtime, not encoded ahead): no copy, and no second copy of every
    image's K/V held at once (ViT-GPT2, 8 images: peak RSS 1,280 -> 1,174 MiB)."""
    return (
        taken[0].encoded is None
        and not isinstance(taken[0].inputs, dict)
        and getattr(executor, "device", None) == "cpu"
        and hasattr(executor, "encode_into")
        and manifest.enc_len is not None
    )


def encode_into_slots(executor: Any, pool: Any, plans: list) -> None:
    """Encode the images of `plans` ((handles, members, batch, slots) per cohort, in the order
    their slots were claimed) into those slots when the slots follow one another; else encode
    and copy each image into its slot."""
    handles = [h for plan in plans for h in plan[0]]
    slots = [slot for plan in plans for slot in plan[3]]
    pixels = np.concatenate([h.inputs for h in handles]) if len(handles) > 1 else handles[0].inputs
    first = slots[0]
    if slots == list(range(first, first + len(slots))):
        into = [pool.cross[j, first : first + len(slots)] for j in range(pool.cross.shape[0])]
        encoded = executor.encode_into(pixels, into)
        pool.encoder_mask[first : first + len(slots)] = encoded.mask
        return
    encoded = executor.encode(pixels)
    for index, slot in enumerate(slots):
        pool.put_image(slot, encoded.cross, encoded.mask, index)


def encode_admitted(executor: Any, manifest: Any, rows: Any, taken: list[Handle]) -> list[tuple]:
    """The requests `taken` into the engine's pool: encoded (or as encoded ahead), the pool made
    big enough, their image slots claimed and filled with their cross K/V. Returns one plan per
    set of equal options, (handles, members, images, slots); raises with no slot left claimed
    if they cannot be encoded or given room."""
    direct = encodes_into_slots(executor, manifest, taken)
    if taken[0].encoded is not None:  # encoded ahead: one part per encoder round
        parts = {id(h.encoded[0]): h.encoded[0] for h in taken}
        encoded, index = list(parts.values()), list(parts)
        where = {id(h): (index.index(id(h.encoded[0])), h.encoded[1]) for h in taken}
    elif not direct:
        encoded, where = encode_requests(executor, taken)
    rows.ensure(taken, manifest.enc_len if direct else max(e.enc_len for e in encoded))
    cohorts: dict[Any, list[Handle]] = {}
    for handle in taken:
        cohorts.setdefault(cohort_key(handle.options), []).append(handle)
    plans = []
    for handles in cohorts.values():
        members, batch = [], 0
        for handle in handles:
            members.append((handle, slice(batch, batch + handle.batch)))
            batch += handle.batch
        plans.append((handles, members, batch, rows.claim_slots(batch)))
    try:
        if direct:
            encode_into_slots(executor, rows.pool, plans)
        else:
            for handles, _, _, slots in plans:
                images = [(h, i) for h in handles for i in range(h.batch)]
                for slot, (handle, i) in zip(slots, images, strict=True):
                    part, first = where[id(handle)]
                    rows.pool.put_image(slot, encoded[part].cross, encoded[part].mask, first + i)
    except BaseException:
        for _, _, _, slots in plans:
            for slot in slots:
                rows.slot_used[slot] = False
        raise
    return plans
