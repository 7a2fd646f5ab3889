"""`jaxllm eval`: lm-evaluation-harness on any model jaxllm loads (a Hugging Face folder or Hub id with
an adapter, a training workdir): the harness's own results table and JSON.

`JaxllmLM` is registered with the harness as "jaxllm" (`lm_eval.simple_evaluate(model="jaxllm",
model_args="pretrained=PATH")` once this module is imported); it is `jaxllm.train.tasks.HarnessLM`
over what `jaxllm.load.load_model` loads.

    results = evaluate("meta-llama/Llama-2-7b-hf", "hellaswag,arc_easy", num_fewshot=0, limit=100)
    print(table(results))
"""

from __future__ import annotations

import datetime
import json
import os
import re
from collections.abc import Sequence
from typing import Any

from jaxllm import JaxllmError, atomic
from jaxllm.config import check_number
from jaxllm.load import load_model
from jaxllm.train.tasks import (  # lm_eval from there: without it, the one line saying how to install it
    HarnessLM,
    get_model,
    lm_eval,
    lm_utils,
    register_model,
    resolve_tasks,
    task_manager,
)


class JaxllmLM(HarnessLM):
    """`JaxllmLM(pretrained=PATH_OR_HUB_ID)`: anything `jaxllm.load.load_model` loads (with `adapter`,
    `revision`, `dtype`), or already loaded objects as `HarnessLM` takes them."""

    def __init__(
        self,
        pretrained: str = "",
        adapter: str = "",
        revision: str | None = None,
        dtype: str = "float32",
        *args: Any,  # batch_size, max_length, ...: as HarnessLM takes them
        add_bos: bool | None = None,
        **objects: Any,
    ):
        if pretrained:
            if objects.get("model") is not None:
                raise JaxllmError("JaxllmLM: give pretrained=PATH or model/params/tokenizer, not both")
            model, params, tokenizer, loaded_bos = load_model(
                pretrained, dtype=dtype, adapter=adapter, revision=revision
            )
            objects.update(model=model, params=params, tokenizer=tokenizer)
            add_bos = loaded_bos if add_bos is None else add_bos
        elif objects.get("model") is None:
            raise JaxllmError(
                "JaxllmLM needs pretrained=PATH (a model folder, Hub id or workdir) or model, params and tokenizer"
            )
        super().__init__(pretrained, adapter, revision, dtype, *args, add_bos=add_bos, **objects)


try:  # lm_eval --model jaxllm, simple_evaluate(model="jaxllm", ...) once this module is imported
    register_model("jaxllm")(JaxllmLM)
except ValueError:  # "already registered": by this module imported before (a reload) it is fine, else not
    first = get_model("jaxllm")
    if (first.__module__, first.__qualname__) != (__name__, "JaxllmLM"):
        raise


def evaluate(
    model: str | HarnessLM,
    tasks: str | Sequence[str],
    *,
    adapter: str = "",
    revision: str | None = None,
    dtype: str = "float32",
    num_fewshot: int | None = None,
    batch_size: int = 8,
    limit: int | float | None = None,
    include_path: str = "",
    seed: Sequence[int] = (0, 1234, 1234, 1234),
    bootstrap_iters: int = 100000,
) -> dict:
    """lm_eval.simple_evaluate's results for `model` (a path or Hub id, or a JaxllmLM) on `tasks`; the tasks
    are checked before the model loads. `seed`: (python, numpy, torch, few-shot) as the harness's --seed."""
    names = resolve_tasks(tasks, include_path)
    if limit is not None:
        check_number("limit", limit, low=0, low_open=True)
        limit = int(limit) if limit >= 1 and float(limit).is_integer() else limit  # N documents, or a fraction < 1
    lm = (
        model
        if isinstance(model, HarnessLM)
        else JaxllmLM(model, adapter=adapter, revision=revision, dtype=dtype, batch_size=batch_size, seed=seed[0])
    )
    return lm_eval.simple_evaluate(
        model=lm,
        model_args=lm.get_model_info(),
        tasks=names,
        num_fewshot=num_fewshot,
        batch_size=lm.batch_size,
        limit=limit,
        task_manager=task_manager(include_path),
        log_samples=False,
        bootstrap_iters=bootstrap_iters,
        random_seed=seed[0],
        numpy_random_seed=seed[1],
        torch_random_seed=seed[2],
        fewshot_random_seed=seed[3],
    )


def seeds(text: str) -> tuple[int, int, int, int]:
    """--seed as the harness's CLI takes it: one integer for all four seeds, or python,numpy,torch,few-shot."""
    parts = text.split(",")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) not in (1, 4):
        raise JaxllmError(f"--seed={text!r}: give one integer, or four (python,numpy,torch,few-shot)")
    return values * 4 if len(values) == 1 else values


def table(results: dict) -> str:
    """The harness's own results table (and its groups table when there are groups)."""
    text = lm_utils.make_table(results)
    return text + ("\n" + lm_utils.make_table(results, "groups") if results.get("groups") else "")


def write_results(results: dict, output_path: str, model: str) -> str:
    """The results JSON as the harness's CLI writes it (indent 2, its encoder for odd values), atomically:
    a path ending in .json is the file; else the file is `<output_path>/<model>/results_<time>.json` (the
    model's name with / -> __, as the harness). Returns the path written."""
    path = output_path
    if not output_path.endswith(".json"):
        stamp = datetime.datetime.now().isoformat().replace(":", "-")
        name = re.sub(r"[\"<>:/|\\?*\[\]]+", "__", model.rstrip("/")) or "model"
        path = os.path.join(output_path, name, f"results_{stamp}.json")
    atomic.as_path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic.write(path, json.dumps(results, indent=2, default=lm_utils.handle_non_serializable, ensure_ascii=False))
    return path
