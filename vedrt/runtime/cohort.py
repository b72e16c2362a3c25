"""A cohort: requests with equal options stepped as one search, joining and leaving it."""

from __future__ import annotations

from typing import Any

import numpy as np

from .handle import Handle
from .options import GenerationOptions
from .search import mergeable

NONFINITE = (
    "the decoder's output for this request is NaN or infinite: its inputs push the model past "
    "its number range"
)


class Active:
    """Requests with the same options stepped as one search (a cohort: one batched search costs
    the host what one request does), with its rows and image slots. Requests admitted on the same
    step share one; with `mergeable` options later ones join it too. Each member is answered as
    soon as its own images are done (the search decides that per slice exactly as a search over
    that member alone would) and its images and rows then leave while the others go on."""

    def __init__(self, members: list[tuple[Handle, slice]], search: Any, offset: int, slots: list):
        self.members = members
        self.search = search
        self.offset = offset
        self.slots = slots
        self.options = members[0][0].options
        self.key = cohort_key(self.options)
        self.enc_width: int | None = None  # a text request's own encoder length (attentions)

    @property
    def rows(self) -> int:
        return self.search.rows

    def join(self, members: list[tuple[Handle, slice]], search: Any, slots: list) -> None:
        """Take in a new search of the same options (its images after this one's)."""
        base = self.search.batch
        self.members += [(h, slice(s.start + base, s.stop + base)) for h, s in members]
        self.search.join(search)
        self.slots += slots

    def drop(self, gone: list[Handle]) -> tuple[list[int], list[int]]:
        """Remove these members' images from the search; returns the rows (relative to the
        cohort) that stay, in order, and the image slots freed."""
        per = self.search.rows_per_image
        kept, keep_slots, freed, members = [], [], [], []
        for handle, images in self.members:
            if handle in gone:
                freed += self.slots[images.start : images.stop]
                continue
            start = len(kept)
            kept += range(images.start, images.stop)
            keep_slots += self.slots[images.start : images.stop]
            members.append((handle, slice(start, len(kept))))
        self.search.keep(np.asarray(kept, dtype=np.int64))
        self.slots, self.members = keep_slots, members
        return [i * per + j for i in kept for j in range(per)], freed

    def nonfinite(self, finite_rows: np.ndarray) -> tuple[list[Handle], list[int], list[int]]:
        """The open members owning a row whose step was not finite (`finite_rows`: per row of
        this cohort), and those members' rows (relative to the cohort) and image slots."""
        per = self.search.rows_per_image
        bad = set((np.flatnonzero(~finite_rows) // per).tolist())
        failed, rows, slots = [], [], []
        for handle, images in self.members:
            if handle.done() or not bad.intersection(range(images.start, images.stop)):
                continue
            failed.append(handle)
            rows += range(images.start * per, images.stop * per)
            slots += self.slots[images.start : images.stop]
        return failed, rows, slots

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


def can_join(a: Active, o: GenerationOptions) -> bool:
    """May a request with options `o`, admitted now, join the running cohort `a`?"""
    return a.key == cohort_key(o) and mergeable(o) and len(a.members) > 0
