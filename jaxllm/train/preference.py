"""Preference objectives on rows of packed pairs: DPO (sigmoid or IPO loss), ORPO and reward models.

A row (see `jaxllm.data.preference`) holds whole pairs: segment 2j+1 is pair j's chosen sequence
(prompt + chosen answer + EOS), segment 2j+2 its rejected one, and `loss_weights` marks the answer
targets. Per-sequence sums are segment sums, so pairs pack several to a row and never attend across
sequences. Each objective gives a batch's *sums* (loss, metrics) and the counts they are divided by;
the counts depend on the batch alone, so a micro-batch's loss is already divided by the whole batch's
counts and gradient accumulation adds gradients. Losses and logged metrics follow TRL (DPOTrainer,
ORPOTrainer, RewardTrainer): rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
logps/chosen, logps/rejected.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxllm import JaxllmError
from jaxllm.config import check_number
from jaxllm.models.decoder import head_DV, over_head_chunks, score_DS
from jaxllm.tree import union

OBJECTIVES = ("lm", "dpo", "orpo", "reward")
LOSS_TYPES = ("sigmoid", "ipo")
Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
    """`PreferenceConfig(**cfg.preference)`: what train.objective = dpo / orpo / reward needs."""

    loss_type: str = "sigmoid"  # dpo: sigmoid (DPO) | ipo (IPO, per-token averaged log-ratios as TRL)
    beta: float = 0.1  # dpo: the KL weight beta; orpo: the odds-ratio weight lambda (TRL's beta)
    model_ref: str = ""  # dpo: the reference model (any model jaxllm loads: a Hugging Face folder or Hub id,
    #                      `jaxllm convert` output, a workdir); "" = the policy at the start
    precompute_ref_logps: bool = False  # dpo: reference log-probs computed once before training, kept with the data

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise JaxllmError(f"preference.loss_type={self.loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
        check_number("preference.beta", self.beta, low=0, low_open=True)


def check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise JaxllmError(f"train.objective={objective!r}; choose one of {', '.join(OBJECTIVES)}")


def num_pairs(length: int) -> int:
    """Pairs a row of `length` inputs can hold at most (each sequence has at least one token)."""
    return max(length // 2, 1)


def segment_sums(values_BL: jax.Array, segment_ids_BL: jax.Array, num_segments: int) -> jax.Array:
    """[B, S] sums of `values` over each row's segments (segment 0, padding, included at index 0)."""
    one = lambda v, s: jax.ops.segment_sum(v, s, num_segments=num_segments)  # noqa: E731
    return jax.vmap(one)(values_BL, segment_ids_BL)


