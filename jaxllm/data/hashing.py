"""splitmix64's finalizer: the one integer hash behind the data split, the mixture's draws and dedup."""

import numpy as np


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer over uint64s: a well-mixed hash, the same on every platform and process."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))
