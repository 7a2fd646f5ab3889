"""`jaxllm push` (and `jaxllm finetune --push_to_hub`): a fine-tuned model or adapter to a Hugging Face Hub
model repository, private unless asked otherwise, with a model card.

What goes up is an export folder as it is on disk: a PEFT adapter folder or a Hugging Face model folder, or
for a finetune run (or its --save_dir) the folder it exported: merged/ (--merge_adapter), else adapter/,
else model/ (full fine-tuning). The model card README.md is made from the run when there is one (its
config.json, metrics.jsonl and export.json, where finetune records its command line and what it wrote),
else the folder's own README.md goes up as it is, else a short card is made from the folder's files.

One repository creation and one commit through `huggingface_hub`. A failed upload changes nothing on disk
and is one line (`UploadError`, exit status 1) naming what failed and the command that retries it. The
token is passed to `huggingface_hub` only: never printed, never written to a file.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Sequence
from typing import Any

from jaxllm import JaxllmError, __version__, atomic
from jaxllm.hf import hub

EXPORTS = ("merged", "adapter", "model")  # a run's export folders, the one uploaded first
EXPORT_RECORD = "export.json"  # in a finetune workdir: {"command": ..., "written": {kind: folder}}


class UploadError(JaxllmError):
    """The upload failed (network, authentication, the Hub refused it); local files are untouched."""

    exit_code = 1


def resolve_repo_id(repo_id: str | None, username: str | None, project: str) -> str:
    """--repo_id, else USERNAME/<project folder name> (as autotrain forms it); checked for the Hub's rules."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not repo_id:
        if not username:
            raise JaxllmError(
                "--push_to_hub needs the repository: --repo_id ORG/NAME, or --username NAME to push to "
                "NAME/<project name>"
            )
        repo_id = f"{username}/{os.path.basename(os.path.normpath(project))}"
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise JaxllmError(
            f"--repo_id {repo_id!r} is not a Hub repository name; use ORG/NAME: letters, digits, "
            "'-', '_' and '.', at most 96 characters, no '--' or '..'"
        ) from None
    if repo_id.count("/") != 1:
        raise JaxllmError(f"--repo_id {repo_id!r}: give the owner too, as ORG/NAME (or USER/NAME)")
    return repo_id


def _stored_token() -> str | None:
    """The token huggingface_hub finds (HF_TOKEN, else the stored login), None when that fails."""
    from huggingface_hub import get_token

    try:
        return get_token()
    except Exception:  # e.g. an OIDC exchange configured but failing
        return None


def check_token(token: str | None) -> None:
    """A token is at hand: --token, else HF_TOKEN, else the stored login (`hf auth login`)."""
    if not (token or _stored_token()):
        raise JaxllmError(
            "pushing to the Hub needs a token with write access: --token TOKEN, the HF_TOKEN "
            "environment variable, or `hf auth login`"
        )


def redact(argv: Sequence[str], token: str | None = None) -> list[str]:
    """`argv` without any --token flag and its value (also abbreviated, as argparse takes them), and with
    `token` masked wherever else it appears."""
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        name = arg.split("=", 1)[0]
        if len(name) >= 5 and "--token".startswith(name):
            if "=" not in arg:
                next(args, None)  # its value
        else:
            out.append(arg.replace(token, "***") if token else arg)
    return out


def _is_run(path: str) -> bool:
    return any(atomic.as_path(os.path.join(path, name)).exists() for name in ("metrics.jsonl", EXPORT_RECORD))


