"""Curriculum: a difficulty score per record, quantile buckets (0 = easiest) and an easy-to-hard order.

The score is a weighted mean of percentile ranks (0 = lowest, 1 = highest) of length, rarity (mean
-log unigram frequency of the tokens, so rare words make a document harder), a numeric field and the
loss of a reference jaxllm model (`ModelLoss`: what the model predicts badly is hard), so signals of
any scale mix. Buckets hold equal numbers of records; ties go by input order.
"""

from __future__ import annotations

import numpy as np

from jaxllm.prep.config import CurriculumConfig


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


def scores(
    cfg: CurriculumConfig,
    length: np.ndarray,
    rarity: np.ndarray | None,
    field: np.ndarray,
    model_loss: np.ndarray | None = None,
) -> np.ndarray:
    parts = [
        (cfg.length_weight, length),
        (cfg.rarity_weight, rarity),
        (cfg.field_weight, field),
        (cfg.model_weight, model_loss),
    ]
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


class ModelLoss:
    """Mean next-token loss of each text under a reference model (a jaxllm workdir or a Hugging Face
    folder, as `jaxllm generate --model` takes), over its first `max_tokens` tokens.

    Batches have one fixed shape (padded rows and columns are masked), so a text's loss does not
    depend on its neighbours; losses are rounded to 1e-4, as they only feed percentile ranks.
    """

    def __init__(self, source: str, max_tokens: int, batch_size: int):
        import jax  # pylint: disable=g-import-not-at-top
        import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

        from jaxllm import load  # pylint: disable=g-import-not-at-top
        from jaxllm.train.step import cross_entropy  # pylint: disable=g-import-not-at-top

        self.model, self.params, self.tokenizer, self.add_bos = load.load_model(source)
        self.max_tokens, self.batch_size = max_tokens, batch_size

        def losses(params, tokens_BL, weights_BL):  # per row: training's cross-entropy, mean over the row
            logits_BLV = self.model.apply({"params": params}, tokens_BL[:, :-1])
            ce_B, _ = jax.vmap(cross_entropy)(logits_BLV, tokens_BL[:, 1:], weights_BL[:, 1:])
            return ce_B / jnp.maximum(weights_BL[:, 1:].sum(1), 1.0)

        self._losses = jax.jit(losses)

    def __call__(self, texts: list[str]) -> list[float]:
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            tokens = np.zeros((self.batch_size, self.max_tokens + 1), np.int32)
            weights = np.zeros(tokens.shape, np.float32)
            for row, text in enumerate(chunk):
                ids = ([self.tokenizer.bos_id] if self.add_bos else []) + list(self.tokenizer.encode(text))
                ids = ids[: self.max_tokens + 1]
                tokens[row, : len(ids)], weights[row, : len(ids)] = ids, 1.0
            losses = np.asarray(self._losses(self.params, tokens, weights))[: len(chunk)]
            out += [round(float(x), 4) for x in losses]
        return out
