"""Data sets by folder or Hugging Face Hub id: which files make each split, by the `datasets` library's rules.

A data set is a local folder or a Hub data set id (`org/name`, optionally `@revision`), then optionally
`:SPLIT` or `:CONFIG:SPLIT` (autotrain's `config:split`). Its splits are found as `datasets.load_dataset`
finds them, so a split name means the same files here as there:
  1. a README.md YAML `configs:` entry (the CONFIG named, else the default one) gives `data_files` per
     split (or a `data_dir` searched by the rules below);
  2. `data/{split}-NNNNN-of-NNNNN.*` shards name their split;
  3. else split keywords as words (between `-._ 0-9` or `/`) in folder names, then in file names: train
     (train, training), validation (validation, valid, dev, val), test (test, testing, eval, evaluation);
  4. else every file is `train`.
Each split keeps the files of its most common data format (Parquet first on a tie). In a local folder,
autotrain's `{folder}/{split}.csv` or `{split}.jsonl` wins when it exists. A config that names no README
entry may name a sub-folder.

    data = resolve_data({"source": "jsonl", "paths": ("timdettmers/openassistant-guanaco",),
                         "valid_paths": ("timdettmers/openassistant-guanaco:test",)})  # train / *eval* files
"""

from __future__ import annotations

import collections
import os
import re
from collections.abc import Mapping
from typing import Any

from jaxllm import JaxllmError

SPLIT_KEYWORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test", "testing", "eval", "evaluation"),
}
_SEP = "-._ 0-9"
_SHARDED = "data/{split}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]*.*"
_IN_DIR = ("**/{k}/**", "**/{k}[{s}]*/**", "**/*[{s}]{k}/**", "**/*[{s}]{k}[{s}]*/**")
_IN_NAME = ("**/{k}[{s}]*", "**/*[{s}]{k}[{s}]*")
# the rule sets tried in order, as `datasets` tries them: the first that matches any file decides
_RULES = (
    {"logs": ("**/*.eval",)},
    {"test": ("**/task.toml", "**/instruction.md")},
    {split: tuple(p.format(k=k, s=_SEP) for k in words for p in _IN_DIR) for split, words in SPLIT_KEYWORDS.items()},
    {split: tuple(p.format(k=k, s=_SEP) for k in words for p in _IN_NAME) for split, words in SPLIT_KEYWORDS.items()},
    {"train": ("**",)},
)
_IGNORED = (
    "README.md",
    "config.json",
    "dataset_info.json",
    "dataset_infos.json",
    "dummy_data.zip",
    "dataset_dict.json",
)
# file extension -> the `datasets` loader that reads it; the loaders jaxllm reads map to a data.source
_LOADERS = {
    ".parquet": "parquet",
    ".geoparquet": "parquet",
    ".gpq": "parquet",
    ".arrow": "arrow",
    ".jsonl": "json",
    ".json": "json",
    ".ndjson": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "text",
    ".eval": "eval",
    ".toml": "harbor",
    ".md": "harbor",
    ".lance": "lance",
    ".vortex": "vortex",
    ".xml": "xml",
    ".tar": "webdataset",
    ".hdf5": "hdf5",
    ".h5": "hdf5",
}
_PREFERRED = (".parquet", ".lance", ".vortex", ".arrow", ".jsonl", ".json", ".csv")  # tie-breaks, best last
_EXTENSION_SOURCES = {
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
}  # a file named directly


def parse_ref(entry: str) -> tuple[str, str, str] | None:
    """(data set, config, split) when `entry` names a data set: a local folder or a Hub data set id, then
    optionally `:SPLIT` or `:CONFIG:SPLIT` ("" where not given); None for a file, glob or URL."""
    from jaxllm.hf import hub  # pylint: disable=g-import-not-at-top

    if not isinstance(entry, str) or not entry:
        return None
    if os.path.exists(os.path.expanduser(entry)):
        return (entry, "", "") if os.path.isdir(os.path.expanduser(entry)) else None
    base, *rest = entry.split(":")
    if len(rest) > 2 or not (os.path.isdir(os.path.expanduser(base)) or hub.is_hub_id(base)):
        return None
    config, split = (rest[0], rest[1]) if len(rest) == 2 else ("", rest[0] if rest else "")
    return base, config, split


