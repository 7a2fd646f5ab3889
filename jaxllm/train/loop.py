"""The training loop: config -> mesh -> sharded state -> Grain batches -> jitted steps -> checkpoints."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import signal
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from jaxllm import JaxllmError, atomic, tree
from jaxllm import sharding as shd
from jaxllm.config import build, to_json
from jaxllm.data.pipeline import (
    check_pairs,
    check_splits,
    make_eval_iterator,
    make_train_iterator,
    tokenizer_for,
)
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.distributed import DistributedConfig, initialize, until_all_done
from jaxllm.hf.peft import load_adapter
from jaxllm.models import lora
from jaxllm.models.decoder import abstract_params
from jaxllm.models.generation import GenerateConfig, continuation, generate, wrap
from jaxllm.train import reference as ref_pass
from jaxllm.train import step as st
from jaxllm.train.checkpoint import Checkpointer, checkpoint_dir
from jaxllm.train.metrics import MetricsWriter, peak_tflops, step_metrics
from jaxllm.train.program import OutOfMemory, Program, reference_of
from jaxllm.train.program import build as build_program
from jaxllm.train.prune import sparsity
from jaxllm.train.run import Run, check_workdir
from jaxllm.train.start import load_frozen, load_init_params, load_reference, parse, pin


def train(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) a training job in `workdir`; returns the final metrics. A run refused before it
    writes a file (a config error, another model's workdir) leaves no folder it created."""
    with atomic.no_leftovers(workdir):
        return _train(cfg, workdir)


def _train(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    initialize(build(DistributedConfig, cfg.get("distributed"), "distributed"))  # first: Hub ids resolve on process 0
    cfg = pin(cfg, workdir)  # Hub ids at the commits this run reads (on resume: the ones it started from)
    run = parse(cfg)
    atomic.check_writable(workdir, "workdir")
    checkpoint_dir(os.path.join(workdir, "checkpoints"))  # a scheme Orbax cannot write fails here, not after compiling
    check_workdir(workdir, cfg)
    if run.data.block_size > run.model.max_seq_len:
        raise JaxllmError(f"data.block_size={run.data.block_size} exceeds model.max_seq_len={run.model.max_seq_len}")
    if run.train.eval_tasks:  # an unknown task name (or no harness) stops the run before anything compiles
        from jaxllm.train import tasks

        tasks.resolve_tasks(run.train.eval_tasks, run.train.eval_tasks_include_path)
    if run.data.format == "preference":  # pairs are few and checked whole: a bad row stops the run before it compiles
        check_pairs(run.data)
    mesh = shd.make_mesh(run.mesh)
    shd.check_batch(run.data.batch_size, mesh, run.optim.grad_accum_steps)
    program = build_program(run, mesh)
    try:  # compiled before any data or weights are read: a step that does not fit stops the run here
        train_step = program.compile_train_step()
    except OutOfMemory as e:  # with the amounts and the way to find a setting that fits
        raise JaxllmError(e.refusal(program, run)) from None
    tokenizer = _tokenizer(run)
    rows = shd.process_rows(mesh, run.data.batch_size)  # this process's rows of the global batch
    frozen, saved = load_frozen(run, mesh, program.trainable) if program.trainable is not None else ({}, {})
    ref_values = {"train": None, "val": None}
    if program.reference is not None and program.reference.kind == "batch":
        ref_values = _reference_values(run, program, tokenizer, workdir, rows, frozen, saved)
    train_iter = make_train_iterator(run.data, tokenizer, rows=rows, ref_logps=ref_values["train"])
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), run.checkpoint)
    state, ref = _initial_state(run, program, ckpt, train_iter, frozen, saved)
    start = int(jax.device_get(state.step))
    writer = MetricsWriter(
        workdir,
        is_primary=jax.process_index() == 0,
        total_steps=run.train.steps,
        initial_step=start,
        progress=run.train.progress,
        tensorboard="tensorboard" in run.train.trackers,
        trackers=run.train.trackers,
        mlflow_tracking_uri=run.train.mlflow_tracking_uri,
    )
    writer.write_config(to_json(cfg))  # and starts the trackers with it
    if start:
        writer.log(f"resumed from {ckpt.directory}/{start}")
    if program.trainable is not None:
        n_train = tree.count(state.params)
        writer.log(
            f"training {n_train:,} params ({100 * n_train / run.model.num_params():.2f}% of the model): "
            f"LoRA r={run.lora.r} on {', '.join(run.model.lora_targets)}; base {run.model.quantization}"
        )
    writer.log(
        f"model: {run.model.num_params():,} params; mesh {dict(mesh.shape)}; "
        f"{jax.device_count()} devices, {jax.process_count()} processes"
    )

    def validate(step: int, params) -> dict[str, float]:
        ev = evaluate(
            lambda p, b: program.eval_step(p, b, frozen, ref),
            params,
            lambda: make_eval_iterator(run.data, tokenizer, rows=rows, ref_logps=ref_values["val"]),
            mesh,
            run.train.eval_batches,
        )
        writer.write(step, ev, prefix="val")
        if run.train.eval_tasks:
            scores = _task_scores(run, program.model, tree.union(params, frozen), tokenizer)
            writer.write(step, scores, prefix="tasks")
            writer.log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        if "perplexity" in ev:
            writer.log(f"step {step}: val loss {ev['loss']:.4f}, perplexity {ev['perplexity']:.1f}")
        else:
            writer.log(
                f"step {step}: val loss {ev['loss']:.4f}, reward accuracy {ev['rewards/accuracies']:.3f} "
                f"over {ev['pairs']:.0f} pairs"
            )
        return ev

    stop = _StopFlag(run.checkpoint.preemption_deadline_s)
    try:
        state, final = _steps(run, train_step, state, (frozen, ref), train_iter, mesh, ckpt, writer, validate, stop)
        ckpt.wait()
    finally:
        stop.restore()
        ckpt.close()
    if run.generate.max_new_tokens and not final.get("preempted") and not run.model.num_labels:
        text = sample(program.model, tree.union(state.params, frozen), tokenizer, run.generate, run.data.add_bos)
        writer.log("sample:\n" + wrap(run.generate.prompt + text))
        final["sample"] = text
    writer.close()
    return final


