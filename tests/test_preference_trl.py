"""jaxllm's preference objectives against TRL 1.16's own trainers (tests/trl_reference.py), float32 on CPU.

For tiny random Llama, Falcon and BLOOM folders and the same three rows, a jaxllm run is built the way
`jaxllm train` builds it (configs/common.py + overrides -> `train.start.parse` -> `program.build` ->
`loop._initial_state`, the first batch of `pipeline.make_train_iterator`), and its first step's loss and
gradients (`jax.value_and_grad(step.make_loss(...))`) are compared with one TRL training step on the same rows
as one batch: the token ids and answer masks, the batch loss, every per-pair value (policy and reference
log-probs, per-token log-probs, scores, ORPO's NLL and odds), the logged metrics, and the gradients of every
trainable tensor, mapped to PEFT's adapter names (`hf.peft.adapter_tensors`) or Hugging Face names
(`hf.weights.hf_tensors`: a tied lm_head is the embedding's gradient, as torch reports it).

Set-ups (TRL's naming):
  * DPO lora_ref_model: `lora.init_adapter` + `preference.model_ref` = the base folder (all three families);
  * DPO lora_continue: `lora.init_adapter` alone (the start adapter is the reference: loss log 2);
  * DPO full_ref_model: full fine-tuning with another model as `preference.model_ref` (tied Falcon);
  * IPO lora_ref_model (BLOOM); ORPO with an adapter (all three families);
  * reward model with an adapter (all three families): TRL's LoRA weights from the CAUSAL_LM adapter file and a
    freshly drawn score head; jaxllm's `lora.init_adapter` is that adapter as a SEQ_CLS one holding TRL's head.
    Continuing the CAUSAL_LM adapter itself (an SFT adapter; the run draws the head) is checked too.
Tolerances: float32 on both sides; rtol 1e-5 on every value, and for gradients an absolute 1e-5 x the tensor's
largest element (near-zero elements of a tensor carry its rounding, about 3e-6 of its scale at most here).
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("trl")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxllm import sharding as shd  # noqa: E402
from jaxllm.config import load_config  # noqa: E402
from jaxllm.data.pipeline import make_train_iterator, tokenizer_for  # noqa: E402
from jaxllm.hf.peft import adapter_tensors  # noqa: E402
from jaxllm.hf.weights import hf_tensors  # noqa: E402
from jaxllm.train import loop  # noqa: E402
from jaxllm.train import preference as pref  # noqa: E402
from jaxllm.train import program as prog  # noqa: E402
from jaxllm.train import step as st  # noqa: E402
from jaxllm.train.checkpoint import Checkpointer  # noqa: E402
from jaxllm.train.start import load_frozen, parse  # noqa: E402
from jaxllm.tree import union  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import trl_reference as R  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = list(R.SAMPLE_ROWS)
FAMILIES = ("llama", "falcon", "bloom")
# The tokenizer of each family: Llama's adds BOS itself (TRL's DPO / reward keep it: data.add_bos=True); the
# others add nothing (data.add_bos=False). Both have a pad distinct from EOS, so a reward model's score is read
# at the EOS, where jaxllm reads it (a sequence's last token).
TOKENIZER = {"llama": "bos", "falcon": "plain", "bloom": "plain"}
BLOCK = 32  # >= 2 x the longest sequence (8 tokens): no pair is truncated
RTOL = 1e-5
GRAD_ATOL = 1e-5  # x the tensor's largest gradient


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The rows file and, per family, a model, its tokenizer and a LoRA adapter (B != 0); one other model."""
    root = tmp_path_factory.mktemp("trl_parity")
    rows = root / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out: dict[str, Any] = {"rows": str(rows), "root": root}
    for kind in set(TOKENIZER.values()):
        out[f"tok_{kind}"] = R.make_tokenizer(root / f"tok_{kind}", kind)
    for family in FAMILIES:
        model = R.make_model(root / family, family, seed=0)
        out[family] = dict(
            model=model,
            tok=out[f"tok_{TOKENIZER[family]}"],
            adapter=R.make_adapter(root / f"{family}_adapter", model, family),
        )
    out["falcon"]["other"] = R.make_model(root / "falcon_other", "falcon", seed=1)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# the jaxllm side


