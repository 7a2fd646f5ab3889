"""Fuzzing the loaders of every file a user points jaxllm at: random bytes, truncations, bit flips and
changed JSON values of valid files must each end in a clean load or a one-line JaxllmError, never in
another exception, never in a hang. (Config .py files are code the user wrote, so they are not fuzzed.)"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import traceback

import numpy as np
import pytest

from jaxllm import JaxllmError

SEED = 20240601
CASES_PER_KIND = 28
CASE_TIMEOUT_S = 10.0


class _Timeout(BaseException):
    """A case ran past CASE_TIMEOUT_S (BaseException: no loader's `except Exception` swallows it)."""


# ------------------------------------------------------------------ valid files of each kind


def _model_folder(folder: str) -> None:
    """config.json + model.safetensors of a one-layer Llama, and pytorch_model.bin of the same tensors."""
    import torch
    from safetensors.numpy import save_file

    from jaxllm.hf.config import hf_config_from_model
    from jaxllm.models.config import ModelConfig

    cfg = ModelConfig(
        vocab_size=32, num_layers=1, embed_dim=8, num_heads=2, mlp_dim=16, max_seq_len=16, dtype="float32"
    )
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config_from_model(cfg, "float32"), f)
    rng = np.random.default_rng(0)
    tensors = {
        "model.embed_tokens.weight": rng.normal(size=(32, 8)).astype(np.float32),
        "model.norm.weight": np.ones(8, np.float32),
        "lm_head.weight": rng.normal(size=(32, 8)).astype(np.float16),
    }
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, os.path.join(folder, "pytorch_model.bin"))


def _seeds(root: str) -> dict[str, tuple[str, bytes]]:
    """kind -> (file name, valid content)."""
    import sentencepiece as spm
    import tokenizers
    from tokenizers import models, pre_tokenizers, trainers

    folder = os.path.join(root, "model")
    os.makedirs(folder)
    _model_folder(folder)

    def read(name: str) -> bytes:
        with open(os.path.join(folder, name), "rb") as f:
            return f.read()

    index = {
        "metadata": {"total_size": 0},
        "weight_map": {
            "model.embed_tokens.weight": "model.safetensors",
            "model.norm.weight": "model.safetensors",
            "lm_head.weight": "model.safetensors",
        },
    }
    adapter = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "base",
        "r": 4,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "use_rslora": False,
        "modules_to_save": None,
    }  # as PEFT writes it
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    text = ["the quick brown fox jumps over the lazy dog", "hello world, jax and flax"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<s>", "</s>"]))
    sp_model = os.path.join(root, "sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text * 5), model_prefix=sp_model, vocab_size=40, model_type="bpe", minloglevel=2
    )
    with open(sp_model + ".model", "rb") as f:
        sp_bytes = f.read()
    metrics = "".join(
        json.dumps(r) + "\n"
        for r in [{"step": 1, "loss": 3.5}, {"step": 2, "loss": "nan"}, {"step": 2, "val_loss": 3.1}]
    )
    jsonl = "".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(text[:6]))
    return {
        "config.json": ("config.json", read("config.json")),
        "model.safetensors": ("model.safetensors", read("model.safetensors")),
        "model.safetensors.index.json": ("model.safetensors.index.json", json.dumps(index).encode()),
        "pytorch_model.bin": ("pytorch_model.bin", read("pytorch_model.bin")),
        "adapter_config.json": ("adapter_config.json", json.dumps(adapter).encode()),
        "tokenizer.json": ("tokenizer.json", tok.to_str().encode()),
        "tokenizer.model": ("tokenizer.model", sp_bytes),
        "metrics.jsonl": ("metrics.jsonl", metrics.encode()),
        "data.jsonl": ("data.jsonl", jsonl.encode()),
        "prompts.txt": ("prompts.txt", "def f(x):\nThe for statement\n\u00e9t\u00e9\n".encode()),
    }


# ------------------------------------------------------------------ mutations


_ODD_VALUES = [None, -1, 0, 1e308, -1e308, 2**70, "", "x", "../../etc/passwd", [], {}, [1, "a"], True, 3.5]


def _mutate_json_value(data: bytes, rng: random.Random) -> bytes:
    """One value somewhere in a JSON document (or in one JSONL line) replaced by an odd one."""
    lines = data.split(b"\n")
    i = rng.randrange(len(lines))
    try:
        doc = json.loads(lines[i])
    except ValueError:
        return data
    paths, stack = [], [((), doc)]
    while stack:
        path, node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            paths.append(path + (k,))
            stack.append((path + (k,), v))
    if not paths:
        return data
    *parents, leaf = rng.choice(paths)
    node = doc
    for k in parents:
        node = node[k]
    if isinstance(node, dict) and rng.random() < 0.25:
        del node[leaf]
    else:
        node[leaf] = rng.choice(_ODD_VALUES)
    lines[i] = json.dumps(doc).encode()
    return b"\n".join(lines)


