"""The tutorial's commands as a reader pastes them, on tiny local models of each family: both
autotrain lines verbatim (model and data paths swapped for local ones, MLP widths no multiple of
the quantization block), the Falcon QLoRA recipe, and the BLOOM sampling example."""

import json
import os
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

sys.path.insert(0, os.path.dirname(__file__))
from test_hf import _assert_close, _hf_logits, _jax_logits, _padded_batch  # noqa: E402

from jaxllm.cli import run as cli_run  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The article's two lines, as printed there but for the model and data paths.
AUTOTRAIN_TRAIN = (
    "jaxllm finetune --llm --train --project OUT --model BASE --data_path DATA.jsonl --text_column text "
    "--use_apex --learning_rate 1e-4 --train_batch_size 2 --num_train_epochs 3 --trainer sft "
    "--model_max_length 2048 --block_size 512 --save_dir ./output"
)
AUTOTRAIN_LLM = (
    'jaxllm llm --train --project_name "FineTuning Llama-2" --model BASE --data_path DATA.jsonl '
    "--use_peft --use_int4 --learning_rate 2e-4 --train_batch_size 2 --num_train_epochs 3 --trainer sft "
    "--model_max_length 2048"
)
# Widths that are no multiple of 64 (NF4's block): Llama's MLP 96; Falcon's 160; BLOOM's 4 x 72 = 288 and 72.
FAMILIES = {
    "llama": lambda common: transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, **common
    ),
    "falcon": lambda common: transformers.FalconConfig(
        hidden_size=64,
        ffn_hidden_size=160,
        num_attention_heads=4,
        new_decoder_architecture=True,
        num_kv_heads=2,
        **common,
    ),
    "bloom": lambda common: transformers.BloomConfig(hidden_size=72, n_head=4, **common),
}


