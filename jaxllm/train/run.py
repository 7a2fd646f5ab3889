"""A run's configuration: the sections of an ml-collections config, parsed into checked dataclasses."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import ml_collections

from jaxllm import JaxllmError, atomic
from jaxllm import sharding as shd
from jaxllm.config import build, check_number, check_sections
from jaxllm.data.config import DataConfig
from jaxllm.distributed import DistributedConfig
from jaxllm.hf import hub
from jaxllm.models import lora
from jaxllm.models.config import SHAPE_FIELDS, ModelConfig
from jaxllm.models.generation import GenerateConfig
from jaxllm.train import preference as pref
from jaxllm.train.checkpoint import CheckpointConfig
from jaxllm.train.optimizer import OptimConfig
from jaxllm.train.prune import PruneConfig
from jaxllm.train.trackers import check as check_trackers

SECTIONS = (
    "seed",
    "model",
    "data",
    "optim",
    "train",
    "mesh",
    "checkpoint",
    "generate",
    "distributed",
    "lora",
    "prune",
    "preference",
)


def check_complete(cfg: ml_collections.ConfigDict, path: str) -> None:
    """Refuses a run config file that leaves out sections: their defaults would run unseen (a file with
    only a `model` section would train the dataclasses' step count on the embedded corpus)."""
    missing = [s for s in SECTIONS if s not in cfg]
    if missing:
        raise JaxllmError(
            f"config file {path!r} lacks section(s) {', '.join(missing)}; start it from "
            "configs/common.py, which declares every section: in get_config(), "
            'c = load_config(os.path.join(os.path.dirname(__file__), "common.py")), then change c'
        )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """`TrainConfig(**cfg.train)`."""

    steps: int = 1000  # optimizer steps in the whole run
    objective: str = "lm"  # lm (next-token loss: pretraining, SFT) | dpo | orpo | reward (data.format=preference)
    log_every: int = 10  # steps between metric lines
    eval_every: int = 100  # steps between validation passes; 0 = only at the end
    eval_at_start: bool = False  # also evaluate before the first step (a fine-tuning run's baseline)
    eval_batches: int = 8  # validation batches per pass
    # lm-evaluation-harness tasks scored at every validation pass (names or groups, e.g. ("arc_easy",); needs
    # jaxllm[eval]); the scores go to metrics.jsonl and the trackers as split "tasks"; () = none
    eval_tasks: tuple[str, ...] = ()
    eval_tasks_limit: int = 0  # documents scored per task; 0 = all
    eval_tasks_fewshot: int = -1  # few-shot examples per prompt; -1 = each task's own default
    eval_tasks_include_path: str = ""  # a folder of task YAML files (the harness's --include_path)
    early_stop_patience: int = 0  # stop after this many evaluations without improvement; 0 = never
    early_stop_min_delta: float = 0.0  # an improvement must lower val loss by more than this
    z_loss: float = 0.0  # weight of the log(Z)^2 auxiliary loss (PaLM uses 1e-4)
    loss_chunk: int = 0  # positions per cross-entropy chunk (float32 [B, chunk, V] logits at a time); 0 = whole
    progress: bool = True  # tqdm progress bar on process 0
    # experiment trackers fed every metrics.jsonl record (always written), on process 0: tensorboard (event
    # files in WORKDIR/tensorboard) | wandb (WANDB_PROJECT, else the workdir's name) | mlflow
    # (MLFLOW_EXPERIMENT_NAME, else the workdir's name); e.g. ("tensorboard", "wandb"); () = metrics.jsonl only
    trackers: tuple[str, ...] = ("tensorboard",)
    mlflow_tracking_uri: str = ""  # "" = MLFLOW_TRACKING_URI, else MLflow's default store

    def __post_init__(self):
        check_trackers(self.trackers)
        pref.check_objective(self.objective)
        if isinstance(self.eval_tasks, str):
            object.__setattr__(self, "eval_tasks", tuple(t.strip() for t in self.eval_tasks.split(",") if t.strip()))
        object.__setattr__(self, "eval_tasks", tuple(self.eval_tasks))
        check_number("train.eval_tasks_limit", self.eval_tasks_limit, low=0, integer=True)
        check_number("train.eval_tasks_fewshot", self.eval_tasks_fewshot, low=-1, integer=True)
        for name in ("steps", "log_every", "eval_batches"):
            check_number(f"train.{name}", getattr(self, name), low=1, integer=True)
        for name in ("eval_every", "early_stop_patience", "loss_chunk"):
            check_number(f"train.{name}", getattr(self, name), low=0, integer=True)
        for name in ("early_stop_min_delta", "z_loss"):
            check_number(f"train.{name}", getattr(self, name), low=0)


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything a run is built from, parsed and validated."""

    seed: int
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    train: TrainConfig
    mesh: shd.MeshConfig
    checkpoint: CheckpointConfig
    generate: GenerateConfig
    distributed: DistributedConfig
    lora: lora.LoraConfig
    prune: PruneConfig
    preference: pref.PreferenceConfig = pref.PreferenceConfig()
    ref_model: ModelConfig | None = None  # preference.model_ref's model (jaxllm.train.start.parse reads its config)


def from_config(
    cfg: ml_collections.ConfigDict, init_model: ModelConfig | None = None, ref_model: ModelConfig | None = None
) -> Run:
    """The run's parts, checked. With `checkpoint.model_from_init`, `init_model` (the config of `init_from`,
    read by `jaxllm.train.start.parse`) gives the model's shapes; the run's model section sets only the rest.
    `ref_model`: the config of `preference.model_ref` (read by `jaxllm.train.start.parse`)."""
    check_sections(cfg, SECTIONS)
    checkpoint = build(CheckpointConfig, cfg.get("checkpoint"), "checkpoint")
    model = build(ModelConfig, cfg.get("model"), "model")
    if checkpoint.model_from_init:
        if init_model is None:
            raise JaxllmError("checkpoint.model_from_init needs checkpoint.init_from (a Hugging Face folder)")
        model = _model_from_init(init_model, checkpoint.init_from, cfg.get("model") or {}, model)
    run_lora = build(lora.LoraConfig, cfg.get("lora"), "lora")
    prune = build(PruneConfig, cfg.get("prune"), "prune")
    if prune.sparsity and run_lora.r:
        raise JaxllmError(
            "prune.sparsity > 0 prunes trained weights, but lora.r > 0 freezes them; prune a full "
            "fine-tuning run (lora.r=0) and fine-tune adapters afterwards"
        )
    train = build(TrainConfig, cfg.get("train"), "train")
    if train.objective == "reward" and not model.num_labels:  # a reward model's score head replaces lm_head
        model = dataclasses.replace(model, num_labels=1)
    run = Run(
        prune=prune,
        seed=int(cfg.get("seed", 0)),
        model=lora.apply(run_lora, model),
        lora=run_lora,
        data=build(DataConfig, cfg.get("data"), "data"),
        optim=build(OptimConfig, cfg.get("optim"), "optim"),
        train=train,
        mesh=build(shd.MeshConfig, cfg.get("mesh"), "mesh"),
        checkpoint=checkpoint,
        generate=build(GenerateConfig, cfg.get("generate"), "generate"),
        distributed=build(DistributedConfig, cfg.get("distributed"), "distributed"),
        preference=build(pref.PreferenceConfig, cfg.get("preference"), "preference"),
    )
    _check_objective(run)
    if ref_model is not None:
        run = dataclasses.replace(run, ref_model=_ref_model(ref_model, run))
    chunk = run.train.loss_chunk
    if chunk and chunk < run.data.block_size and run.data.block_size % chunk:
        raise JaxllmError(
            f"train.loss_chunk={chunk} does not divide data.block_size={run.data.block_size}; pick a divisor of it"
        )
    return run


def _check_objective(run: Run) -> None:
    """Refuses an objective its data or settings cannot serve, before anything is built."""
    objective, p = run.train.objective, run.preference
    preference_data = run.data.format == "preference"
    if objective != "lm" and not preference_data:
        raise JaxllmError(
            f"train.objective={objective} trains on preference pairs: set data.format=preference "
            "(columns data.prompt_field / chosen_field / rejected_field)"
        )
    if objective == "lm" and preference_data:
        raise JaxllmError(
            "data.format=preference needs a preference objective: set train.objective to dpo, orpo "
            "or reward (finetune --trainer dpo|orpo|reward)"
        )
    if objective != "dpo" and (p.model_ref or p.precompute_ref_logps):
        raise JaxllmError(
            f"preference.model_ref and precompute_ref_logps apply to train.objective=dpo, not "
            f"{objective}; ORPO and reward models have no reference model"
        )
    if objective == "reward" and run.model.num_labels != 1:
        raise JaxllmError(f"train.objective=reward scores with one label; model.num_labels={run.model.num_labels}")
    if objective != "reward" and run.model.num_labels:
        raise JaxllmError(
            f"model.num_labels={run.model.num_labels} makes a score head with no language-model head; "
            f"train.objective={objective} needs the language-model head: set model.num_labels=0"
        )
    if run.train.eval_tasks and run.model.num_labels:
        raise JaxllmError(
            "train.eval_tasks scores a language model; a reward model (model.num_labels > 0) has no "
            "language-model head: set train.eval_tasks=()"
        )
    if objective != "lm" and run.train.z_loss:
        raise JaxllmError(f"train.z_loss applies to train.objective=lm; set it to 0 for {objective}")


def _ref_model(ref: ModelConfig, run: Run) -> ModelConfig:
    """`preference.model_ref`'s config, computing as the policy does (dtypes, attention, layer scan)."""
    if ref.vocab_size != run.model.vocab_size:
        raise JaxllmError(
            f"preference.model_ref {run.preference.model_ref} has vocab_size {ref.vocab_size}, the "
            f"policy {run.model.vocab_size}: the reference must read the same tokens (the same tokenizer)"
        )
    keep = ("dtype", "param_dtype", "attention", "scan_layers", "max_seq_len")
    return dataclasses.replace(
        ref,
        **{k: getattr(run.model, k) for k in keep},
        remat="none",
        embed_dropout=0.0,
        attn_dropout=0.0,
        resid_dropout=0.0,
        lora_dropout=0.0,
    )


