"""Deterministic weighted mixing of several sources, with O(1) random access to the g-th sample.

One period of P samples is assigned greedily (each slot goes to the source furthest below its target share,
as Megatron's blended dataset does); the period repeats. Source s thus gets round(w_s * P) of every P samples
(within one sample), and sample g maps to (source, index within that source) without any history.
"""

from __future__ import annotations

import numpy as np


class Mixture:
    def __init__(self, weights: list[float], period: int = 10_000) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or len(w) == 0 or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"mixing weights must be non-negative and not all zero, got {weights}")
        w = w / w.sum()
        counts = np.zeros(len(w), dtype=np.int64)
        pattern = np.empty(period, dtype=np.int64)
        for i in range(period):
            s = int(np.argmax(w * (i + 1) - counts))
            pattern[i] = s
            counts[s] += 1
        self.weights = w
        self.period = period
        self.pattern = pattern  # [P] source of each slot
        self.per_period = counts  # [S] samples of each source per period
        # rank of each slot among the slots of its source, within the period
        self.rank_in_source = np.zeros(period, dtype=np.int64)
        seen = np.zeros(len(w), dtype=np.int64)
        for i, s in enumerate(pattern):
            self.rank_in_source[i] = seen[s]
            seen[s] += 1

    def locate(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global sample indices [k] -> (source [k], index within the source [k])."""
        g = np.asarray(g, dtype=np.int64)
        slot = g % self.period
        source = self.pattern[slot]
        return source, (g // self.period) * self.per_period[source] + self.rank_in_source[slot]