def split_files(ref: str, split: str = "train", config: str = "") -> tuple[str, tuple[str, ...]]:
    """(data.source, files) of `split` of the data set `ref` (a local folder or a Hub id, fetched into the
    Hugging Face cache)."""
    from jaxllm.hf import hub  # pylint: disable=g-import-not-at-top

    is_local = os.path.isdir(os.path.expanduser(ref))
    named = f"data set {ref!r}" + (f" (config {config!r})" if config else "")
    if is_local:
        folder, listing = os.path.expanduser(ref), None
        if not config:  # autotrain's local layout: {folder}/{split}.csv or {split}.jsonl
            for ext in (".csv", ".jsonl"):
                if os.path.isfile(os.path.join(folder, split + ext)):
                    return _EXTENSION_SOURCES[ext], (os.path.join(folder, split + ext),)
    else:  # the card (its configs) and the listing first, then only the split's files are fetched
        folder, listing = hub.local(ref, what="dataset_card"), hub.files(ref)
    splits = data_files(folder, config, named, listing)
    if split not in splits:
        raise JaxllmError(
            f"{named} has no split {split!r}; its splits: {', '.join(splits) or 'none'}; name one of them"
        )
    files = splits[split]
    source = source_of(files, f"{named} split {split!r}")
    if not is_local:
        folder = hub.local(ref, what="dataset", only=tuple(files))
    return source, tuple(os.path.join(folder, f) for f in files)


def source_of(files: list[str] | tuple[str, ...], where: str) -> str:
    """The data.source that reads `files` (one format; `.json` and `.jsonl` together read as json)."""
    kinds = set()
    for f in files:
        name = f.lower()
        if name.endswith((".gz", ".bz2", ".xz", ".zst", ".zip")):
            raise JaxllmError(
                f"{where}: {f} is compressed; jaxllm reads uncompressed .parquet, .arrow, .jsonl, .json "
                "and .csv files: decompress it (or convert it to Parquet)"
            )
        ext = os.path.splitext(name)[1]
        if ext not in _EXTENSION_SOURCES:
            raise JaxllmError(
                f"{where}: {f} is not a format jaxllm reads (.parquet, .arrow, .jsonl, .json, .csv); "
                "convert it, e.g. to Parquet with the datasets library"
            )
        kinds.add(_EXTENSION_SOURCES[ext])
    if kinds <= {"jsonl", "json"} and "json" in kinds:
        return "json"
    if len(kinds) > 1:
        raise JaxllmError(f"{where} mixes {', '.join(sorted(kinds))} files; give files of one format")
    if not kinds:
        raise JaxllmError(f"{where} holds no data files")
    return kinds.pop()


def data_files(
    folder: str, config: str = "", named: str = "", listing: list[str] | None = None
) -> dict[str, list[str]]:
    """split -> its data files (paths relative to `folder`, '/'-separated, sorted), splits in the
    `datasets` library's order, each keeping the files of its most common format. `listing` gives the
    data set's files where `folder` holds only its card (a Hub data set not fetched yet)."""
    named = named or f"data set {folder!r}"
    files = _listing(folder) if listing is None else sorted(listing)
    configs = _readme_configs(folder, named)
    base = ""
    patterns: dict[str, list[str]] | None = None
    if configs:
        name = config or _default_config(configs)
        if name is None:
            raise JaxllmError(
                f"{named} has configs {', '.join(configs)} and none is the default; name one as "
                f"CONFIG:SPLIT (e.g. --train_split {next(iter(configs))}:train)"
            )
        if name in configs:
            entry = configs[name]
            base = str(entry.get("data_dir") or "").strip("/")
            if entry.get("data_files") is not None:
                patterns = _sanitize(entry["data_files"], named)
            config = ""
    if config and config != "default":
        if not any(f.startswith(config + "/") for f in files):
            known = ", ".join(configs) if configs else "none"
            raise JaxllmError(
                f"{named} has no config {config!r} (README configs: {known}) and no sub-folder of that "
                "name; name one of those"
            )
        base = config
    if base:
        files = [f[len(base) + 1 :] for f in files if f.startswith(base + "/")]
    if patterns is None:
        patterns = _patterns(files)
    out = {}
    for split, split_patterns in patterns.items():
        matched = sorted({f for p in split_patterns for f in _resolve(p, files)})
        kept = _keep_one_format(matched)
        if kept:
            out[split] = [f"{base}/{f}" if base else f for f in kept]
    return out