def _config(
    folders,
    family: str,
    objective: str,
    *,
    add_bos: bool,
    adapter: bool = True,
    model_ref: str = "",
    loss_type: str = "sigmoid",
    beta: float = 0.1,
):
    f = folders[family]
    cfg = load_config(os.path.join(ROOT, "configs", "common.py"))
    cfg.seed = 0
    cfg.checkpoint.init_from = f["model"]
    cfg.checkpoint.model_from_init = True
    cfg.checkpoint.resume = False
    cfg.data.update(
        source="jsonl",
        paths=(folders["rows"],),
        valid_paths=(folders["rows"],),
        tokenizer=f["tok"],
        format="preference",
        batch_size=len(ROWS),
        block_size=BLOCK,
        packing=False,
        shuffle=False,
        add_bos=add_bos,
        add_eos=True,
    )
    cfg.model.dtype = "float32"
    cfg.model.param_dtype = "float32"
    cfg.train.objective = objective
    cfg.preference.update(loss_type=loss_type, beta=beta, model_ref=model_ref)
    cfg.mesh.update(data=1, fsdp=1, tensor=1)
    if adapter:
        cfg.lora.update(r=4, alpha=8.0, dropout=0.0, target_modules=R.LORA_TARGETS[family], init_adapter=f["adapter"])
    return cfg


def _initial_state(run, program, workdir: str, train_iter):
    """(state, frozen, ref) as `jaxllm train` starts them: `load_frozen`, then the loop's `_initial_state`."""
    frozen, saved = load_frozen(run, program.mesh, program.trainable) if program.trainable is not None else ({}, {})
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), run.checkpoint)
    try:
        state, ref = loop._initial_state(run, program, ckpt, train_iter, frozen, saved)  # pylint: disable=W0212
    finally:
        ckpt.close()
    return state, frozen, ref


def jaxllm_step(cfg, workdir: str, score_weight: np.ndarray | None = None) -> dict[str, Any]:
    """The run's first global batch, its loss, metric sums and gradients at the starting params, and per-pair
    values recomputed with the objective's own functions (rows in batch order, one pair per row)."""
    run = parse(cfg)
    mesh = shd.make_mesh(run.mesh, jax.devices()[:1])
    program = prog.build(run, mesh)
    train_iter = make_train_iterator(run.data, tokenizer_for(run.data))
    try:
        state, frozen, ref = _initial_state(run, program, workdir, train_iter)
        host_batch = {k: np.asarray(v) for k, v in next(train_iter).items()}
    finally:
        if hasattr(train_iter, "close"):
            train_iter.close()
    params = state.params
    if score_weight is not None:  # TRL's freshly drawn score head (HF layout [1, D]) -> jaxllm's kernel [D, 1]
        assert params["score"]["kernel"].shape == score_weight.T.shape
        params = {**params, "score": {**params["score"], "kernel": jnp.asarray(score_weight.T)}}
    batch = shd.global_batch(host_batch, mesh)
    cfg_step = program.step_cfg
    n = st._counts(cfg_step, batch)  # pylint: disable=protected-access
    with shd.activate(mesh):
        grad_fn = jax.jit(jax.value_and_grad(st.make_loss(program.model, cfg_step), has_aux=True))
        (loss, sums), grads = grad_fn(params, frozen, ref, batch, n, None)
        full = union(params, frozen)
        out: dict[str, Any] = {}
        if run.train.objective == "reward":
            out["scores"] = pref.pairs(pref.scores(program.model, full, batch))
        else:
            logps_BL = pref.target_logps(program.model, full, batch)
            policy_BS, tokens_BS = pref.answer_logps(logps_BL, batch)
            out.update(token_logps=logps_BL, policy=pref.pairs(policy_BS), tokens=pref.pairs(tokens_BS))
            if run.train.objective == "dpo":
                ref_BS = pref.reference_logps(program.reference, program.model, ref, frozen, batch, cfg_step.loss_chunk)
                out["reference"] = pref.pairs(ref_BS)
    out = jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(out))
    for k in ("scores", "policy", "tokens", "reference"):  # [B, P] -> [B]: each row's one pair
        if k in out:
            assert all(np.all(x[:, 1:] == 0) for x in out[k]), f"{k}: a row holds more than one pair"
            out[k] = tuple(x[:, 0] for x in out[k])
    metrics = {k: float(v) for k, v in jax.device_get(pref.finish(sums, n)).items()}
    if program.trainable is not None:
        named = adapter_tensors(grads, run.model, run.lora)
    else:
        named = dict(hf_tensors(run.model, grads, np.float32))
    return dict(run=run, program=program, batch=host_batch, loss=float(loss), metrics=metrics, grads=named, **out)