def _tokenizer(run: Run) -> Tokenizer:
    """The run's tokenizer, checked against the model and the data splits (before any weights load)."""
    tokenizer = tokenizer_for(run.data)
    if tokenizer.vocab_size > run.model.vocab_size:
        raise JaxllmError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but model.vocab_size="
            f"{run.model.vocab_size}; set --config.model.vocab_size={tokenizer.vocab_size}"
        )
    check_splits(run.data, tokenizer, process_index=jax.process_index(), process_count=jax.process_count())
    return tokenizer


def _initial_state(
    run: Run, program: Program, ckpt: Checkpointer, train_iter, frozen: Any, saved: dict
) -> tuple[st.TrainState, Any]:
    """(state, reference params): the latest checkpoint (rewinding `train_iter`), else a fresh start from
    `init_from` or a random init (an adapter run's: `saved`, the base's trainable leaves, over the frozen
    base); a DPO reference that is the starting policy is rebuilt as it started (on resume too)."""
    kind = program.reference.kind if program.reference is not None else None
    ref = load_reference(run, program.mesh, program.ref_shardings) if kind == "model" else {}
    if run.checkpoint.resume and ckpt.latest_step() is not None:
        state = ckpt.restore(program.abstract_state(), train_iter, set_aside=True)
        if kind == "start":
            ref = _start_params(run, program, saved)
        return state, ref
    params = _start_params(run, program, saved)
    if kind == "start":  # a copy: the state's params are donated to (updated in place by) the step
        ref = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=program.shardings.params)(params)
    return st.state_from_params(params, program.tx, program.shardings), ref


