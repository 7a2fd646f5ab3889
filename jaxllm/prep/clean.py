"""Per-document stages: cleaning (Unicode, control characters, whitespace, length) and quality filters.

Quality follows Gopher's rules (Rae et al. 2021, appendix A) with C4's (Raffel et al. 2020) as
options. Each returns the (possibly edited) text, or None and the first rule it failed, so every
removed document is counted under exactly one reason.
"""

from __future__ import annotations

import collections
import re
import unicodedata

from jaxllm.prep.config import CleanConfig, QualityConfig

# C0/C1 controls but tab, LF, CR; and invisible format characters (zero-width, bidi marks, BOM, soft hyphen).
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.M)
_BLANK_RUNS = re.compile(r"\n{3,}")
_SPACE_RUNS = re.compile(r"[^\S\n]+")
_ALPHA_WORDS = re.compile(r"\S*[^\W\d_]\S*")  # whitespace-separated words holding at least one letter
_BULLETS = ("•", "‣", "⁃", "◦", "●", "○", "▪", "■", "-", "*", "–", "—")
_ELLIPSES = ("...", "…")
_TERMINAL = (".", "!", "?", '"', "'", "”", "’")


def clean(text: str, cfg: CleanConfig) -> tuple[str | None, str]:
    """(cleaned text, "") or (None, reason)."""
    if cfg.unicode != "none":
        text = unicodedata.normalize(cfg.unicode, text)
    if cfg.strip_control:
        text = _CONTROL.sub("", text)
    if cfg.whitespace != "none":
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        if cfg.whitespace == "all":
            text = _SPACE_RUNS.sub(" ", text)
            text = "\n".join(line.strip() for line in text.split("\n"))
        else:
            text = _TRAILING_SPACE.sub("", text)
        text = _BLANK_RUNS.sub("\n\n", text).strip("\n")
    if not text.strip():
        return None, "empty_after_clean"
    if len(text) < cfg.min_chars:
        return None, "too_short"
    if cfg.max_chars and len(text) > cfg.max_chars:
        return None, "too_long"
    return text, ""


def quality(text: str, cfg: QualityConfig) -> tuple[str | None, str, int]:
    """(text, "", lines removed) if `text` passes, else (None, the first failed rule, lines removed).

    C4's line rules run first (they edit the text); the document rules then judge what is left.
    """
    lines = text.split("\n")
    removed = 0
    if cfg.c4_javascript or cfg.c4_terminal_punctuation or cfg.c4_min_words_per_line:
        kept = [line for line in lines if _c4_keeps(line, cfg)]
        removed = len(lines) - len(kept)
        if removed:
            lines = kept
            text = "\n".join(kept)
    reason = _document_rule(text, lines, cfg)
    return (None, reason, removed) if reason else (text, "", removed)


def _c4_keeps(line: str, cfg: QualityConfig) -> bool:
    if not line.strip():
        return True  # paragraph breaks stay
    if cfg.c4_javascript and "javascript" in line.lower():
        return False
    if cfg.c4_terminal_punctuation and not line.rstrip().endswith(_TERMINAL):
        return False
    return not (cfg.c4_min_words_per_line and len(line.split()) < cfg.c4_min_words_per_line)


def language_identifier():
    """langid.py's bundled model with normalized probabilities (loaded once per process)."""
    global _LANGID  # pylint: disable=global-statement
    if _LANGID is None:  # QualityConfig checked that langid is installed
        from langid.langid import LanguageIdentifier, model  # pylint: disable=g-import-not-at-top

        _LANGID = LanguageIdentifier.from_modelstring(model, norm_probs=True)
    return _LANGID


_LANGID = None


def language(text: str, cfg: QualityConfig) -> tuple[str, float]:
    """(most likely language, its probability) of the start of `text`, over all 97 of langid's."""
    lang, prob = language_identifier().classify(text[: cfg.language_sample_chars])
    return lang, float(prob)


def _document_rule(text: str, lines: list[str], cfg: QualityConfig) -> str:
    """The name of the first rule `text` fails, or ""."""
    if cfg.c4_lorem_ipsum and "lorem ipsum" in text.lower():
        return "c4_lorem_ipsum"
    if cfg.c4_curly_bracket and "{" in text:
        return "c4_curly_bracket"
    words = text.split()
    n = len(words)
    if n == 0:
        return "no_words"
    if cfg.min_words and n < cfg.min_words:
        return "too_few_words"
    if cfg.max_words and n > cfg.max_words:
        return "too_many_words"
    word_chars = sum(map(len, words))
    mean = word_chars / n
    if cfg.min_mean_word_length and mean < cfg.min_mean_word_length:
        return "mean_word_length_low"
    if cfg.max_mean_word_length and mean > cfg.max_mean_word_length:
        return "mean_word_length_high"
    if cfg.max_symbol_word_ratio:
        symbols = text.count("#") + text.count("...") + text.count("…")
        if symbols / n > cfg.max_symbol_word_ratio:
            return "symbol_word_ratio"
    content = [line.strip() for line in lines if line.strip()]
    if content and cfg.max_bullet_line_fraction:
        if sum(line.startswith(_BULLETS) for line in content) / len(content) > cfg.max_bullet_line_fraction:
            return "bullet_lines"
    if content and cfg.max_ellipsis_line_fraction:
        if sum(line.endswith(_ELLIPSES) for line in content) / len(content) > cfg.max_ellipsis_line_fraction:
            return "ellipsis_lines"
    if cfg.max_non_alpha_word_fraction:
        if 1.0 - len(_ALPHA_WORDS.findall(text)) / n > cfg.max_non_alpha_word_fraction:
            return "non_alpha_words"
    if content and cfg.max_duplicate_line_fraction:
        if 1.0 - len(set(content)) / len(content) > cfg.max_duplicate_line_fraction:
            return "duplicate_lines"
    if cfg.top_ngram_max_fractions:
        lowered = text.lower().split()
        for n_gram, limit in enumerate(cfg.top_ngram_max_fractions, start=2):
            if limit and top_ngram_fraction(lowered, n_gram, word_chars) > limit:
                return f"top_{n_gram}gram_fraction"
    if cfg.languages:
        lang, prob = language(text, cfg)
        if lang not in cfg.languages or prob < cfg.min_language_score:
            return "language"
    return ""


def top_ngram_fraction(words: list[str], n: int, total_chars: int) -> float:
    """Fraction of word characters inside the most frequent word n-gram (0 if no n-gram repeats)."""
    if len(words) < n or total_chars == 0:
        return 0.0
    counts = collections.Counter(zip(*(words[i:] for i in range(n))))
    gram, count = counts.most_common(1)[0]
    return 0.0 if count < 2 else count * sum(map(len, gram)) / total_chars
