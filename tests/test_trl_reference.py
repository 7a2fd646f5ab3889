"""Self-test of tests/trl_reference.py: TRL 1.16's DPO / IPO / ORPO / reward trainers on tiny Llama, Falcon and
BLOOM folders. Checks that the per-example values the helper reads out of TRL add up to TRL's batch loss, that the
policy / reference log-probs, scores and gradients are those of the models the helper says (an independent plain
torch forward and backward), and pins the tokenization and truncation conventions the jaxllm side must follow."""

import math
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("trl")

sys.path.insert(0, os.path.dirname(__file__))
import trl_reference as R  # noqa: E402

ROWS = list(R.SAMPLE_ROWS)
TOKENIZER = {"llama": "bos", "falcon": "plain", "bloom": "nopad"}  # one tokenizer convention per architecture


@pytest.fixture(scope="module", params=["llama"])  # the helper's logic is the architecture's; the parity tests
# (test_preference_trl.py) run TRL on Llama, Falcon and BLOOM
def setup(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    model = R.make_model(root / "model", arch, seed=0)
    return dict(
        arch=arch,
        model=model,
        ref=R.make_model(root / "ref", arch, seed=1),
        tok=R.make_tokenizer(root / "tok", TOKENIZER[arch]),
        adapter=R.make_adapter(root / "adapter", model, arch),
    )


# ----------------------------------------------------------------------------------------------------------------------
# independent plain-torch computations (checks on the helper, not on TRL)


def _causal(folder, adapter=None):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter, is_trainable=True)
    return model.eval()