# ----------------------------------------------------------------------------------------------------------------------
# comparisons


def sequences(batch: dict[str, np.ndarray]) -> list[dict[str, list[list[int]]]]:
    """Per row: the ids of each sequence (by segment, in order) and its answer mask over input positions (token t
    is an answer token where target t - 1 of the same sequence has loss weight 1)."""
    out = []
    for inputs, seg, w in zip(batch["inputs"], batch["segment_ids"], batch["loss_weights"]):
        ids, masks = [], []
        for s in range(1, int(seg.max()) + 1):
            idx = np.flatnonzero(seg == s)
            assert np.all(np.diff(idx) == 1), "a sequence is not contiguous"
            ids.append([int(t) for t in inputs[idx]])
            masks.append([0] + [int(w[i]) for i in idx[:-1]])
            assert w[idx[-1]] == 0, "a sequence's last input predicts across sequences"
        out.append(dict(ids=ids, masks=masks))
    return out


def check_tokens(ours: dict, chosen_ids, rejected_ids, chosen_mask=None, rejected_mask=None) -> None:
    seqs = sequences(ours["batch"])
    assert len(seqs) == len(chosen_ids) == len(ROWS)
    for i, row in enumerate(seqs):
        assert len(row["ids"]) == 2, f"row {i}: {len(row['ids'])} sequences"
        assert row["ids"] == [list(chosen_ids[i]), list(rejected_ids[i])], f"row {i} token ids"
        if chosen_mask is not None:
            assert row["masks"] == [list(chosen_mask[i]), list(rejected_mask[i])], f"row {i} answer masks"


def close(ours, theirs, what: str, rtol: float = RTOL, atol: float = 0.0) -> None:
    np.testing.assert_allclose(
        np.asarray(ours, np.float64), np.asarray(theirs, np.float64), rtol=rtol, atol=atol, err_msg=what
    )


def check_grads(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray], what: str) -> None:
    assert sorted(ours) == sorted(theirs), f"{what}: gradient names differ"
    for k, want in theirs.items():
        assert ours[k].shape == want.shape, f"{what}: {k} shape {ours[k].shape} != {want.shape}"
        # float32 sums of many terms: an element's error scales with its tensor's size, not its own (observed
        # max|ours - TRL| <= 3e-6 x max|TRL| per tensor), so near-zero elements get an absolute tolerance
        close(ours[k], want, f"{what}: {k}", atol=GRAD_ATOL * float(np.abs(want).max()))
        assert np.abs(want).max() > 0, f"{what}: {k} has no gradient in TRL"


def check_metrics(ours: dict[str, float], theirs: dict[str, float], names: dict[str, str], what: str) -> None:
    for mine, trl_name in names.items():
        close(ours[mine], theirs[trl_name], f"{what}: metric {mine} (TRL {trl_name})", atol=1e-6)


DPO_NAMES = {
    k: k
    for k in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    )
}


