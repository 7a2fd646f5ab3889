"""What a run compiles, built once from its config: the model, optimizer, state layout on the mesh, and
the jitted train and eval steps. `jaxllm train` runs it; `jaxllm plan` compiles it ahead of time for a
TPU slice or the local devices without running it."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh

from jaxllm import JaxllmError, tree
from jaxllm import sharding as shd
from jaxllm.models import lora
from jaxllm.models.decoder import Decoder, abstract_params
from jaxllm.train import preference as pref
from jaxllm.train import step as st
from jaxllm.train.optimizer import make_optimizer
from jaxllm.train.prune import with_pruning

BATCH_FIELDS = {
    "inputs": jnp.int32,
    "targets": jnp.int32,
    "positions": jnp.int32,
    "segment_ids": jnp.int32,
    "loss_weights": jnp.float32,
    "ref_logps": jnp.float32,
}  # ref_logps: precomputed DPO references


def optimizer(run) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The run's optimizer (with magnitude pruning chained last when asked) and its schedule."""
    tx, schedule = make_optimizer(run.optim, run.train.steps)
    return with_pruning(tx, run.prune), schedule


@dataclasses.dataclass(frozen=True)
class Program:
    model: nn.Module
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    trainable: Callable | None  # path predicate of the trained subset (None: every param)
    boxed: Any  # the train state's shapes with logical-axis boxes
    shardings: Any  # of the train state
    frozen_boxed: Any  # an adapter run's frozen base ({} otherwise)
    frozen_shardings: Any
    mesh: Mesh
    batch_size: int
    seq_len: int
    train_step: Callable  # run(state, batch, frozen, ref) -> (state, metrics), with .lower(...)
    eval_step: Callable  # run(params, batch, frozen, ref) -> metrics with their count (tokens or pairs)
    reference: pref.Reference | None = None  # a DPO run's reference (None: no reference model)
    ref_boxed: Any = dataclasses.field(default_factory=dict)  # the step's `ref` input ({}: none)
    ref_shardings: Any = None
    batch_fields: tuple[str, ...] = tuple(BATCH_FIELDS)
    step_cfg: st.StepConfig = st.StepConfig()  # what the steps were made with (`st.make_loss(model, step_cfg)`)

    def abstract_state(self) -> Any:
        return shd.placed(self.boxed, self.shardings)

    def abstract_frozen(self) -> Any:
        return shd.placed(self.frozen_boxed, self.frozen_shardings) if self.frozen_boxed else {}

    def abstract_ref(self) -> Any:
        return shd.placed(self.ref_boxed, self.ref_shardings) if self.ref_boxed else {}

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        sharding = shd.batch_sharding(self.mesh)
        return {
            k: jax.ShapeDtypeStruct((self.batch_size, self.seq_len), BATCH_FIELDS[k], sharding=sharding)
            for k in self.batch_fields
        }

    def compile_train_step(self):
        """The train step compiled for the mesh's devices (the executable a run calls). Raises
        `OutOfMemory` when the compiler refuses it for memory."""
        try:
            return self.train_step.lower(
                self.abstract_state(), self.abstract_batch(), self.abstract_frozen(), self.abstract_ref()
            ).compile()
        except Exception as e:  # XLA raises its own runtime error type; only memory refusals are ours
            oom = OutOfMemory.parse(str(e))
            if oom is None:
                raise
            raise oom from None


class OutOfMemory(JaxllmError):
    """The compiler's refusal of a step for memory, with the amounts it gave (bytes; None if not said)."""

    def __init__(self, message: str, needed: float | None, capacity: float | None):
        super().__init__(message)
        self.needed, self.capacity = needed, capacity

    _SIZE = r"([\d.]+)\s*([KMGT]i?B?|[KMGT]|B)"

    @classmethod
    def parse(cls, text: str) -> OutOfMemory | None:
        if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
            return None
        first = text.strip().splitlines()[0]
        exceeds = r"required for [^(]*\(" + cls._SIZE + r"\) exceeds available \w+ \(" + cls._SIZE + r"\)"
        m = re.search(exceeds, text) or re.search(r"Used " + cls._SIZE + r" of " + cls._SIZE, text)
        if m is None:
            return cls(first, None, None)
        return cls(first, _bytes(m.group(1), m.group(2)), _bytes(m.group(3), m.group(4)))

    def refusal(self, program: Program, run) -> str:
        """The one-line refusal `jaxllm train` gives for a step that does not fit."""
        need = f"{self.needed / 2**30:.1f} GiB" if self.needed else "more memory"
        cap = f"{self.capacity / 2**30:.1f} GiB" if self.capacity else "what it has"
        return (
            f"the train step does not fit: it needs {need} per device and a "
            f"{program.mesh.devices.flat[0].device_kind} has {cap} (mesh {dict(program.mesh.shape)}, remat="
            f"{run.model.remat}, grad_accum_steps={run.optim.grad_accum_steps}); run `jaxllm plan` with the "
            "same --config flags and --search for a setting that fits"
        )


