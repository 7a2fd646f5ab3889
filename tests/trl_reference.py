"""TRL 1.16 reference values for jaxllm's DPO / IPO / ORPO / reward-model parity tests (torch, CPU, float32).

Each function builds TRL's own trainer (DPOTrainer, experimental ORPOTrainer, RewardTrainer) on a tiny Hugging Face
model folder, lets the trainer tokenize the rows with its own dataset code, collates all rows into ONE batch with the
trainer's own collator, and runs ONE `trainer.training_step` (TRL's `compute_loss` + the backward Trainer does). Every
number returned is read from the tensors TRL's code computed (their local variables are captured when the TRL
function returns, see `_capture`), not recomputed here:

    ref = dpo_reference(model_dir, tokenizer_dir, rows, adapter_dir=..., loss_type="sigmoid", beta=0.1)
    ref["loss"], ref["per_example_loss"], ref["chosen_logps"], ref["grads"]["base_model.model...lora_A.weight"]

`rows` are plain-text preference rows {"prompt": str, "chosen": str, "rejected": str}. Gradients come back keyed as
the adapter file (peft's `get_peft_model_state_dict`) keys them, or by the Hugging Face parameter names (a tied
lm_head is reported once, under the embedding's name) for full fine-tuning; numpy float32.

The policy/reference set-ups (DPO):
  * adapter_dir, adapter_ref="base": TRL's fresh-adapter path (`peft_config=` the adapter's LoraConfig); the trained
    adapter starts from the folder's weights (B != 0 allowed) and the reference is the base model (adapters disabled),
    as TRL does for a new adapter.
  * adapter_dir, adapter_ref="copy": TRL's continue-an-adapter path (a `PeftModel` passed as `model`): TRL adds a
    frozen "ref" adapter copied from the start adapter, so policy == reference on the first step.
  * ref_model_dir: TRL's `ref_model` (any causal LM folder), with or without an adapter.
  * no adapter: full fine-tuning; TRL loads a frozen copy of the model folder as the reference.
This file is a helper for the tests, not a test module; tests/test_trl_reference.py checks it.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

DPO_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "entropy",
    "mean_token_accuracy",
    "num_tokens",
)
ORPO_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "nll_loss",
    "log_odds_ratio",
    "log_odds_chosen",
)
REWARD_METRICS = ("min_reward", "mean_reward", "max_reward", "accuracy", "margin", "num_tokens")


# ----------------------------------------------------------------------------------------------------------------------
# tiny local fixtures (shared with the jaxllm-side parity tests)

WORDS = tuple(
    (
        "the a cat dog sat on mat ran fast slow red blue big small is was and or not yes no hello world jax "
        "llm good bad it"
    ).split()
)
SAMPLE_ROWS = (
    dict(prompt="the cat sat", chosen=" on the mat", rejected=" ran fast"),
    dict(prompt="hello world", chosen=" good", rejected=" bad dog ran fast"),
    dict(prompt="is jax good", chosen=" yes it is", rejected=" no"),
)
LORA_TARGETS = {
    "llama": ("q_proj", "v_proj", "down_proj"),
    "falcon": ("query_key_value", "dense_4h_to_h"),
    "bloom": ("query_key_value", "dense"),
}


def make_tokenizer(folder, kind: str = "bos", words: Sequence[str] = WORDS) -> str:
    """Saves a whitespace WordLevel tokenizer.json folder (ids: <pad>=0, <s>=1, </s>=2, <unk>=3, then `words`).
    kind "bos": encodes with <s> first, as Llama's tokenizer does; "plain": adds nothing (BLOOM/Falcon-like);
    "nopad": adds nothing and has no pad token (TRL then pads with EOS). Returns the folder."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    if kind not in ("bos", "plain", "nopad"):
        raise ValueError(f"tokenizer kind {kind!r}")
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + list(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "bos":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
    extra = {} if kind == "nopad" else {"pad_token": "<pad>"}
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", **extra
    ).save_pretrained(str(folder))
    return str(folder)