def _is_export(path: str) -> bool:
    p = atomic.as_path(path)
    return (p / "adapter_config.json").exists() or (
        (p / "config.json").exists() and (any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").exists())
    )


def _read_json(path: str) -> dict[str, Any]:
    try:
        return json.loads(atomic.as_path(path).read_text())
    except (OSError, ValueError):
        return {}


def locate(path: str) -> tuple[str, str | None]:
    """(the folder to upload, the finetune run it came from or None) for a run, a --save_dir or an export."""
    if not atomic.as_path(path).is_dir():
        raise JaxllmError(
            f"--workdir {path!r} is not a folder; point at a finetune run, its --save_dir, or a "
            "Hugging Face model or PEFT adapter folder"
        )
    if _is_export(path):
        parent = os.path.dirname(os.path.normpath(path))
        return path, parent if parent and _is_run(parent) else None
    run = path if _is_run(path) else None
    written = _read_json(os.path.join(path, EXPORT_RECORD)).get("written", {}) if run else {}
    for kind in EXPORTS:  # what the run's last export wrote, else the folders found here
        folder = written.get(kind) if written else os.path.join(path, kind)
        if folder and _is_export(folder):
            return folder, run
    raise JaxllmError(
        f"{path!r} holds no exported model (adapter/, merged/ or model/, or adapter_config.json / "
        "config.json + safetensors); export a run first: jaxllm convert --from_workdir RUN --output DIR"
    )


def _hub_origin(path: str, kind: str = "models") -> tuple[str | None, str | None]:
    """(Hub id, commit) of a path inside a Hugging Face cache snapshot (.../models--ORG--NAME/snapshots/C/),
    or (Hub id, revision) of a model id as a run records it (`org/name@<commit>`, see jaxllm.train.start.pin);
    (None, None) otherwise."""
    if not path:
        return None, None
    parts = os.path.normpath(os.path.expanduser(path)).split(os.sep)
    for i, part in enumerate(parts):
        if part.startswith(f"{kind}--") and part.count("--") >= 2:
            commit = parts[i + 2] if len(parts) > i + 2 and parts[i + 1] == "snapshots" else None
            return part[len(kind) + 2 :].replace("--", "/"), commit
    if kind == "models" and hub.is_hub_id(path):
        return hub.split_id(path)
    return None, None


def _loss(records: list[dict[str, Any]], split: str) -> tuple[int, Any] | None:
    found = [r for r in records if r.get("split") == split and "loss" in r]
    return (found[-1]["step"], found[-1]["loss"]) if found else None


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else str(value)


def _data_lines(data: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(lines describing the training data, the Hub data set ids among them)."""
    source, paths = data.get("source", ""), list(data.get("paths") or ())
    ids = sorted({i for i in (_hub_origin(p, "datasets")[0] for p in paths) if i})
    if source == "embedded_sft":
        lines = ["the Python-docs chat set bundled with jaxllm (`--data_path embedded`)"]
    elif source == "tfds":
        lines = [f"TensorFlow Datasets `{data.get('tfds_name')}` (split `{data.get('tfds_split')}`)"]
    else:
        lines = [f"`{p}`" for p in paths[:8]] + ([f"... and {len(paths) - 8} more files"] if len(paths) > 8 else [])
        lines = [f"{source} files: " + ", ".join(lines)] if lines else [f"data source `{source}`"]
    if data.get("mixture"):
        lines.append(f"mixture: `{json.dumps(data['mixture'], default=str)}`")
    return [f"Hub data set `{i}`" for i in ids] + lines, ids


def model_card(folder: str, repo_id: str, *, run: str | None = None, command: Sequence[str] | None = None) -> str:
    """README.md for `repo_id`: YAML front matter (base_model, library_name, tags, datasets) and a body that
    says what was trained on what, how (the command line), how far (steps, final losses) and how to load it."""
    from huggingface_hub import ModelCardData

    from jaxllm.train.metrics import read_metrics

    adapter = atomic.as_path(os.path.join(folder, "adapter_config.json")).exists()
    cfg = _read_json(os.path.join(run, "config.json")) if run else {}
    record = _read_json(os.path.join(run, EXPORT_RECORD)) if run else {}
    if command is None and record.get("command"):
        command = record["command"]
    source = cfg.get("checkpoint", {}).get("init_from", "")
    if not source and adapter:
        source = _read_json(os.path.join(folder, "adapter_config.json")).get("base_model_name_or_path", "")
    base_id, commit = _hub_origin(source)
    data_lines, data_ids = _data_lines(cfg.get("data", {})) if cfg else ([], [])
    lora = cfg.get("lora", {})
    tags = (
        ["jaxllm", "text-generation"]
        + (["lora", "peft"] if adapter else [])
        + ([f"{lora.get('quantization')}"] if adapter and lora.get("quantization", "none") != "none" else [])
    )
    meta = ModelCardData(
        base_model=base_id,
        library_name="peft" if adapter else "transformers",
        tags=tags,
        datasets=data_ids or None,
        pipeline_tag="text-generation",
    ).to_yaml()
    what = "LoRA adapter (PEFT format)" if adapter else "model"
    lines = [
        f"---\n{meta}\n---",
        f"# {repo_id.split('/')[-1]}",
        "",
        f"A {what} fine-tuned with jaxllm {__version__} (JAX/Flax).",
        "",
    ]
    if source:
        base = f"[`{base_id}`](https://huggingface.co/{base_id})" if base_id else f"`{source}` (a local folder)"
        lines.append(f"- Base model: {base}" + (f", revision `{commit}`" if commit else ""))
    lines += [f"- Data: {line}" for line in data_lines]
    if run:
        records = read_metrics(run)
        steps = max((r.get("step", 0) for r in records), default=0)
        total = cfg.get("train", {}).get("steps")
        lines.append(f"- Steps: {steps}" + (f" of {total}" if total and total != steps else ""))
        for split, name in (("train", "Final train loss"), ("val", "Final validation loss")):
            if (found := _loss(records, split)) is not None:
                lines.append(f"- {name}: {_fmt(found[1])} (step {found[0]})")
    if adapter and lora:
        lines.append(
            f"- LoRA: r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, "
            f"target modules {', '.join(lora.get('target_modules') or ())}, "
            f"base quantization {lora.get('quantization', 'none')}"
        )
    optim, data = cfg.get("optim", {}), cfg.get("data", {})
    if optim:
        lines.append(
            f"- Optimizer: AdamW, learning rate {optim.get('learning_rate')}, schedule "
            f"{optim.get('schedule')}, {data.get('batch_size')} rows of {data.get('block_size')} tokens "
            f"a step"
        )
    if command:
        lines += ["", "Trained with:", "", "```bash", shlex.join(command), "```"]
    lines += [
        "",
        "## Use it",
        "",
        "The repository may be private: log in first (`hf auth login`) or pass `token=`.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
    ]
    if adapter:
        base_ref = base_id or "BASE_MODEL"  # the Hub id (or local folder) of the base model
        lines += [
            "from peft import PeftModel",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base_ref}")',
            f'model = PeftModel.from_pretrained(base, "{repo_id}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{base_ref}")',
            "```",
        ]
        if not base_id:
            lines += ["", f"`BASE_MODEL`: the base model it was trained on{f' (`{source}`)' if source else ''}."]
    else:
        lines += [
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
            "```",
        ]
    return "\n".join(lines) + "\n"


def retry_command(path: str, repo_id: str, private: bool = True) -> str:
    return shlex.join(
        ["jaxllm", "push", f"--workdir={path}", f"--repo_id={repo_id}"] + ([] if private else ["--public"])
    )


def _files(folder: str) -> list[str]:
    """The folder's files (relative, sorted), without hidden ones (.git, temp files)."""

    def walk(d, prefix: str) -> list[str]:
        out = []
        for p in d.iterdir():
            if p.name.startswith("."):
                continue
            out += walk(p, f"{prefix}{p.name}/") if p.is_dir() else [f"{prefix}{p.name}"]
        return out

    return sorted(walk(atomic.as_path(folder), ""))


def push(
    path: str,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = True,
    run: str | None = None,
    command: Sequence[str] | None = None,
    retry_path: str | None = None,
) -> dict[str, str]:
    """Uploads the export at `path` (see the module doc) to model repository `repo_id`, created private
    unless `private=False` (an existing one keeps its visibility), in one commit with its model card.
    Returns {repo_id, url, commit, folder}; an upload that fails raises UploadError, one line."""
    from huggingface_hub import CommitOperationAdd, HfApi

    repo_id = resolve_repo_id(repo_id, None, "")
    check_token(token)
    folder, found_run = locate(path)
    run = run or found_run
    names = _files(folder)
    own_card = "README.md" in names and not run
    ops = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=_source(folder, name))
        for name in names
        if own_card or name != "README.md"
    ]
    if not own_card:
        card = model_card(folder, repo_id, run=run, command=redact(command, token) if command else None)
        ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    # HF_ENDPOINT read now, not at huggingface_hub's import: a private Hub or a mirror set after it loaded
    api = HfApi(
        endpoint=os.environ.get("HF_ENDPOINT") or None, token=token, library_name="jaxllm", library_version=__version__
    )
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.create_commit(
            repo_id, ops, commit_message=f"Upload {os.path.basename(os.path.normpath(folder))} with jaxllm"
        )
    except (Exception, KeyboardInterrupt) as e:  # pylint: disable=broad-except
        raise UploadError(
            _failure(e, repo_id, retry_command(retry_path or path, repo_id, private), token, folder)
        ) from None
    return {"repo_id": repo_id, "url": str(url), "commit": info.oid, "folder": atomic.location(folder)}


