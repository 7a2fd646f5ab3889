"""Magnitude pruning as the last Optax transform, so pruned weights stay exactly zero while training goes on.

The masks live in the optimizer state with their params' shapes (and logical-axis boxes at init), so they
take the params' shardings and are checkpointed with the rest of the state. Thresholds are found by
bisection on the float bit pattern: exact, deterministic, and it never gathers or sorts the weights.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from jaxllm import JaxllmError

SCOPES = ("global", "layer")
SCANNED_KEY = "layers"  # scanned decoders stack their layers on a leading axis under params["layers"]
_INF_BITS = 0x7F800000  # bit pattern of float32 +inf: bisection's upper end


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """`build(PruneConfig, cfg.prune, "prune")`."""

    sparsity: float = 0.0  # magnitude pruning: target fraction of the targeted weights set to zero; 0 = off
    scope: str = "global"  # global: one threshold over all targets | layer: each matrix (each scanned layer) alone
    start_step: int = 0  # first pruning step (the one-shot step when end_step <= start_step)
    end_step: int = 0  # gradual pruning (cubic schedule of Zhu & Gupta 2017) reaches `sparsity` here
    every: int = 100  # steps between mask updates during the gradual phase
    targets: str = "kernel"  # regex fullmatched against a leaf's path "a/b/c" or a trailing part ("b/c", "c");
    #                          kernel = the linear layers' matrices

    def __post_init__(self):
        if not 0.0 <= self.sparsity < 1.0:
            raise JaxllmError(f"prune.sparsity={self.sparsity}; use a fraction in [0, 1) (0 turns pruning off)")
        if self.scope not in SCOPES:
            raise JaxllmError(f"prune.scope={self.scope!r}; choose one of {', '.join(SCOPES)}")
        if self.start_step < 0 or self.end_step < 0:
            raise JaxllmError(f"prune.start_step={self.start_step}, prune.end_step={self.end_step}; steps must be >= 0")
        if self.every < 1:
            raise JaxllmError(f"prune.every={self.every}; use a positive number of steps between mask updates")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise JaxllmError(f"prune.targets={self.targets!r} is not a valid regex ({e}); e.g. 'kernel'") from None


class PruneState(NamedTuple):
    count: jax.Array  # int32: updates applied so far (the schedule's step)
    masks: Any  # like params: bool arrays (True = kept) for targeted leaves, optax.MaskedNode() elsewhere


def _names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def _is_target(path, leaf, cfg: PruneConfig) -> bool:
    names = _names(path)
    regex = re.compile(cfg.targets)
    return jnp.issubdtype(jnp.result_type(leaf), jnp.floating) and any(
        regex.fullmatch("/".join(names[i:])) for i in range(len(names))
    )


def _is_scanned(path, leaf) -> bool:
    return SCANNED_KEY in _names(path) and jnp.ndim(leaf) >= 2


def sparsity_at(cfg: PruneConfig, step: jax.Array) -> jax.Array:
    """Target sparsity at `step`: s_f * (1 - (1 - progress)^3) between start and end, s_f after."""
    step = jnp.asarray(step, jnp.float32)
    if cfg.end_step <= cfg.start_step:
        return jnp.where(step >= cfg.start_step, cfg.sparsity, 0.0).astype(jnp.float32)
    progress = jnp.clip((step - cfg.start_step) / (cfg.end_step - cfg.start_step), 0.0, 1.0)
    return (cfg.sparsity * (1.0 - (1.0 - progress) ** 3)).astype(jnp.float32)


def is_prune_step(cfg: PruneConfig, step: jax.Array) -> jax.Array:
    """Masks are recomputed at start_step, every `every` steps after it, and at end_step."""
    step = jnp.asarray(step, jnp.int32)
    if cfg.end_step <= cfg.start_step:
        return step == cfg.start_step
    on_grid = ((step - cfg.start_step) % cfg.every == 0) | (step == cfg.end_step)
    return (step >= cfg.start_step) & (step <= cfg.end_step) & on_grid


def _bits(w: jax.Array, keep: jax.Array) -> jax.Array:
    """|w| as int32 float32 bits (monotonic in |w|); already pruned entries get -1, below every weight."""
    bits = jax.lax.bitcast_convert_type(jnp.abs(w).astype(jnp.float32), jnp.int32)
    return jnp.where(keep, bits, -1)


def _count_le(w, keep, t, grouped):
    """Entries with bits <= t; float32 counts do not overflow on huge leaves (exact below 2^24)."""
    bits = _bits(w, keep)
    if grouped:  # one count per leading (layer) slice; no reshape, so the sharding stays as it is
        return jnp.sum(
            bits <= t.reshape((-1,) + (1,) * (bits.ndim - 1)), axis=tuple(range(1, bits.ndim)), dtype=jnp.float32
        )
    return jnp.sum(bits <= t, dtype=jnp.float32)


def _bisect(count_le, ks: list[jax.Array]) -> list[jax.Array]:
    """Per group, the smallest bit pattern t with count_le(t) >= k (the k-th smallest magnitude), exactly."""
    lo = [jnp.full(jnp.shape(k), -2, jnp.int32) for k in ks]  # count_le(lo) = 0
    hi = [jnp.full(jnp.shape(k), _INF_BITS, jnp.int32) for k in ks]  # count_le(hi) = all

    def body(_, carry):
        lo, hi = carry
        mid = [a + (b - a) // 2 for a, b in zip(lo, hi)]
        ok = [c >= k for c, k in zip(count_le(mid), ks)]
        return (
            [jnp.where(o, a, m) for o, a, m in zip(ok, lo, mid)],
            [jnp.where(o, m, b) for o, m, b in zip(ok, mid, hi)],
        )

    return jax.lax.fori_loop(0, 32, body, (lo, hi))[1]  # the range is < 2^31: 31 halvings suffice


def _new_masks(ws: list, keeps: list, scanned: list[bool], target: jax.Array, scope: str) -> list[jax.Array]:
    """Keeps the largest (1 - target) of the still kept magnitudes; a pruned weight stays pruned."""
    if scope == "global":
        k = jnp.round(target * sum(w.size for w in ws))
        count = lambda t: [sum(_count_le(w, m, t[0], False) for w, m in zip(ws, keeps))]  # noqa: E731
        thresholds = _bisect(count, [k]) * len(ws)
        grouped = [False] * len(ws)
    else:
        grouped = scanned
        ks = [
            jnp.full((w.shape[0],) if g else (), jnp.round(target * (w.size // (w.shape[0] if g else 1))))
            for w, g in zip(ws, grouped)
        ]
        count = lambda ts: [_count_le(w, m, t, g) for w, m, t, g in zip(ws, keeps, ts, grouped)]  # noqa: E731
        thresholds = _bisect(count, ks)
    out = []
    for w, m, t, g in zip(ws, keeps, thresholds, grouped):
        t = t.reshape((-1,) + (1,) * (w.ndim - 1)) if g else t
        out.append(_bits(w, m) > t)
    return out


def _flat_targets(params: Any, cfg: PruneConfig):
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    idx = [i for i, (path, leaf) in enumerate(flat) if _is_target(path, leaf, cfg)]
    if not idx:
        raise JaxllmError(f"prune.targets={cfg.targets!r} matches no float parameter; e.g. use 'kernel'")
    return flat, treedef, idx


def magnitude_pruning(cfg: PruneConfig) -> optax.GradientTransformation:
    """Chain it last: it edits the final updates so that params + updates = would-be params * mask."""

    def init_fn(params):
        # Boxed (logically partitioned) leaves keep their box, so masks get the same shardings as params.
        def one(path, p):
            if not _is_target(path, nn.meta.unbox(p), cfg):
                return optax.MaskedNode()
            return jax.tree.map(lambda a: jnp.ones(jnp.shape(a), jnp.bool_), p)

        is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
        _flat_targets(nn.meta.unbox(params), cfg)  # a regex that matches nothing is a config error
        return PruneState(
            count=jnp.zeros([], jnp.int32), masks=jax.tree_util.tree_map_with_path(one, params, is_leaf=is_box)
        )

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("magnitude_pruning needs params: call tx.update(grads, opt_state, params)")
        flat, treedef, idx = _flat_targets(params, cfg)
        flat_u = treedef.flatten_up_to(updates)
        flat_m = treedef.flatten_up_to(state.masks)
        ps = [flat[i][1] for i in idx]
        ws = [(p + flat_u[i]).astype(p.dtype) for p, i in zip(ps, idx)]  # what apply_updates would give
        keeps = [flat_m[i] for i in idx]
        scanned = [_is_scanned(flat[i][0], flat[i][1]) for i in idx]
        target = sparsity_at(cfg, state.count)
        keeps = jax.lax.cond(
            is_prune_step(cfg, state.count), lambda: _new_masks(ws, keeps, scanned, target, cfg.scope), lambda: keeps
        )
        for i, p, m in zip(idx, ps, keeps):
            u = flat_u[i]
            flat_u[i] = jnp.where(m, u, -p.astype(u.dtype))  # p + (-p) is exactly 0
            flat_m[i] = m
        return (
            treedef.unflatten(flat_u),
            PruneState(count=optax.safe_increment(state.count), masks=treedef.unflatten(flat_m)),
        )

    return optax.GradientTransformation(init_fn, update_fn)


def with_pruning(tx: optax.GradientTransformation, cfg: PruneConfig) -> optax.GradientTransformation:
    return tx if cfg.sparsity == 0 else optax.chain(tx, magnitude_pruning(cfg))


def sparsity(params: Any, cfg: PruneConfig) -> jax.Array:
    """Fraction of exact zeros among the targeted weights (the metric to log)."""
    flat, _, idx = _flat_targets(nn.meta.unbox(params), cfg)
    zeros = sum(jnp.sum(flat[i][1] == 0, dtype=jnp.float32) for i in idx)
    return zeros / sum(flat[i][1].size for i in idx)


@functools.partial(jax.jit, static_argnums=2)
def _prune_now(params, target, cfg):
    flat, treedef, idx = _flat_targets(params, cfg)
    ws = [flat[i][1] for i in idx]
    scanned = [_is_scanned(flat[i][0], w) for i, w in zip(idx, ws)]
    keeps = _new_masks(ws, [jnp.ones(w.shape, jnp.bool_) for w in ws], scanned, target, cfg.scope)
    leaves = [leaf for _, leaf in flat]
    masks = [optax.MaskedNode()] * len(flat)
    for i, w, m in zip(idx, ws, keeps):
        leaves[i], masks[i] = jnp.where(m, w, jnp.zeros_like(w)), m
    return treedef.unflatten(leaves), treedef.unflatten(masks)


def prune_now(params: Any, cfg: PruneConfig, sparsity: float | None = None) -> tuple[Any, Any]:
    """One-shot magnitude pruning of `params` (e.g. to report the val loss right after pruning)."""
    target = cfg.sparsity if sparsity is None else float(sparsity)
    if not 0.0 <= target < 1.0:
        raise JaxllmError(f"prune sparsity={target}; use a fraction in [0, 1)")
    return _prune_now(nn.meta.unbox(params), jnp.float32(target), cfg)
