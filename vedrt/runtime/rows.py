"""Which decoder rows and image slots each running cohort holds in the engine's cache pool.

The decoder graph steps rows [0, used) of the pool, so the cohorts' rows are kept packed at the
front, each cohort's rows contiguous and in its search's order. Cohorts join (new rows right
after their own, the later cohorts moved up), shrink (a member leaves; the rows after it move
down) and leave (the cohorts after them move down); beam search reorders rows within a cohort.
Only rows that change place are copied, and only the cache positions they hold (of a beam
reorder, only those after the history a row shares with the one it replaces).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .cohort import Active
from .errors import InputError
from .handle import Handle
from .options import PROMPT_LEN


class Rows:
    """The pool, the cohorts in row order and the image slots in use."""

    def __init__(self, executor: Any, max_rows: int, cache_len: int | None):
        self.executor, self.ops = executor, executor.ops
        self.max_rows = max_rows
        self.min_cache_len = cache_len
        self.pool: Any = None
        self.active: list[Active] = []
        self.slot_used: list[bool] = []
        self.groups = 0  # group layout of the active rows (0: to be rebuilt)

    @property
    def used(self) -> int:
        return sum(a.rows for a in self.active)

    def ensure(self, taken: list[Handle], enc_len: int) -> None:
        """A pool (grown if need be) for the active cohorts and the requests `taken`."""
        lengths = [a.options.max_length for a in self.active]
        lengths += [h.options.max_length for h in taken]
        cache_len = max(lengths) - PROMPT_LEN
        if self.min_cache_len is not None:
            cache_len = max(cache_len, self.min_cache_len)
        slots = sum(self.slot_used) + sum(h.batch for h in taken)
        try:
            if self.pool is None:
                self.pool = self.executor.new_pool(self.max_rows, slots, cache_len, enc_len)
            else:
                self.pool.ensure(cache_len, slots, enc_len, self.used)
        except MemoryError:  # numpy's "Unable to allocate 59.1 GiB" names no option
            raise InputError(
                f"the decoder cache of {self.max_rows} rows x {cache_len} positions does not fit "
                "in memory: ask for fewer beams, return sequences, images or new tokens"
            ) from None
        self.slot_used += [False] * (self.pool.slots - len(self.slot_used))

    def claim_slots(self, count: int) -> list[int]:
        slots = [i for i, used in enumerate(self.slot_used) if not used][:count]
        for i in slots:
            self.slot_used[i] = True
        return slots

    def place(self, members: list, search: Any, slots: list[int], joined: Active | None) -> Active:
        """A new search's rows: after cohort `joined`'s, which takes it in, or after all.
        Returns the cohort it is in."""
        offset = self.used
        if joined is not None:
            for b in reversed(self.active[self.active.index(joined) + 1 :]):
                self.move(b, b.offset + search.rows)
            offset = joined.offset + joined.rows
        end = offset + search.rows
        self.pool.input_ids[offset:end, 0] = search.first_tokens()
        self.pool.past_lengths[offset:end] = 0
        if joined is not None:  # one search for all of them: the host's cost of one
            joined.join(members, search, slots)
        else:
            self.active.append(joined := Active(members, search, offset, slots))
        self.groups = 0
        return joined

    def move(self, a: Active, offset: int) -> None:
        rows = np.arange(a.rows)
        self.pool.move_rows(rows + a.offset, rows + offset, self.pool.filled(a.offset, a.rows))
        a.offset = offset

    def shrink(self, a: Active, gone: list[Handle]) -> None:
        """Members `gone` leave cohort `a`: the rows that stay move to the front of its range,
        their slots are freed; `release` packs the cohorts after it."""
        length = self.pool.filled(a.offset, a.rows)
        keep, freed = a.drop(gone)
        for slot in freed:
            self.slot_used[slot] = False
        keep = np.asarray(keep, dtype=np.int64)
        moved = np.flatnonzero(keep != np.arange(len(keep)))
        if len(moved):  # only the rows after the first one gone change place
            self.pool.move_rows(keep[moved] + a.offset, moved + a.offset, length)
        self.groups = 0

    def release(self, gone: list[Active]) -> None:
        """Free the rows and slots of finished cohorts; pack the rest to the front."""
        for a in gone:
            for slot in a.slots:
                self.slot_used[slot] = False
        self.active = [a for a in self.active if a not in gone]
        offset = 0
        for a in self.active:
            if a.offset != offset:
                self.move(a, offset)
                self.groups = 0
            offset += a.rows
        if gone:
            self.groups = 0

    def reorder(self, a: Active, source: Any, shared: Any) -> None:
        """Beam search moved rows: row i continues row `source[i]` (cohort-relative) and shares
        its first `shared[i]` positions with what row i held, so only the positions after those
        are copied, of the rows that changed."""
        ops = self.ops
        source = np.asarray(ops.to_numpy(source))
        target = np.flatnonzero(source != np.arange(a.rows))
        if len(target):
            start = np.asarray(ops.to_numpy(shared))[target]
            self.pool.copy_positions(
                source[target] + a.offset,
                target + a.offset,
                start,
                self.pool.filled(a.offset, a.rows),
            )

    def layout_groups(self) -> int:
        """Rows in equal groups, each reading one image slot: as large as every request allows
        (all beam-4 requests: groups of 4 rows, each image's K/V read once per step)."""
        if self.groups:
            return self.groups
        size = 0
        for a in self.active:
            size = math.gcd(size, a.search.rows_per_image)
        slots = []
        for a in self.active:
            for slot in a.slots:
                slots += [slot] * (a.search.rows_per_image // size)
        self.groups = self.pool.set_groups(slots)
        return self.groups