def _task_scores(run: Run, model, params, tokenizer: Tokenizer) -> dict[str, float]:
    """`train.eval_tasks` scored by lm-evaluation-harness on the run's params (every process takes part in
    the sharded forward passes; process 0 writes the scores)."""
    from jaxllm.train import tasks  # lm-evaluation-harness, an optional extra: imported only when asked for

    t = run.train
    return tasks.run_tasks(
        model,
        params,
        tokenizer,
        t.eval_tasks,
        num_fewshot=None if t.eval_tasks_fewshot < 0 else t.eval_tasks_fewshot,
        limit=t.eval_tasks_limit or None,
        include_path=t.eval_tasks_include_path,
        batch_size=run.data.batch_size,
        add_bos=run.data.add_bos,
        seed=run.seed,
    )


def _reference_values(
    run: Run, program: Program, tokenizer: Tokenizer, workdir: str, rows: list[int], frozen: Any, saved: dict
) -> dict[str, np.ndarray]:
    """Precomputed reference log-probs of every pair (both splits): the workdir's, or one pass of the
    reference the run would otherwise run at every step (`reference_of` without precomputing)."""

    def compute():
        plain = dataclasses.replace(run, preference=dataclasses.replace(run.preference, precompute_ref_logps=False))
        reference, ref, ref_sh = reference_of(plain, program.trainable), {}, None
        if reference.kind == "model":
            ref_sh = shd.shardings_for(abstract_params(run.ref_model), program.mesh)
            ref = load_reference(run, program.mesh, ref_sh)
        elif reference.kind == "start":
            ref, ref_sh = _start_params(run, program, saved), program.shardings.params
        return ref_pass.compute(run, program, tokenizer, reference, frozen, ref, ref_sh, rows)

    return ref_pass.load_or_compute(run, workdir, compute)


def _start_params(run: Run, program: Program, saved: dict) -> Any:
    """The trainable params a fresh run starts from: adapters (and `modules_to_save`), or the whole model
    from `init_from` or a random init."""
    if program.trainable is None and run.checkpoint.init_from:
        return load_init_params(run.checkpoint.init_from, run.model, program.mesh)
    state, _ = st.init_state(
        program.model, program.tx, program.mesh, jax.random.key(run.seed), program.trainable, program.shardings
    )
    return state.params if program.trainable is None else fresh_adapter_params(run, state.params, saved)


def _steps(
    run: Run,
    train_step,
    state,
    inputs,
    train_iter,
    mesh,
    ckpt: Checkpointer,
    writer: MetricsWriter,
    validate,
    stop: _StopFlag,
) -> tuple[st.TrainState, dict[str, Any]]:
    """Steps to `train.steps` (or early stopping, or a preemption): logging, validation, checkpoints.
    `inputs`: (frozen, ref), the step's read-only params."""
    start = step = int(jax.device_get(state.step))
    flops_per_token = run.model.train_flops_per_token(run.data.block_size)
    peak = peak_tflops(jax.devices()[0])
    tokens_per_step = run.data.batch_size * run.data.block_size
    best, bad_evals, last_val = float("inf"), 0, None
    final: dict[str, Any] = {}
    window: list[dict] = []  # step metrics since the last log line, still on device
    t0, last_logged = time.perf_counter(), start
    if run.train.eval_at_start and start == 0:
        final.update(initial_val_loss=validate(0, state.params)["loss"])
    while step < run.train.steps:
        state, metrics = train_step(state, shd.global_batch(next(train_iter), mesh), *inputs)
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
            values.update(
                step_time_s=dt,
                **step_metrics(
                    step_time_s=dt,
                    tokens=tokens_per_step,
                    flops_per_token=flops_per_token,
                    num_devices=jax.device_count(),
                    peak=peak,
                ),
            )
            writer.write(step, values)
            final.update(train_loss=values["loss"], tokens_per_s=values.get("tokens_per_s"))
            t0, last_logged = time.perf_counter(), step
        evaluate_now = (run.train.eval_every and step % run.train.eval_every == 0) or step == run.train.steps
        val_loss = None
        if evaluate_now:
            ev = validate(step, state.params)
            val_loss = last_val = ev["loss"]
            final.update(val_loss=ev["loss"], val_perplexity=ev.get("perplexity"))
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
    final.update(step=step, best_val_loss=best if best < float("inf") else last_val)
    return state, final


