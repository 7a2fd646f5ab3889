"""Train state, loss, and the jitted train / eval steps with explicit shardings."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh

from jaxllm import sharding as shd
from jaxllm.models.decoder import head_DV, over_head_chunks
from jaxllm.train import preference as pref
from jaxllm.tree import partition, union

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    """What training updates and checkpoints. With adapters, `params` holds only the trainable subset;
    the frozen base is passed to the step separately (no gradients, no optimizer state, not saved)."""

    step: jax.Array
    params: Any
    opt_state: Any
    skipped: jax.Array  # updates skipped because the loss or a gradient was not finite


def new_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
    """A step-0 state around `params` with fresh optimizer state."""
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), skipped=jnp.zeros((), jnp.int32)
    )


def _init(
    model: nn.Module, tx: optax.GradientTransformation, trainable: Callable | None, rng: jax.Array, boxed: bool
) -> TrainState:
    params = model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]
    return new_state(partition(params if boxed else nn.meta.unbox(params), trainable)[0], tx)


def abstract_state(model: nn.Module, tx: optax.GradientTransformation, trainable: Callable | None = None) -> Any:
    """The state's shapes with logical-axis boxes (`trainable`: path predicate of the trained subset)."""
    return jax.eval_shape(lambda rng: _init(model, tx, trainable, rng, boxed=True), jax.random.key(0))


def state_shardings(boxed_abstract: Any, mesh: Mesh, offload_opt_state: bool = False) -> Any:
    """The state's shardings from its logical axes; `offload_opt_state` keeps the optimizer state in host
    memory between steps (the step brings it to the device for the update and writes it back)."""
    shardings = shd.shardings_for(boxed_abstract, mesh)
    if offload_opt_state:
        shardings = shardings.replace(
            opt_state=jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), shardings.opt_state)
        )
    return shardings


def init_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rng: jax.Array,
    trainable: Callable | None = None,
    shardings: Any = None,
) -> tuple[TrainState, Any]:
    """Initialises params and optimizer state directly sharded (never materialised on one device).
    With `trainable`, only that subset is made (XLA drops the rest of the init)."""
    if shardings is None:
        shardings = state_shardings(abstract_state(model, tx, trainable), mesh)
    with shd.activate(mesh):
        state = jax.jit(lambda rng: _init(model, tx, trainable, rng, boxed=False), out_shardings=shardings)(rng)
    return state, shardings


def state_from_params(params: Any, tx: optax.GradientTransformation, shardings: Any) -> TrainState:
    """A step-0 state around given trainable params (fresh optimizer state), placed with `shardings`."""
    return jax.jit(lambda params: new_state(params, tx), out_shardings=shardings)(params)


def cross_entropy(
    logits_BLV: jax.Array, targets_BL: jax.Array, weights_BL: jax.Array, z_loss: float = 0.0
) -> tuple[jax.Array, jax.Array]:
    """Weighted token cross-entropy sum and z-loss sum (float32); weight 0 tokens contribute nothing."""
    logits_BLV = logits_BLV.astype(jnp.float32)
    lse_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
    weights_BL = weights_BL.astype(jnp.float32)
    ce = jnp.sum((lse_BL - target_logit_BL) * weights_BL)
    z = jnp.sum(z_loss * jnp.square(lse_BL) * weights_BL)
    return ce, z


def chunked_cross_entropy(
    x_BLD: jax.Array, head_DV: jax.Array, targets_BL: jax.Array, weights_BL: jax.Array, z_loss: float, chunk: int
) -> tuple[jax.Array, jax.Array]:
    """`cross_entropy` of the logits x @ head, computed `chunk` positions at a time (`over_head_chunks`)."""

    def one(sums, logits_BCV, targets_BC, weights_BC):
        ce, z = cross_entropy(logits_BCV, targets_BC, weights_BC, z_loss)
        return (sums[0] + ce, sums[1] + z), None

    zero = jnp.zeros((), jnp.float32)
    return over_head_chunks(one, (zero, zero), x_BLD, head_DV, targets_BL, weights_BL, chunk=chunk)[0]


