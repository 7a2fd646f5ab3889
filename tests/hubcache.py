"""A Hugging Face Hub cache built on disk in `huggingface_hub`'s own layout, for tests without network:

    commit = put_repo(hf_home, "org/name", {"config.json": b"{...}", "model.safetensors": Path(...)})
    monkeypatch.setenv("HF_HOME", str(hf_home)); monkeypatch.setenv("HF_HUB_OFFLINE", "1")

`snapshot_download` / `hf_hub_download` then resolve "org/name" (and `revision=` a ref or the commit)
exactly as they would after an online download.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

FileContent = bytes | str | os.PathLike


def put_repo(
    hf_home: str | os.PathLike,
    repo_id: str,
    files: Mapping[str, FileContent],
    *,
    repo_type: str = "model",
    revision: str = "main",
    commit: str | None = None,
    tree: bool = True,
) -> str:
    """Writes `files` (name -> bytes, text or a local file/folder to copy) as the snapshot of `repo_id` at
    `revision`; returns the commit id (40 hex digits, derived from the content unless given). With `tree`,
    also the commit's file listing (`trees/<commit>.json`), as `snapshot_download` keeps it."""
    prefix = {"model": "models", "dataset": "datasets", "space": "spaces"}[repo_type]
    repo = Path(hf_home) / "hub" / f"{prefix}--{repo_id.replace('/', '--')}"
    if commit is None:
        digest = hashlib.sha1(repo_id.encode())
        for name in sorted(files):
            digest.update(name.encode())
        commit = digest.hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        elif isinstance(content, str):
            target.write_text(content)
        elif Path(content).is_dir():
            shutil.copytree(content, target, dirs_exist_ok=True)
        else:
            shutil.copyfile(content, target)
    if tree:
        listing = {
            str(p.relative_to(snapshot)): {
                "size": p.stat().st_size,
                "blob_id": hashlib.sha1(p.read_bytes()).hexdigest(),
            }
            for p in sorted(snapshot.rglob("*"))
            if p.is_file()
        }
        (repo / "trees").mkdir(exist_ok=True)
        (repo / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": listing}))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    if revision != commit:
        (repo / "refs" / revision).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(commit)  # no newline, as huggingface_hub writes it
    return commit


def offline(monkeypatch, hf_home: str | os.PathLike) -> None:
    """Points huggingface_hub at `hf_home` with no network, as a user with a warm cache and HF_HUB_OFFLINE=1.
    huggingface_hub reads these variables when it is imported, so its constants are patched too."""
    import huggingface_hub.constants as c

    hub = os.path.join(hf_home, "hub")
    for name, value in (("HF_HOME", str(hf_home)), ("HF_HUB_CACHE", hub), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(c, "HF_HOME", str(hf_home))
    monkeypatch.setattr(c, "HF_HUB_CACHE", hub)
    monkeypatch.setattr(c, "HUGGINGFACE_HUB_CACHE", hub, raising=False)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
