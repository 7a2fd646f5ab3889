"""Hugging Face Hub ids -> local folders, through `huggingface_hub` and its standard cache.

A path that exists on disk always wins; otherwise `org/name` (optionally `org/name@REVISION`) is a Hub
repository. Only the files a command needs are fetched (config, one weight format with safetensors
preferred, tokenizer files; a data set's data files), into the cache `HF_HOME` / `HF_HUB_CACHE` name,
with `HF_TOKEN` for private or gated repositories and `HF_HUB_OFFLINE=1` to use the cache alone.
On several processes, process 0 resolves the revision to a commit id and every process fetches that
commit, so no run mixes two versions of a repository. Every failure is one `JaxllmError` line.

    folder = model_folder("bigscience/bloom-560m")         # .../snapshots/<commit>
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import os
import re
from collections.abc import Iterable

from jaxllm import JaxllmError, atomic

# org/name, as the Hub spells repository ids (each part: letters, digits, '-', '_', '.'), then @revision
_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@(?P<revision>[\w./-]+))?")

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # the first one there is fetched
DATA_FILES = (
    "*.jsonl",
    "*.json",
    "*.parquet",
    "*.csv",
    "*.arrow",
    "*.txt",
    "*.jsonl.gz",
    "*.json.gz",
    "*.csv.gz",
    "*.txt.gz",
    "README.md",
)


# a name ending so is a file someone meant to point at (a missing one gets its own error), not a repository
_FILE_ENDINGS = (
    ".model",
    ".json",
    ".jsonl",
    ".ndjson",
    ".txt",
    ".csv",
    ".tsv",
    ".parquet",
    ".arrow",
    ".safetensors",
    ".bin",
    ".py",
    ".gz",
    ".zst",
    ".zip",
    ".array_record",
)


def is_hub_id(ref: str) -> bool:
    """Whether `ref` names a Hub repository: `org/name[@rev]` that is not a path on this machine, a file
    name or a URL."""
    if not isinstance(ref, str) or not ref or atomic.is_url(ref) or ref.startswith((".", "/", "~")):
        return False
    if ref.split("@")[0].lower().endswith(_FILE_ENDINGS):
        return False
    if os.path.exists(os.path.expanduser(ref)) or os.path.exists(os.path.expanduser(ref.split("@")[0])):
        return False
    return _ID.fullmatch(ref) is not None


def split_id(ref: str, revision: str | None = None) -> tuple[str, str | None]:
    """(repo id, revision) of `org/name@rev`; a revision in the id and a different `revision` argument clash."""
    match = _ID.fullmatch(ref)
    if match is None:
        raise JaxllmError(f"{ref!r} is not a Hugging Face Hub id (org/name, optionally @revision) nor a local path")
    inline = match.group("revision")
    if inline and revision and inline != revision:
        raise JaxllmError(f"{ref!r} names revision {inline!r} but --revision is {revision!r}; give one")
    return match.group("repo"), inline or revision or None


def local(ref: str, *, what: str = "model", revision: str | None = None, only: tuple[str, ...] = ()) -> str:
    """`ref` itself when it is a local path (or a URL), else the cached snapshot folder of the Hub
    repository it names, holding the files `what` needs: "model" (config, weights, tokenizer),
    "config" (config and tokenizer files), "tokenizer", "adapter" (a PEFT adapter), "dataset" (its
    data files and card), "dataset_card" (README.md alone); `only` names the files instead."""
    if not is_hub_id(ref):
        return ref
    repo_id, rev = split_id(ref, revision)
    return _fetch_into(repo_id, rev, what, tuple(only), _cache_dir(), _offline())


def files(ref: str, *, what: str = "dataset", revision: str | None = None) -> list[str]:
    """The file names of the Hub repository `ref` at the commit every process reads (from the Hub, or
    offline from the cache's record of the download)."""
    repo_id, rev = split_id(ref, revision)
    return list(_resolve(repo_id, _repo_type(what), rev, _cache_dir(), _offline())[1])


def commit(ref: str, *, what: str = "model", revision: str | None = None) -> str:
    """The commit id the Hub repository `ref` names (at its revision), the one every process reads."""
    repo_id, rev = split_id(ref, revision)
    return _resolve(repo_id, _repo_type(what), rev, _cache_dir(), _offline())[0]


def _repo_type(what: str) -> str:
    return "dataset" if what.startswith("dataset") else "model"


@functools.cache
def _fetch_into(repo_id: str, revision: str | None, what: str, only: tuple[str, ...], cache: str, offline: bool) -> str:
    """Memoised per process and cache, so a run that reads its config several times looks the id up once
    (every process makes the same calls in the same order: the agreement in `_resolve` pairs them)."""
    repo_type = _repo_type(what)
    commit, files = _resolve(repo_id, repo_type, revision, cache, offline)
    if only:
        absent = [f for f in only if f not in files]
        if absent:  # a caller's bug: `only` comes from this listing
            raise AssertionError(f"{repo_id} has no {absent}")
    patterns = list(only) or _patterns(what, files, repo_id)
    wanted = [f for f in files if any(fnmatch.fnmatch(f, p) for p in patterns)]
    if _offline():  # say which files a partial download lacks (huggingface_hub would only say it cannot fetch)
        _check_complete(repo_id, repo_type, commit, wanted, _snapshot_dir(repo_id, repo_type, commit))
    folder = _download(repo_id, repo_type, commit, patterns, revision)
    _check_complete(repo_id, repo_type, commit, wanted, folder)
    return folder


def _snapshot_dir(repo_id: str, repo_type: str, commit: str) -> str:
    from huggingface_hub.file_download import repo_folder_name

    return os.path.join(_cache_dir(), repo_folder_name(repo_id=repo_id, repo_type=repo_type), "snapshots", commit)


def _check_complete(repo_id: str, repo_type: str, commit: str, wanted: list[str], folder: str) -> None:
    missing = [f for f in wanted if not os.path.exists(os.path.join(folder, f))]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise JaxllmError(
            f"the cached copy of {repo_id} (commit {commit[:12]}) is incomplete: it lacks "
            f"{', '.join(missing[:3])}{more}; fetch it again with network (hf download "
            f"{_cli_flags(repo_type)}{repo_id}) or unset HF_HUB_OFFLINE"
        )


def _patterns(what: str, files: list[str], repo_id: str) -> list[str]:
    """The files of `files` (a repository's listing) that `what` needs; one weight format, safetensors first."""
    has = lambda pattern: any(fnmatch.fnmatch(f, pattern) for f in files)  # noqa: E731
    if what == "dataset":
        return [p for p in DATA_FILES if has(p)]
    if what == "dataset_card":
        return ["README.md"] if "README.md" in files else []
    if what == "tokenizer":
        return [p for p in TOKENIZER_FILES + CONFIG_FILES if has(p)]
    if what == "adapter":
        if not has("adapter_config.json"):
            raise JaxllmError(f"{repo_id} is not a PEFT adapter repository (no adapter_config.json)")
        weights = [w for w in ADAPTER_WEIGHTS if has(w)][:1]
        return ["adapter_config.json", *weights, *(p for p in TOKENIZER_FILES if has(p))]
    if not has("config.json"):
        if has("adapter_config.json"):
            raise JaxllmError(f"{repo_id} is a PEFT adapter, not a model: pass it as --adapter (with --model its base)")
        raise JaxllmError(f"{repo_id} has no config.json: it is not a transformers model repository")
    wanted = [p for p in CONFIG_FILES + TOKENIZER_FILES if has(p)]
    if what == "config":
        return wanted
    top = [f for f in files if "/" not in f]  # weights in subfolders (onnx/, original/, ...) are other formats
    weights = [f for f in top if f.endswith(".safetensors") or f == "model.safetensors.index.json"]
    if not any(f.endswith(".safetensors") for f in weights):
        weights = [f for f in top if fnmatch.fnmatch(f, "pytorch_model*.bin") or f == "pytorch_model.bin.index.json"]
    if not weights:
        raise JaxllmError(
            f"{repo_id} holds no safetensors or pytorch_model*.bin weights at its top level; jaxllm "
            "reads those two formats"
        )
    return wanted + weights


def _listing(folder: str) -> list[str]:
    """Paths of the files under `folder`, relative, with '/' separators (symlinks into blobs/ followed)."""
    out = []
    for root, _, names in os.walk(folder, followlinks=True):
        rel = os.path.relpath(root, folder)
        for name in names:
            if os.path.exists(os.path.join(root, name)):  # a dangling link is a missing blob
                out.append(name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}")
    return sorted(out)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@functools.cache
def _resolve(repo_id: str, repo_type: str, revision: str | None, cache: str, offline: bool) -> tuple[str, list[str]]:
    """(commit id, file names) of the repository at `revision`: process 0 asks the Hub (or, offline, the
    cache) and the others take its commit, so that every process reads the same version (memoised: one
    look-up per repository and revision in a process)."""
    from jaxllm import distributed

    del cache, offline  # in the key only
    commit = None
    if distributed.is_primary():
        commit = _commit(repo_id, repo_type, revision)
    commit = distributed.broadcast_str(commit or "")
    return commit, _files(repo_id, repo_type, commit, revision)


def _commit(repo_id: str, repo_type: str, revision: str | None) -> str:
    from huggingface_hub import HfApi, snapshot_download

    with _errors(repo_id, repo_type, revision):
        if _offline():  # the snapshot folder the ref points at is named by its commit
            return os.path.basename(
                snapshot_download(repo_id, repo_type=repo_type, revision=revision, allow_patterns=[])
            )
        return HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision).sha