def pairs(sums_BS: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(chosen [B, P], rejected [B, P]) of per-segment values: segments 1, 3, ... and 2, 4, ..."""
    p = (sums_BS.shape[1] - 1) // 2
    return sums_BS[:, 1 : 2 * p : 2], sums_BS[:, 2 : 2 * p + 1 : 2]


def _same_sequence(segment_ids_BL: jax.Array) -> jax.Array:
    """1 where target t (input t + 1) belongs to input t's sequence (the last input's target never does)."""
    same = (segment_ids_BL[:, 1:] == segment_ids_BL[:, :-1]) & (segment_ids_BL[:, :-1] != 0)
    return jnp.pad(same, ((0, 0), (0, 1))).astype(jnp.float32)


def _last_token(segment_ids_BL: jax.Array) -> jax.Array:
    """1 at the last input position of every sequence (where a reward model reads its score)."""
    nxt = jnp.pad(segment_ids_BL[:, 1:], ((0, 0), (0, 1)))
    return ((segment_ids_BL != 0) & (nxt != segment_ids_BL)).astype(jnp.float32)


def _segments(batch: Batch) -> int:
    return 2 * num_pairs(batch["inputs"].shape[1]) + 1


def valid_pairs(batch: Batch) -> jax.Array:
    """[B, P] 1 for the pairs a row holds (both sequences present), 0 for the empty slots."""
    seg = batch["segment_ids"]
    chosen, rejected = pairs(segment_sums(jnp.ones_like(seg, jnp.float32), seg, _segments(batch)))
    return ((chosen > 0) & (rejected > 0)).astype(jnp.float32)


def counts(objective: str, batch: Batch) -> dict[str, jax.Array]:
    """What the batch's sums are divided by (a function of the data only): pairs, and for ORPO the
    chosen sequences' target tokens (its NLL is a token mean, as TRL's)."""
    seg = batch["segment_ids"]
    out = {"pairs": jnp.sum(valid_pairs(batch))}
    if objective == "orpo":
        nll_w = segment_sums(_same_sequence(seg), seg, _segments(batch))
        out["nll_tokens"] = jnp.sum(pairs(nll_w)[0])
    return out


def target_logps(
    model: nn.Module, params: Any, batch: Batch, *, loss_chunk: int = 0, rng: jax.Array | None = None
) -> jax.Array:
    """[B, L] float32 log-probability of every target under the model (`loss_chunk`: computed that many
    positions at a time, so float32 [B, L, V] logits never exist)."""
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    kwargs = dict(deterministic=rng is None, rngs={} if rng is None else {"dropout": rng})
    targets_BL = batch["targets"]

    def logps(logits_BCV, targets_BC):
        logits_BCV = logits_BCV.astype(jnp.float32)
        picked_BC = jnp.take_along_axis(logits_BCV, targets_BC[..., None], axis=-1)[..., 0]
        return picked_BC - jax.nn.logsumexp(logits_BCV, axis=-1)

    if not loss_chunk:
        return logps(model.apply({"params": params}, *args, **kwargs), targets_BL)
    x_BLD = model.apply({"params": params}, *args, hidden=True, **kwargs)
    one = lambda _, logits_BCV, targets_BC: (None, logps(logits_BCV, targets_BC))  # noqa: E731
    return over_head_chunks(one, None, x_BLD, head_DV(params, model.cfg), targets_BL, chunk=loss_chunk)[1]


def answer_logps(logps_BL: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """([B, S] answer log-prob sums per sequence, [B, S] answer token counts)."""
    seg, w = batch["segment_ids"], batch["loss_weights"].astype(jnp.float32)
    return segment_sums(logps_BL * w, seg, _segments(batch)), segment_sums(w, seg, _segments(batch))


def scores(model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None = None) -> jax.Array:
    """[B, S] a reward model's score of every sequence: the score head on its last token."""
    kwargs = dict(deterministic=rng is None, rngs={} if rng is None else {"dropout": rng})
    x_BLD = model.apply(
        {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"], hidden=True, **kwargs
    )
    s_BL = jnp.einsum("bld,d->bl", x_BLD, score_DS(params, model.cfg)[:, 0]).astype(jnp.float32)
    return segment_sums(s_BL * _last_token(batch["segment_ids"]), batch["segment_ids"], _segments(batch))


def _log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x < 0, stable at both ends (as TRL's ORPO)."""
    return jnp.where(x < -0.693147, jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def _metric_sums(valid, chosen_rewards, rejected_rewards, chosen_logps=None, rejected_logps=None):
    sums = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(jnp.float32),
        "rewards/margins": chosen_rewards - rejected_rewards,
    }
    if chosen_logps is not None:
        sums.update({"logps/chosen": chosen_logps, "logps/rejected": rejected_logps})
    return {k: jnp.sum(jax.lax.stop_gradient(v) * valid) for k, v in sums.items()}


def dpo(cfg: PreferenceConfig, policy_BS, ref_BS, tokens_BS, valid, n: dict) -> tuple[jax.Array, dict]:
    """DPO / IPO: (loss of these rows divided by the batch's pairs, metric sums)."""
    pc, pr = pairs(policy_BS)
    rc, rr = pairs(ref_BS)
    nc, nr = pairs(tokens_BS)
    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    if cfg.loss_type == "ipo":  # TRL: log-ratios averaged over each answer's tokens
        delta = chosen_ratio / jnp.maximum(nc, 1.0) - rejected_ratio / jnp.maximum(nr, 1.0)
        per_pair = jnp.square(delta - 1.0 / (2.0 * cfg.beta))
    else:
        per_pair = -jax.nn.log_sigmoid(cfg.beta * (chosen_ratio - rejected_ratio))
    loss_sum = jnp.sum(per_pair * valid)
    sums = {"loss": loss_sum, **_metric_sums(valid, cfg.beta * chosen_ratio, cfg.beta * rejected_ratio, pc, pr)}
    return loss_sum / jnp.maximum(n["pairs"], 1.0), sums


def orpo(cfg: PreferenceConfig, policy_BS, tokens_BS, nll_sum, valid, n: dict) -> tuple[jax.Array, dict]:
    """ORPO: the chosen sequences' token-mean NLL minus lambda x the mean log-sigmoid of the log odds ratio
    of the answers' per-token average log-probs (TRL's ORPOTrainer)."""
    pc, pr = pairs(policy_BS)
    nc, nr = pairs(tokens_BS)
    safe = lambda x: jnp.where(valid > 0, x, -1.0)  # noqa: E731 (empty slots: finite values, then masked)
    avg_c, avg_r = safe(pc / jnp.maximum(nc, 1.0)), safe(pr / jnp.maximum(nr, 1.0))
    log_odds = (avg_c - avg_r) - (_log1mexp(avg_c) - _log1mexp(avg_r))
    ratio = jax.nn.log_sigmoid(log_odds)
    pairs_n, tokens_n = jnp.maximum(n["pairs"], 1.0), jnp.maximum(n["nll_tokens"], 1.0)
    nll_part, ratio_part = nll_sum / tokens_n, jnp.sum(ratio * valid) / pairs_n
    loss = nll_part - cfg.beta * ratio_part
    sums = {
        "loss": loss * pairs_n,
        "nll_loss": nll_part * pairs_n,
        "log_odds_ratio": jnp.sum(ratio * valid),
        "log_odds_chosen": jnp.sum(log_odds * valid),
        **_metric_sums(valid, cfg.beta * avg_c, cfg.beta * avg_r, avg_c, avg_r),
    }
    return loss, jax.tree.map(jax.lax.stop_gradient, sums)


def reward(scores_BS, valid_BP, n: dict) -> tuple[jax.Array, dict]:
    """Bradley-Terry: -log sigmoid(score(chosen) - score(rejected)), mean over pairs."""
    sc, sr = pairs(scores_BS)
    loss_sum = jnp.sum(-jax.nn.log_sigmoid(sc - sr) * valid_BP)
    sums = {"loss": loss_sum, **_metric_sums(valid_BP, sc, sr)}
    return loss_sum / jnp.maximum(n["pairs"], 1.0), sums


def finish(sums: dict[str, jax.Array], n: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Batch metrics from their sums: every sum divided by the batch's pairs (`pairs` itself kept)."""
    pairs_n = jnp.maximum(n["pairs"], 1.0)
    return {**{k: v / pairs_n for k, v in sums.items()}, "pairs": n["pairs"]}


@dataclasses.dataclass(frozen=True)
class Reference:
    """Where a DPO run's reference log-probs come from. `start`: the trainable params as they were at step
    0 (the step's `ref` input) over the frozen base; `base`: the frozen base alone through `model` (fresh
    adapters switched off: no copy of any weight); `model`: `preference.model_ref`'s params (`ref`)
    through `model`; `batch`: precomputed, the batch's `ref_logps`."""

    kind: str
    model: nn.Module | None = None


def reference_logps(
    reference: Reference, policy: nn.Module, ref: Any, frozen: Any, batch: Batch, loss_chunk: int
) -> jax.Array:
    """[B, S] the reference's answer log-prob sum of every sequence (never differentiated)."""
    if reference.kind == "batch":
        return segment_sums(batch["ref_logps"].astype(jnp.float32), batch["segment_ids"], _segments(batch))
    if reference.kind == "base":
        model, params = reference.model, frozen
    elif reference.kind == "model":
        model, params = reference.model, ref
    else:
        model, params = policy, union(ref, frozen)
    logps_BL = target_logps(model, jax.lax.stop_gradient(params), batch, loss_chunk=loss_chunk)
    return jax.lax.stop_gradient(answer_logps(logps_BL, batch)[0])


def batch_loss(
    objective: str,
    cfg: PreferenceConfig,
    model: nn.Module,
    params: Any,
    batch: Batch,
    n: dict[str, jax.Array],
    *,
    ref_BS: jax.Array | None = None,
    loss_chunk: int = 0,
    rng: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(this (micro-)batch's share of the batch loss, its metric sums) for a preference objective."""
    valid = valid_pairs(batch)
    if objective == "reward":
        return reward(scores(model, params, batch, rng), valid, n)
    logps_BL = target_logps(model, params, batch, loss_chunk=loss_chunk, rng=rng)
    policy_BS, tokens_BS = answer_logps(logps_BL, batch)
    if objective == "orpo":
        seg = batch["segment_ids"]
        nll_w = _same_sequence(seg) * (seg % 2 == 1).astype(jnp.float32)  # every target of the chosen sequences
        return orpo(cfg, policy_BS, tokens_BS, -jnp.sum(logps_BL * nll_w), valid, n)
    return dpo(cfg, policy_BS, ref_BS, tokens_BS, valid, n)
