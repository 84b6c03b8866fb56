"""Counter-based random numbers: every draw is a pure function of a tuple of integers (seed, epoch, image,
caption, counter, ...), so a whole chunk of draws is one vectorized numpy step and any draw can be
recomputed alone, as a resumed run must, with no generator state to carry. A seeded numpy Generator per
caption cost ~40 µs to create, more than the rest of the caption's way through the loader.

The mixing function is splitmix64's finalizer (Steele, Lea and Flood, OOPSLA 2014), a bijection of uint64
words; the words of the tuple are folded in one at a time, each after a multiplication by the 64-bit
golden ratio, so the result depends on their order.
"""

from __future__ import annotations

import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
START = np.uint64(0x243F6A8885A308D3)  # the first hex digits of pi: any start but 0 would do


def mix64(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hashed(*words: int | np.ndarray) -> np.ndarray:
    """One uint64 per element of the broadcast `words` (integers, negative ones included)."""
    key = START
    with np.errstate(over="ignore"):  # the multiplications wrap by design
        for word in words:
            key = mix64((key ^ np.asarray(word).astype(np.uint64)) * GOLDEN)
    return np.asarray(key)


def uniform(*words: int | np.ndarray) -> np.ndarray:
    """A float64 in [0, 1) per element of the broadcast `words`: the hash's top 53 bits."""
    return (hashed(*words) >> np.uint64(11)).astype(np.float64) * 2.0**-53
