"""Preference objectives in the one train step: DPO/IPO, ORPO and reward losses on packed pair rows equal
the same pairs computed one sequence at a time; packing, meshes and gradient accumulation change nothing."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxllm import sharding as shd
from jaxllm.models.config import ModelConfig
from jaxllm.models.decoder import Decoder
from jaxllm.train import preference as pref
from jaxllm.train import step as st
from jaxllm.train.optimizer import OptimConfig, make_optimizer

CFG = ModelConfig(
    vocab_size=64,
    num_layers=2,
    embed_dim=32,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=64,
    max_seq_len=64,
    dtype="float32",
)
L = 32
PREF = pref.PreferenceConfig(beta=0.3)


def _pairs(n, seed=0):
    """n (prompt, chosen, rejected) id lists of random lengths."""
    rs = np.random.RandomState(seed)
    ids = lambda k: list(rs.randint(3, 64, k))  # noqa: E731
    return [(ids(rs.randint(2, 5)), ids(rs.randint(1, 4)) + [2], ids(rs.randint(1, 4)) + [2]) for _ in range(n)]


def _rows(pairs, per_row, rows):
    """The batch contract: pairs packed `per_row` to a row (segments 2j+1 chosen, 2j+2 rejected)."""
    b = {k: np.zeros((rows, L), np.int32) for k in ("inputs", "targets", "positions", "segment_ids")}
    b["loss_weights"] = np.zeros((rows, L), np.float32)
    for i, (prompt, chosen, rejected) in enumerate(pairs):
        r, j = divmod(i, per_row)
        fill = int(np.count_nonzero(b["segment_ids"][r]))
        for s, answer in ((2 * j + 1, chosen), (2 * j + 2, rejected)):
            seq = prompt + answer
            n = len(seq)
            b["inputs"][r, fill : fill + n] = seq
            b["targets"][r, fill : fill + n - 1] = seq[1:]
            b["segment_ids"][r, fill : fill + n] = s
            b["positions"][r, fill : fill + n] = np.arange(n)
            b["loss_weights"][r, fill + len(prompt) - 1 : fill + n - 1] = 1.0
            fill += n
    return b


def _params(seed=0):
    return nn.meta.unbox(Decoder(CFG).init(jax.random.key(seed), jnp.zeros((1, 1), jnp.int32))["params"])


@jax.jit
def _alone(params, ids):
    """log-softmax of one sequence run alone (padded to L with segment 0: causal, so nothing changes)."""
    n = ids.shape[0]
    seg = (jnp.arange(L) < n).astype(jnp.int32)
    padded = jnp.zeros(L, jnp.int32).at[:n].set(ids)
    return jax.nn.log_softmax(Decoder(CFG).apply({"params": params}, padded[None], jnp.arange(L)[None], seg[None])[0])


def _seq_logps(params, seq, prompt_len):
    """log p(answer | prompt) of one sequence run alone."""
    logp = np.asarray(_alone(params, jnp.asarray(seq)), np.float64)
    return float(sum(logp[t, seq[t + 1]] for t in range(prompt_len - 1, len(seq) - 1))), len(seq) - prompt_len


def test_dpo_loss_on_packed_rows_equals_one_sequence_at_a_time():
    pairs, policy, ref = _pairs(6), _params(0), _params(1)
    batch = {k: jnp.asarray(v) for k, v in _rows(pairs, 2, 3).items()}
    model = Decoder(CFG)
    n = pref.counts("dpo", batch)
    ref_BS = pref.answer_logps(pref.target_logps(model, ref, batch), batch)[0]
    for loss_type in ("sigmoid", "ipo"):
        cfg = dataclasses.replace(PREF, loss_type=loss_type)
        loss, sums = pref.batch_loss("dpo", cfg, model, policy, batch, n, ref_BS=ref_BS)
        want, acc = [], []
        for prompt, chosen, rejected in pairs:
            (pc, nc), (pr, nr) = (_seq_logps(policy, prompt + a, len(prompt)) for a in (chosen, rejected))
            (rc, _), (rr, _) = (_seq_logps(ref, prompt + a, len(prompt)) for a in (chosen, rejected))
            if loss_type == "ipo":
                want.append(((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * cfg.beta)) ** 2)
            else:
                want.append(-np.log(1 / (1 + np.exp(-cfg.beta * ((pc - rc) - (pr - rr))))))
            acc.append(float(pc - rc > pr - rr))
        assert float(n["pairs"]) == 6
        np.testing.assert_allclose(float(loss), np.mean(want), rtol=1e-5)
        np.testing.assert_allclose(float(sums["rewards/accuracies"]) / 6, np.mean(acc))


def test_orpo_and_reward_losses_equal_one_sequence_at_a_time():
    pairs, params = _pairs(4, seed=3), _params(2)
    batch = {k: jnp.asarray(v) for k, v in _rows(pairs, 2, 2).items()}
    model = Decoder(CFG)
    n = pref.counts("orpo", batch)
    loss, _ = pref.batch_loss("orpo", PREF, model, params, batch, n)
    nll, tokens, ratios = 0.0, 0, []
    for prompt, chosen, rejected in pairs:
        seq = prompt + chosen
        logp = np.asarray(_alone(params, jnp.asarray(seq)), np.float64)
        nll -= float(sum(logp[t, seq[t + 1]] for t in range(len(seq) - 1)))
        tokens += len(seq) - 1
        (pc, nc), (pr, nr) = (_seq_logps(params, prompt + a, len(prompt)) for a in (chosen, rejected))
        c, r = pc / nc, pr / nr
        log_odds = (c - r) - (np.log1p(-np.exp(c)) - np.log1p(-np.exp(r)))
        ratios.append(np.log(1 / (1 + np.exp(-log_odds))))
    np.testing.assert_allclose(float(loss), nll / tokens - PREF.beta * np.mean(ratios), rtol=1e-5)

    rcfg = dataclasses.replace(CFG, num_labels=1)
    rmodel = Decoder(rcfg)
    rparams = nn.meta.unbox(rmodel.init(jax.random.key(5), jnp.zeros((1, 1), jnp.int32))["params"])
    loss, sums = pref.batch_loss("reward", PREF, rmodel, rparams, batch, pref.counts("reward", batch))
    want = []
    for prompt, chosen, rejected in pairs:
        score = [
            float(rmodel.apply({"params": rparams}, jnp.asarray([prompt + a]))[0, -1, 0]) for a in (chosen, rejected)
        ]
        want.append(np.log1p(np.exp(-(score[0] - score[1]))))
    np.testing.assert_allclose(float(loss), np.mean(want), rtol=1e-5)


def _train(objective, batch, *, micro=1, mesh_cfg=shd.MeshConfig(), devices=None, steps=2):
    cfg = dataclasses.replace(CFG, num_labels=1) if objective == "reward" else CFG
    model = Decoder(cfg)
    tx, schedule = make_optimizer(OptimConfig(warmup_steps=1, learning_rate=1e-2), 10)
    mesh = shd.make_mesh(mesh_cfg, devices)
    state, shardings = st.init_state(model, tx, mesh, jax.random.key(0))
    reference = pref.Reference("start") if objective == "dpo" else None
    step_cfg = st.StepConfig(grad_accum_steps=micro, objective=objective, preference=PREF, reference=reference)
    ref = jax.device_put(_params(1), shardings.params) if objective == "dpo" else {}
    fn = st.jit_train_step(
        st.make_train_step(model, tx, schedule, step_cfg),
        shardings,
        mesh,
        ref_shardings=shardings.params if objective == "dpo" else None,
    )
    history = []
    for _ in range(steps):
        state, m = fn(state, shd.global_batch(batch, mesh), {}, ref)
        history.append({k: float(v) for k, v in m.items()})
    return history, jax.device_get(state.params)


@pytest.mark.parametrize(
    "objective, variants", [("dpo", ("packed", "micro", "mesh")), ("orpo", ("packed", "micro")), ("reward", ("mesh",))]
)
def test_packing_meshes_and_accumulation_change_nothing(objective, variants):
    pairs = _pairs(8, seed=7)
    one = _train(objective, _rows(pairs, 1, 8), devices=jax.devices()[:1])
    hows = {
        "packed": dict(batch=_rows(pairs, 2, 8)),  # two pairs per row, and 4 empty rows
        "micro": dict(batch=_rows(pairs, 1, 8), micro=2),
        "mesh": dict(batch=_rows(pairs, 1, 8), mesh_cfg=shd.MeshConfig(data=2, fsdp=2, tensor=2)),
    }
    for how in (hows[v] for v in variants):
        history, params = _train(objective, **how)
        for got, want in zip(history, one[0]):
            for k in ("loss", "grad_norm", "rewards/accuracies", "rewards/margins"):
                np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-6, err_msg=f"{k} {how.keys()}")
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(one[1])):
            np.testing.assert_allclose(a, b, atol=1e-4)
    assert one[0][0]["pairs"] == 8


def test_fresh_adapters_reference_is_the_base_with_adapters_off():
    """`base` (no copy of any weight) gives what `start` gives with a copy of the zero-B adapters."""
    from jaxllm.models import lora

    lcfg = lora.LoraConfig(r=4, target_modules=("q_proj", "v_proj"))
    cfg = lora.apply(lcfg, CFG)
    model = Decoder(cfg)
    params = jax.device_get(nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]))
    params = jax.tree_util.tree_map_with_path(  # a trained adapter: B no longer zero
        lambda p, x: x + 0.05 if p[-1].key == "lora_b" else x, params
    )
    from jaxllm.tree import partition

    trainable, frozen = partition(params, lambda path: path[-1] in lora.ADAPTER_LEAVES)
    batch = {k: jnp.asarray(v) for k, v in _rows(_pairs(4), 2, 2).items()}
    zero = jax.tree.map(jnp.zeros_like, trainable)
    base = pref.Reference("base", Decoder(dataclasses.replace(cfg, lora_rank=0, lora_targets=())))
    via_base = pref.reference_logps(base, model, {}, frozen, batch, 0)
    via_start = pref.reference_logps(pref.Reference("start"), model, zero, frozen, batch, 0)
    via_policy = pref.reference_logps(pref.Reference("start"), model, trainable, frozen, batch, 0)
    np.testing.assert_allclose(via_base, via_start, rtol=1e-6)
    assert not np.allclose(via_base, via_policy)