def make_model(folder, arch: str, seed: int = 0, vocab_size: int = 96, hidden_size: int = 32) -> str:
    """Saves a random float32 2-layer causal LM ("llama": GQA 4/2 heads; "falcon": new_decoder_architecture, 4/2
    heads, tied; "bloom": 4 heads, tied) with bos=1, eos=2, pad=0 (as make_tokenizer). Returns the folder."""
    import torch
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config = {
        "llama": lambda: transformers.LlamaConfig(
            intermediate_size=2 * hidden_size,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=2,
            **common,
        ),
        "falcon": lambda: transformers.FalconConfig(
            num_attention_heads=4, new_decoder_architecture=True, num_kv_heads=2, num_hidden_layers=2, **common
        ),
        "bloom": lambda: transformers.BloomConfig(n_layer=2, n_head=4, **common),
    }[arch]()
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(config).float().save_pretrained(str(folder))
    return str(folder)


def make_adapter(
    folder,
    model_dir: str,
    arch: str,
    targets: Sequence[str] | None = None,
    r: int = 4,
    alpha: float = 8,
    b_std: float = 0.2,
    seed: int = 7,
) -> str:
    """Saves a PEFT LoRA adapter for `model_dir` whose B matrices are drawn N(0, b_std) (not zero), so the policy
    differs from the base model. Returns the folder."""
    import peft
    import torch
    import transformers

    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = peft.get_peft_model(
        base,
        peft.LoraConfig(
            r=r, lora_alpha=alpha, task_type="CAUSAL_LM", target_modules=list(targets or LORA_TARGETS[arch])
        ),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, b_std)
    model.save_pretrained(str(folder))
    return str(folder)


# ----------------------------------------------------------------------------------------------------------------------
# plumbing


@contextlib.contextmanager
def _capture(*functions) -> Iterable[dict[str, dict[str, Any]]]:
    """Records the local variables of each function (by name) at its last return while the block runs, so the
    tensors a TRL method computed inside can be read without re-implementing it."""
    codes = {inspect.unwrap(f).__code__: inspect.unwrap(f).__name__ for f in functions}
    seen: dict[str, dict[str, Any]] = {}

    def profiler(frame, event, arg):
        if event == "return" and frame.f_code in codes:
            seen[codes[frame.f_code]] = dict(frame.f_locals)

    previous = sys.getprofile()
    if previous is not None:
        raise RuntimeError("trl_reference needs sys.setprofile, but a profiler is already set")
    sys.setprofile(profiler)
    try:
        yield seen
    finally:
        sys.setprofile(None)


@contextlib.contextmanager
def _quiet_offline():
    """No telemetry, no Hub downloads, fewer logs: everything the trainers need is local."""
    import datasets
    import huggingface_hub.constants as constants
    import transformers

    saved = constants.HF_HUB_DISABLE_TELEMETRY
    verbosity = transformers.logging.get_verbosity()
    bars = datasets.is_progress_bar_enabled()
    constants.HF_HUB_DISABLE_TELEMETRY = True
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        constants.HF_HUB_DISABLE_TELEMETRY = saved
        transformers.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _np(t) -> np.ndarray:
    return t.detach().to("cpu").float().numpy().astype(np.float32)


def _common_args(output_dir: str, n: int, seed: int) -> dict:
    """TrainingArguments shared by the three configs: CPU, float32 (TRL configs default to bf16=True), one batch
    with every row, no gradient accumulation, no logging/saving/reporting. Gradient checkpointing (TRL's default)
    is turned off: it does not change float32 values, only speed."""
    return dict(
        output_dir=output_dir,
        report_to="none",
        use_cpu=True,
        bf16=False,
        fp16=False,
        per_device_train_batch_size=n,
        gradient_accumulation_steps=1,
        gradient_checkpointing=False,
        seed=seed,
        save_strategy="no",
        logging_strategy="no",
        dataloader_num_workers=0,
        dataset_num_proc=None,
    )


