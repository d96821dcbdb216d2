"""A seeded pseudo-random permutation of range(n), evaluated index by index in O(1) memory.

A permutation table of a Pile-sized dataset (~10^8 windows) costs hundreds of MB per epoch; a Feistel network
over the next power of four, with cycle-walking back into range(n), is a bijection that needs none.
"""

from __future__ import annotations

import numpy as np

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """splitmix64-style round function on uint64 arrays."""
    with np.errstate(over="ignore"):
        z = (x + key) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return z ^ (z >> np.uint64(31))


class Permutation:
    def __init__(self, n: int, seed: int | list[int], rounds: int = 4) -> None:
        if n < 1:
            raise ValueError("a permutation needs n >= 1")
        self.n = n
        bits = max(2, int(n - 1).bit_length())
        self.half = (bits + 1) // 2  # the domain is 4^half >= n
        self.half_mask = np.uint64((1 << self.half) - 1)
        rng = np.random.default_rng(seed)
        self.keys = [np.uint64(k) for k in rng.integers(0, 2**63, size=rounds, dtype=np.int64)]

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(self.half), x & self.half_mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right, key) & self.half_mask)
        return (left << np.uint64(self.half)) | right

    def __call__(self, idx: np.ndarray | int) -> np.ndarray:
        """Images of indices in [0, n)."""
        scalar = np.ndim(idx) == 0
        x = np.atleast_1d(np.asarray(idx, dtype=np.uint64))
        if x.size and int(x.max()) >= self.n:
            raise IndexError(f"index out of range for a permutation of {self.n}")
        out = self._feistel(x)
        outside = out >= self.n
        while outside.any():  # cycle-walk: re-apply until back in range (a bijection on range(n))
            out[outside] = self._feistel(out[outside])
            outside = out >= self.n
        out = out.astype(np.int64)
        return out[0] if scalar else out