def resolve_data(data: Mapping[str, Any]) -> dict[str, Any]:
    """A run config's `data` section with each data set named in `paths` (default split train) and
    `valid_paths` (default split validation), a Hub id or a local folder, replaced by its split's files,
    and `source` set to their format; `data.mixture` entries alike. Files and globs stay as they are."""
    out = data.to_dict() if hasattr(data, "to_dict") else dict(data)
    out.update(_resolve_paths(out, "data"))
    valid = tuple(
        (out.get("valid_paths") or ()) if not isinstance(out.get("valid_paths"), str) else (out["valid_paths"],)
    )
    if any(parse_ref(p) for p in valid):
        source, files = _files_of(valid, "validation", "data.valid_paths")
        train_source = out.get("source")
        if {source, train_source} == {"json", "jsonl"}:
            out["source"] = source = "json"
        elif source != train_source:
            raise JaxllmError(
                f"data.valid_paths holds {source} files but data.source is {train_source!r}; give "
                "validation files of the training files' format"
            )
        out["valid_paths"] = files
    mixture = out.get("mixture")
    if isinstance(mixture, Mapping):
        out["mixture"] = {
            name: {**dict(entry), **_resolve_paths(dict(entry), f"data.mixture.{name}")}
            if isinstance(entry, Mapping)
            else entry
            for name, entry in mixture.items()
        }
    return out


def _resolve_paths(section: dict[str, Any], key: str) -> dict[str, Any]:
    paths = section.get("paths") or ()
    paths = (paths,) if isinstance(paths, str) else tuple(paths)
    if not any(parse_ref(p) for p in paths):
        return {}
    source, files = _files_of(paths, "train", f"{key}.paths")
    return {"source": source, "paths": files}


def _files_of(entries: tuple[str, ...], default_split: str, key: str) -> tuple[str, tuple[str, ...]]:
    """(data.source, files) of `entries`: data sets become their split's files; files and globs stay."""
    files: list[str] = []
    for entry in entries:
        ref = parse_ref(entry)
        if ref is None:
            files.append(entry)
            continue
        data_set, config, split = ref
        files.extend(split_files(data_set, split or default_split, config)[1])
    return source_of(files, key), tuple(dict.fromkeys(files))


def _listing(folder: str) -> list[str]:
    """Files under `folder` (links followed, as in a Hugging Face cache snapshot), relative, '/'-separated."""
    out = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs.sort()
        rel = os.path.relpath(root, folder).replace(os.sep, "/")
        for name in names:
            if os.path.isfile(os.path.join(root, name)):
                out.append(name if rel == "." else f"{rel}/{name}")
    return sorted(out)


def _resolve(pattern: str, files: list[str]) -> list[str]:
    """The files `pattern` (an fsspec glob relative to the base) matches, as `datasets` resolves it:
    hidden files and `__special__` folders only when the pattern names them; metadata files left out."""
    from fsspec.utils import glob_translate  # pylint: disable=g-import-not-at-top  (fsspec's own glob rules)

    pattern = pattern[2:] if pattern.startswith("./") else pattern
    regex = re.compile(glob_translate(pattern))
    parts = pattern.split("/")
    ignored, marks = set(_IGNORED) - {parts[-1]}, _marks(parts)
    return [
        f for f in files if f.split("/")[-1] not in ignored and regex.fullmatch(f) and _marks(f.split("/")) == marks
    ]