def _dataset(rows: Sequence[dict]):
    from datasets import Dataset

    for i, r in enumerate(rows):
        missing = {"prompt", "chosen", "rejected"} - set(r)
        if missing:
            raise ValueError(f"row {i} lacks {sorted(missing)}")
    return Dataset.from_list(
        [
            {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"], "row": i}
            for i, r in enumerate(rows)
        ]
    )


def _tokenizer(tokenizer_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _lora_config(adapter_dir: str, **overrides):
    from peft import LoraConfig

    config = LoraConfig.from_pretrained(adapter_dir)
    config.inference_mode = False  # a saved adapter config says inference_mode=True, which would freeze the adapter
    for k, v in overrides.items():
        setattr(config, k, v)
    return config


def _adapter_state(adapter_dir: str) -> dict:
    import safetensors.torch
    import torch

    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    if os.path.exists(path):
        return safetensors.torch.load_file(path)
    return torch.load(os.path.join(adapter_dir, "adapter_model.bin"), map_location="cpu", weights_only=True)


def _load_adapter_weights(peft_model, adapter_dir: str) -> None:
    """Puts the adapter file's weights into the trainer's freshly initialised "default" adapter (so the trained
    adapter starts where the jaxllm run starts) and checks every file tensor landed."""
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    state = _adapter_state(adapter_dir)
    full = get_peft_model_state_dict(peft_model, adapter_name="default")  # e.g. a reward model's new score head
    full.update(state)
    set_peft_model_state_dict(peft_model, full, adapter_name="default")
    now = get_peft_model_state_dict(peft_model, adapter_name="default")
    missing = sorted(set(state) - set(now))
    if missing:
        raise ValueError(f"adapter tensors the model does not have: {missing[:5]}")
    for k, v in state.items():
        if not torch.equal(now[k].to(v.dtype), v):
            raise ValueError(f"adapter tensor {k} did not load")


def _grads(model) -> dict[str, np.ndarray]:
    """Gradients after the backward, keyed as peft's adapter file (PEFT) or as named_parameters (full)."""
    from peft import PeftModel, get_peft_model_state_dict

    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    if isinstance(model, PeftModel):
        stray = [n for n in grads if ".ref." in n]
        if stray:
            raise AssertionError(f"the frozen reference adapter got gradients: {stray[:3]}")
        grads = get_peft_model_state_dict(model, state_dict=grads, adapter_name="default")
    return {k: _np(v) for k, v in grads.items()}


def _trainable_names(model) -> list[str]:
    from peft import PeftModel, get_peft_model_state_dict

    names = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if isinstance(model, PeftModel):
        return sorted(get_peft_model_state_dict(model, state_dict=names, adapter_name="default"))
    return sorted(names)


def _one_step(trainer, features: list[dict], captured_fns: Sequence) -> tuple[float, dict, dict]:
    """Collates `features` with the trainer's collator and runs Trainer.training_step (compute_loss + backward) once,
    with the named TRL functions' locals captured."""
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop; training_step divides by it
    batch = trainer.data_collator(features)
    trainer.model.zero_grad(set_to_none=True)
    with _capture(*captured_fns) as seen:
        loss = trainer.training_step(trainer.model, batch)
    return float(loss.item()), seen, batch


def _metrics(trainer, names: Sequence[str]) -> dict[str, float]:
    stored = trainer._metrics["train"]  # pylint: disable=protected-access
    return {k: float(stored[k][-1]) for k in names if stored.get(k)}


def _strip(ids, mask=None) -> list[int]:
    ids = [int(x) for x in ids]
    if mask is not None:
        ids = [x for x, m in zip(ids, mask) if m]
    return ids


# ----------------------------------------------------------------------------------------------------------------------
# DPO / IPO


def dpo_reference(
    model_dir: str,
    tokenizer_dir: str,
    rows: Sequence[dict],
    *,
    adapter_dir: str | None = None,
    adapter_ref: str = "base",
    ref_model_dir: str | None = None,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    max_length: int | None = 1024,
    truncation_mode: str = "keep_start",
    seed: int = 0,
) -> dict[str, Any]:
    """One DPOTrainer step (TRL 1.16) on all `rows` as one batch. See the module docstring for the set-ups
    (adapter_ref only matters without ref_model_dir; with one, the adapter is trained from the file's weights and the
    reference is ref_model). max_length / truncation_mode are DPOConfig's (defaults 1024 / "keep_start").

    Returns (B = rows TRL kept, in order; numpy arrays float32 unless said):
      loss (float, TRL's batch loss = mean(per_example_loss)), per_example_loss [B] (TRL's `per_sequence_loss`),
      chosen_logps / rejected_logps [B] (policy: sum of completion-token log-probs),
      ref_chosen_logps / ref_rejected_logps [B], chosen_token_logps / rejected_token_logps /
      ref_chosen_token_logps / ref_rejected_token_logps (list of [T_i]: per completion token, in order),
      metrics {name: float} (DPO_METRICS, as TRL logs them for this one step),
      grads {name: [..]} , trainable (sorted names of every trainable tensor; grads may lack some only if unused),
      prompt_ids / chosen_ids / rejected_ids (list of list[int]: TRL's dataset tokenization, before truncation),
      chosen_input_ids / rejected_input_ids (list of list[int]: the collated sequences, truncated, unpadded),
      chosen_completion_mask / rejected_completion_mask (list of list[int], aligned with *_input_ids),
      rows (list[int]: indices into `rows` of the pairs TRL kept), pad_token_id, beta, loss_type, mode.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    if loss_type not in ("sigmoid", "ipo"):
        raise ValueError(f"loss_type {loss_type!r}: only 'sigmoid' and 'ipo' are covered")
    if adapter_ref not in ("base", "copy"):
        raise ValueError(f"adapter_ref {adapter_ref!r}: 'base' (fresh adapter) or 'copy' (continue an adapter)")
    tokenizer = _tokenizer(tokenizer_dir)
    with tempfile.TemporaryDirectory() as out, _quiet_offline():
        args = DPOConfig(
            **_common_args(out, len(rows), seed),
            loss_type=[loss_type],
            beta=beta,
            max_length=max_length,
            truncation_mode=truncation_mode,
        )
        ref_model = None
        if ref_model_dir is not None:
            ref_model = AutoModelForCausalLM.from_pretrained(ref_model_dir, dtype=torch.float32)
        model: Any = model_dir
        peft_config = None
        if adapter_dir is not None and adapter_ref == "copy" and ref_model is None:
            base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
            mode = "lora_continue"
        elif adapter_dir is not None:
            peft_config = _lora_config(adapter_dir)
            mode = "lora_fresh" if ref_model is None else "lora_ref_model"
        else:
            mode = "full" if ref_model is None else "full_ref_model"
        trainer = DPOTrainer(
            model=model,
            ref_model=ref_model,
            args=args,
            train_dataset=_dataset(rows),
            processing_class=tokenizer,
            peft_config=peft_config,
        )
        if peft_config is not None:
            _load_adapter_weights(trainer.model, adapter_dir)
        if mode == "lora_continue" and "ref" not in trainer.model.peft_config:
            raise AssertionError("TRL did not add its 'ref' adapter")
        features = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
        loss, seen, batch = _one_step(trainer, features, [DPOTrainer._compute_loss])  # pylint: disable=protected-access
        f = seen["_compute_loss"]
        grads = _grads(trainer.model)

    n = len(features)
    mask = f["shift_completion_mask"].bool()
    tok_pol = [f["per_token_logps"][i][mask[i]] for i in range(2 * n)]
    tok_ref = [f["ref_per_token_logps"][i][mask[i]] for i in range(2 * n)]
    ids, am, cm = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    return {
        "loss": loss,
        "per_example_loss": _np(f["per_sequence_loss"]),
        "chosen_logps": _np(f["chosen_logps"]),
        "rejected_logps": _np(f["rejected_logps"]),
        "ref_chosen_logps": _np(f["ref_chosen_logps"]),
        "ref_rejected_logps": _np(f["ref_rejected_logps"]),
        "chosen_token_logps": [_np(t) for t in tok_pol[:n]],
        "rejected_token_logps": [_np(t) for t in tok_pol[n:]],
        "ref_chosen_token_logps": [_np(t) for t in tok_ref[:n]],
        "ref_rejected_token_logps": [_np(t) for t in tok_ref[n:]],
        "metrics": _metrics(trainer, DPO_METRICS),
        "grads": grads,
        "trainable": _trainable_names(trainer.model),
        "prompt_ids": [list(x["prompt_ids"]) for x in features],
        "chosen_ids": [list(x["chosen_ids"]) for x in features],
        "rejected_ids": [list(x["rejected_ids"]) for x in features],
        "chosen_input_ids": [_strip(ids[i], am[i]) for i in range(n)],
        "rejected_input_ids": [_strip(ids[n + i], am[n + i]) for i in range(n)],
        "chosen_completion_mask": [_strip(cm[i], am[i]) for i in range(n)],
        "rejected_completion_mask": [_strip(cm[n + i], am[n + i]) for i in range(n)],
        "rows": [int(x["row"]) for x in features],
        "pad_token_id": int(tokenizer.pad_token_id),
        "beta": beta,
        "loss_type": loss_type,
        "mode": mode,
    }


# ----------------------------------------------------------------------------------------------------------------------
# ORPO


def orpo_reference(
    model_dir: str,
    tokenizer_dir: str,
    rows: Sequence[dict],
    *,
    adapter_dir: str | None = None,
    beta: float = 0.1,
    max_length: int | None = 1024,
    seed: int = 0,
) -> dict[str, Any]:
    """One experimental ORPOTrainer step (TRL 1.16) on all `rows` as one batch; `beta` is ORPO's lambda.

    Returns (B = len(rows); numpy float32):
      loss (float, TRL's batch loss = nll_loss + mean(or_loss)),
      nll_loss (float: cross-entropy token mean over every chosen-sequence token after the first, prompt included,
      over the whole batch: sum over all chosen tokens / their count, not a mean of per-row means),
      or_loss [B] (= -beta * logsigmoid(log_odds), TRL's `-losses`), log_odds [B],
      chosen_logps_avg / rejected_logps_avg [B] (TRL's per-token mean over answer tokens, used in the odds),
      chosen_logps / rejected_logps [B] (sums: TRL's get_batch_logps(average_log_prob=False) on the same logits),
      chosen_ntokens / rejected_ntokens [B] (int: answer tokens scored), metrics {ORPO_METRICS}, grads, trainable,
      chosen_input_ids / rejected_input_ids (list of list[int], prompt + answer as TRL built them, unpadded),
      chosen_labels_mask / rejected_labels_mask (list of list[int]: 1 on answer tokens, aligned with input ids),
      prompt_ids (list of list[int]: TRL's prompt for generation; min of chosen/rejected prompt lengths),
      rows, pad_token_id, beta, mode.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tokenizer = _tokenizer(tokenizer_dir)
    if tokenizer.pad_token is None:  # the ORPO collator needs one; DPO/reward trainers fall back to EOS themselves
        tokenizer.pad_token = tokenizer.eos_token
    with tempfile.TemporaryDirectory() as out, _quiet_offline():
        args = ORPOConfig(**_common_args(out, len(rows), seed), beta=beta, max_length=max_length)
        peft_config = _lora_config(adapter_dir) if adapter_dir is not None else None
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        trainer = ORPOTrainer(
            model=model, args=args, train_dataset=_dataset(rows), processing_class=tokenizer, peft_config=peft_config
        )
        if peft_config is not None:
            _load_adapter_weights(trainer.model, adapter_dir)
        features = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
        loss, seen, _ = _one_step(
            trainer,
            features,
            [ORPOTrainer.get_batch_loss_metrics, ORPOTrainer.concatenated_forward, ORPOTrainer.odds_ratio_loss],
        )
        grads = _grads(trainer.model)
        g, cf, od = seen["get_batch_loss_metrics"], seen["concatenated_forward"], seen["odds_ratio_loss"]
        labels = cf["concatenated_batch"]["concatenated_labels"]
        sums = trainer.get_batch_logps(cf["all_logits"].detach(), labels, average_log_prob=False)
        counts = (labels[:, 1:] != -100).sum(-1)

    n = len(features)
    return {
        "loss": loss,
        "nll_loss": float(g["policy_nll_loss"].item()),
        "or_loss": _np(-g["losses"]),
        "log_odds": _np(od["log_odds"]),
        "chosen_logps_avg": _np(g["policy_chosen_logps"]),
        "rejected_logps_avg": _np(g["policy_rejected_logps"]),
        "chosen_logps": _np(sums[:n]),
        "rejected_logps": _np(sums[n:]),
        "chosen_ntokens": [int(c) for c in counts[:n]],
        "rejected_ntokens": [int(c) for c in counts[n:]],
        "metrics": {k: float(v) for k, v in g["metrics"].items()},
        "grads": grads,
        "trainable": _trainable_names(trainer.model),
        "prompt_ids": [list(x["prompt_input_ids"]) for x in features],
        "chosen_input_ids": [list(x["chosen_input_ids"]) for x in features],
        "rejected_input_ids": [list(x["rejected_input_ids"]) for x in features],
        "chosen_labels_mask": [[int(t != -100) for t in x["chosen_labels"]] for x in features],
        "rejected_labels_mask": [[int(t != -100) for t in x["rejected_labels"]] for x in features],
        "rows": [int(x["row"]) for x in features],
        "pad_token_id": int(tokenizer.pad_token_id),
        "beta": beta,
        "mode": "lora_fresh" if adapter_dir else "full",
    }


# ----------------------------------------------------------------------------------------------------------------------
# reward model


def reward_reference(
    model_dir: str,
    tokenizer_dir: str,
    rows: Sequence[dict],
    *,
    adapter_dir: str | None = None,
    max_length: int | None = 1024,
    seed: int = 0,
) -> dict[str, Any]:
    """One RewardTrainer step (TRL 1.16) on all `rows` as one batch. The model is TRL's own load of the causal-LM
    folder as AutoModelForSequenceClassification(num_labels=1): the backbone from the folder, lm_head dropped, a new
    `score` Linear(D, 1, bias=False) drawn after set_seed(seed). With adapter_dir, the adapter's LoRA config becomes
    task_type SEQ_CLS (peft then trains `score` in full, as modules_to_save) and starts from the file's weights.

    Returns (B = rows TRL kept; numpy float32):
      loss (float) = mean(per_example_loss), per_example_loss [B] (= -logsigmoid(rc - rr), TRL's tensor before .mean()),
      chosen_scores / rejected_scores [B], score_weight [1, D] (HF layout: jaxllm's kernel is its transpose),
      score_positions_chosen / score_positions_rejected (list[int]: the token index HF read each score at),
      metrics {REWARD_METRICS}, grads (incl. 'score.weight' full / peft's key for the score copy), trainable,
      chosen_input_ids / rejected_input_ids (list of list[int]: TRL's tokenization of prompt+answer+EOS, unpadded),
      rows, pad_token_id, eos_token_id, mode.
    """
    import torch.nn.functional as F
    from trl import RewardConfig, RewardTrainer

    tokenizer = _tokenizer(tokenizer_dir)
    recorded: list = []
    original = F.logsigmoid

    def logsigmoid(x, *a, **k):
        y = original(x, *a, **k)
        recorded.append(y)
        return y

    with tempfile.TemporaryDirectory() as out, _quiet_offline():
        args = RewardConfig(**_common_args(out, len(rows), seed), max_length=max_length)
        peft_config = _lora_config(adapter_dir, task_type="SEQ_CLS") if adapter_dir is not None else None
        trainer = RewardTrainer(
            model=model_dir,
            args=args,
            train_dataset=_dataset(rows),
            processing_class=tokenizer,
            peft_config=peft_config,
        )
        if peft_config is not None:
            _load_adapter_weights(trainer.model, adapter_dir)
        core = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
        score_weight = _np(
            core.score.weight
            if not hasattr(core.score, "modules_to_save")
            else core.score.modules_to_save["default"].weight
        )
        features = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
        F.logsigmoid = logsigmoid
        try:
            loss, seen, batch = _one_step(trainer, features, [RewardTrainer.compute_loss, type(core).forward])
        finally:
            F.logsigmoid = original
        grads = _grads(trainer.model)
        if len(recorded) != 1:
            raise AssertionError(f"expected one logsigmoid call in RewardTrainer.compute_loss, saw {len(recorded)}")
        c = seen["compute_loss"]
        positions = seen["forward"]["last_non_pad_token"]

    n = len(features)
    return {
        "loss": loss,
        "per_example_loss": _np(-recorded[0]),
        "chosen_scores": _np(c["rewards_chosen"]),
        "rejected_scores": _np(c["rewards_rejected"]),
        "score_weight": score_weight,
        "score_positions_chosen": [int(p) for p in positions[:n]],
        "score_positions_rejected": [int(p) for p in positions[n:]],
        "metrics": _metrics(trainer, REWARD_METRICS),
        "grads": grads,
        "trainable": _trainable_names(trainer.model),
        "chosen_input_ids": [list(x["chosen_ids"]) for x in features],
        "rejected_input_ids": [list(x["rejected_ids"]) for x in features],
        "rows": [int(x["row"]) for x in features],
        "pad_token_id": int(tokenizer.pad_token_id),
        "eos_token_id": int(tokenizer.eos_token_id),
        "mode": "lora_fresh" if adapter_dir else "full",
    }