@pytest.fixture(scope="module")
def made(tmp_path_factory, tok):
    """Tiny model folders of each family with the 512-piece tokenizer, a 64-row Guanaco-style JSONL
    (short rows: 2 rows of 2,048 tokens an epoch, the fewest that fill a batch of 2) and a dataset
    folder laid out as timdettmers/openassistant-guanaco's."""
    from jaxllm.data.corpus import embedded_sft_records

    root = tmp_path_factory.mktemp("tutorial")
    records = embedded_sft_records()
    short = [r["text"] for r in records if 50 <= len(tok.encode(r["text"])) <= 60][:64]
    (root / "guanaco.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in short))
    (root / "guanaco").mkdir()
    for split, rows in (("train", records[:300]), ("eval", records[300:320])):
        (root / "guanaco" / f"openassistant_best_replies_{split}.jsonl").write_text(
            "".join(json.dumps({"text": r["text"]}) + "\n" for r in rows)
        )
    common = dict(
        vocab_size=512,
        num_hidden_layers=2,
        initializer_range=0.2,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
    )
    for family, config in FAMILIES.items():
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(config(common)).save_pretrained(root / family)
        shutil.copy(tok.path, root / family / "tokenizer.model")
    return root


def _run(lines: list[str], cwd, **paths) -> subprocess.CompletedProcess:
    """Command lines run as a reader runs them: shell-split, parsed by the `jaxllm` command, on a
    one-device machine, from `cwd` (one after another in one process, to import JAX once)."""
    argvs = []
    for line in lines:
        for placeholder, path in paths.items():
            line = line.replace(placeholder, shlex.quote(str(path)))
        argvs.append(shlex.split(line))
        assert argvs[-1][0] == "jaxllm"
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=ROOT,
        XLA_FLAGS=" ".join(
            f
            for f in os.environ.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")
        ),
    )
    driver = "import json, sys; from jaxllm.cli import run; [run(argv[1:]) for argv in json.loads(sys.argv[1])]"
    proc = subprocess.run(
        [sys.executable, "-c", driver, json.dumps(argvs)], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _logits_agree(ours, theirs_model, base_model=None):
    ids, mask, positions = _padded_batch()
    ids = ids % 512
    theirs = _hf_logits(theirs_model.eval(), ids, mask, positions)
    _assert_close(_jax_logits(*ours, ids, mask, positions), theirs, mask, "export")
    if base_model is not None:  # the fine-tuning shows: the export is not the base
        base = _hf_logits(base_model.eval(), ids, mask, positions)
        assert np.abs(theirs - base)[mask.astype(bool)].max() > 1e-4 * np.abs(base).max()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_both_article_lines_run_verbatim(made, family, tmp_path):
    from jaxllm.load import load_model

    base, data = made / family, made / "guanaco.jsonl"
    proc = _run([AUTOTRAIN_TRAIN, AUTOTRAIN_LLM], tmp_path, BASE=base, **{"DATA.jsonl": data})
    assert "jaxllm: note: --use_apex (mixed precision) does not apply on CPU" in proc.stderr
    first, second = (json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"'))
    assert "jaxllm: note: no --use_peft: jaxllm finetune trains LoRA adapters (r=16)" in proc.stderr
    assert first["written"] == {"adapter": "./output/adapter"} and np.isfinite(first["val_loss"])
    config = json.load(open(tmp_path / "OUT" / "config.json"))
    assert (config["data"]["block_size"], config["data"]["batch_size"], config["lora"]["r"]) == (512, 2, 16)
    assert config["lora"]["quantization"] == "none"
    peft_model = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base), tmp_path / "output" / "adapter"
    )
    _logits_agree(
        load_model(str(base), adapter=str(tmp_path / "output" / "adapter"))[:2],
        peft_model,
        transformers.AutoModelForCausalLM.from_pretrained(base),
    )

    adapter = tmp_path / "FineTuning Llama-2" / "adapter"
    assert second["written"] == {"adapter": str(adapter.relative_to(tmp_path))} and np.isfinite(second["val_loss"])
    config = json.load(open(tmp_path / "FineTuning Llama-2" / "config.json"))
    assert (config["data"]["block_size"], config["lora"]["quantization"], config["lora"]["r"]) == (2048, "nf4", 16)
    metrics = [json.loads(line) for line in open(tmp_path / "FineTuning Llama-2" / "metrics.jsonl")]
    assert sum(m["split"] == "val" for m in metrics) == 2  # before the first step and at the end: 3 rows, padded
    peft_model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), adapter)
    _logits_agree(
        load_model(str(base), adapter=str(adapter))[:2],
        peft_model,
        transformers.AutoModelForCausalLM.from_pretrained(base),
    )