def fresh_adapter_params(run: Run, params: Any, saved: dict) -> Any:
    """Trainable params of a new adapter run (`params`: freshly initialised ones): PEFT-initialised adapters
    (or `lora.init_adapter`'s), and the base's own values for `modules_to_save`."""
    adapters, _ = tree.partition(params, lambda path: path[-1] in lora.ADAPTER_LEAVES)
    if run.lora.init_adapter:
        loaded, file_cfg = load_adapter(run.lora.init_adapter, run.model)
        theirs = lora.apply(file_cfg, lora.base_config(run.model))
        if (theirs.lora_rank, theirs.lora_targets) != (run.model.lora_rank, run.model.lora_targets):
            raise JaxllmError(
                f"lora.init_adapter {run.lora.init_adapter} has r={theirs.lora_rank} on "
                f"{list(theirs.lora_targets)}; set lora.r and lora.target_modules to match"
            )
        loaded_adapters, loaded_saved = tree.partition(loaded, lambda path: path[-1] in lora.ADAPTER_LEAVES)
        like = lambda new, old: jax.device_put(new.astype(old.dtype), old.sharding)  # noqa: E731
        adapters = jax.tree.map(like, loaded_adapters, adapters)
        # the file's saved modules replace the base's; a causal-LM adapter on a score model has no `score`
        # (its fresh head stays)
        replaced, kept = tree.partition(saved, lambda path: tree.has(loaded_saved, path))
        saved = tree.union(kept, jax.tree.map(like, loaded_saved, replaced))
    return tree.union(adapters, saved)


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
            self._timer = threading.Timer(
                self.deadline_s,
                _exit_now,
                args=(
                    f"the preemption checkpoint was not written within checkpoint.preemption_deadline_s="
                    f"{self.deadline_s:g}; exiting without it (the previous checkpoint is intact)",
                    1,
                ),
            )
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
    """Validation metrics over the first `num_batches` global batches (a process out of rows feeds padding):
    the loss (and perplexity) of a language model, or a preference objective's loss and reward metrics."""
    parts = [
        {k: float(v) for k, v in jax.device_get(eval_fn(params, shd.global_batch(batch, mesh))).items()}
        for batch in itertools.islice(until_all_done(eval_iter_fn()), num_batches)
    ]
    out = st.combine_eval(parts) if parts else {"loss": 0.0, "tokens": 0.0}
    out.pop("z_loss", None)
    if "tokens" in out:
        out = {"loss": out["loss"], "perplexity": math.exp(min(out["loss"], 50.0))}
    return out


def _window_mean(window: list[dict]) -> dict[str, float]:
    """Every step metric averaged over the logging window (lr and skipped as of its last step)."""
    return {
        k: float(v) if k in ("lr", "skipped") else float(np.mean([float(m[k]) for m in window]))
        for k, v in window[-1].items()
    }


def sample(model, params, tokenizer: Tokenizer, gen: GenerateConfig, add_bos: bool = True) -> str:
    """A continuation of `gen.prompt`, which starts as the run's documents do (BOS when the data adds one
    and the tokenizer has it; else, for an empty prompt, the EOS that ends the document before)."""
    prompt_ids = tokenizer.encode(gen.prompt)
    if add_bos and tokenizer.bos_id >= 0:
        prompt_ids = [tokenizer.bos_id] + prompt_ids
    elif not prompt_ids:
        prompt_ids = [tokenizer.eos_id]
    max_new = min(gen.max_new_tokens, model.cfg.max_seq_len - len(prompt_ids))
    ids = generate(
        model,
        params,
        [prompt_ids],
        dataclasses.replace(gen, max_new_tokens=max_new),
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
    )[0]
    return continuation(tokenizer, prompt_ids, ids)
