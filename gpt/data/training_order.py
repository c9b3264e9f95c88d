"""The order fine-tuning visits its examples: epoch after epoch, each a seeded permutation.

Item j of the stream is a pure function of (seed, j), so a resumed run visits exactly what an
uninterrupted one would. `ShuffledOrder` is the plain stream of item numbers (DPO's pairs);
`RowStream` groups it into training rows (SFT: one example a row, or packed several to a row).
"""

from __future__ import annotations

import numpy as np


class ShuffledOrder:
    """Item numbers 0..n-1, epoch after epoch: epoch e is permutation(n) of a generator seeded by
    (seed, e), or 0..n-1 in order when not shuffling."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._cached: tuple[int, np.ndarray] | None = None

    def epoch(self, epoch: int) -> np.ndarray:
        """This epoch's order (cached: consecutive items mostly share an epoch)."""
        if self._cached is None or self._cached[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
            self._cached = (epoch, order)
        return self._cached[1]

    def __getitem__(self, j: int) -> int:
        """The j-th item of the endless stream."""
        epoch, k = divmod(j, self.n)
        return int(self.epoch(epoch)[k])


class RowStream:
    """The training stream's rows (lists of example indices), epoch after epoch."""

    def __init__(self, lengths: list[int], capacity: int, packing: bool, seed: int, shuffle: bool = True):
        self.lengths, self.capacity, self.packing = lengths, capacity, packing
        self.order = ShuffledOrder(len(lengths), seed, shuffle)
        self.rows: list[list[int]] = []  # packed rows built so far (packing only)
        self.epoch_rows: list[int] = []  # rows per packed epoch

    def row(self, j: int) -> list[int]:
        if not self.packing:
            return [self.order[j]]
        while len(self.rows) <= j:
            self._pack_epoch(len(self.epoch_rows))
        return self.rows[j]

    def rows_per_epoch(self) -> int:
        if not self.packing:
            return len(self.lengths)
        if not self.epoch_rows:
            self._pack_epoch(0)
        return self.epoch_rows[0]

    def _pack_epoch(self, epoch: int) -> None:
        """Greedy, in order: an example that does not fit in the current row starts the next one."""
        before = len(self.rows)
        current: list[int] = []
        used = 0
        for i in self.order.epoch(epoch):
            n = self.lengths[i]
            if current and used + n > self.capacity:
                self.rows.append(current)
                current, used = [], 0
            current.append(int(i))
            used += n
        self.rows.append(current)
        self.epoch_rows.append(len(self.rows) - before)
