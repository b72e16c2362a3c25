"""Search state kept per image along axis 0, so searches join, and finished images leave."""

from __future__ import annotations

import numpy as np


def counts(flags: np.ndarray) -> list[int]:
    """Running counts of true flags, [0, f0, f0+f1, ...]: any/all over a slice by subtraction,
    one numpy call for every member of a cohort instead of three each."""
    return [0, *np.cumsum(flags, dtype=np.int64).tolist()]


class PerImage:
    """State kept per image (or per row) along axis 0, so searches of equal options can be
    joined (`join`) and finished images forgotten (`keep` the others) while the others go on.
    `lengths` [batch] is each image's current length on the host (the step it is at)."""

    _per_image: tuple[str, ...] = ()
    _per_row: tuple[str, ...] = ()

    def join(self, other) -> None:
        """Append the images of `other`, a search of the same options."""
        ops = self.ops
        for name in self._per_image + self._per_row:
            setattr(self, name, ops.concat([getattr(self, name), getattr(other, name)], axis=0))
        self.lengths = np.concatenate([self.lengths, other.lengths])
        self.batch += other.batch
        self.rows += other.rows

    def keep(self, images: np.ndarray) -> None:
        """Keep only `images` (host indices, in order) and forget the others, which finished:
        the kept ones go on unchanged."""
        per = self.rows_per_image
        rows = (images[:, None] * per + np.arange(per)).reshape(-1)
        index, row_index = self.ops.asarray(images), self.ops.asarray(rows)
        for name in self._per_image:
            setattr(self, name, getattr(self, name)[index])
        for name in self._per_row:
            setattr(self, name, getattr(self, name)[row_index])
        self.lengths = self.lengths[images]
        self.batch = len(images)
        self.rows = len(rows)

    @property
    def cur_len(self) -> int:
        """The length of every image; searches that apply processors are never joined, so
        theirs is one length."""
        return int(self.lengths.max())

    def _length_of(self, images: slice) -> int:
        return int(self.lengths[images].max())
