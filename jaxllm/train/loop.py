"""The training loop: config -> mesh -> sharded state -> Grain batches -> jitted steps -> checkpoints."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from jaxllm import JaxllmError
from jaxllm import sharding as shd
from jaxllm.config import build, check_sections, to_json
from jaxllm.convert import load_init_params
from jaxllm.data.pipeline import DataConfig, check_splits, make_eval_iterator, make_train_iterator, padding_like
from jaxllm.data.tokenizer import load_tokenizer
from jaxllm.distributed import DistributedConfig, initialize
from jaxllm.generate import GenerateConfig, generate, wrap
from jaxllm.models import lora
from jaxllm.models.config import ModelConfig
from jaxllm.models.decoder import Decoder
from jaxllm.train import step as st
from jaxllm.train.checkpoint import CheckpointConfig, Checkpointer, abstract_with_shardings
from jaxllm.train.metrics import MetricsWriter, peak_tflops, step_metrics
from jaxllm.train.optimizer import OptimConfig
from jaxllm.train.program import OutOfMemory, optimizer
from jaxllm.train.program import build as build_program
from jaxllm.train.prune import PruneConfig, sparsity

SECTIONS = ("seed", "model", "data", "optim", "train", "mesh", "checkpoint", "generate", "distributed", "lora",
            "prune")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """`TrainConfig(**cfg.train)`."""

    steps: int = 1000  # optimizer steps in the whole run
    log_every: int = 10  # steps between metric lines
    eval_every: int = 100  # steps between validation passes; 0 = only at the end
    eval_at_start: bool = False  # also evaluate before the first step (a fine-tuning run's baseline)
    eval_batches: int = 8  # validation batches per pass
    early_stop_patience: int = 0  # stop after this many evaluations without improvement; 0 = never
    early_stop_min_delta: float = 0.0  # an improvement must lower val loss by more than this
    z_loss: float = 0.0  # weight of the log(Z)^2 auxiliary loss (PaLM uses 1e-4)
    loss_chunk: int = 0  # positions per cross-entropy chunk (float32 [B, chunk, V] logits at a time); 0 = whole
    progress: bool = True  # tqdm progress bar on process 0

    def __post_init__(self):
        if self.steps <= 0 or self.log_every <= 0 or self.eval_batches <= 0:
            raise JaxllmError("train: steps, log_every and eval_batches must be positive")
        if self.loss_chunk < 0:
            raise JaxllmError(f"train.loss_chunk={self.loss_chunk} must be >= 0 (0 = no chunking)")


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


def parse(cfg: ml_collections.ConfigDict) -> Run:
    """The run's parts; with `checkpoint.model_from_init` the model's shapes come from `init_from`."""
    check_sections(cfg, SECTIONS)
    checkpoint = build(CheckpointConfig, cfg.get("checkpoint"), "checkpoint")
    model = build(ModelConfig, cfg.get("model"), "model")
    if checkpoint.model_from_init:
        model = _model_from_init(checkpoint.init_from, cfg.get("model") or {}, model)
    run_lora = build(lora.LoraConfig, cfg.get("lora"), "lora")
    prune = build(PruneConfig, cfg.get("prune"), "prune")
    if prune.sparsity and run_lora.r:
        raise JaxllmError("prune.sparsity > 0 prunes trained weights, but lora.r > 0 freezes them; prune a full "
                          "fine-tuning run (lora.r=0) and fine-tune adapters afterwards")
    run = Run(prune=prune, seed=int(cfg.get("seed", 0)), model=lora.apply(run_lora, model), lora=run_lora,
               data=build(DataConfig, cfg.get("data"), "data"), optim=build(OptimConfig, cfg.get("optim"), "optim"),
               train=build(TrainConfig, cfg.get("train"), "train"), mesh=build(shd.MeshConfig, cfg.get("mesh"), "mesh"),
               checkpoint=checkpoint, generate=build(GenerateConfig, cfg.get("generate"), "generate"),
               distributed=build(DistributedConfig, cfg.get("distributed"), "distributed"))
    chunk = run.train.loss_chunk
    if chunk and chunk < run.data.block_size and run.data.block_size % chunk:
        raise JaxllmError(f"train.loss_chunk={chunk} does not divide data.block_size={run.data.block_size}; "
                          "pick a divisor of it")
    return run


def _model_from_init(source: str, section: Any, run_model: ModelConfig) -> ModelConfig:
    """The source's ModelConfig with the run's non-shape fields (dtype, remat, dropout, ...) on top."""
    from jaxllm.convert import SHAPE_FIELDS, source_model_config

    if not source:
        raise JaxllmError("checkpoint.model_from_init needs checkpoint.init_from (a Hugging Face folder)")
    base = source_model_config(source)
    shape_keys = [k for k in section.keys() if k in SHAPE_FIELDS or k in ("num_kv_heads", "head_dim")]
    if shape_keys:
        raise JaxllmError(f"model.{shape_keys[0]} comes from {source}'s config with checkpoint.model_from_init; "
                          "remove it from the model section")
    return dataclasses.replace(base, **{k: getattr(run_model, k) for k in section.keys()})


def load_frozen(run: Run, mesh, trainable) -> tuple[dict, dict]:
    """(frozen params, initial values of the trainable base leaves) of an adapter run: the base from
    `checkpoint.init_from`, quantized when asked, split by `trainable` (their shardings: the Program's)."""
    if not run.checkpoint.init_from:
        raise JaxllmError("lora.r > 0 fine-tunes a pretrained base: set checkpoint.init_from to a Hugging Face "
                          "folder or `jaxllm convert` output")
    quantized = run.model if run.model.quantization != "none" else None
    base = load_init_params(run.checkpoint.init_from, lora.base_config(run.model), mesh, quantized=quantized)
    saved, frozen = lora.split(base, trainable)
    return frozen, saved


def fresh_adapter_params(run: Run, model, tx, mesh, trainable, saved: dict) -> Any:
    """Trainable params of a new adapter run: PEFT-initialised adapters (or `lora.init_adapter`'s),
    and the base's own values for `modules_to_save`."""
    state, _ = st.init_state(model, tx, mesh, jax.random.key(run.seed), 1, trainable)
    adapters, _ = lora.split(state.params, lambda path: path[-1] in lora.ADAPTER_LEAVES)
    if run.lora.init_adapter:
        from jaxllm.hf.peft import load_adapter

        loaded, file_cfg = load_adapter(run.lora.init_adapter, run.model)
        theirs = lora.apply(file_cfg, lora.base_config(run.model))
        if (theirs.lora_rank, theirs.lora_targets) != (run.model.lora_rank, run.model.lora_targets):
            raise JaxllmError(f"lora.init_adapter {run.lora.init_adapter} has r={theirs.lora_rank} on "
                              f"{list(theirs.lora_targets)}; set lora.r and lora.target_modules to match")
        loaded_adapters, loaded_saved = lora.split(loaded, lambda path: path[-1] in lora.ADAPTER_LEAVES)
        adapters = jax.tree.map(lambda new, old: jax.device_put(new.astype(old.dtype), old.sharding),
                                loaded_adapters, adapters)
        saved = jax.tree.map(lambda new, old: jax.device_put(new.astype(old.dtype), old.sharding), loaded_saved, saved)
    return lora.merge(adapters, saved)


class _StopFlag:
    """SIGTERM / SIGINT (a preemption notice) asks the loop to checkpoint and exit cleanly; every process
    stops at the same step when any one of them got the signal (`agreed`).

    The checkpoint must be written within `deadline_s` of the signal, else this process says so and
    exits (1) without it (the previous checkpoint is intact); a second signal exits at once (128 + signal).
    """

    def __init__(self, deadline_s: float = 0.0):
        self.requested = False
        self.deadline_s = deadline_s
        self._timer: threading.Timer | None = None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers
                pass

    def _handle(self, signum, frame):
        if self.requested:
            _exit_now(f"a second {signal.Signals(signum).name}: exiting now, without a checkpoint", 128 + signum)
        self.requested = True
        if self.deadline_s > 0:
            self._timer = threading.Timer(self.deadline_s, _exit_now, args=(
                f"the preemption checkpoint was not written within checkpoint.preemption_deadline_s="
                f"{self.deadline_s:g}; exiting without it (the previous checkpoint is intact)", 1))
            self._timer.daemon = True
            self._timer.start()

    def agreed(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        return bool(np.any(multihost_utils.process_allgather(np.array([self.requested]))))

    def restore(self):
        if self._timer is not None:
            self._timer.cancel()
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _exit_now(message: str, code: int) -> None:
    print(f"jaxllm: {message}", file=sys.stderr, flush=True)
    os._exit(code)


def evaluate(eval_fn, params, eval_iter_fn, mesh, num_batches: int) -> dict[str, float]:
    """Validation loss over the first `num_batches` global batches (a process out of rows feeds padding)."""
    ce_sum, weight_sum = 0.0, 0.0
    batches, last = iter(eval_iter_fn()), None
    for _ in range(num_batches):
        batch = next(batches, None)
        if jax.process_count() > 1:  # hosts may run out at different batches: go on while any has rows
            if not bool(np.any(multihost_utils.process_allgather(np.array([batch is not None])))):
                break
            batch = padding_like(last) if batch is None else batch
        elif batch is None:
            break
        last = batch
        ce, w = eval_fn(params, shd.global_batch(batch, mesh))
        ce_sum, weight_sum = ce_sum + float(ce), weight_sum + float(w)
    loss = ce_sum / max(weight_sum, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def train(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) a training job in `workdir`; returns the final metrics."""
    run = parse(cfg)
    initialize(run.distributed)
    primary = jax.process_index() == 0
    writable_dir(workdir, "workdir")
    if run.data.block_size > run.model.max_seq_len:
        raise JaxllmError(f"data.block_size={run.data.block_size} exceeds model.max_seq_len={run.model.max_seq_len}")
    mesh = shd.make_mesh(run.mesh)
    shd.check_batch(run.data.batch_size, mesh, run.optim.grad_accum_steps)
    program = build_program(run, mesh)
    compiled_step = _compile_or_explain(program, run)  # before any data or weights are read
    tokenizer = load_tokenizer(run.data)
    if tokenizer.vocab_size > run.model.vocab_size:
        raise JaxllmError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but model.vocab_size="
                          f"{run.model.vocab_size}; set --config.model.vocab_size={tokenizer.vocab_size}")
    check_splits(run.data, tokenizer, process_index=jax.process_index(), process_count=jax.process_count())

    model, tx, trainable, boxed, shardings = (program.model, program.tx, program.trainable, program.boxed,
                                              program.shardings)
    frozen, saved = {}, {}
    if trainable is not None:
        frozen, saved = load_frozen(run, mesh, trainable)
    rows = shd.process_rows(mesh, run.data.batch_size)  # this process's rows of the global batch
    train_iter = make_train_iterator(run.data, tokenizer, rows=rows)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), run.checkpoint)
    if run.checkpoint.resume and ckpt.latest_step() is not None:
        abstract = abstract_with_shardings(shd.unbox(boxed), shardings)
        state = ckpt.restore(abstract, train_iter)
    elif trainable is not None:
        state = st.state_from_params(fresh_adapter_params(run, model, tx, mesh, trainable, saved), tx, shardings)
    else:
        state, _ = st.init_state(model, tx, mesh, jax.random.key(run.seed), run.data.block_size,
                                 shardings=shardings)
        if run.checkpoint.init_from:
            state = state.replace(params=load_init_params(run.checkpoint.init_from, run.model, mesh))
    del saved
    start = int(jax.device_get(state.step))

    train_step, eval_step = compiled_step, program.eval_step
    eval_iter_fn = lambda: make_eval_iterator(run.data, tokenizer, rows=rows)  # noqa: E731
    flops_per_token = run.model.train_flops_per_token(run.data.block_size)
    peak = peak_tflops(jax.devices()[0])
    tokens_per_step = run.data.batch_size * run.data.block_size

    writer = MetricsWriter(workdir, is_primary=primary, total_steps=run.train.steps, initial_step=start,
                           progress=run.train.progress)
    writer.write_config(to_json(cfg))
    if start:
        writer.log(f"resumed from {ckpt.directory}/{start}")
    if trainable is not None:
        n_train = lora.count(state.params)
        writer.log(f"training {n_train:,} params ({100 * n_train / run.model.num_params():.2f}% of the model): "
                   f"LoRA r={run.lora.r} on {', '.join(run.model.lora_targets)}; base {run.model.quantization}")
    writer.log(f"model: {run.model.num_params():,} params; mesh {dict(mesh.shape)}; "
               f"{jax.device_count()} devices, {jax.process_count()} processes")
    stop = _StopFlag(run.checkpoint.preemption_deadline_s)
    best, bad_evals, last_val = float("inf"), 0, None
    final: dict[str, Any] = {}
    step = start
    window: list[dict] = []  # step metrics since the last log line, still on device
    t0, last_logged = time.perf_counter(), start
    try:
        if run.train.eval_at_start and start == 0:
            ev = evaluate(lambda p, b: eval_step(p, b, frozen), state.params, eval_iter_fn, mesh,
                          run.train.eval_batches)
            writer.write(0, ev, prefix="val")
            writer.log(f"step 0: val loss {ev['loss']:.4f}, perplexity {ev['perplexity']:.1f}")
            final.update(initial_val_loss=ev["loss"])
        while step < run.train.steps:
            batch = shd.global_batch(next(train_iter), mesh)
            state, metrics = train_step(state, batch, frozen)
            window.append(metrics)
            step += 1
            ckpt.check()  # a background save that failed stops the run now, not at the next save
            writer.advance(step)
            if step % run.train.log_every == 0 or step == run.train.steps:
                values = _window_mean(jax.device_get(window))
                if run.prune.sparsity:
                    values["sparsity"] = float(sparsity(state.params, run.prune))
                window = []
                dt = (time.perf_counter() - t0) / max(step - last_logged, 1)
                values.update(step_time_s=dt, **step_metrics(step_time_s=dt, tokens=tokens_per_step,
                                                              flops_per_token=flops_per_token,
                                                              num_devices=jax.device_count(), peak=peak))
                writer.write(step, values)
                final.update(train_loss=values["loss"], tokens_per_s=values.get("tokens_per_s"))
                t0, last_logged = time.perf_counter(), step
            evaluate_now = (run.train.eval_every and step % run.train.eval_every == 0) or step == run.train.steps
            val_loss = None
            if evaluate_now:
                ev = evaluate(lambda p, b: eval_step(p, b, frozen), state.params, eval_iter_fn, mesh,
                              run.train.eval_batches)
                writer.write(step, ev, prefix="val")
                writer.log(f"step {step}: val loss {ev['loss']:.4f}, perplexity {ev['perplexity']:.1f}")
                val_loss = last_val = ev["loss"]
                final.update(val_loss=ev["loss"], val_perplexity=ev["perplexity"])
                if ev["loss"] < best - run.train.early_stop_min_delta:
                    best, bad_evals = ev["loss"], 0
                else:
                    bad_evals += 1
                t0 = time.perf_counter()
            early = run.train.early_stop_patience and bad_evals >= run.train.early_stop_patience
            preempted = stop.agreed() or ckpt.reached_preemption(step)
            periodic = run.checkpoint.every and step % run.checkpoint.every == 0
            if periodic or evaluate_now or preempted or early or step == run.train.steps:
                ckpt.save(step, state, train_iter, val_loss=val_loss)
            if preempted:
                ckpt.wait()  # written before it is called saved (and before the deadline)
                writer.log(f"preemption signal: checkpoint saved at step {step}; exiting")
                final["preempted"] = True
                break
            if early:
                writer.log(f"early stopping at step {step}: no val improvement in {bad_evals} evaluations")
                final["early_stopped"] = True
                break
        ckpt.wait()
    finally:
        stop.restore()
        ckpt.close()
    final.update(step=step, best_val_loss=best if best < float("inf") else last_val)
    if run.generate.max_new_tokens and not final.get("preempted"):
        text = sample(model, lora.merge(state.params, frozen), tokenizer, run.generate)
        writer.log("sample:\n" + wrap(run.generate.prompt + text))
        final["sample"] = text
    writer.close()
    return final


def writable_dir(path: str, what: str) -> None:
    """Creates folder `path` and checks that files can be written in it: before a run, not after."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=".jaxllm-write-check-"):
            pass
    except OSError as e:
        raise JaxllmError(f"{what} {path!r} is not a writable folder ({e.strerror or e}); choose another") from None


def load_run(workdir: str, *, with_frozen: bool = True) -> tuple[Run, Any, dict]:
    """(run, trained params, frozen params) from the latest checkpoint of a training workdir; an adapter
    run's frozen base is rebuilt from its `init_from` (quantized as it was trained) unless `with_frozen`
    is False (then {}: exporting an adapter needs only the adapters)."""
    path = os.path.join(workdir, "config.json")
    try:
        with open(path) as f:
            cfg = ml_collections.ConfigDict(json.load(f))
    except (OSError, json.JSONDecodeError) as e:
        raise JaxllmError(f"cannot read {path} ({e}); is {workdir!r} a jaxllm workdir?") from None
    run = parse(cfg)
    model = Decoder(run.model)
    tx = optimizer(run)[0]
    mesh = shd.make_mesh(shd.MeshConfig(data=-1))
    trainable = lora.trainable_fn(run.lora, run.model)
    boxed = st.abstract_state(model, tx, run.data.block_size, trainable)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), dataclasses.replace(run.checkpoint, async_save=False))
    if ckpt.latest_step() is None:
        raise JaxllmError(f"no checkpoint in {workdir}/checkpoints; train first")
    state = ckpt.restore(abstract_with_shardings(shd.unbox(boxed), st.state_shardings(boxed, mesh)))
    ckpt.close()
    frozen = load_frozen(run, mesh, trainable)[0] if trainable is not None and with_frozen else {}
    return run, state.params, frozen


def load_trained(workdir: str):
    """(model, params, tokenizer, add_bos) from the latest checkpoint of a training workdir."""
    run, params, frozen = load_run(workdir)
    return Decoder(run.model), lora.merge(params, frozen), load_tokenizer(run.data), run.data.add_bos


def _compile_or_explain(program, run: Run):
    """The compiled train step; a step that does not fit the devices' memory stops the run here, with
    the amounts and the way to find a setting that fits."""
    try:
        return program.compile_train_step()
    except OutOfMemory as e:
        from jaxllm.plan import explain

        raise JaxllmError(explain(e, program, run)) from None


def _window_mean(window: list[dict]) -> dict[str, float]:
    """Loss, grad norm and tokens averaged over the logging window (the rest as of its last step)."""
    last = {k: float(v) for k, v in window[-1].items()}
    for key in ("loss", "z_loss", "grad_norm", "tokens"):
        last[key] = float(np.mean([float(m[key]) for m in window]))
    return last


def sample(model, params, tokenizer, gen: GenerateConfig) -> str:
    prompt_ids = [tokenizer.bos_id] + tokenizer.encode(gen.prompt)
    max_new = min(gen.max_new_tokens, model.cfg.max_seq_len - len(prompt_ids))
    ids = generate(model, params, [prompt_ids], dataclasses.replace(gen, max_new_tokens=max_new),
                   eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)[0]
    return tokenizer.decode(ids)
