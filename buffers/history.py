"""Event history: a preallocated ring of the last N channel events.

Stored column-wise in numpy arrays so that appending allocates nothing and a model can read the
recent past as array slices.
"""

from __future__ import annotations

import numpy as np


class EventHistory:
    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self.t = np.zeros(capacity, np.float64)
        self.status = np.zeros(capacity, np.uint8)
        self.data1 = np.zeros(capacity, np.uint8)
        self.data2 = np.zeros(capacity, np.uint8)
        self._n = 0  # total appended

    def append(self, t: float, data: bytes) -> None:
        i = self._n % self.capacity
        self.t[i] = t
        self.status[i] = data[0]
        self.data1[i] = data[1] if len(data) > 1 else 0
        self.data2[i] = data[2] if len(data) > 2 else 0
        self._n += 1

    def __len__(self) -> int:
        return min(self._n, self.capacity)

    @property
    def total(self) -> int:
        return self._n

    def last(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The last ``n`` events in time order (copies of at most ``n`` rows)."""
        n = min(n, len(self))
        idx = (np.arange(self._n - n, self._n)) % self.capacity
        return self.t[idx], self.status[idx], self.data1[idx], self.data2[idx]