def _token_logps(model, ids):
    """log p(ids[t] | ids[:t]) for t >= 1, one unpadded sequence."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def _seq_logps(model, ids, mask):
    """Sum of log-probs of the tokens with mask[t] = 1 (t >= 1)."""
    return (_token_logps(model, ids) * torch.tensor(mask[1:], dtype=torch.float32)).sum()


def _assert_grads(ours, theirs, what):
    assert sorted(ours) == sorted(theirs), what
    for k in ours:
        np.testing.assert_allclose(ours[k], theirs[k], rtol=2e-3, atol=2e-6, err_msg=f"{what}: {k}")


def _peft_grads(model):
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.numpy() for k, v in peft.get_peft_model_state_dict(model, state_dict=grads).items()}


def _check_dpo_tokens(ref, tok_dir):
    """TRL's DPO tokenization: tok(prompt) and tok(prompt + answer + eos_token text), both with the tokenizer's own
    special tokens; the prompt is their common prefix."""
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    for i, row in enumerate(ROWS):
        p = tok(row["prompt"])["input_ids"]
        pc = tok(row["prompt"] + row["chosen"] + tok.eos_token)["input_ids"]
        pr = tok(row["prompt"] + row["rejected"] + tok.eos_token)["input_ids"]
        assert ref["prompt_ids"][i] == p and p + ref["chosen_ids"][i] == pc and p + ref["rejected_ids"][i] == pr
        assert ref["chosen_ids"][i][-1] == ref["rejected_ids"][i][-1] == tok.eos_token_id
        assert ref["chosen_input_ids"][i] == pc and ref["rejected_input_ids"][i] == pr
        assert ref["chosen_completion_mask"][i] == [0] * len(p) + [1] * (len(pc) - len(p))


# ----------------------------------------------------------------------------------------------------------------------
# DPO


def test_dpo_fresh_adapter_matches_an_independent_forward_and_backward(setup):
    beta = 0.3
    ref = R.dpo_reference(setup["model"], setup["tok"], ROWS, adapter_dir=setup["adapter"], beta=beta)
    assert ref["mode"] == "lora_fresh" and ref["rows"] == [0, 1, 2]
    _check_dpo_tokens(ref, setup["tok"])
    if setup["arch"] == "llama":
        assert all(p[0] == 1 for p in ref["prompt_ids"])  # the tokenizer's BOS
    else:
        assert all(p[0] != 1 for p in ref["prompt_ids"])  # DPO adds no BOS of its own

    delta = (ref["chosen_logps"] - ref["ref_chosen_logps"]) - (ref["rejected_logps"] - ref["ref_rejected_logps"])
    expect = -np.log(1 / (1 + np.exp(-beta * delta)))
    np.testing.assert_allclose(ref["per_example_loss"], expect, rtol=1e-5)
    assert ref["loss"] == pytest.approx(float(ref["per_example_loss"].mean()), rel=1e-6)
    assert not np.allclose(ref["chosen_logps"], ref["ref_chosen_logps"])  # B != 0: policy != reference
    np.testing.assert_allclose([t.sum() for t in ref["chosen_token_logps"]], ref["chosen_logps"], rtol=1e-5)
    m = ref["metrics"]
    assert m["rewards/chosen"] == pytest.approx(
        beta * float((ref["chosen_logps"] - ref["ref_chosen_logps"]).mean()), rel=1e-4
    )
    assert m["rewards/margins"] == pytest.approx(beta * float(delta.mean()), rel=1e-4, abs=1e-6)
    assert m["logps/rejected"] == pytest.approx(float(ref["rejected_logps"].mean()), rel=1e-5)

    # Policy = base + the adapter file, reference = base; the gradient is that of TRL's batch loss.
    policy, base = _causal(setup["model"], setup["adapter"]), _causal(setup["model"])
    losses = []
    for i in range(len(ROWS)):
        c = [ref["chosen_input_ids"][i], ref["chosen_completion_mask"][i]]
        r = [ref["rejected_input_ids"][i], ref["rejected_completion_mask"][i]]
        pc, pr = _seq_logps(policy, *c), _seq_logps(policy, *r)
        with torch.no_grad():
            rc, rr = _seq_logps(base, *c), _seq_logps(base, *r)
        np.testing.assert_allclose(
            [pc.item(), pr.item(), rc.item(), rr.item()],
            [
                ref["chosen_logps"][i],
                ref["rejected_logps"][i],
                ref["ref_chosen_logps"][i],
                ref["ref_rejected_logps"][i],
            ],
            rtol=1e-4,
        )
        losses.append(-torch.nn.functional.logsigmoid(beta * ((pc - rc) - (pr - rr))))
    torch.stack(losses).mean().backward()
    theirs = _peft_grads(policy)
    assert sorted(theirs) == sorted(R._adapter_state(setup["adapter"])) == ref["trainable"]
    _assert_grads(ref["grads"], theirs, "DPO LoRA gradients")
    assert all(np.abs(g).max() > 0 for g in ref["grads"].values())


def test_dpo_continuing_an_adapter_uses_trls_ref_copy(setup):
    fresh = R.dpo_reference(setup["model"], setup["tok"], ROWS, adapter_dir=setup["adapter"])
    cont = R.dpo_reference(setup["model"], setup["tok"], ROWS, adapter_dir=setup["adapter"], adapter_ref="copy")
    assert cont["mode"] == "lora_continue"
    np.testing.assert_allclose(cont["chosen_logps"], fresh["chosen_logps"], rtol=1e-5)
    np.testing.assert_array_equal(cont["ref_chosen_logps"], cont["chosen_logps"])  # the ref adapter = start adapter
    np.testing.assert_array_equal(cont["ref_rejected_logps"], cont["rejected_logps"])
    np.testing.assert_allclose(cont["per_example_loss"], math.log(2), rtol=1e-6)
    assert cont["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert sorted(cont["grads"]) == cont["trainable"] == fresh["trainable"]  # no ".ref." tensors
    assert all(np.abs(g).max() > 0 for g in cont["grads"].values())


def test_dpo_with_a_reference_model_and_full_fine_tuning(setup):
    with_ref = R.dpo_reference(
        setup["model"], setup["tok"], ROWS, adapter_dir=setup["adapter"], ref_model_dir=setup["ref"]
    )
    assert with_ref["mode"] == "lora_ref_model"
    other = _causal(setup["ref"])
    with torch.no_grad():
        rc = [
            _seq_logps(other, ids, m).item()
            for ids, m in zip(with_ref["chosen_input_ids"], with_ref["chosen_completion_mask"])
        ]
    np.testing.assert_allclose(with_ref["ref_chosen_logps"], rc, rtol=1e-4)
    assert with_ref["loss"] == pytest.approx(float(with_ref["per_example_loss"].mean()), rel=1e-6)

    full = R.dpo_reference(setup["model"], setup["tok"], ROWS)
    assert full["mode"] == "full"
    np.testing.assert_array_equal(full["ref_chosen_logps"], full["chosen_logps"])  # a frozen copy of the model
    assert full["loss"] == pytest.approx(math.log(2), rel=1e-6)
    model = _causal(setup["model"])
    assert sorted(full["grads"]) == full["trainable"] == sorted(n for n, _ in model.named_parameters())
    losses = []
    for i in range(len(ROWS)):
        pc = _seq_logps(model, full["chosen_input_ids"][i], full["chosen_completion_mask"][i])
        pr = _seq_logps(model, full["rejected_input_ids"][i], full["rejected_completion_mask"][i])
        losses.append(-torch.nn.functional.logsigmoid(0.1 * ((pc - pc.detach()) - (pr - pr.detach()))))
    torch.stack(losses).mean().backward()
    _assert_grads(full["grads"], {n: p.grad.numpy() for n, p in model.named_parameters()}, "DPO full gradients")

    full_ref = R.dpo_reference(setup["model"], setup["tok"], ROWS, ref_model_dir=setup["ref"])
    assert full_ref["mode"] == "full_ref_model"
    np.testing.assert_allclose(full_ref["ref_chosen_logps"], with_ref["ref_chosen_logps"], rtol=1e-5)


def test_ipo_is_length_normalised(setup):
    beta = 0.5
    ref = R.dpo_reference(setup["model"], setup["tok"], ROWS, adapter_dir=setup["adapter"], loss_type="ipo", beta=beta)
    nc = np.array([sum(m) for m in ref["chosen_completion_mask"]], np.float32)
    nr = np.array([sum(m) for m in ref["rejected_completion_mask"]], np.float32)
    assert (nc != nr).any()  # the normalisation matters for these rows
    d = (ref["chosen_logps"] - ref["ref_chosen_logps"]) / nc - (ref["rejected_logps"] - ref["ref_rejected_logps"]) / nr
    np.testing.assert_allclose(ref["per_example_loss"], (d - 1 / (2 * beta)) ** 2, rtol=1e-5)
    assert ref["loss"] == pytest.approx(float(ref["per_example_loss"].mean()), rel=1e-6)
    assert all(np.abs(g).max() > 0 for g in ref["grads"].values())


# ----------------------------------------------------------------------------------------------------------------------
# ORPO


def test_orpo(setup):
    lam = 0.25
    ref = R.orpo_reference(setup["model"], setup["tok"], ROWS, adapter_dir=setup["adapter"], beta=lam)
    tok = transformers.AutoTokenizer.from_pretrained(setup["tok"])
    for i, row in enumerate(ROWS):  # ORPO: BOS always prepended (once), EOS id appended, no special tokens from tok
        p = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        c = tok(row["prompt"] + row["chosen"], add_special_tokens=False)["input_ids"]
        assert ref["chosen_input_ids"][i] == [tok.bos_token_id] + c + [tok.eos_token_id]
        assert ref["chosen_labels_mask"][i] == [0] * (len(p) + 1) + [1] * (len(c) - len(p) + 1)
    n_c = np.array(ref["chosen_ntokens"], np.float32)
    np.testing.assert_allclose(ref["chosen_logps_avg"], ref["chosen_logps"] / n_c, rtol=1e-5)
    a, b = ref["chosen_logps_avg"].astype(np.float64), ref["rejected_logps_avg"].astype(np.float64)
    log_odds = (a - b) - (np.log1p(-np.exp(a)) - np.log1p(-np.exp(b)))
    np.testing.assert_allclose(ref["log_odds"], log_odds, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ref["or_loss"], lam * np.log1p(np.exp(-log_odds)), rtol=1e-4)
    assert ref["loss"] == pytest.approx(ref["nll_loss"] + float(ref["or_loss"].mean()), rel=1e-6)
    assert ref["metrics"]["nll_loss"] == pytest.approx(ref["nll_loss"], rel=1e-6)
    assert ref["metrics"]["rewards/chosen"] == pytest.approx(lam * float(a.mean()), rel=1e-5)

    policy = _causal(setup["model"], setup["adapter"])
    nll = [-_token_logps(policy, ids) for ids in ref["chosen_input_ids"]]  # every token after the first, prompt too
    total = torch.cat(nll).mean()
    assert total.item() == pytest.approx(ref["nll_loss"], rel=1e-4)
    sums = [_seq_logps(policy, ids, m) for ids, m in zip(ref["chosen_input_ids"], ref["chosen_labels_mask"])]
    np.testing.assert_allclose([s.item() for s in sums], ref["chosen_logps"], rtol=1e-4)
    rsums = [_seq_logps(policy, ids, m) for ids, m in zip(ref["rejected_input_ids"], ref["rejected_labels_mask"])]
    ca = torch.stack(sums) / torch.tensor(n_c)
    ra = torch.stack(rsums) / torch.tensor(ref["rejected_ntokens"], dtype=torch.float32)
    lo = (ca - ra) - (torch.log1p(-torch.exp(ca)) - torch.log1p(-torch.exp(ra)))
    (total - lam * torch.nn.functional.logsigmoid(lo).mean()).backward()
    _assert_grads(ref["grads"], _peft_grads(policy), "ORPO LoRA gradients")

    full = R.orpo_reference(setup["model"], setup["tok"], ROWS, beta=lam)
    assert full["mode"] == "full" and sorted(full["grads"]) == full["trainable"]
    assert full["loss"] == pytest.approx(full["nll_loss"] + float(full["or_loss"].mean()), rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# reward model


def test_reward_model(setup):
    ref = R.reward_reference(setup["model"], setup["tok"], ROWS)
    tok = transformers.AutoTokenizer.from_pretrained(setup["tok"])
    pad_is_eos = tok.pad_token is None
    assert ref["pad_token_id"] == (tok.eos_token_id if pad_is_eos else tok.pad_token_id)
    for i, row in enumerate(ROWS):
        assert ref["chosen_input_ids"][i] == tok(row["prompt"] + row["chosen"] + tok.eos_token)["input_ids"]
        # HF scores the rightmost token that is not the pad id: the appended EOS, or the token before it if pad == EOS
        last = len(ref["chosen_input_ids"][i]) - 1
        assert ref["score_positions_chosen"][i] == (last - 1 if pad_is_eos else last)
    np.testing.assert_allclose(
        ref["per_example_loss"], np.log1p(np.exp(-(ref["chosen_scores"] - ref["rejected_scores"]))), rtol=1e-5
    )
    assert ref["loss"] == pytest.approx(float(ref["per_example_loss"].mean()), rel=1e-6)
    assert ref["metrics"]["accuracy"] == pytest.approx(float((ref["chosen_scores"] > ref["rejected_scores"]).mean()))

    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        setup["model"], num_labels=1, dtype=torch.float32
    ).eval()
    assert model.score.weight.shape == ref["score_weight"].shape == (1, 32)
    with torch.no_grad():
        model.score.weight.copy_(torch.from_numpy(ref["score_weight"]))
    scores = []
    for ids, pos in zip(
        ref["chosen_input_ids"] + ref["rejected_input_ids"],
        ref["score_positions_chosen"] + ref["score_positions_rejected"],
    ):
        hidden = model.base_model(input_ids=torch.tensor([ids])).last_hidden_state  # final-norm hidden states
        scores.append(model.score(hidden[0, pos])[0])
    scores = torch.stack(scores)
    np.testing.assert_allclose(
        scores.detach().numpy(), np.concatenate([ref["chosen_scores"], ref["rejected_scores"]]), rtol=1e-4
    )
    n = len(ROWS)
    (-torch.nn.functional.logsigmoid(scores[:n] - scores[n:]).mean()).backward()
    assert "score.weight" in ref["grads"] and sorted(ref["grads"]) == ref["trainable"]
    _assert_grads(
        ref["grads"],
        {k: p.grad.numpy() for k, p in model.named_parameters() if p.grad is not None},
        "reward full gradients",
    )

    lora = R.reward_reference(setup["model"], setup["tok"], ROWS, adapter_dir=setup["adapter"])
    np.testing.assert_array_equal(lora["score_weight"], ref["score_weight"])  # the same seeded head
    assert set(lora["grads"]) == set(R._adapter_state(setup["adapter"])) | {"base_model.model.score.weight"}
    assert lora["loss"] == pytest.approx(float(lora["per_example_loss"].mean()), rel=1e-6)
    assert all(np.abs(g).max() > 0 for g in lora["grads"].values())


# ----------------------------------------------------------------------------------------------------------------------
# truncation


@pytest.mark.parametrize("setup", ["llama"], indirect=True)  # tokenizer-level rules: one architecture is enough
def test_truncation_conventions(setup):
    long = dict(prompt="the cat sat on the mat and the dog ran fast", chosen=" yes", rejected=" no")
    wordy = dict(prompt="hello", chosen=" the cat sat on the big red mat", rejected=" no")
    rows = ROWS + [long, wordy]
    dpo = R.dpo_reference(setup["model"], setup["tok"], rows, max_length=8)
    assert dpo["rows"] == [0, 1, 2, 4]  # keep_start: a prompt of >= max_length tokens drops the pair
    assert all(len(s) <= 8 for s in dpo["chosen_input_ids"] + dpo["rejected_input_ids"])
    assert dpo["chosen_input_ids"][3] == (dpo["prompt_ids"][3] + dpo["chosen_ids"][3])[:8]  # EOS cut off
    assert sum(dpo["chosen_completion_mask"][3]) == 8 - len(dpo["prompt_ids"][3])

    rm = R.reward_reference(setup["model"], setup["tok"], rows, max_length=8)
    assert rm["rows"] == [0, 1, 2]  # reward: a pair with a sequence over max_length is dropped, never truncated

    orpo = R.orpo_reference(setup["model"], setup["tok"], ROWS + [wordy], max_length=8)
    seq, mask = orpo["chosen_input_ids"][3], orpo["chosen_labels_mask"][3]
    assert len(seq) == 8 and seq[-1] != 2 and sum(mask) == 8 - mask.count(0)  # answer cut to fit, EOS lost
