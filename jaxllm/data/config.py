"""`DataConfig`, the `data` sub-dict of an experiment config, and the rows of the source it names."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

from jaxllm import JaxllmError
from jaxllm.data import mixture
from jaxllm.data.sources import (
    ArrayRecordSource,
    EmbeddedPreferenceSource,
    EmbeddedSftSource,
    EmbeddedSource,
    Fields,
    JsonlSource,
    RowSource,
    TextSource,
    TfdsSource,
)

SOURCE_NAMES: tuple[str, ...] = (
    "embedded",
    "embedded_sft",
    "embedded_preference",
    "text",
    "jsonl",
    "json",
    "parquet",
    "csv",
    "arrow",
    "array_record",
    "tfds",
)
# sources that read data.paths
FILE_SOURCES = frozenset(SOURCE_NAMES) - {"embedded", "embedded_sft", "embedded_preference", "tfds"}
FORMATS: tuple[str, ...] = ("text", "sft_text", "messages", "prompt_completion", "preference")
CHAT_TEMPLATES: tuple[str, ...] = ("guanaco", "chatml", "llama2")
LOSS_ON: tuple[str, ...] = ("auto", "all", "assistant")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The `data` sub-dict of an experiment config."""

    # embedded (the Python reference manual + stdlib docstrings; ships with Python) | embedded_sft (Q/A chats
    # about Python) | embedded_preference (those, with another's answer rejected) | text | jsonl | json | parquet
    # | csv | arrow | array_record | tfds
    source: str = "embedded"
    # file globs of a file source; or a data set (a Hugging Face Hub id org/name[@rev] or a local folder, then
    # :SPLIT or :CONFIG:SPLIT, default train), replaced by its split's files (found by the `datasets` library's
    # rules; `jaxllm.data.splits.resolve_data`), which also set data.source
    paths: tuple[str, ...] = ()
    # validation files (data.source's format), or a data set split (default :validation), read instead of
    # holding out data.val_fraction of the training documents; () = hold out
    valid_paths: tuple[str, ...] = ()
    text_field: str = "text"  # JSON / Parquet / TFDS / ArrayRecord field holding the document
    text_split: str = "file"  # text source: "file" (one doc per file) or "paragraph" (blank-line blocks)
    tfds_name: str = ""  # tfds source: the TensorFlow Datasets name
    tfds_split: str = "train"  # tfds source: the split read
    tfds_data_dir: str = ""  # tfds source: where the data set was prepared; "" = TFDS's default (never downloads)
    tokenizer: str = ""  # SentencePiece .model path; "" trains one on the corpus and caches it
    vocab_size: int = 2048  # vocab of a tokenizer trained on the corpus
    block_size: int = 128  # tokens per packed training sequence
    batch_size: int = 8  # global batch in sequences (all processes together)
    val_fraction: float = 0.05  # documents held out for validation (deterministic split)
    seed: int = 0  # of the document order, the row shuffle and the mixture's draws (not of the validation split)
    shuffle: bool = True
    shuffle_window: int = 2048  # format text: packed sequences shuffled together, so long docs spread out; 0 = off
    add_bos: bool = True
    add_eos: bool = True
    num_workers: int = 0  # worker processes reading and tokenizing; 0 = threads in the main process
    # text (language modelling) | sft_text (a Guanaco `### Human: q### Assistant: a` column) | messages
    # | prompt_completion | preference (prompt, chosen, rejected: train.objective dpo / orpo / reward)
    format: str = "text"
    prompt_field: str = "prompt"  # prompt_completion, preference: the prompt column (preference: absent = the
    #                               leading part chosen and rejected share, as TRL)
    completion_field: str = "completion"  # prompt_completion: the completion column (appended to the prompt)
    messages_field: str = "messages"  # messages: the column of [{"role": system|user|assistant, "content": str}]
    chat_template: str = "guanaco"  # messages, and preference rows of messages: guanaco | chatml | llama2
    loss_on: str = "auto"  # all | assistant (answers + their EOS) | auto (assistant for prompt_completion, else all)
    packing: bool = True  # SFT, preference: several whole examples (pairs) per row (first-fit); False = one per row
    chosen_field: str = "chosen"  # preference: the preferred answer's column (text, or messages ending in it)
    rejected_field: str = "rejected"  # preference: the dispreferred answer's column
    max_prompt_length: int = 0  # preference: a prompt keeps its last this many tokens; 0 = no limit
    max_completion_length: int = 0  # preference: an answer keeps its first this many tokens; 0 = no limit
    # Several sources: {name: {source, paths, <field keys>, weight}}, weight a number or ((step, w), ...);
    # each entry inherits the keys above it does not set (see jaxllm.data.mixture). E.g. {"web": dict(
    # source="array_record", paths=("web/*.array_record",), weight=3.0), "code": dict(..., weight=((0, 0.0),
    # (10_000, 1.0)))}
    mixture: Any = None
    curriculum_field: str = ""  # integer record field naming a document's stage, e.g. "bucket" (jaxllm prep)
    # stage weights over steps: ((step, (w0, w1, ...)), ...), linear between; e.g. ((0, (1, 0)), (5000, (0.5, 0.5)))
    curriculum_schedule: tuple = ()

    def __post_init__(self):
        for name in ("paths", "valid_paths"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        object.__setattr__(self, "mixture", mixture.parse_mixture(self.mixture))
        if bool(self.curriculum_field) != bool(self.curriculum_schedule):
            raise JaxllmError(
                "data.curriculum_field and data.curriculum_schedule go together: name the stage field "
                "(e.g. 'bucket') and give ((step, (w0, w1, ...)), ...) stage weights"
            )
        if self.curriculum_schedule:
            object.__setattr__(
                self,
                "curriculum_schedule",
                mixture.parse_schedule(self.curriculum_schedule, "data.curriculum_schedule"),
            )
        if self.source not in SOURCE_NAMES:
            raise JaxllmError(f"data.source={self.source!r} is not known; use one of {', '.join(SOURCE_NAMES)}")
        if self.text_split not in ("file", "paragraph"):
            raise JaxllmError(f"data.text_split={self.text_split!r} is not known; use 'file' or 'paragraph'")
        for name in ("block_size", "batch_size", "vocab_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise JaxllmError(f"data.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise JaxllmError(f"data.val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.valid_paths and self.mixture:
            raise JaxllmError(
                "data.valid_paths does not combine with data.mixture (each source holds out "
                "data.val_fraction for validation); drop data.valid_paths"
            )
        if self.valid_paths and self.source not in FILE_SOURCES:
            raise JaxllmError(
                f"data.valid_paths needs a source that reads files, not data.source={self.source!r}; "
                "set data.source and data.paths, or drop data.valid_paths"
            )
        if self.shuffle_window < 0:
            raise JaxllmError(f"data.shuffle_window must be >= 0, got {self.shuffle_window}")
        if self.num_workers < 0:
            raise JaxllmError(f"data.num_workers must be >= 0, got {self.num_workers}")
        for name, known in (("format", FORMATS), ("chat_template", CHAT_TEMPLATES), ("loss_on", LOSS_ON)):
            if getattr(self, name) not in known:
                raise JaxllmError(f"data.{name}={getattr(self, name)!r} is not known; use one of {', '.join(known)}")
        for name in (
            "text_field",
            "prompt_field",
            "completion_field",
            "messages_field",
            "chosen_field",
            "rejected_field",
        ):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise JaxllmError(f"data.{name} must name a field, got {getattr(self, name)!r}")
        for name in ("max_prompt_length", "max_completion_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise JaxllmError(f"data.{name} must be an integer >= 0 (0 = no limit), got {value!r}")
        if self.format == "preference" and self.loss_on == "all":
            raise JaxllmError(
                "data.loss_on='all' does not apply to data.format='preference' (its losses read the "
                "answers); drop data.loss_on"
            )
        if self.format == "preference" and self.chosen_field == self.rejected_field:
            raise JaxllmError(
                f"data.chosen_field and data.rejected_field both name {self.chosen_field!r}; point "
                "them at the two answer columns"
            )
        if not isinstance(self.packing, bool):
            raise JaxllmError(f"data.packing must be True or False, got {self.packing!r}")
        if self.format == "text" and self.loss_on == "assistant":
            raise JaxllmError("data.loss_on='assistant' needs data.format sft_text, messages or prompt_completion")
        if self.format == "text" and not self.packing:
            raise JaxllmError("data.packing=False needs an SFT data.format; format 'text' always concatenates docs")
        if self.format in ("messages", "prompt_completion", "preference") and self.source in ("embedded", "text"):
            raise JaxllmError(
                f"data.format={self.format!r} needs records with fields, but data.source={self.source!r} "
                "gives plain text; use jsonl, parquet, array_record, tfds, embedded_sft or "
                "embedded_preference"
            )
        if self.curriculum_field and not self.mixture and self.source in ("embedded", "text"):
            raise JaxllmError(
                f"data.curriculum_field={self.curriculum_field!r} needs records with fields, but "
                f"data.source={self.source!r} gives plain text; prepare it with `jaxllm prep` (its shards "
                "hold a 'bucket' field) and read them with data.source='array_record'"
            )
        components(self)  # each mixture entry is a valid data config


def components(cfg: DataConfig) -> list[tuple[str, DataConfig]]:
    """(name, data config) of each source `cfg` reads: the mixture's entries, or ("", cfg) alone."""
    if not cfg.mixture:
        return [("", cfg)]
    out = []
    for c in cfg.mixture:
        try:
            out.append((c.name, dataclasses.replace(cfg, mixture=None, **dict(c.overrides))))
        except JaxllmError as e:
            raise JaxllmError(f"data.mixture.{c.name}: {e}") from None
    return out


def make_source(cfg: DataConfig) -> Sequence[str] | Sequence[dict[str, Any]]:
    """The rows of `cfg.source`: `str` documents for `cfg.format == "text"`, else dicts holding the
    format's fields (cached: a JSONL scan runs once, not every eval). Preference rows without the prompt
    column are read without it: their prompt is the leading part chosen and rejected share (as TRL)."""
    try:
        return source_rows(cfg, row_fields(cfg), cfg.format != "text")
    except JaxllmError as e:
        if cfg.format != "preference" or f"no field {cfg.prompt_field!r}" not in str(e):
            raise
    return source_rows(cfg, preference_answers(cfg))


def source_rows(cfg: DataConfig, fields: Fields, whole_row: bool = True) -> RowSource:
    """Whole rows (dicts) of `cfg.source`, each checked to hold `fields`: for keys besides the text
    (`whole_row=False`: the text of the first field)."""
    return _make_source(
        cfg.source, cfg.paths, fields, whole_row, cfg.text_split, cfg.tfds_name, cfg.tfds_split, cfg.tfds_data_dir
    )


def row_fields(cfg: DataConfig) -> Fields:
    """The fields `cfg.format` reads from each row, with the config keys that name them."""
    if cfg.format == "messages":
        return (("messages_field", cfg.messages_field),)
    if cfg.format == "prompt_completion":
        return (("prompt_field", cfg.prompt_field), ("completion_field", cfg.completion_field))
    if cfg.format == "preference":  # make_source reads a source lacking it without it
        return (("prompt_field", cfg.prompt_field),) + preference_answers(cfg)
    return (("text_field", cfg.text_field),)


def preference_answers(cfg: DataConfig) -> Fields:
    return (("chosen_field", cfg.chosen_field), ("rejected_field", cfg.rejected_field))


@functools.lru_cache(maxsize=8)
def _make_source(
    source: str,
    paths: tuple[str, ...],
    fields: Fields,
    whole_row: bool,
    text_split: str,
    tfds_name: str,
    tfds_split: str,
    tfds_dir: str,
) -> RowSource:
    rows = dict(fields=fields, whole_row=whole_row)
    if source == "embedded":
        return EmbeddedSource(**rows)
    if source == "embedded_sft":
        return EmbeddedSftSource(**rows)
    if source == "embedded_preference":
        return EmbeddedPreferenceSource(**rows)
    if source == "text":
        return TextSource(paths, text_split, **rows)
    if source == "jsonl":
        return JsonlSource(paths, **rows)
    if source == "parquet":
        from jaxllm.data.parquet import ParquetSource  # pylint: disable=g-import-not-at-top  (imports pyarrow)

        return ParquetSource(paths, **rows)
    if source in ("json", "csv", "arrow"):
        from jaxllm.data import tables  # pylint: disable=g-import-not-at-top  (imports pyarrow)

        return {"json": tables.JsonSource, "csv": tables.CsvSource, "arrow": tables.ArrowSource}[source](paths, **rows)
    if source == "array_record":
        return ArrayRecordSource(paths, **rows)
    if source == "tfds":
        return TfdsSource(tfds_name, tfds_split, tfds_dir, **rows)
    raise JaxllmError(f"data.source={source!r} is not known; use one of {', '.join(SOURCE_NAMES)}")