def _source(folder: str, name: str) -> Any:
    local = os.path.join(folder, name)
    return local if not atomic.is_url(folder) else atomic.as_path(local).read_bytes()


def _failure(e: BaseException, repo_id: str, retry: str, token: str | None, folder: str) -> str:
    """One line: what failed (the first line of the error, the token masked), that the files stay, the retry."""
    secrets = [s for s in (token, _stored_token()) if s]
    reason = " ".join(str(e).split("\n")[0].split()) or type(e).__name__
    if isinstance(e, KeyboardInterrupt):
        reason = "interrupted"
    for secret in secrets:
        reason = reason.replace(secret, "***")
    status = getattr(getattr(e, "response", None), "status_code", None)
    hint = {
        401: " (is the token valid? `hf auth login` or --token)",
        403: " (does the token have write access to this namespace?)",
    }.get(status, "")
    return (
        f"upload to the Hub repository {repo_id} failed: {type(e).__name__}: {reason}{hint}; nothing local "
        f"was changed ({atomic.location(folder)} is kept); retry with: {retry}"
    )


def record_export(workdir: str, written: dict[str, str], command: Sequence[str], token: str | None) -> None:
    """Writes workdir/export.json: the command line (token removed) and the folders the run exported, for
    the model card of a later `jaxllm push --workdir=WORKDIR`."""
    atomic.write(
        os.path.join(workdir, EXPORT_RECORD),
        json.dumps(
            {"command": redact(command, token), "written": {k: atomic.location(v) for k, v in written.items()}},
            indent=2,
        )
        + "\n",
    )