def _model_from_init(base: ModelConfig, source: str, section: Any, run_model: ModelConfig) -> ModelConfig:
    """The source's ModelConfig with the run's non-shape fields (dtype, remat, dropout, ...) on top."""
    shape_keys = [k for k in section.keys() if k in SHAPE_FIELDS or k in ("num_kv_heads", "head_dim")]
    if shape_keys:
        raise JaxllmError(
            f"model.{shape_keys[0]} comes from {source}'s config with checkpoint.model_from_init; "
            "remove it from the model section"
        )
    return dataclasses.replace(base, **{k: getattr(run_model, k) for k in section.keys()})


def check_workdir(workdir: str, cfg: ml_collections.ConfigDict) -> None:
    """Refuses, before any work, a workdir whose checkpoints are another model's run (resuming it would
    fail on the shapes, or quietly go on training the other model)."""
    folder = atomic.as_path(workdir)
    try:
        saved = ml_collections.ConfigDict(json.loads((folder / "config.json").read_text()))
        if not any(p.name.isdigit() for p in (folder / "checkpoints").iterdir()):
            return
    except (OSError, ValueError):
        return

    def model(c: ml_collections.ConfigDict) -> dict[str, Any]:  # the source, and the shapes unless taken from it
        checkpoint = c.get("checkpoint") or {}
        source = checkpoint.get("init_from") or ""
        shapes = None if checkpoint.get("model_from_init") else build(ModelConfig, c.get("model"), "model")
        if hub.is_hub_id(source):  # the commit is checked where the run pins it (jaxllm.train.start.pin)
            source = hub.split_id(source)[0]
        return {
            "init_from": atomic.location(source) if source else "none",
            **({f: getattr(shapes, f) for f in SHAPE_FIELDS} if shapes else {}),
        }

    try:
        theirs = model(saved)
    except JaxllmError:  # a config.json of another jaxllm version: the restore will judge
        return
    ours = model(cfg)
    diffs = [f"{k}: {theirs[k]} there, {ours[k]} here" for k in theirs if theirs[k] != ours.get(k, theirs[k])]
    if diffs:
        raise JaxllmError(
            f"workdir {workdir!r} holds a run of another model ({'; '.join(diffs)}); resume it with "
            f"that model, or run this one in another --workdir / --project_name (or delete {workdir!r})"
        )