def check_dpo(ours: dict, theirs: dict, what: str) -> None:
    assert theirs["rows"] == list(range(len(ROWS)))  # TRL's row order is the file's (so is jaxllm's unshuffled)
    check_tokens(
        ours,
        theirs["chosen_input_ids"],
        theirs["rejected_input_ids"],
        theirs["chosen_completion_mask"],
        theirs["rejected_completion_mask"],
    )
    (pc, pr), (rc, rr), (nc, nr) = ours["policy"], ours["reference"], ours["tokens"]
    close(pc, theirs["chosen_logps"], f"{what}: policy chosen log-probs")
    close(pr, theirs["rejected_logps"], f"{what}: policy rejected log-probs")
    close(rc, theirs["ref_chosen_logps"], f"{what}: reference chosen log-probs")
    close(rr, theirs["ref_rejected_logps"], f"{what}: reference rejected log-probs")
    close(nc, [len(t) for t in theirs["chosen_token_logps"]], f"{what}: chosen answer tokens")
    close(nr, [len(t) for t in theirs["rejected_token_logps"]], f"{what}: rejected answer tokens")
    # per token: jaxllm's log-prob of every answer target, in order, is TRL's
    lw = ours["batch"]["loss_weights"]
    for i in range(len(ROWS)):
        for s, key in ((1, "chosen_token_logps"), (2, "rejected_token_logps")):
            picked = ours["token_logps"][i][(ours["batch"]["segment_ids"][i] == s) & (lw[i] > 0)]
            close(picked, theirs[key][i], f"{what}: row {i} {key}", atol=1e-6)
    beta = theirs["beta"]
    if theirs["loss_type"] == "ipo":
        delta = (pc - rc) / nc - (pr - rr) / nr
        per_pair = (delta - 1 / (2 * beta)) ** 2
    else:
        per_pair = np.log1p(np.exp(-beta * ((pc - rc) - (pr - rr))))
    close(per_pair, theirs["per_example_loss"], f"{what}: per-pair loss", atol=1e-7)
    close(ours["loss"], theirs["loss"], f"{what}: batch loss")
    close(ours["metrics"]["loss"], theirs["loss"], f"{what}: logged loss")
    assert ours["metrics"]["pairs"] == len(ROWS)
    names = dict(DPO_NAMES)
    ties = (pc == rc) & (pr == rr)  # the policy is the reference (TRL: both log-ratios exactly 0)
    if np.any(ties):
        # In jaxllm's one jitted program the differentiated policy forward and the reference forward are compiled
        # apart and differ in the last float32 bits, so the log-ratios inside the loss are ~1e-7, not 0, and
        # rewards/accuracies ("chosen > rejected", strict) of tied pairs is rounding noise where TRL logs 0.
        assert np.all(ties), "some pairs tied, some not"
        names.pop("rewards/accuracies")
        for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert abs(ours["metrics"][k]) < 1e-6 and theirs["metrics"][k] == 0, k
    check_metrics(ours["metrics"], theirs["metrics"], names, what)
    check_grads(ours["grads"], theirs["grads"], what)


# ----------------------------------------------------------------------------------------------------------------------
# DPO / IPO


@pytest.mark.parametrize("family", FAMILIES)
def test_dpo_adapter_with_the_base_as_model_ref(folders, family, tmp_path):
    """TRL lora_ref_model: the trained adapter starts from the file, the reference is the base folder."""
    f = folders[family]
    cfg = _config(folders, family, "dpo", add_bos=TOKENIZER[family] == "bos", model_ref=f["model"])
    ours = jaxllm_step(cfg, str(tmp_path))
    assert ours["program"].reference.kind == "model"
    theirs = R.dpo_reference(f["model"], f["tok"], ROWS, adapter_dir=f["adapter"], ref_model_dir=f["model"])
    assert theirs["mode"] == "lora_ref_model"
    assert not np.allclose(theirs["chosen_logps"], theirs["ref_chosen_logps"])  # the adapter moves the policy
    check_dpo(ours, theirs, f"DPO {family} lora_ref_model")


def test_dpo_continuing_an_adapter(folders, tmp_path):
    """TRL lora_continue (a PeftModel passed as the model: its start adapter, frozen, is the reference); jaxllm:
    lora.init_adapter without model_ref. Loss log 2 on the first step, gradients equal."""
    f = folders["llama"]
    ours = jaxllm_step(_config(folders, "llama", "dpo", add_bos=True), str(tmp_path))
    assert ours["program"].reference.kind == "start"
    theirs = R.dpo_reference(f["model"], f["tok"], ROWS, adapter_dir=f["adapter"], adapter_ref="copy")
    assert theirs["mode"] == "lora_continue"
    assert ours["loss"] == pytest.approx(math.log(2), rel=1e-6)
    np.testing.assert_array_equal(ours["policy"][0], ours["reference"][0])
    check_dpo(ours, theirs, "DPO llama lora_continue")