def _mutate(data: bytes, rng: random.Random, is_json: bool) -> tuple[str, bytes]:
    kinds = ["random", "truncate", "bitflip", "splice"] + (["json_value"] * 3 + ["deep", "bigint"] if is_json else [])
    kind = rng.choice(kinds)
    if kind == "random":
        return kind, bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 8, 64, 700])))
    if kind == "truncate":
        return kind, data[: rng.randrange(len(data))]
    if kind == "bitflip":
        out = bytearray(data)
        for _ in range(rng.randint(1, 12)):
            j = rng.randrange(len(out))
            out[j] ^= 1 << rng.randrange(8)
        return kind, bytes(out)
    if kind == "splice":  # a run of the file's bytes repeated or moved
        a, b = sorted(rng.randrange(len(data) + 1) for _ in range(2))
        return kind, data[:a] + data[a:b] * rng.randint(0, 3) + data[b:]
    if kind == "deep":
        return kind, b'{"a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    if kind == "bigint":
        return kind, b'{"r": ' + b"7" * 5000 + b', "step": 1, "text": "a", "weight_map": {}}'
    return kind, _mutate_json_value(data, rng)


# ------------------------------------------------------------------ loaders


def _load(kind: str, folder: str, path: str) -> None:
    """What jaxllm does with a file of `kind` at `path` (in `folder`), read to the end."""
    if kind == "config.json":
        from jaxllm.hf.config import model_config_from_hf
        from jaxllm.hf.weights import read_config

        model_config_from_hf(read_config(folder))
    elif kind in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        from jaxllm.hf.weights import TensorFiles

        files = TensorFiles(folder)
        for name in files.names():
            files.read(name, None)
    elif kind == "adapter_config.json":
        from jaxllm.hf.peft import read_adapter_config

        read_adapter_config(folder)
    elif kind in ("tokenizer.json", "tokenizer.model"):
        from jaxllm.data.tokenizer import load_tokenizer

        tok = load_tokenizer(folder if kind == "tokenizer.json" else path)
        tok.decode(tok.encode("hello world"))
    elif kind == "metrics.jsonl":
        from jaxllm.train.metrics import read_metrics

        def skipped(line):  # a bad line is skipped with a warning, never fatal: count the warning as caught
            raise JaxllmError(line)

        read_metrics(folder, warn=skipped)
    elif kind == "data.jsonl":
        from jaxllm.data.sources import JsonlSource
        from jaxllm.prep.config import InputConfig
        from jaxllm.prep.readers import Reader

        list(Reader(InputConfig()).read([("json", path)]))
        source = JsonlSource([path])
        for i in range(len(source)):
            source[i]
    elif kind == "prompts.txt":
        from jaxllm.cli import read_prompt_file

        read_prompt_file(path)
    else:
        raise AssertionError(kind)


def _run_case(kind: str, folder: str, path: str) -> str:
    """ "ok", "error" (a JaxllmError) or the traceback of anything else."""

    def alarm(*_):
        raise _Timeout()

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_TIMEOUT_S)
    try:
        _load(kind, folder, path)
        return "ok"
    except JaxllmError as e:
        assert "\n" not in str(e).strip(), f"a JaxllmError of several lines: {e}"
        return "error"
    except _Timeout:
        return f"hang: over {CASE_TIMEOUT_S} s"
    except Exception:  # what the test is looking for: any other exception is a finding
        return traceback.format_exc(limit=-3)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return _seeds(str(tmp_path_factory.mktemp("seeds")))


def test_valid_seed_files_load(seeds, tmp_path):
    """The unmutated files load cleanly, so the mutations below start from files that work."""
    for kind, (name, data) in seeds.items():
        folder = tmp_path / kind
        _folder_for(seeds, kind, str(folder))
        with open(folder / name, "wb") as f:
            f.write(data)
        assert _run_case(kind, str(folder), str(folder / name)) == "ok", kind


def _folder_for(seeds: dict, kind: str, folder: str) -> None:
    """A folder holding the valid files `kind` is read with (a model folder's other files)."""
    os.makedirs(folder, exist_ok=True)
    companions = {
        "model.safetensors": ["config.json"],
        "model.safetensors.index.json": ["config.json", "model.safetensors"],
        "pytorch_model.bin": ["config.json"],
        "tokenizer.json": [],
    }.get(kind, [])
    for other in companions:
        name, data = seeds[other]
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)


@pytest.mark.parametrize(
    "kind",
    [
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "adapter_config.json",
        "tokenizer.json",
        "tokenizer.model",
        "metrics.jsonl",
        "data.jsonl",
        "prompts.txt",
    ],
)
def test_mutated_files_load_or_fail_in_one_line(seeds, tmp_path, kind):
    name, data = seeds[kind]
    rng = random.Random(f"{SEED}-{kind}")
    findings, outcomes = [], {"ok": 0, "error": 0}
    for case in range(CASES_PER_KIND):
        how, mutated = _mutate(data, rng, name.endswith((".json", ".jsonl")))
        folder = tmp_path / f"case{case}"
        _folder_for(seeds, kind, str(folder))
        with open(folder / name, "wb") as f:
            f.write(mutated)
        result = _run_case(kind, str(folder), str(folder / name))
        if result in outcomes:
            outcomes[result] += 1
        else:
            findings.append(f"{kind} case {case} ({how}, {len(mutated)} bytes):\n{result}")
        shutil.rmtree(folder)
    assert not findings, "\n".join(findings)
    assert outcomes["error"] > 0  # the mutations do reach the loaders' checks
