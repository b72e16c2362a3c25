"""A cohort: requests admitted together with equal options, stepped as one search."""

from __future__ import annotations

from typing import Any

from .handle import Handle
from .options import GenerationOptions


class Active:
    """Requests admitted to the pool together with the same options, stepped as one search (a
    cohort: one batched search costs the host what one request does), with its rows and image
    slots. Each member is answered as soon as its own images are done: the search decides that
    per slice exactly as a search over that member alone would."""

    def __init__(self, members: list[tuple[Handle, slice]], search: Any, offset: int, slots: list):
        self.members = members
        self.search = search
        self.offset = offset
        self.rows = search.rows
        self.slots = slots
        self.options = members[0][0].options

    @property
    def handles(self) -> list[Handle]:
        return [handle for handle, _ in self.members]

    def open_members(self) -> list[tuple[Handle, slice]]:
        return [(h, images) for h, images in self.members if not h.done()]


def cohort_key(o: GenerationOptions) -> Any:
    """Requests with equal options may share one search, unless they sample (each has its own
    random stream) or collect per-step scores or attentions (those are per search)."""
    if o.do_sample or o.output_scores or o.output_attentions:
        return object()  # a key equal to no other
    return o
