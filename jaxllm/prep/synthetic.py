"""Generated corpora for prep's tests and benchmarks: prose-like documents that pass the quality
filters, and near-duplicates of them planted at a known word-shingle Jaccard similarity."""

from __future__ import annotations

import itertools
import re

import numpy as np

_SYLLABLES = ("ka", "lo", "mi", "ne", "ra", "to", "su", "vi", "de", "pa", "ri", "on", "el", "an", "ur", "bo")
VOCAB: tuple[str, ...] = tuple("".join(p) for n in (2, 3) for p in itertools.product(_SYLLABLES, repeat=n))
_ZIPF = 1.0 / np.arange(1, len(VOCAB) + 1) ** 0.8
_ZIPF /= _ZIPF.sum()


def document(seed: int, min_words: int = 80, max_words: int = 400) -> str:
    """Sentences of Zipf-distributed invented words, a few per line, paragraphs between."""
    rng = np.random.default_rng([seed, 0x646F63])
    words = [VOCAB[i] for i in rng.choice(len(VOCAB), int(rng.integers(min_words, max_words)), p=_ZIPF)]
    lines, line, i = [], [], 0
    while i < len(words):
        n = int(rng.integers(6, 16))
        sentence = words[i : i + n]
        line.append(sentence[0].capitalize() + (" " + " ".join(sentence[1:]) if len(sentence) > 1 else "") + ".")
        i += n
        if rng.random() < 0.4:
            lines.append(" ".join(line))
            line = []
            if rng.random() < 0.3:
                lines.append("")
    if line:
        lines.append(" ".join(line))
    return "\n".join(lines).strip("\n")  # blank lines never follow each other (paragraph breaks)


def shingles(text: str, k: int = 5) -> set[tuple[str, ...]]:
    """The word k-shingles prep's MinHash signs (lowercased `\\w+` words)."""
    words = re.findall(r"\w+", text.lower())
    return set(zip(*(words[i:] for i in range(min(k, len(words))))))


def jaccard(a: str, b: str, k: int = 5) -> float:
    sa, sb = shingles(a, k), shingles(b, k)
    return len(sa & sb) / max(1, len(sa | sb))


def edit(text: str, fraction: float, rng: np.random.Generator) -> str:
    """`text` with `fraction` of its words replaced by random vocabulary words (line breaks kept)."""
    lines = [line.split(" ") for line in text.split("\n")]
    positions = [(i, j) for i, line in enumerate(lines) for j, w in enumerate(line) if w]
    for k in rng.choice(len(positions), max(1, round(fraction * len(positions))), replace=False):
        i, j = positions[int(k)]
        lines[i][j] = VOCAB[int(rng.integers(len(VOCAB)))]
    return "\n".join(" ".join(line) for line in lines)


def planted_duplicates(
    num_sources: int,
    num_duplicates: int,
    num_distractors: int,
    *,
    seed: int = 0,
    duplicate_jaccard: tuple[float, float] = (0.85, 1.0),
    distractor_jaccard: tuple[float, float] = (0.2, 0.6),
):
    """(documents, is_duplicate, jaccard): sources, then edited copies of random sources shuffled in
    after them, whose true Jaccard with their source lies in `duplicate_jaccard` (is_duplicate True)
    or in `distractor_jaccard` (heavier edits: related but not duplicates, is_duplicate False)."""
    rng = np.random.default_rng([seed, 0x706C74])
    sources = [document(seed * 1_000_003 + i, 150, 400) for i in range(num_sources)]
    planted: list[tuple[str, bool, float]] = []
    for want, (lo, hi) in ((num_duplicates, duplicate_jaccard), (num_distractors, distractor_jaccard)):
        made = 0
        while made < want:
            src = sources[int(rng.integers(num_sources))]
            fraction = rng.uniform(0.002, 0.03) if lo >= 0.8 else rng.uniform(0.04, 0.3)
            copy = edit(src, fraction, rng)
            j = jaccard(src, copy)
            if lo <= j <= hi:
                planted.append((copy, lo >= 0.8, j))
                made += 1
    order = rng.permutation(len(planted))
    docs = sources + [planted[i][0] for i in order]
    return (
        docs,
        [False] * num_sources + [planted[i][1] for i in order],
        [1.0] * num_sources + [planted[i][2] for i in order],
    )