def test_falcon_qlora_recipe_on_a_tiny_falcon(made, tmp_path):
    """configs/falcon_qlora.py as the README runs it, on a Guanaco-shaped dataset folder; the tiny folder
    is the scale-down (the model's shapes come from it), one step instead of 500."""
    from jaxllm.load import load_model

    line = (
        "jaxllm finetune --config=configs/falcon_qlora.py --model=FALCON --data_path=GUANACO "
        "--project_name=runs/falcon-guanaco --merge_adapter --config.train.steps=1 "
        "--config.train.eval_batches=1 --config.generate.max_new_tokens=0"
    )
    proc = _run([line], tmp_path, FALCON=made / "falcon", GUANACO=made / "guanaco", **{"configs/": f"{ROOT}/configs/"})
    (summary,) = (json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"'))
    run = tmp_path / "runs" / "falcon-guanaco"
    config = json.load(open(run / "config.json"))
    assert config["data"]["paths"] == [str(made / "guanaco" / "openassistant_best_replies_train.jsonl")]
    assert (
        config["lora"]["r"],
        config["lora"]["alpha"],
        config["lora"]["dropout"],
        config["lora"]["quantization"],
        config["data"]["block_size"],
        config["data"]["batch_size"],
        config["optim"]["grad_accum_steps"],
    ) == (64, 16.0, 0.1, "nf4", 512, 16, 4)
    assert summary["step"] == 1 and np.isfinite(summary["val_loss"])
    base = transformers.AutoModelForCausalLM.from_pretrained(made / "falcon")
    peft_model = peft.PeftModel.from_pretrained(base, run / "adapter")
    _logits_agree(load_model(str(made / "falcon"), adapter=str(run / "adapter"))[:2], peft_model)
    assert os.path.isfile(run / "merged" / "config.json")


def test_bloom_sampling_example(made, capsys):
    """The tutorial's Bloom-560m call on a tiny BLOOM folder: top-k 50, top-p 0.9, 150 new tokens, 75 wide."""
    argv = [
        "generate",
        f"--model={made / 'bloom'}",
        "--prompt=The meaning of life is",
        "--max_new_tokens=150",
        "--top_k=50",
        "--top_p=0.9",
        "--seed=1",
    ]
    assert cli_run(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines[0].startswith("The meaning of life is") and len(lines) >= 3
    assert all(len(line) <= 75 for line in lines) and len(" ".join(lines)) > 150


def _sharded_bin(model, folder, shards=3, dtype=None):
    """`model`'s weights as PyTorch pickles the way the article's 70B model ships them: shards
    pytorch_model-0000N-of-0000M.bin (fp16) with an index, no safetensors."""
    state = {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in model.state_dict().items()}
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({k: state[k] for k in part}, os.path.join(folder, file))
        weight_map.update({k: file for k in part})
    total = sum(v.numel() * v.element_size() for v in state.values())
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)


def test_the_article_line_with_its_hub_ids(made, tmp_path, monkeypatch):
    """The article's second line as printed, model and data by Hub id: the 70B model's repository laid out as
    it is (fp16 pickle shards, an index, no safetensors) holding a tiny Llama, and the Guanaco data set's two
    files; the cache is offline. It trains on the train file, evaluates on the eval file with --valid_split
    test, and writes an adapter PEFT loads onto the transformers model with equal logits."""
    from hubcache import offline, put_repo

    from jaxllm.load import load_model

    base = transformers.AutoModelForCausalLM.from_pretrained(made / "llama", dtype=torch.float32)
    repo = tmp_path / "repo"
    repo.mkdir()
    base.config.save_pretrained(repo)
    shutil.copy(made / "llama" / "tokenizer.model", repo / "tokenizer.model")
    _sharded_bin(base, repo, dtype=torch.float16)
    home = tmp_path / "hf"
    put_repo(home, "Riiid/sheep-duck-llama-2-70b-v1.1", {name: repo / name for name in os.listdir(repo)})
    rows = [json.loads(line) for line in open(made / "guanaco.jsonl")]
    put_repo(
        home,
        "timdettmers/openassistant-guanaco",
        {
            "openassistant_best_replies_train.jsonl": "".join(json.dumps(r) + "\n" for r in rows[:48]),
            "openassistant_best_replies_eval.jsonl": "".join(json.dumps(r) + "\n" for r in rows[48:56]),
        },
        repo_type="dataset",
    )
    offline(monkeypatch, home)
    line = (
        AUTOTRAIN_LLM.replace("BASE", "Riiid/sheep-duck-llama-2-70b-v1.1").replace(
            "DATA.jsonl", "timdettmers/openassistant-guanaco"
        )
        + " --valid_split test"
    )
    proc = _run([line], tmp_path)
    (summary,) = (json.loads(out) for out in proc.stdout.splitlines() if out.startswith('{"'))
    run = tmp_path / "FineTuning Llama-2"
    config = json.load(open(run / "config.json"))
    assert config["checkpoint"]["init_from"].startswith("Riiid/sheep-duck-llama-2-70b-v1.1@")
    assert config["lora"]["quantization"] == "nf4" and np.isfinite(summary["val_loss"])
    adapter = json.load(open(run / "adapter" / "adapter_config.json"))
    assert adapter["base_model_name_or_path"] == "Riiid/sheep-duck-llama-2-70b-v1.1"
    fp16 = transformers.AutoModelForCausalLM.from_pretrained(repo, dtype=torch.float32)  # the .bin, as shipped
    peft_model = peft.PeftModel.from_pretrained(fp16, run / "adapter")
    _logits_agree(
        load_model("Riiid/sheep-duck-llama-2-70b-v1.1", adapter=str(run / "adapter"))[:2],
        peft_model,
        transformers.AutoModelForCausalLM.from_pretrained(repo, dtype=torch.float32),
    )