def token_loss(
    model: nn.Module,
    params: Any,
    batch: Batch,
    *,
    z_loss: float = 0.0,
    loss_chunk: int = 0,
    rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(cross-entropy sum, z-loss sum, weight sum) of a batch: the one loss of training (`rng` given:
    dropout on) and evaluation. `loss_chunk` > 0 takes the chunked path (same values and gradients)."""
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    kwargs = dict(deterministic=rng is None, rngs={} if rng is None else {"dropout": rng})
    if loss_chunk:
        x_BLD = model.apply({"params": params}, *args, hidden=True, **kwargs)
        ce, z = chunked_cross_entropy(
            x_BLD, head_DV(params, model.cfg), batch["targets"], batch["loss_weights"], z_loss, loss_chunk
        )
    else:
        logits = model.apply({"params": params}, *args, **kwargs)
        ce, z = cross_entropy(logits, batch["targets"], batch["loss_weights"], z_loss)
    return ce, z, jnp.sum(batch["loss_weights"].astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class StepConfig:
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    z_loss: float = 0.0
    dropout_seed: int = 0
    loss_chunk: int = 0  # positions per cross-entropy chunk; 0 = whole logits
    host_offload: bool = False  # the optimizer state arrives in host memory (see `state_shardings`)
    objective: str = "lm"  # lm (next-token cross-entropy) | dpo | orpo | reward (jaxllm.train.preference)
    preference: pref.PreferenceConfig = pref.PreferenceConfig()
    reference: pref.Reference | None = None  # dpo: where the reference log-probs come from


def _counts(cfg: StepConfig, batch: Batch) -> dict[str, jax.Array]:
    """What a batch's sums are divided by; a function of the data alone (so known before any micro-batch)."""
    if cfg.objective == "lm":
        return {"tokens": jnp.sum(batch["loss_weights"].astype(jnp.float32))}
    return pref.counts(cfg.objective, batch)


def _finish(cfg: StepConfig, sums: dict[str, jax.Array], n: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """A batch's metrics from its sums and counts."""
    if cfg.objective == "lm":
        denom = jnp.maximum(n["tokens"], 1.0)
        return {"loss": sums["ce"] / denom, "z_loss": sums["z"] / denom, "tokens": n["tokens"]}
    return pref.finish(sums, n)


def make_loss(model: nn.Module, cfg: StepConfig) -> Callable:
    """`loss(params, frozen, ref, batch, n, rng) -> (loss, sums)`: the objective of one (micro-)batch.
    lm: the unnormalised cross-entropy + z-loss sum (the step divides the gradient by the batch's
    tokens); preference objectives: the batch loss's share of these rows (already divided by `n`)."""

    def loss(params, frozen, ref, mb: Batch, n, rng):
        full = union(params, frozen)
        if cfg.objective == "lm":
            ce, z, _ = token_loss(model, full, mb, z_loss=cfg.z_loss, loss_chunk=cfg.loss_chunk, rng=rng)
            return ce + z, {"ce": ce, "z": z}
        ref_BS = None
        if cfg.objective == "dpo":
            ref_BS = pref.reference_logps(cfg.reference, model, ref, frozen, mb, cfg.loss_chunk)
        return pref.batch_loss(
            cfg.objective, cfg.preference, model, full, mb, n, ref_BS=ref_BS, loss_chunk=cfg.loss_chunk, rng=rng
        )

    return loss


def make_train_step(
    model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule, cfg: StepConfig
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """`train_step(state, batch, frozen, ref) -> (state, metrics)`; pure, to be jitted by `jit_train_step`.
    Gradients are taken with respect to `state.params` only; `frozen` (the rest of the model's params,
    {} for full training) and `ref` (a DPO reference's params, else {}) are read, never differentiated."""
    grad_fn = jax.value_and_grad(make_loss(model, cfg), has_aux=True)

    def train_step(state: TrainState, batch: Batch, frozen: Any, ref: Any = None):
        ref = {} if ref is None else ref
        rng = jax.random.fold_in(jax.random.key(cfg.dropout_seed), state.step)
        n = _counts(cfg, batch)
        m = cfg.grad_accum_steps
        if m == 1:
            (_, sums), grads = grad_fn(state.params, frozen, ref, batch, n, rng)
        else:

            def split(x):  # micro-batch i takes rows i, i+m, ...: every micro-batch spans all devices
                b = x.shape[0]
                x = x.reshape(b // m, m, *x.shape[1:]).swapaxes(0, 1)
                return shd.constrain(x, (None, "batch"))

            micro = jax.tree.map(split, batch)

            def body(carry, inp):
                mb, i = inp
                (_, aux), g = grad_fn(state.params, frozen, ref, mb, n, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, carry, (g, aux)), None

            shapes = jax.eval_shape(
                lambda mb: grad_fn(state.params, frozen, ref, mb, n, rng)[0][1], jax.tree.map(lambda x: x[0], micro)
            )
            zeros = (
                jax.tree.map(jnp.zeros_like, state.params),
                jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
            )
            (grads, sums), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(m)))
        if cfg.objective == "lm":
            denom = jnp.maximum(n["tokens"], 1.0)
            grads = jax.tree.map(lambda g: g / denom, grads)
        metrics = _finish(cfg, sums, n)
        loss = metrics["loss"]
        grad_norm = optax.tree.norm(grads)
        # a NaN or inf anywhere in the gradients makes their norm NaN or inf: no second pass over them
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        opt_state = state.opt_state
        if cfg.host_offload:  # the state comes to the device only now, for the update, and goes back through
            # the step's output sharding; the barrier ties the transfer to the gradients (not hoisted earlier)
            grads, opt_state = jax.lax.optimization_barrier((grads, opt_state))
            opt_state = jax.tree.map(lambda x: jax.device_put(x, jax.memory.Space.Device), opt_state)
        updates, new_opt_state = tx.update(grads, opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_state = state.replace(
            step=state.step + 1,
            params=keep(new_params, state.params),
            opt_state=keep(new_opt_state, opt_state),
            skipped=state.skipped + (~finite).astype(jnp.int32),
        )
        metrics.update(grad_norm=grad_norm, lr=schedule(state.step), skipped=new_state.skipped)
        return new_state, metrics

    return train_step


def jit_train_step(step_fn, shardings: Any, mesh: Mesh, frozen_shardings: Any = None, ref_shardings: Any = None):
    """Jits with explicit in/out shardings; the old state is donated (updated in place).
    `run(state, batch, frozen={}, ref={})`."""
    out_shardings = (shardings, shd.replicated(mesh))
    return _jit(step_fn, mesh, shardings, frozen_shardings, ref_shardings, out_shardings, donate_argnums=0)


def _or_empty(shardings: Any) -> Any:
    return {} if shardings is None else shardings


def _jit(fn, mesh: Mesh, x_shardings: Any, frozen_shardings: Any, ref_shardings: Any, out_shardings: Any, **options):
    """`run(x, batch, frozen={}, ref={})`: `fn` jitted with these shardings (the batch's: `batch_sharding`),
    called (or, by `run.lower`, lowered) under the mesh's rules."""
    in_shardings = (x_shardings, shd.batch_sharding(mesh), _or_empty(frozen_shardings), _or_empty(ref_shardings))
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings, **options)

    def run(x, batch, frozen=None, ref=None, method=jitted):
        with shd.activate(mesh):
            return method(x, batch, _or_empty(frozen), _or_empty(ref))

    run.lower = lambda x, batch, frozen=None, ref=None: run(x, batch, frozen, ref, method=jitted.lower)
    return run


def make_eval_step(
    model: nn.Module,
    mesh: Mesh,
    param_shardings: Any,
    frozen_shardings: Any = None,
    cfg: StepConfig = StepConfig(),
    ref_shardings: Any = None,
):
    """`eval_step(params, batch, frozen={}, ref={}) -> metrics` of one batch, deterministic (no dropout),
    with the counts they are averages over ("tokens" for lm, "pairs" for preference objectives), so
    batches combine (`combine_eval`)."""
    loss = make_loss(model, cfg)

    def eval_step(params, batch, frozen, ref):
        n = _counts(cfg, batch)
        _, sums = loss(params, frozen, ref, batch, n, None)
        return _finish(cfg, sums, n)

    return _jit(eval_step, mesh, param_shardings, frozen_shardings, ref_shardings, shd.replicated(mesh))


def combine_eval(parts: list[dict[str, float]]) -> dict[str, float]:
    """Metrics over several batches from their per-batch metrics: each weighted by its count."""
    if not parts:
        return {}
    count = "tokens" if "tokens" in parts[0] else "pairs"
    total = sum(p[count] for p in parts)
    out = {k: sum(p[k] * p[count] for p in parts) / max(total, 1.0) for k in parts[0] if k != count}
    out[count] = total
    return out