def test_dpo_full_fine_tuning_with_a_reference_model(folders, tmp_path):
    """TRL full_ref_model on Falcon (tied embeddings: torch reports lm_head's gradient under the embedding's
    name, jaxllm has the one embedding matrix)."""
    f = folders["falcon"]
    cfg = _config(folders, "falcon", "dpo", add_bos=False, adapter=False, model_ref=f["other"])
    ours = jaxllm_step(cfg, str(tmp_path))
    assert ours["program"].trainable is None and ours["program"].reference.kind == "model"
    assert ours["run"].model.tie_embeddings
    theirs = R.dpo_reference(f["model"], f["tok"], ROWS, ref_model_dir=f["other"])
    assert theirs["mode"] == "full_ref_model"
    assert "lm_head.weight" not in theirs["grads"] and "lm_head.weight" not in ours["grads"]
    check_dpo(ours, theirs, "DPO falcon full_ref_model")


def test_ipo(folders, tmp_path):
    f = folders["bloom"]
    cfg = _config(folders, "bloom", "dpo", add_bos=False, model_ref=f["model"], loss_type="ipo", beta=0.5)
    ours = jaxllm_step(cfg, str(tmp_path))
    theirs = R.dpo_reference(
        f["model"], f["tok"], ROWS, adapter_dir=f["adapter"], ref_model_dir=f["model"], loss_type="ipo", beta=0.5
    )
    assert (np.asarray(ours["tokens"][0]) != np.asarray(ours["tokens"][1])).any()  # length normalisation matters
    check_dpo(ours, theirs, "IPO bloom lora_ref_model")


# ----------------------------------------------------------------------------------------------------------------------
# ORPO


@pytest.mark.parametrize("family", FAMILIES)
def test_orpo_adapter(folders, family, tmp_path):
    """TRL's experimental ORPOTrainer always prepends BOS (the tokenizer's own specials unused): data.add_bos=True."""
    f = folders[family]
    lam = 0.25
    ours = jaxllm_step(_config(folders, family, "orpo", add_bos=True, beta=lam), str(tmp_path))
    theirs = R.orpo_reference(f["model"], f["tok"], ROWS, adapter_dir=f["adapter"], beta=lam)
    what = f"ORPO {family}"
    assert theirs["rows"] == list(range(len(ROWS)))
    check_tokens(
        ours,
        theirs["chosen_input_ids"],
        theirs["rejected_input_ids"],
        theirs["chosen_labels_mask"],
        theirs["rejected_labels_mask"],
    )
    (pc, pr), (nc, nr) = ours["policy"], ours["tokens"]
    close(nc, theirs["chosen_ntokens"], f"{what}: chosen answer tokens")
    close(nr, theirs["rejected_ntokens"], f"{what}: rejected answer tokens")
    close(pc, theirs["chosen_logps"], f"{what}: chosen log-prob sums")
    close(pr, theirs["rejected_logps"], f"{what}: rejected log-prob sums")
    close(pc / nc, theirs["chosen_logps_avg"], f"{what}: chosen mean log-probs")
    close(pr / nr, theirs["rejected_logps_avg"], f"{what}: rejected mean log-probs")
    a, b = pc / nc, pr / nr
    log_odds = (a - b) - (np.log1p(-np.exp(a)) - np.log1p(-np.exp(b)))
    close(log_odds, theirs["log_odds"], f"{what}: log odds", atol=1e-6)
    close(lam * np.log1p(np.exp(-log_odds)), theirs["or_loss"], f"{what}: odds-ratio loss", atol=1e-7)
    m = ours["metrics"]
    close(m["nll_loss"], theirs["nll_loss"], f"{what}: NLL (prompt tokens included, token mean over the batch)")
    close(ours["loss"], theirs["loss"], f"{what}: batch loss")
    close(m["loss"], theirs["loss"], f"{what}: logged loss")
    check_metrics(
        m,
        theirs["metrics"],
        {k: k for k in R.ORPO_METRICS if k not in ("logits/chosen", "logits/rejected") and k in theirs["metrics"]},
        what,
    )
    check_grads(ours["grads"], theirs["grads"], what)