def _marks(parts: list[str]) -> tuple[int, int]:
    """(hidden parts, `__special__` folders) of a '/'-split path: a file needs as many as its pattern names."""
    hidden = sum(1 for p in parts if p.startswith(".") and set(p) != {"."})
    return hidden, sum(1 for p in parts[:-1] if p.startswith("__"))


def _patterns(files: list[str]) -> dict[str, list[str]]:
    """split -> patterns, the first rule that matches any file deciding (`datasets`' get_data_patterns)."""
    sharded = _SHARDED.replace("{split}", "*")
    found = _resolve(sharded, files)
    if found:
        names = set()
        for f in found:
            split = re.match(r"(.*)-[0-9]{5}-of-[0-9]{5}", f.split("/")[-1]).group(1)
            if not re.fullmatch(r"\w+(\.\w+)*", split):
                raise JaxllmError(f"data file {f}: split name {split!r} is not a word (letters, digits, _ and .)")
            names.add(split)
        ordered = [s for s in SPLIT_KEYWORDS if s in names] + sorted(names - set(SPLIT_KEYWORDS))
        return {s: [_SHARDED.format(split=s)] for s in ordered}
    for rules in _RULES:
        found_splits = {
            split: list(patterns) for split, patterns in rules.items() if any(_resolve(p, files) for p in patterns)
        }
        if found_splits:
            return found_splits
    return {}


def _keep_one_format(files: list[str]) -> list[str]:
    """`files` of the split's most common format (`datasets` infers one loader per split and drops the rest)."""
    counts = collections.Counter("." + s.lower() for f in files for s in f.split("/")[-1].split(".")[1:])
    ranked = sorted(counts.items(), key=lambda c: (c[1], *(c[0] == p for p in _PREFERRED), c[0]), reverse=True)
    loader = next((_LOADERS[ext] for ext, _ in ranked if ext in _LOADERS), None)
    if loader is None:
        return []
    exts = tuple(e for e, m in _LOADERS.items() if m == loader)
    keep = re.compile(".*(" + "|".join(re.escape(e) for e in exts + (".zip",)) + r")(\..+)?$")
    return [f for f in files if keep.match(f)]


def _readme_configs(folder: str, named: str) -> dict[str, dict[str, Any]]:
    """config name -> its entry, from the `configs:` list of README.md's YAML header."""
    path = os.path.join(folder, "README.md")
    if not os.path.isfile(path):
        return {}
    from huggingface_hub import metadata_load  # pylint: disable=g-import-not-at-top

    try:
        meta = metadata_load(path) or {}
    except Exception as e:  # a YAML error: the card's header is the data set author's to fix
        raise JaxllmError(f"{named}: README.md's YAML header does not parse ({str(e).splitlines()[0]})") from None
    configs = meta.get("configs") or []
    if not isinstance(configs, list) or not all(isinstance(c, dict) and "config_name" in c for c in configs):
        raise JaxllmError(f"{named}: README.md's `configs:` must be a list of entries with a config_name")
    return {str(c["config_name"]): {k: v for k, v in c.items() if k != "config_name"} for c in configs}


def _default_config(configs: dict[str, dict[str, Any]]) -> str | None:
    names = [n for n, c in configs.items() if len(configs) == 1 or n == "default" or c.get("default")]
    return names[0] if len(names) == 1 else None


def _sanitize(data_files: Any, named: str) -> dict[str, list[str]]:
    """README `data_files` (a pattern, a list of them, {split: ...} or [{split, path}, ...]) -> split -> patterns."""
    as_list = lambda v: [str(x) for x in v] if isinstance(v, (list, tuple)) else [str(v)]  # noqa: E731
    if isinstance(data_files, Mapping):
        return {str(k): as_list(v) for k, v in data_files.items()}
    if isinstance(data_files, (list, tuple)) and any(isinstance(x, Mapping) for x in data_files):
        if not all(isinstance(x, Mapping) and "split" in x and "path" in x for x in data_files):
            raise JaxllmError(f"{named}: README.md data_files entries must each hold a split and a path")
        return {str(x["split"]): as_list(x["path"]) for x in data_files}
    return {"train": as_list(data_files)}
