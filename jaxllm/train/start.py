"""What a run needs to start, from the paths and Hub ids its config names: the config parsed into a
`Run` (Hub ids fetched into the Hugging Face cache and pinned to commits), `init_from`'s config and
params (a Hugging Face folder or a `jaxllm convert` output), an adapter run's frozen base, a DPO
`model_ref`, and a finished run's trained params (`load_run`, through the run's own `Program`)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import linen as nn
from jax.sharding import Mesh

from jaxllm import JaxllmError, atomic, hf, tree
from jaxllm import sharding as shd
from jaxllm.data.splits import parse_ref, resolve_data
from jaxllm.hf import hub, peft
from jaxllm.hf.weights import TensorFiles, fresh_score, load_params, read_config
from jaxllm.models import lora
from jaxllm.models.config import SHAPE_FIELDS, ModelConfig
from jaxllm.models.decoder import abstract_params, layer_layout
from jaxllm.train.checkpoint import Checkpointer
from jaxllm.train.program import build
from jaxllm.train.run import Run, from_config


def kind(path: str) -> str:
    """What `path` holds: "workdir" (config.json + checkpoints/), "converted" (`jaxllm convert` output:
    model.json + params/), "hf" (config.json, a Hugging Face model folder) or "adapter" (a PEFT adapter)."""
    root = atomic.as_path(path)
    has = lambda name: (root / name).exists()  # noqa: E731
    if has("config.json") and (root / "checkpoints").is_dir():
        return "workdir"
    if has("model.json") and (root / "params").is_dir():
        return "converted"
    if has("config.json") or has(peft.CONFIG):
        if atomic.is_url(path):
            raise JaxllmError(
                f"{path!r}: Hugging Face and adapter folders are read from local disk (safetensors "
                f"are memory-mapped); copy it down first, e.g. gcloud storage cp -r {path} ."
            )
        return "hf" if has("config.json") else "adapter"
    raise JaxllmError(
        f"{path!r} is neither a Hugging Face model folder (config.json + weights), a "
        "`jaxllm convert` output (model.json + params/), a jaxllm workdir (config.json + checkpoints/) "
        "nor a PEFT adapter folder (adapter_config.json); a Hugging Face Hub id is written org/name"
    )


def source_model_config(source: str) -> ModelConfig:
    """The ModelConfig of a Hugging Face folder or a `jaxllm convert` output."""
    what = kind(source)
    if what == "converted":
        path = os.path.join(source, "model.json")
        try:
            fields = json.loads(atomic.as_path(path).read_text())
            return ModelConfig(**fields)
        except (ValueError, RecursionError, TypeError) as e:  # not JSON, not an object, unknown or bad fields
            raise JaxllmError(
                f"{path} is not a model.json that `jaxllm convert` writes ({str(e)[:200]}); convert the model again"
            ) from None
    if what == "hf":
        return hf.model_config_from_hf(read_config(source))
    raise JaxllmError(f"init_from {source!r} is a {what}, not a Hugging Face folder or a `jaxllm convert` output")


def _check_compatible(run_cfg: ModelConfig, source_cfg: ModelConfig, source: str) -> None:
    diffs = [
        f"{f}: {getattr(source_cfg, f)} there, {getattr(run_cfg, f)} here"
        for f in SHAPE_FIELDS
        if getattr(source_cfg, f) != getattr(run_cfg, f)
    ]
    if diffs:
        raise JaxllmError(
            f"init_from {source} does not fit model config ({'; '.join(diffs)}); "
            "set the model section from the source's config.json"
        )


def load_init_params(
    source: str,
    run_cfg: ModelConfig,
    mesh: Mesh,
    *,
    quantized: ModelConfig | None = None,
    score_key: jax.Array | None = None,
) -> Any:
    """Params for a fresh run from a Hugging Face folder or a `jaxllm convert` output, placed sharded;
    with `quantized`, a Hugging Face base is quantized kernel by kernel as it loads. A causal LM starting a
    score model (run num_labels > 0) gives its base; the score head is drawn fresh from `score_key` (key 0)."""
    source_cfg = source_model_config(source)
    _check_compatible(run_cfg, source_cfg, source)
    fresh = fresh_score(source_cfg.num_labels, run_cfg.num_labels, source)
    score_key = (jax.random.key(0) if score_key is None else score_key) if fresh else None
    if kind(source) == "hf":
        return load_params(TensorFiles(source), run_cfg, mesh, quantized=quantized, score_key=score_key)
    # restored in the layout it was saved in (scanned or unrolled layers), then put in the run's
    stored_cfg = dataclasses.replace(run_cfg, scan_layers=source_cfg.scan_layers, num_labels=source_cfg.num_labels)
    boxed = abstract_params(stored_cfg)
    abstract = shd.placed(boxed, shd.shardings_for(boxed, mesh))
    try:
        params = ocp.StandardCheckpointer().restore(os.path.join(source, "params"), abstract)
    except Exception as e:
        raise JaxllmError(f"init_from {source}/params is corrupt or incompatible ({str(e)[:200]})") from e
    if fresh:  # the causal LM's head gives way to a fresh score head
        params = {k: v for k, v in params.items() if k != "lm_head"}
        score = shd.unbox(abstract_params(run_cfg))["score"]["kernel"]
        draw = jax.jit(
            lambda key: nn.initializers.normal(run_cfg.init_std)(key, score.shape, score.dtype),
            out_shardings=shd.shardings_for(abstract_params(run_cfg), mesh)["score"]["kernel"],
        )
        params["score"] = {"kernel": draw(score_key)}
    if stored_cfg.scan_layers != run_cfg.scan_layers:
        run_sh = shd.shardings_for(abstract_params(run_cfg), mesh)
        params = jax.jit(lambda p: layer_layout(p, run_cfg.num_layers, run_cfg.scan_layers), out_shardings=run_sh)(
            params
        )
    if quantized is not None:
        params = lora.quantize_params(
            params, quantized, shd.shardings_for(abstract_params(quantized), mesh), in_place=True
        )
    return params


# config keys that may name a Hugging Face Hub repository, and which of its files they need
HUB_KEYS = (
    ("checkpoint", "init_from", "model"),
    ("data", "tokenizer", "tokenizer"),
    ("lora", "init_adapter", "adapter"),
    ("preference", "model_ref", "model"),
)


def resolve(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `cfg` in which every Hub id (`org/name[@rev]`) a key of HUB_KEYS holds is the local folder
    of its snapshot in the Hugging Face cache, fetched if needed; local paths are kept as they are."""
    out = ml_collections.ConfigDict(cfg.to_dict())
    for section, key, what in HUB_KEYS:
        value = (out.get(section) or {}).get(key)
        if isinstance(value, str) and hub.is_hub_id(value):
            out[section][key] = hub.local(value, what=what)
    if out.get("data") is not None:  # data sets named by Hub id or folder (and split) -> their split's files
        out["data"] = resolve_data(out["data"])
    return out


