"""Frozen configs of `jaxllm prep`, one per section of `configs/prep_default.py` (every key declared there)."""

from __future__ import annotations

import dataclasses

import ml_collections

from jaxllm import JaxllmError
from jaxllm.config import build, check_sections


@dataclasses.dataclass(frozen=True)
class InputConfig:
    text_split: str = "file"
    text_field: str = "text"
    tfds_data_dir: str = ""
    decode_errors: str = "replace"
    max_doc_bytes: int = 8_000_000
    too_long: str = "truncate"

    def __post_init__(self):
        _one_of("input.text_split", self.text_split, ("file", "paragraph"))
        _one_of("input.decode_errors", self.decode_errors, ("replace", "ignore", "skip"))
        _one_of("input.too_long", self.too_long, ("truncate", "skip"))
        _positive("input.max_doc_bytes", self.max_doc_bytes)
        if not self.text_field:
            raise JaxllmError("input.text_field must name a field")


@dataclasses.dataclass(frozen=True)
class CleanConfig:
    enabled: bool = True
    unicode: str = "NFC"
    strip_control: bool = True
    whitespace: str = "lines"
    min_chars: int = 1
    max_chars: int = 0

    def __post_init__(self):
        _one_of("clean.unicode", self.unicode, ("NFC", "NFKC", "none"))
        _one_of("clean.whitespace", self.whitespace, ("none", "lines", "all"))


@dataclasses.dataclass(frozen=True)
class QualityConfig:
    enabled: bool = True
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1
    max_ellipsis_line_fraction: float = 0.3
    max_bullet_line_fraction: float = 0.9
    max_non_alpha_word_fraction: float = 0.2
    max_duplicate_line_fraction: float = 0.3
    top_ngram_max_fractions: tuple[float, ...] = (0.20, 0.18, 0.16)
    c4_lorem_ipsum: bool = False
    c4_javascript: bool = False
    c4_curly_bracket: bool = False
    c4_terminal_punctuation: bool = False
    c4_min_words_per_line: int = 0
    languages: tuple[str, ...] = ()
    min_language_score: float = 0.65
    language_sample_chars: int = 2000

    def __post_init__(self):
        object.__setattr__(self, "top_ngram_max_fractions", tuple(float(x) for x in self.top_ngram_max_fractions))
        languages = (self.languages,) if isinstance(self.languages, str) else tuple(self.languages)
        object.__setattr__(self, "languages", languages)
        if not 0.0 <= self.min_language_score <= 1.0:
            raise JaxllmError(f"quality.min_language_score must be in [0, 1], got {self.min_language_score}")
        if self.languages and self.enabled:  # fail now, with how to install it, not in a worker
            try:
                import langid.langid  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
            except ImportError:
                raise JaxllmError(
                    "quality.languages needs langid: pip install 'jaxllm[langid]' (or langid), or set "
                    "quality.languages=()"
                ) from None


@dataclasses.dataclass(frozen=True)
class DedupConfig:
    """Defaults: 20 bands x 6 rows, then >= 70% of the 120 rows equal; the S-curve behind that choice is
    worked out above `c.dedup` in configs/prep_default.py."""

    exact: bool = True
    near: bool = True
    num_perm: int = 120
    bands: int = 20
    shingle_size: int = 5
    threshold: float = 0.7
    seed: int = 0

    def __post_init__(self):
        for name in ("num_perm", "bands", "shingle_size"):
            _positive(f"dedup.{name}", getattr(self, name))
        if self.num_perm % self.bands:
            raise JaxllmError(f"dedup.num_perm={self.num_perm} must be a multiple of dedup.bands={self.bands}")
        if not 0.0 < self.threshold <= 1.0:
            raise JaxllmError(f"dedup.threshold must be in (0, 1], got {self.threshold}")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    enabled: bool = False
    ops: tuple[str, ...] = ("swap", "delete", "insert", "synonym")
    rate: float = 0.1
    copies: int = 1
    seed: int = 0
    paraphrase_model: str = ""
    paraphrase_prompt: str = "Paraphrase the following text.\nText: {text}\nParaphrase:"
    paraphrase_fraction: float = 1.0
    paraphrase_max_new_tokens: int = 128
    paraphrase_temperature: float = 0.7

    def __post_init__(self):
        ops = (self.ops,) if isinstance(self.ops, str) else tuple(self.ops)
        object.__setattr__(self, "ops", ops)
        for op in ops:
            _one_of("augment.ops", op, ("swap", "delete", "insert", "synonym"))
        if self.enabled and not ops and not self.paraphrase_model:
            raise JaxllmError("augment.enabled needs augment.ops or augment.paraphrase_model")
        if not 0.0 <= self.rate <= 1.0 or not 0.0 <= self.paraphrase_fraction <= 1.0:
            raise JaxllmError("augment.rate and augment.paraphrase_fraction must be in [0, 1]")
        if self.copies < 0:
            raise JaxllmError(f"augment.copies must be >= 0, got {self.copies}")
        if self.paraphrase_model and "{text}" not in self.paraphrase_prompt:
            raise JaxllmError("augment.paraphrase_prompt must contain {text}")