# ----------------------------------------------------------------------------------------------------------------------
# reward model


def seq_cls_adapter(folder, adapter_dir: str, score_weight: np.ndarray) -> str:
    """`adapter_dir` (a CAUSAL_LM LoRA adapter) as the SEQ_CLS adapter PEFT saves for a score model: the same LoRA
    tensors, task_type SEQ_CLS, and the score head `score_weight` [1, D] saved in full."""
    from safetensors.numpy import load_file, save_file

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(adapter_dir, "adapter_config.json")) as fh:
        config = json.load(fh)
    config.update(task_type="SEQ_CLS", modules_to_save=["classifier", "score"])
    with open(os.path.join(folder, "adapter_config.json"), "w") as fh:
        json.dump(config, fh)
    tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    tensors["base_model.model.score.weight"] = np.ascontiguousarray(score_weight, np.float32)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    return str(folder)


def check_reward(folders, family: str, cfg, theirs: dict, workdir: str, score_weight=None) -> None:
    ours = jaxllm_step(cfg, workdir, score_weight=score_weight)
    what = f"reward {family}"
    assert ours["run"].model.num_labels == 1
    assert theirs["rows"] == list(range(len(ROWS)))
    check_tokens(ours, theirs["chosen_input_ids"], theirs["rejected_input_ids"])
    for ids, pos in zip(
        theirs["chosen_input_ids"] + theirs["rejected_input_ids"],
        theirs["score_positions_chosen"] + theirs["score_positions_rejected"],
    ):
        assert pos == len(ids) - 1 and ids[pos] == theirs["eos_token_id"]  # TRL scores the last token, as jaxllm
    sc, sr = ours["scores"]
    close(sc, theirs["chosen_scores"], f"{what}: chosen scores", atol=1e-6)
    close(sr, theirs["rejected_scores"], f"{what}: rejected scores", atol=1e-6)
    close(np.log1p(np.exp(-(sc - sr))), theirs["per_example_loss"], f"{what}: per-pair loss", atol=1e-7)
    close(ours["loss"], theirs["loss"], f"{what}: batch loss")
    close(ours["metrics"]["loss"], theirs["loss"], f"{what}: logged loss")
    check_metrics(
        ours["metrics"], theirs["metrics"], {"rewards/accuracies": "accuracy", "rewards/margins": "margin"}, what
    )
    close(
        ours["metrics"]["rewards/chosen"],
        float(np.mean(theirs["chosen_scores"])),
        f"{what}: mean chosen score",
        atol=1e-6,
    )
    assert "base_model.model.score.weight" in theirs["grads"]
    check_grads(ours["grads"], theirs["grads"], what)


@pytest.mark.parametrize("family", FAMILIES)
def test_reward_adapter(folders, family, tmp_path):
    """TRL's RewardTrainer on AutoModelForSequenceClassification: the adapter file's LoRA weights, a fresh score head
    (trained in full, as jaxllm's `score`). jaxllm continues the same start: the adapter as PEFT saves it for a score
    model (SEQ_CLS, with TRL's drawn head in it)."""
    f = folders[family]
    theirs = R.reward_reference(f["model"], f["tok"], ROWS, adapter_dir=f["adapter"])
    adapter = seq_cls_adapter(tmp_path / "seq_cls_adapter", f["adapter"], theirs["score_weight"])
    cfg = _config(folders, family, "reward", add_bos=TOKENIZER[family] == "bos")
    cfg.lora.init_adapter = adapter
    check_reward(folders, family, cfg, theirs, str(tmp_path / "work"))


def test_reward_run_continues_a_causal_lm_adapter(folders, tmp_path):
    """A reward model started from an SFT (CAUSAL_LM) adapter, as TRL's set-up: the LoRA weights from the file, the
    score head fresh (TRL's drawn head copied into jaxllm's before comparing)."""
    f = folders["llama"]
    theirs = R.reward_reference(f["model"], f["tok"], ROWS, adapter_dir=f["adapter"])
    cfg = _config(folders, "llama", "reward", add_bos=True)
    check_reward(folders, "llama", cfg, theirs, str(tmp_path), score_weight=theirs["score_weight"])
