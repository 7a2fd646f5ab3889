"""Benchmark tasks scored in-process with lm-evaluation-harness: `HarnessLM`, the harness's model
interface over a model jaxllm holds (a training run's params, wherever they are), and `run_tasks`, what
`train.eval_tasks` calls at every validation. (`jaxllm eval`, loading a model by path or Hub id, is
`jaxllm.evaluate`.)

Tokenization, truncation, rolling windows, greedy flags and stop strings follow the harness's own `hf`
backend (HFLM), so a model scores what it scores there. Requests are scored in fixed shapes: one request
per row, right-padded to the next power of two of its length (capped at the context), `batch_size` rows
at a time split over the mesh's batch axes, so a whole benchmark compiles a handful of programs.

    scores = run_tasks(model, params, tokenizer, ["arc_easy"], limit=50)  # {"arc_easy/acc": 0.41, ...}
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import numbers
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from jaxllm import JaxllmError
from jaxllm import sharding as shd
from jaxllm.config import check_number
from jaxllm.models.decoder import Decoder
from jaxllm.models.generation import GenerateConfig, generate

try:  # the optional `eval` extra. jaxllm never imports torch; simple_evaluate does when it is installed (its
    # environment report and torch seed), which `jaxllm eval` accepts and run_tasks avoids. jaxllm.evaluate
    # takes lm_eval and its registry from here, so a missing harness is this one line there too
    import lm_eval  # noqa: F401
    from lm_eval import evaluator
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import get_model, register_model  # noqa: F401
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.tasks import TaskManager
except ImportError as e:
    if not (e.name or "").startswith("lm_eval"):
        raise
    raise JaxllmError("benchmark evaluation needs lm-evaluation-harness: pip install 'jaxllm[eval]'") from None

MIN_WIDTH = 16  # the shortest padded row: tiny requests share one program


def bucket(n: int, cap: int) -> int:
    """The padded length of a row of `n` tokens: the next power of two (at least MIN_WIDTH), at most `cap`."""
    return min(max(MIN_WIDTH, 1 << max(n - 1, 0).bit_length()), max(cap, n))


class HarnessLM(TemplateLM):
    """lm-evaluation-harness model over loaded objects (`model`, `params`, `tokenizer`, `add_bos`: a training
    run's, params left where they are); `pretrained` / `adapter` / `revision` / `dtype` only name them in
    the results (`jaxllm.evaluate.JaxllmLM` loads them from a path)."""

    def __init__(
        self,
        pretrained: str = "",
        adapter: str = "",
        revision: str | None = None,
        dtype: str = "float32",
        batch_size: int | str = 8,
        max_length: int = 0,
        max_gen_toks: int = 256,
        seed: int = 0,
        *,
        model: Decoder | None = None,
        params: Any = None,
        tokenizer: Any = None,
        add_bos: bool | None = None,
        max_batch_size: Any = None,
        device: Any = None,
    ):  # the last two: what the harness passes every LM
        super().__init__()
        del max_batch_size, device  # JAX places work on its devices; batches are fixed-size
        if isinstance(batch_size, str) and not batch_size.isdigit():
            raise JaxllmError(f"batch_size={batch_size!r}: give a number of rows (jaxllm pads every batch to it)")
        check_number("batch_size", int(batch_size), low=1, integer=True)
        if model is None or params is None or tokenizer is None:
            raise JaxllmError(
                "HarnessLM needs model, params and tokenizer (a path or Hub id: jaxllm.evaluate.JaxllmLM)"
            )
        if getattr(model.cfg, "num_labels", 0):
            raise JaxllmError(
                f"the model has a score head (num_labels={model.cfg.num_labels}), no language-model "
                "head: benchmarks score token probabilities"
            )
        self.source = {"pretrained": pretrained, "adapter": adapter, "revision": revision, "dtype": dtype}
        self.model = Decoder(dataclasses.replace(model.cfg, remat="none"))
        self.params, self.mesh = _placed(params)
        self.tokenizer = tokenizer
        self.add_bos = bool(add_bos) and tokenizer.bos_id >= 0
        self._max_length = int(max_length) or model.cfg.max_seq_len
        if not 1 < self._max_length <= model.cfg.max_seq_len:
            raise JaxllmError(f"max_length={max_length}: give 2 .. the model's context ({model.cfg.max_seq_len})")
        self._max_gen_toks, self.seed = int(max_gen_toks), int(seed)
        shards = shd.batch_shards(self.mesh)
        self.rows = -(-int(batch_size) // shards) * shards  # every batch has this many rows, split over the mesh
        self.pad_id = max(tokenizer.pad_id, 0)
        self._bos_text = tokenizer.decode([tokenizer.bos_id]) if tokenizer.bos_id >= 0 else ""

    # what the harness reads: the same definitions as its hf backend
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context and the first rolling window condition on: BOS, else EOS (as HFLM)."""
        return self.tokenizer.bos_id if self.tokenizer.bos_id >= 0 else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.rows

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **kwargs
    ) -> list[int]:
        """Ids of `string` with BOS first where the family's tokenizer adds it (as HF's encode with special
        tokens does), unless the text already starts with BOS; add_special_tokens=False adds nothing."""
        add = self.add_bos if add_special_tokens is None else add_special_tokens and self.add_bos
        if add_special_tokens is None and self._bos_text and string.startswith(self._bos_text):
            add = False
        ids = ([self.tokenizer.bos_id] if add else []) + list(self.tokenizer.encode(string))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids without special tokens (HF's decode with skip_special_tokens=True)."""
        special = {self.tokenizer.bos_id, self.tokenizer.eos_id, self.tokenizer.pad_id}
        return self.tokenizer.decode([i for i in ids if i not in special])

    def get_model_info(self) -> dict:
        return {"model_source": "jaxllm", **{k: v for k, v in self.source.items() if v}}

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probs, whether greedy decoding gives the continuation) per
        ((context, continuation) or None, context ids, continuation ids), as HFLM: the window is the
        last max_length + 1 tokens of context + continuation, log-softmax in float32."""
        windows = []
        for _, context, continuation in requests:
            if not context or not continuation or len(continuation) > self.max_length:
                raise JaxllmError(
                    f"a request with {len(context)} context and {len(continuation)} continuation "
                    f"tokens: each needs at least one, the continuation at most {self.max_length}"
                )
            windows.append((list(context) + list(continuation))[-(self.max_length + 1) :])
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i]))  # similar lengths share a batch
        out: list[Any] = [None] * len(windows)
        for chunk in self._batches(order, "loglikelihood batches", disable_tqdm):
            width = bucket(max(len(windows[i]) - 1 for i in chunk), self.max_length)
            inputs = np.full((self.rows, width), self.pad_id, np.int32)
            targets = np.zeros((self.rows, width), np.int32)
            for row, i in enumerate(chunk):
                inputs[row, : len(windows[i]) - 1] = windows[i][:-1]
                targets[row, : len(windows[i]) - 1] = windows[i][1:]
            logp, greedy = self._score(inputs, targets)
            for row, i in enumerate(chunk):
                n, k = len(windows[i]) - 1, len(requests[i][2])
                answer = (float(logp[row, n - k : n].sum(dtype=np.float64)), bool(greedy[row, n - k : n].all()))
                out[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return out

    def _batches(self, items: list[int], desc: str, disable: bool):
        """`items` in batches of `self.rows`, with a progress bar (on process 0)."""
        bar = tqdm(range(0, len(items), self.rows), desc=desc, disable=disable or jax.process_index() != 0)
        return (items[start : start + self.rows] for start in bar)

    def _score(self, inputs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sharding = shd.batch_sharding(self.mesh)
        put = lambda x: jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])  # noqa: E731
        with shd.activate(self.mesh):
            logp, greedy = _score_fn(self.model.cfg)(self.params, put(inputs), put(targets))
        return shd.to_host(logp), shd.to_host(greedy)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts over the harness's disjoint rolling windows of max_length tokens."""
        windows, owners = [], []
        for k, (string,) in enumerate(r.args for r in requests):
            for context, continuation in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owners.append(k)
        totals = [0.0] * len(requests)
        for k, (logp, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[k] += logp
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations (jaxllm.models.generation's KV-cache decoding) cut at the first stop string; greedy unless
        the task samples (do_sample with temperature, top_k, top_p)."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        eos_text = self.tokenizer.decode([self.eot_token_id]) if self.eot_token_id >= 0 else None
        out: list[Any] = [None] * len(requests)
        for indices in groups.values():
            context_kwargs = requests[indices[0]].args[1]
            kwargs = normalize_gen_kwargs(context_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = kwargs.pop("max_gen_toks")
            room = self.max_length - max_new
            if room <= 0:
                raise JaxllmError(f"max_gen_toks={max_new} leaves no room for a prompt in max_length={self.max_length}")
            sample = bool(kwargs.get("do_sample"))
            cfg = GenerateConfig(
                max_new_tokens=max_new,
                temperature=float(kwargs.get("temperature", 0.0)) if sample else 0.0,
                top_k=int(kwargs.get("top_k") or 0) if sample else 0,
                top_p=float(kwargs.get("top_p") or 1.0) if sample else 1.0,
                seed=self.seed,
            )
            prompts = {
                i: self.tok_encode(requests[i].args[0], left_truncate_len=room) or [self.prefix_token_id]
                for i in indices
            }
            indices = sorted(indices, key=lambda i: -len(prompts[i]))
            for chunk in self._batches(indices, "generate_until batches", disable_tqdm):
                rows = [prompts[i] for i in chunk] + [prompts[chunk[-1]]] * (self.rows - len(chunk))
                new = generate(
                    self.model,
                    self.params,
                    rows,
                    cfg,
                    eos_id=self.eot_token_id,
                    pad_id=self.pad_id,
                    width=bucket(len(rows[0]), room),
                )
                for i, ids in zip(chunk, new):
                    text = postprocess_generated_text(self.tok_decode(ids), until, None)
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out


def _placed(params: Any) -> tuple[Any, Mesh]:
    """`params` and the mesh batches are split over: the one they are sharded over (a training run's), else
    one over this process's devices, all on the batch axis, with the params replicated on it."""
    mesh = shd.mesh_of(params)
    if mesh is None:
        devices = jax.local_devices()
        mesh = Mesh(np.asarray(devices).reshape(len(devices), 1, 1), shd.MESH_AXES)
        params = jax.device_put(params, NamedSharding(mesh, P()))
    return params, mesh


@functools.lru_cache(maxsize=8)
def _score_fn(model_cfg):
    """Jitted (params, inputs [B, L], targets [B, L]) -> (log p(target) [B, L], target is the argmax [B, L])."""
    model = Decoder(model_cfg)

    @jax.jit
    def score(params, inputs_BL, targets_BL):
        logits_BLV = model.apply({"params": params}, inputs_BL).astype(jnp.float32)
        logp_BLV = jax.nn.log_softmax(logits_BLV, axis=-1)
        logp_BL = jnp.take_along_axis(logp_BLV, targets_BL[..., None], axis=-1)[..., 0]
        return logp_BL, jnp.argmax(logits_BLV, axis=-1) == targets_BL

    return score


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str = "") -> TaskManager:
    """The harness's tasks plus the YAML tasks under `include_path` (indexed once per process)."""
    if include_path and not os.path.isdir(include_path):
        raise JaxllmError(f"--include_path {include_path!r} is not a folder of task YAML files")
    return TaskManager(include_path=include_path or None)


def resolve_tasks(tasks: str | Sequence[str], include_path: str = "") -> list[Any]:
    """Task names (comma-separated or a list; globs like mmlu_* as the harness's CLI) and task YAML files,
    checked before any model is loaded: an unknown name is a JaxllmError."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise JaxllmError("give tasks: --tasks=hellaswag,arc_easy")
    manager = task_manager(include_path)
    resolved: list[Any] = []
    for name in names:
        if name.endswith((".yaml", ".yml")):
            from lm_eval.tasks._yaml_loader import load_yaml  # pylint: disable=g-import-not-at-top

            found = [load_yaml(f, resolve_func=True) for f in sorted(glob.glob(name))]
        else:
            found = manager.match_tasks([name])
        if not found:
            raise JaxllmError(
                f"unknown task {name!r}; `lm-eval ls tasks` lists the harness's tasks, or give a "
                "folder of task YAML files with --include_path"
            )
        resolved += [f for f in found if f not in resolved]
    return resolved


def run_tasks(
    model: Decoder,
    params: Any,
    tokenizer: Any,
    tasks: str | Sequence[str],
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    include_path: str = "",
    batch_size: int = 8,
    add_bos: bool = True,
    seed: int = 1234,
) -> dict[str, float]:
    """Task scores for a model in this process (a training run's params, wherever they are): flat
    {"arc_easy/acc": 0.41, "tiny_gen/exact_match/strict-match": 0.0, ...} (filter "none" left out, no
    stderrs). Runs the harness's `evaluate` on tasks set up as simple_evaluate does (few-shot count and
    seed), without simple_evaluate's environment report, which imports torch and probes the GPUs."""
    names = resolve_tasks(tasks, include_path)
    lm = HarnessLM(model=model, params=params, tokenizer=tokenizer, add_bos=add_bos, batch_size=batch_size)
    loaded = task_manager(include_path).load(names)
    for task in loaded["tasks"].values():
        if num_fewshot is not None and task.get_config("num_fewshot") != 0:  # a task fixed at 0 stays 0
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=seed)
    results = evaluator.evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=0, log_samples=False)
    return flat_metrics(results or {})


def flat_metrics(results: dict) -> dict[str, float]:
    """{"task/metric[/filter]": value} of a harness results dict's numbers (no stderrs, no aliases)."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, comma, filt = key.partition(",")  # metrics are "name,filter"; name, alias, sample_len are not
            if not comma or "_stderr" in metric or isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            out[f"{task}/{metric}" + (f"/{filt}" if filt and filt != "none" else "")] = float(value)
    return out
