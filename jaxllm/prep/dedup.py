"""Exact and near-duplicate removal; the first occurrence of each document is kept.

Exact: a 64-bit BLAKE2 hash of the text casefolded with whitespace collapsed.
Near: MinHash over word shingles (Broder 1997) with LSH banding (Leskovec et al., Mining of Massive
Datasets ch. 3): documents agreeing on every row of one band are candidates, and a candidate is a
duplicate when the signatures' estimated Jaccard (the fraction of equal rows) reaches the threshold.
Signatures are computed in worker processes (`signature`); the index lives in the main process and
holds, per document, its signature and one 12-byte entry per band (about 0.7 KB), never the text.

The rule, in input order, so that a distributed run (`jaxllm.prep.beam`) decides the same:
- a document whose exact key an earlier document had is an exact duplicate;
- among the rest, a document is a near duplicate when, in one of its bands, the earliest document
  with the same band key (kept or not) has an estimated Jaccard >= threshold with it. Each document
  is compared with one document per band bucket, so the cost stays linear in the corpus.
"""

from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np

from jaxllm.data.hashing import mix64
from jaxllm.prep.config import DedupConfig

_WORDS = re.compile(r"\w+")
_ROWS_PER_CHUNK = 4096  # shingles hashed at once: bounds the (shingles x permutations) matrix
_SIG_BLOCK = 16384  # signatures stored per block (blocks, not a doubling array: no slack to speak of)
_MIN_MERGE = 1 << 16  # recent band keys held in a dict before they join the sorted arrays


def exact_key(text: str) -> int:
    normalized = " ".join(text.casefold().split())
    return int.from_bytes(
        hashlib.blake2b(normalized.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little"
    )


class MinHasher:
    """Word-shingle MinHash signatures: `num_perm` uint32 values, a pure function of text and seed."""

    def __init__(self, cfg: DedupConfig):
        rng = np.random.default_rng([cfg.seed, 0x6D696E68])
        self.num_perm, self.shingle_size = cfg.num_perm, cfg.shingle_size
        self._a = rng.integers(0, 2**32, cfg.num_perm, dtype=np.uint32) | np.uint32(1)  # odd multipliers
        self._b = rng.integers(0, 2**32, cfg.num_perm, dtype=np.uint32)

    def shingles(self, text: str) -> np.ndarray:
        """Distinct 64-bit hashes of the text's lowercased word `shingle_size`-grams."""
        words = _WORDS.findall(text.lower())
        if not words:
            return np.zeros(0, np.uint64)
        ids = np.fromiter((zlib.crc32(w.encode("utf-8", "surrogatepass")) for w in words), np.uint64, len(words))
        k = min(self.shingle_size, len(ids))
        with np.errstate(over="ignore"):
            h = np.zeros(len(ids) - k + 1, np.uint64)
            for j in range(k):  # polynomial combination of the k word hashes, then mixed
                h = h * np.uint64(0x100000001B3) + ids[j : len(ids) - k + 1 + j]
        return np.unique(mix64(h))

    def signature(self, text: str) -> np.ndarray:
        """uint32[num_perm]: per permutation, the minimum of (a * x + b) mod 2**32 over the shingles x
        (the shingle hashes' top 32 bits; odd `a` makes each map a permutation)."""
        x = (self.shingles(text) >> np.uint64(32)).astype(np.uint32)
        sig = np.full(self.num_perm, np.iinfo(np.uint32).max, np.uint32)
        with np.errstate(over="ignore"):
            for start in range(0, len(x), _ROWS_PER_CHUNK):
                chunk = x[start : start + _ROWS_PER_CHUNK, None]
                sig = np.minimum(sig, (chunk * self._a + self._b).min(axis=0))
        return sig


class NearDuplicateIndex:
    """LSH index: the signature of every indexed document and, per (band, band key), the first one.

    Memory per document: its signature (4 bytes a permutation, in fixed blocks) and one 12-byte
    entry per band in `FirstIndex`, about 0.7 KB at the defaults; never the text.
    """

    def __init__(self, cfg: DedupConfig):
        self.bands, self.rows, self.threshold = cfg.bands, cfg.num_perm // cfg.bands, cfg.threshold
        rng = np.random.default_rng([cfg.seed, 0x6C7368])
        self._mult = rng.integers(1, 2**63, self.rows, dtype=np.uint64) | np.uint64(1)
        self._salt = mix64(np.arange(1, self.bands + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
        self._first = FirstIndex()
        self._blocks: list[np.ndarray] = []
        self._num_perm = cfg.num_perm
        self._count = 0
        self.candidates_checked = 0

    def band_keys(self, sig: np.ndarray) -> list[int]:
        return self._band_keys(sig).tolist()

    def _band_keys(self, sig: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            rows = sig.reshape(self.bands, self.rows).astype(np.uint64)
            return mix64((rows * self._mult).sum(axis=1, dtype=np.uint64))

    def check_and_add(self, sig: np.ndarray) -> tuple[bool, int]:
        """(is a near duplicate, candidates compared), then indexes `sig`: it is compared with the first
        indexed document of each of its band buckets (a duplicate when one of them has estimated
        Jaccard >= threshold), and becomes the first of the buckets that had none."""
        keys = self._table_keys(sig)
        firsts = self._first.get(keys)
        others = sorted(set(firsts[firsts >= 0].tolist()))
        matched = any(near_match(self._sig(i), sig, self.threshold) for i in others)
        self.candidates_checked += len(others)
        index = self._count
        if index % _SIG_BLOCK == 0:
            self._blocks.append(np.zeros((_SIG_BLOCK, self._num_perm), np.uint32))
        self._blocks[-1][index % _SIG_BLOCK] = sig
        self._count += 1
        self._first.set_missing(keys, firsts, index)
        return matched, len(others)

    def _table_keys(self, sig: np.ndarray) -> np.ndarray:
        """One key per band, salted by the band so that equal keys of two bands stay apart."""
        return mix64(self._band_keys(sig) ^ self._salt)

    def _sig(self, index: int) -> np.ndarray:
        return self._blocks[index // _SIG_BLOCK][index % _SIG_BLOCK]


class FirstIndex:
    """uint64 key -> the first int value set for it, in 12 bytes an entry: sorted arrays plus a dict of
    recent keys, merged in when it reaches an eighth of the arrays (so merges cost O(n) amortized)."""

    def __init__(self):
        self._keys = np.zeros(0, np.uint64)
        self._values = np.zeros(0, np.int32)
        self._recent: dict[int, int] = {}

    def get(self, keys: np.ndarray) -> np.ndarray:
        """The value of each key, -1 where it has none."""
        out = np.full(len(keys), -1, np.int64)
        if len(self._keys):
            pos = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
            found = self._keys[pos] == keys
            out[found] = self._values[pos[found]]
        if self._recent:
            for i in np.flatnonzero(out < 0):
                out[i] = self._recent.get(int(keys[i]), -1)
        return out

    def setdefault(self, keys: np.ndarray, value: int) -> None:
        """Sets `value` for each key that has none yet."""
        self.set_missing(keys, self.get(keys), value)

    def set_missing(self, keys: np.ndarray, current: np.ndarray, value: int) -> None:
        """`setdefault` given `current = get(keys)`, looked up already."""
        for i in np.flatnonzero(current < 0):
            self._recent.setdefault(int(keys[i]), value)
        if len(self._recent) >= max(_MIN_MERGE, len(self._keys) // 8):
            self._merge()

    def _merge(self) -> None:
        keys = np.fromiter(self._recent.keys(), np.uint64, len(self._recent))
        values = np.fromiter(self._recent.values(), np.int32, len(self._recent))
        order = np.argsort(keys)
        keys, values = keys[order], values[order]
        at = np.searchsorted(self._keys, keys)
        self._keys, self._values = np.insert(self._keys, at, keys), np.insert(self._values, at, values)
        self._recent = {}

    def __len__(self) -> int:
        return len(self._keys) + len(self._recent)


class Deduplicator:
    """Main-process state of both dedup stages: `check(key, sig)` says why a document is a duplicate."""

    def __init__(self, cfg: DedupConfig):
        self._seen: set[int] = set()
        self.near = NearDuplicateIndex(cfg) if cfg.near else None

    def check(self, key: int | None, sig: np.ndarray | None) -> str:
        """ "" (kept), "exact_duplicate" or "near_duplicate", by the rule in the module doc; documents
        are checked in input order."""
        if key is not None:
            if key in self._seen:
                return "exact_duplicate"
            self._seen.add(key)
        if self.near is not None and sig is not None:
            # Near duplicates are indexed too: the rule does not depend on what was kept.
            if self.near.check_and_add(sig)[0]:
                return "near_duplicate"
        return ""


def near_match(a: np.ndarray, b: np.ndarray, threshold: float) -> bool:
    """Whether two MinHash signatures estimate a Jaccard similarity >= threshold."""
    return float(np.mean(a == b)) >= threshold