def _files(repo_id: str, repo_type: str, commit: str, revision: str | None) -> list[str]:
    from huggingface_hub import HfApi, get_cached_repo_tree, snapshot_download
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    with _errors(repo_id, repo_type, revision):
        if not _offline():
            return sorted(HfApi().list_repo_files(repo_id, repo_type=repo_type, revision=commit))
        try:  # the listing huggingface_hub kept when it downloaded this commit: tells a partial download
            return sorted(f.path for f in get_cached_repo_tree(repo_id, repo_type=repo_type, revision=commit))
        except CachedRepoTreeNotFoundError:  # a cache filled by other means: what is there is all there is
            return _listing(snapshot_download(repo_id, repo_type=repo_type, revision=commit, allow_patterns=[]))


def _download(repo_id: str, repo_type: str, commit: str, patterns: Iterable[str], revision: str | None) -> str:
    from huggingface_hub import snapshot_download

    from jaxllm import distributed

    with _errors(repo_id, repo_type, revision):
        if distributed.is_primary():  # one process fetches into a shared cache first; the others then find it
            # by the revision's name, so that the cache records the branch or tag (refs/) for offline use later
            folder = snapshot_download(repo_id, repo_type=repo_type, revision=revision, allow_patterns=list(patterns))
            if os.path.basename(folder) != commit:
                raise JaxllmError(
                    f"{repo_id}@{revision or 'main'} moved to a new commit while it was being fetched; "
                    "run the command again (or pin a commit with @COMMIT)"
                )
        distributed.barrier(f"hub:{repo_type}:{repo_id}@{commit}")
        if not distributed.is_primary():
            folder = snapshot_download(repo_id, repo_type=repo_type, revision=commit, allow_patterns=list(patterns))
    return folder


