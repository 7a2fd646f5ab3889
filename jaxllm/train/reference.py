"""Precomputed DPO reference log-probs (`preference.precompute_ref_logps`): one forward pass of the
reference over every training and validation pair before the first step, kept in the workdir.

Training then holds no reference weights and runs no reference forward: each batch carries its pairs'
reference sums (`ref_logps`, the data pipeline attaches them by pair index). The file is written once,
atomically, by process 0 and read again on resume, so a resumed run trains on the same numbers; it is
keyed by what the numbers depend on (reference, base, adapter, data, tokenization), and a different
key is recomputed rather than reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxllm import atomic
from jaxllm import sharding as shd
from jaxllm.data.pipeline import make_reference_iterator, preference_documents
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.distributed import until_all_done
from jaxllm.train import preference as pref

FILE = "reference_logps.npz"


def key_of(run) -> str:
    """What the reference numbers depend on, as a short hash."""
    p, d = run.preference, run.data
    parts = dict(
        ref=p.model_ref,
        init_from=run.checkpoint.init_from,
        adapter=run.lora.init_adapter,
        model=dataclasses.asdict(run.ref_model or run.model),
        data=dataclasses.asdict(d),
    )
    parts["data"].pop("num_workers", None)
    parts["data"].pop("batch_size", None)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_or_compute(run, workdir: str, compute) -> dict[str, np.ndarray]:
    """{"train": [N, 2], "val": [M, 2]} from the workdir's file when its key matches, else `compute()`
    (every process takes part), written by process 0 before anyone goes on."""
    path, key = os.path.join(workdir, FILE), key_of(run)
    try:
        with atomic.as_path(path).open("rb") as f:
            saved = np.load(io.BytesIO(f.read()))
            if str(saved["key"]) == key:
                return {"train": saved["train"], "val": saved["val"]}
    except (OSError, ValueError, KeyError):
        pass
    values = compute()
    if jax.process_index() == 0:
        buf = io.BytesIO()
        np.savez(buf, key=np.asarray(key), **values)
        atomic.write(path, buf.getvalue())
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jaxllm-reference-logps-written")
    return values


def compute(
    run,
    program,
    tokenizer: Tokenizer,
    reference: pref.Reference,
    frozen: Any,
    ref: Any,
    ref_shardings: Any,
    rows: list[int],
) -> dict[str, np.ndarray]:
    """Every pair's reference (chosen, rejected) answer log-prob sums, for both splits, over all processes
    (`reference`: where they come from, never `batch`; `ref`: its params placed with `ref_shardings`)."""
    mesh = program.mesh

    def sums(ref, frozen, batch):
        return pref.reference_logps(reference, program.model, ref, frozen, batch, run.train.loss_chunk)

    fn = jax.jit(
        sums,
        in_shardings=(ref_shardings or {}, program.frozen_shardings or {}, shd.batch_sharding(mesh)),
        out_shardings=shd.replicated(mesh),
    )
    out = {}
    for split, docs in zip(("train", "val"), preference_documents(run.data)):
        values = np.full((len(docs), 2), np.nan, np.float32)
        it = make_reference_iterator(run.data, tokenizer, split, rows=rows)
        for batch in until_all_done(it):
            batch = dict(batch)
            doc = batch.pop("doc_index")
            with shd.activate(mesh):
                seq = np.asarray(jax.device_get(fn(ref, frozen, shd.global_batch(batch, mesh))))
            starts = (batch["positions"] == 0) & (batch["segment_ids"] > 0) & (doc >= 0)
            for i, t in zip(*np.nonzero(starts)):
                s = int(batch["segment_ids"][i, t])
                values[doc[i, t], (s - 1) % 2] = seq[rows[i], s]
        if jax.process_count() > 1:  # each process filled its rows' pairs
            values = np.fmax.reduce(multihost_utils.process_allgather(values), axis=0)
        out[split] = values
    return out