def _bytes(number: str, unit: str) -> float:
    scale = {"B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit[0]]
    return float(number) * scale


def build(run, mesh: Mesh) -> Program:
    """The run's model, optimizer, state layout and jitted steps on `mesh` (nothing is allocated)."""
    model = Decoder(run.model)
    tx, schedule = optimizer(run)
    trainable = lora.trainable_fn(run.lora, run.model)
    boxed = st.abstract_state(model, tx, trainable)
    shardings = st.state_shardings(boxed, mesh, offload_opt_state=run.optim.host_offload)
    frozen_boxed, frozen_sh = {}, None
    if trainable is not None:
        frozen_boxed = tree.partition(abstract_params(model.cfg), trainable)[1]
        frozen_sh = shd.shardings_for(frozen_boxed, mesh)
    reference = reference_of(run, trainable)
    ref_boxed, ref_sh = {}, None
    if reference is not None and reference.kind == "start":  # the trainable params as they start
        ref_boxed, ref_sh = boxed.params, shardings.params
    elif reference is not None and reference.kind == "model":
        ref_boxed = abstract_params(run.ref_model)
        ref_sh = shd.shardings_for(ref_boxed, mesh)
    step_cfg = st.StepConfig(
        grad_accum_steps=run.optim.grad_accum_steps,
        z_loss=run.train.z_loss,
        dropout_seed=run.seed,
        loss_chunk=run.train.loss_chunk,
        host_offload=run.optim.host_offload,
        objective=run.train.objective,
        preference=run.preference,
        reference=reference,
    )
    train_step = st.jit_train_step(
        st.make_train_step(model, tx, schedule, step_cfg), shardings, mesh, frozen_sh, ref_sh
    )
    eval_step = st.make_eval_step(model, mesh, shardings.params, frozen_sh, cfg=step_cfg, ref_shardings=ref_sh)
    fields = tuple(k for k in BATCH_FIELDS if k != "ref_logps" or (reference and reference.kind == "batch"))
    return Program(
        model=model,
        tx=tx,
        schedule=schedule,
        trainable=trainable,
        boxed=boxed,
        shardings=shardings,
        frozen_boxed=frozen_boxed,
        frozen_shardings=frozen_sh,
        mesh=mesh,
        batch_size=run.data.batch_size,
        seq_len=run.data.block_size,
        train_step=train_step,
        eval_step=eval_step,
        reference=reference,
        ref_boxed=ref_boxed,
        ref_shardings=ref_sh,
        batch_fields=fields,
        step_cfg=step_cfg,
    )


def reference_of(run, trainable: Callable | None) -> pref.Reference | None:
    """Where a DPO run's reference log-probs come from (as TRL): precomputed with the data; else
    `preference.model_ref`; else, for fresh adapters over a frozen base, the base with the adapters
    switched off; else the trainable params as they were at step 0 (an adapter continued from
    `lora.init_adapter`, `modules_to_save`, or a full fine-tune's frozen copy of the start)."""
    if run.train.objective != "dpo":
        return None
    if run.preference.precompute_ref_logps:
        return pref.Reference("batch")
    if run.preference.model_ref:
        return pref.Reference("model", Decoder(run.ref_model))
    if trainable is not None and not run.lora.init_adapter and not run.lora.modules_to_save:
        plain = dataclasses.replace(run.model, lora_rank=0, lora_targets=(), lora_dropout=0.0)
        return pref.Reference("base", Decoder(plain))
    return pref.Reference("start")