@dataclasses.dataclass(frozen=True)
class CurriculumConfig:
    enabled: bool = True
    length_weight: float = 1.0
    rarity_weight: float = 0.0
    field_weight: float = 0.0
    field: str = ""
    model_weight: float = 0.0
    model: str = ""
    model_max_tokens: int = 256
    model_batch_size: int = 8
    num_buckets: int = 4
    order: str = "easy_to_hard"

    def __post_init__(self):
        _one_of("curriculum.order", self.order, ("easy_to_hard", "input"))
        _positive("curriculum.num_buckets", self.num_buckets)
        _positive("curriculum.model_max_tokens", self.model_max_tokens)
        _positive("curriculum.model_batch_size", self.model_batch_size)
        if self.field_weight and not self.field:
            raise JaxllmError("curriculum.field_weight needs curriculum.field (the numeric field to read)")
        if self.model_weight and not self.model:
            raise JaxllmError(
                "curriculum.model_weight needs curriculum.model (a jaxllm workdir or Hugging Face folder)"
            )


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
    enabled: bool = True
    tokenizer: str = ""
    vocab_size: int = 0
    write_tokens: bool = True

    def __post_init__(self):
        if self.vocab_size != 0:
            _positive("tokenize.vocab_size", self.vocab_size)


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    records_per_shard: int = 100_000
    overwrite: bool = False

    def __post_init__(self):
        _positive("output.records_per_shard", self.records_per_shard)


_SECTIONS = {
    "input": InputConfig,
    "clean": CleanConfig,
    "quality": QualityConfig,
    "dedup": DedupConfig,
    "augment": AugmentConfig,
    "curriculum": CurriculumConfig,
    "tokenize": TokenizeConfig,
    "output": OutputConfig,
}


@dataclasses.dataclass(frozen=True)
class PrepConfig:
    """Everything `prepare` reads: one frozen section per stage."""

    input: InputConfig = dataclasses.field(default_factory=InputConfig)
    clean: CleanConfig = dataclasses.field(default_factory=CleanConfig)
    quality: QualityConfig = dataclasses.field(default_factory=QualityConfig)
    dedup: DedupConfig = dataclasses.field(default_factory=DedupConfig)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    curriculum: CurriculumConfig = dataclasses.field(default_factory=CurriculumConfig)
    tokenize: TokenizeConfig = dataclasses.field(default_factory=TokenizeConfig)
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)
    num_workers: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.num_workers < 0:
            raise JaxllmError(f"num_workers must be >= 0 (0 = all cores), got {self.num_workers}")
        if self.curriculum.enabled and self.curriculum.rarity_weight and not self.tokenize.enabled:
            raise JaxllmError("curriculum.rarity_weight needs tokenize.enabled=True (rarity is over tokens)")

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict | dict) -> PrepConfig:
        """From a `get_config()` of `configs/prep_default.py` form; unknown keys are errors."""
        cfg = ml_collections.ConfigDict(cfg) if isinstance(cfg, dict) else cfg
        check_sections(cfg, [*_SECTIONS, "num_workers", "progress"])
        sections = {name: build(kind, cfg.get(name), name) for name, kind in _SECTIONS.items()}
        return cls(**sections, num_workers=int(cfg.get("num_workers", 0)), progress=bool(cfg.get("progress", True)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _one_of(name: str, value, known: tuple) -> None:
    if value not in known:
        raise JaxllmError(f"{name}={value!r} is not known; use one of {', '.join(map(str, known))}")


def _positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise JaxllmError(f"{name} must be a positive integer, got {value!r}")