def pin(cfg: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """A copy of `cfg` whose Hub ids (keys of HUB_KEYS) name the commit they resolve to, `org/name@<commit>`,
    so the run's config.json records exactly what it read. A run resuming in `workdir` keeps the commits
    it started from (a branch that moved since does not change its base model); asking it for another
    revision of the same repository is refused."""
    saved = _started_config(workdir)
    out = ml_collections.ConfigDict(cfg.to_dict())
    for section, key, what in HUB_KEYS:
        value = (out.get(section) or {}).get(key)
        if isinstance(value, str) and hub.is_hub_id(value):
            out[section][key] = _pinned(value, (saved.get(section) or {}).get(key), what, f"{section}.{key}", workdir)
    data, before = out.get("data") or {}, saved.get("data") or {}
    for key in ("paths", "valid_paths"):  # data set ids, with their optional :config:split
        entries = data.get(key)
        if isinstance(entries, (tuple, list)) and any(_dataset_id(e) for e in entries):
            started = before.get(key) if isinstance(before.get(key), (tuple, list)) else ()
            olds = list(started) if len(started) == len(entries) else [None] * len(entries)
            out["data"][key] = tuple(
                _pin_dataset(e, o, workdir) if _dataset_id(e) else e for e, o in zip(entries, olds)
            )
    return out


def _dataset_id(entry: Any) -> str:
    """The Hub data set id `entry` (`org/name[@rev][:config][:split]`) names, else ''."""
    ref = parse_ref(entry) if isinstance(entry, str) else None
    return ref[0] if ref and hub.is_hub_id(ref[0]) else ""


def _pin_dataset(entry: str, before: Any, workdir: str) -> str:
    base = _dataset_id(entry)
    suffix = entry[len(base) :]
    old = _dataset_id(before) if isinstance(before, str) and before.endswith(suffix) else ""
    return _pinned(base, old or None, "dataset", "data set", workdir) + suffix


def _pinned(value: str, before: Any, what: str, key: str, workdir: str) -> str:
    """`value` (a Hub id) as `org/name@<commit>`: the commit the run in `workdir` started from (`before`)
    if it names the same repository and `value` asks for no other revision, else the one it resolves to."""
    repo, revision = hub.split_id(value)
    if isinstance(before, str) and hub.is_hub_id(before) and hub.split_id(before)[0] == repo:
        started = hub.split_id(before)[1]
        if revision in (None, started):
            return before
        now = hub.commit(value, what=what)
        if now != started:
            raise JaxllmError(
                f"{workdir} was started from {repo} at commit {started}; {key}={value} is commit "
                f"{now}: resume with {repo} (or @{started}), or start a new workdir"
            )
    return f"{repo}@{hub.commit(value, what=what)}"


def _started_config(workdir: str) -> dict[str, Any]:
    """The config.json of the run `workdir` holds (one with a checkpoint), else {}."""
    root = atomic.as_path(workdir)
    try:
        if not any(p.name.isdigit() for p in (root / "checkpoints").iterdir()):
            return {}
        saved = json.loads((root / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def parse(cfg: ml_collections.ConfigDict) -> Run:
    """The run `cfg` describes, checked, with its Hub ids resolved to local folders; with
    `checkpoint.model_from_init` the model's shapes come from `init_from`'s config."""
    cfg = resolve(cfg)
    section = cfg.get("checkpoint") or {}
    init_model = ref_model = None
    if section.get("model_from_init") and section.get("init_from"):
        init_model = source_model_config(section.get("init_from"))
    model_ref = (cfg.get("preference") or {}).get("model_ref")
    if model_ref:
        ref_model = _workdir_run(model_ref).model if kind(model_ref) == "workdir" else source_model_config(model_ref)
    return from_config(cfg, init_model, ref_model)


def load_reference(run: Run, mesh: Mesh, shardings: Any) -> Any:
    """`preference.model_ref`'s params, placed with `shardings` (a workdir's: its trained params over its base)."""
    source = run.preference.model_ref
    if kind(source) == "workdir":
        _, params, frozen = load_run(source)
        params = tree.union(params, frozen)
    else:
        params = load_init_params(source, run.ref_model, mesh)
    cfg = run.ref_model
    dtypes = jax.tree.map(lambda s: s.dtype, shd.unbox(abstract_params(cfg)))

    def placed(p):
        return jax.tree.map(lambda x, d: x.astype(d), layer_layout(p, cfg.num_layers, cfg.scan_layers), dtypes)

    return jax.jit(placed, out_shardings=shardings)(params)


def load_frozen(run: Run, mesh: Mesh, trainable: Callable) -> tuple[dict, dict]:
    """(frozen params, initial values of the trainable base leaves) of an adapter run: the base from
    `checkpoint.init_from`, quantized when asked, split by `trainable`."""
    if not run.checkpoint.init_from:
        raise JaxllmError(
            "lora.r > 0 fine-tunes a pretrained base: set checkpoint.init_from to a Hugging Face "
            "folder or `jaxllm convert` output"
        )
    quantized = run.model if run.model.quantization != "none" else None
    base = load_init_params(run.checkpoint.init_from, lora.base_config(run.model), mesh, quantized=quantized)
    saved, frozen = tree.partition(base, trainable)
    return frozen, saved


def _workdir_run(workdir: str) -> Run:
    """The run a training workdir's config.json describes."""
    path = os.path.join(workdir, "config.json")
    try:
        cfg = ml_collections.ConfigDict(json.loads(atomic.as_path(path).read_text()))
    except (OSError, ValueError, RecursionError, TypeError, AttributeError) as e:  # missing, not JSON, not an object
        raise JaxllmError(f"cannot read {path} ({str(e)[:200]}); is {workdir!r} a jaxllm workdir?") from None
    return parse(cfg)


def load_run(workdir: str, *, with_frozen: bool = True) -> tuple[Run, Any, dict]:
    """(run, trained params, frozen params) from the latest checkpoint of a training workdir, restored
    into the state layout of the run's own `Program`; an adapter run's frozen base is rebuilt from its
    `init_from` (quantized as it was trained) unless `with_frozen` is False (then {}: exporting an
    adapter needs only the adapters)."""
    run = _workdir_run(workdir)
    run = dataclasses.replace(run, optim=dataclasses.replace(run.optim, host_offload=False))  # restored to devices
    mesh = shd.make_mesh(shd.MeshConfig(data=-1))
    program = build(run, mesh)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), dataclasses.replace(run.checkpoint, async_save=False))
    if ckpt.latest_step() is None:
        raise JaxllmError(f"no checkpoint in {workdir}/checkpoints; train first")
    state = ckpt.restore(program.abstract_state())
    ckpt.close()
    trainable = program.trainable
    frozen = load_frozen(run, mesh, trainable)[0] if trainable is not None and with_frozen else {}
    return run, state.params, frozen
