"""Optax optimizer: AdamW with a decay mask, LR schedules, global-norm clipping."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

from jaxllm import JaxllmError
from jaxllm.config import check_number

SCHEDULES = ("cosine", "linear", "constant", "rsqrt")
NO_DECAY_NAMES = ("scale", "bias", "norm")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """`OptimConfig(**cfg.optim)`."""

    learning_rate: float = 3e-4  # peak learning rate
    schedule: str = "cosine"  # cosine | linear | constant | rsqrt (each after a linear warmup)
    warmup_steps: int = 100  # linear warmup from 0 to the peak
    decay_steps: int = 0  # steps of the decay phase end; 0 = the run's total steps
    end_lr_ratio: float = 0.1  # final lr as a fraction of the peak (cosine, linear)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # decoupled (AdamW); never applied to norms and biases
    grad_clip: float = 1.0  # global-norm clipping threshold; 0 disables
    grad_accum_steps: int = 1  # micro-batches per step (the global batch is split this many ways)
    host_offload: bool = False  # keep the optimizer state in host memory between steps (pinned_host; TPU/GPU)

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise JaxllmError(f"optim.schedule={self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        check_number("optim.learning_rate", self.learning_rate, low=0, low_open=True)
        for name in ("warmup_steps", "decay_steps"):
            check_number(f"optim.{name}", getattr(self, name), low=0, integer=True)
        check_number("optim.grad_accum_steps", self.grad_accum_steps, low=1, integer=True)
        check_number("optim.end_lr_ratio", self.end_lr_ratio, low=0, high=1)
        for name in ("b1", "b2"):
            check_number(f"optim.{name}", getattr(self, name), low=0, high=1, high_open=True)
        check_number("optim.eps", self.eps, low=0, low_open=True)
        for name in ("weight_decay", "grad_clip"):
            check_number(f"optim.{name}", getattr(self, name), low=0)


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    peak, warm = cfg.learning_rate, cfg.warmup_steps
    end = peak * cfg.end_lr_ratio
    decay_end = max(cfg.decay_steps or total_steps, warm + 1)
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warm, decay_end, end_value=end)
    warmup = optax.linear_schedule(0.0, peak, max(warm, 1))
    if cfg.schedule == "linear":
        after = optax.linear_schedule(peak, end, decay_end - warm)
    elif cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    else:  # rsqrt: peak at the end of warmup, then peak * sqrt(warmup / step)
        after = lambda count: peak * jax.lax.rsqrt((count + max(warm, 1)) / max(warm, 1))  # noqa: E731
    return optax.join_schedules([warmup, after], [warm])


def decay_mask(params: Any) -> Any:
    """True for matrices and embeddings; False for norm scales and biases."""

    def decays(path, _):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        return not any(n in NO_DECAY_NAMES or n.endswith("norm") for n in names)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(cfg, total_steps)
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    )
    return optax.chain(*parts), schedule