def _cli_flags(repo_type: str) -> str:
    return "--repo-type dataset " if repo_type == "dataset" else ""


# the HTTP client packages huggingface_hub has used: their exceptions are network failures
_HTTP_CLIENTS = ("httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3")


@contextlib.contextmanager
def _errors(repo_id: str, repo_type: str, revision: str | None):
    """Turns huggingface_hub's exceptions into one line that says what is wrong and what to do."""
    try:
        yield
    except JaxllmError:
        raise
    except Exception as error:
        from huggingface_hub import errors

        what, repo = ("data set" if repo_type == "dataset" else "model"), repo_id
        page = f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo}"
        if isinstance(error, errors.GatedRepoError):
            message = (
                f"{repo} is gated: accept its licence on {page} (logged in), then set HF_TOKEN to a token of "
                "that account (huggingface.co/settings/tokens)"
            )
        elif isinstance(error, errors.RevisionNotFoundError):
            message = f"{repo} has no revision {revision!r}; give a branch, tag or commit id that exists"
        elif isinstance(error, errors.RepositoryNotFoundError):
            message = (
                f"{repo} is neither a local path nor a {what} repository on the Hugging Face Hub (if it is "
                "private, set HF_TOKEN); check the path or the id"
            )
        elif isinstance(error, errors.IncompleteSnapshotError):
            message = (
                f"the cached copy of {repo} is incomplete ({str(error).split(': ', 1)[-1].split('. ')[0]}); "
                f"fetch it again with network (hf download {_cli_flags(repo_type)}{repo})"
            )
        elif isinstance(error, (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError)) and _offline():
            rev = f" at revision {revision!r}" if revision else ""
            message = (
                f"{repo} is not a local path, and {what} {repo}{rev} is not in the Hugging Face cache "
                f"({_cache_dir()}) while HF_HUB_OFFLINE=1 "
                f"forbids downloading it; unset HF_HUB_OFFLINE, or fetch it where there is network "
                f"(hf download {_cli_flags(repo_type)}{repo}) and copy the cache here"
            )
        elif isinstance(error, errors.HfHubHTTPError):
            status = getattr(getattr(error, "response", None), "status_code", "?")
            hint = "; set HF_TOKEN to a token with read access" if status in (401, 403) else ""
            message = f"the Hugging Face Hub refused {what} {repo} (HTTP {status}){hint}"
        elif isinstance(error, (errors.LocalEntryNotFoundError, ConnectionError, TimeoutError, OSError)) or (
            type(error).__module__.split(".")[0] in _HTTP_CLIENTS
        ):
            reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
            message = (
                f"cannot fetch {what} {repo} from the Hugging Face Hub ({reason}); check the network (and "
                "HF_ENDPOINT), or set HF_HUB_OFFLINE=1 to use a cache that holds it"
            )
        else:
            raise
        raise JaxllmError(message) from None


def _cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE
