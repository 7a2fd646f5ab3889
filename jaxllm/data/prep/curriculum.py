"""Curriculum: a difficulty score per record, quantile buckets (0 = easiest) and an easy-to-hard order.

The score is a weighted mean of percentile ranks (0 = lowest, 1 = highest) of length, rarity (mean
-log unigram frequency of the tokens, so rare words make a document harder) and a numeric field, so
signals of any scale mix. Buckets hold equal numbers of records; ties go by input order.
"""

from __future__ import annotations

import numpy as np

from jaxllm.data.prep.config import CurriculumConfig


def percentile_ranks(values: np.ndarray) -> np.ndarray:
    """Mid-ranks scaled to [0, 1]; NaN (missing) ranks lowest."""
    values = np.nan_to_num(np.asarray(values, np.float64), nan=-np.inf)
    n = len(values)
    if n <= 1:
        return np.zeros(n)
    ordered = np.sort(values)
    low = np.searchsorted(ordered, values, "left")
    high = np.searchsorted(ordered, values, "right") - 1
    return (low + high) / 2.0 / (n - 1)


def scores(cfg: CurriculumConfig, length: np.ndarray, rarity: np.ndarray | None, field: np.ndarray) -> np.ndarray:
    parts = [(cfg.length_weight, length), (cfg.rarity_weight, rarity), (cfg.field_weight, field)]
    parts = [(w, v) for w, v in parts if w and v is not None]
    total = sum(abs(w) for w, _ in parts)
    if not cfg.enabled or not total:
        return np.zeros(len(length))
    return sum(w * percentile_ranks(v) for w, v in parts) / total


def buckets_and_order(cfg: CurriculumConfig, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bucket per record, the order to write records in)."""
    n = len(score)
    by_score = np.argsort(score, kind="stable")
    bucket = np.zeros(n, np.int32)
    num_buckets = cfg.num_buckets if cfg.enabled else 1
    bucket[by_score] = (np.arange(n) * num_buckets // max(n, 1)).astype(np.int32)
    order = by_score if cfg.enabled and cfg.order == "easy_to_hard" else np.arange(n)
    return bucket, order


def rarity(tokens: np.ndarray, log_freq: np.ndarray) -> float:
    """Mean -log unigram frequency of `tokens` (add-one smoothed frequencies in `log_freq`)."""
    return float(-log_freq[tokens].mean()) if len(tokens) else 0.0


def log_frequencies(counts: np.ndarray) -> np.ndarray:
    counts = counts.astype(np.float64) + 1.0
    return np.log(counts / counts.sum())
