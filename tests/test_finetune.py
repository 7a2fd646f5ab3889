"""`jaxllm finetune` end to end on tiny local Hugging Face models: autotrain flags -> config, LoRA and
QLoRA runs on the bundled chat set, adapter-only checkpoints, PEFT/transformers loading the outputs,
adapter import to continue or generate, pruning through the loop, and bad input."""

import argparse
import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

sys.path.insert(0, os.path.dirname(__file__))
from test_hf import _assert_close, _hf_logits, _jax_logits, _padded_batch  # noqa: E402

from jaxllm import JaxllmError, cli  # noqa: E402
from jaxllm.autotrain import add_arguments, flags_to_config  # noqa: E402
from jaxllm.load import load_trained  # noqa: E402
from jaxllm.train.start import load_run  # noqa: E402

FAST = [
    "--config.train.progress=False",
    "--config.train.eval_batches=2",
    "--config.checkpoint.async_save=False",
    "--config.generate.max_new_tokens=0",
]


def _base(tmp_path_factory, kind: str) -> str:
    """A tiny random HF model folder with a SentencePiece tokenizer trained on the embedded corpus."""
    from jaxllm.data.config import DataConfig
    from jaxllm.data.pipeline import tokenizer_for

    tok = tokenizer_for(DataConfig(vocab_size=512))
    out = str(tmp_path_factory.mktemp(kind))
    common = dict(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=2,
        initializer_range=0.1,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
    )
    config = {
        "llama": lambda: transformers.LlamaConfig(
            intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, **common
        ),
        "falcon": lambda: transformers.FalconConfig(
            num_attention_heads=4, new_decoder_architecture=True, num_kv_heads=2, **common
        ),
    }[kind]()
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out)
    shutil.copy(tok.path, os.path.join(out, "tokenizer.model"))
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _base(tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def falcon(tmp_path_factory):
    return _base(tmp_path_factory, "falcon")


def _args(argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def test_autotrain_flags_map_onto_the_config(llama, tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"conv": "### Human: hi### Assistant: hello"}) + "\n")
    cfg, workdir = flags_to_config(
        _args(
            [
                "--model",
                llama,
                "--data_path",
                str(jsonl),
                "--text_column",
                "conv",
                "--project_name",
                "p",
                "--lr",
                "2e-4",
                "--train_batch_size",
                "2",
                "--gradient_accumulation",
                "4",
                "--max_steps",
                "500",
                "--trainer",
                "sft",
                "--model_max_length",
                "512",
                "--block_size",
                "-1",
                "--use_peft",
                "--use_int4",
                "--lora_r",
                "64",
                "--lora_alpha",
                "16",
                "--lora_dropout",
                "0.1",
                "--target_modules",
                "query_key_value,dense",
                "--mixed_precision",
                "bf16",
                "--max_grad_norm",
                "0.3",
                "--warmup_ratio",
                "0.03",
                "--scheduler",
                "constant",
                "--weight_decay",
                "0.01",
                "--seed",
                "7",
            ]
        ),
        ["train.log_every=5"],
    )
    assert workdir == "p"
    assert (cfg.checkpoint.init_from, cfg.checkpoint.model_from_init, cfg.data.tokenizer) == (llama, True, llama)
    assert (cfg.data.source, cfg.data.paths, cfg.data.text_field) == ("jsonl", (str(jsonl),), "conv")
    assert (cfg.data.block_size, cfg.data.batch_size, cfg.optim.grad_accum_steps) == (512, 2 * 8 * 4, 4)  # 8 devices
    assert (cfg.optim.learning_rate, cfg.optim.schedule, cfg.optim.grad_clip, cfg.optim.weight_decay) == (
        2e-4,
        "constant",
        0.3,
        0.01,
    )
    assert (cfg.train.steps, cfg.optim.warmup_steps, cfg.train.log_every, cfg.seed) == (500, 15, 5, 7)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.quantization) == (64, 16.0, 0.1, "nf4")
    assert cfg.lora.target_modules == ("query_key_value", "dense") and cfg.model.dtype == "bfloat16"
    default, _ = flags_to_config(
        _args(
            ["--model", llama, "--data_path", "embedded", "--epochs", "1", "--batch_size", "1", "--block_size", "64"]
        ),
        [],
    )
    assert default.lora.r == 16  # no --use_peft: LoRA adapters all the same (with a note)
    full, _ = flags_to_config(
        _args(
            [
                "--model",
                llama,
                "--data_path",
                "embedded",
                "--epochs",
                "1",
                "--batch_size",
                "1",
                "--block_size",
                "64",
                "--lora_r",
                "0",
            ]
        ),
        [],
    )
    assert full.lora.r == 0  # --lora_r 0: full fine-tuning
    assert 20 < full.train.steps < 400  # ~1,400 short Q&A examples packed into 64-token rows, 8 a batch
    with pytest.raises(JaxllmError, match="is neither a local file, glob or folder nor a Hugging Face Hub data set"):
        flags_to_config(_args(["--model", llama, "--data_path", str(tmp_path / "missing.jsonl")]), [])
    with pytest.raises(
        JaxllmError, match="is neither a Hugging Face model folder .no config.json. nor a Hugging Face Hub id"
    ):
        flags_to_config(_args(["--model", str(tmp_path)]), [])


def test_every_autotrain_spelling_and_flag_is_accepted(llama, tmp_path, capsys):
    """autotrain's dash spellings and its other LLM flags: each sets its key, or is accepted with a note."""
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"text": "### Human: hi### Assistant: hello"}) + "\n")
    cfg, workdir = flags_to_config(
        _args(
            [
                "--llm",
                "--train",
                "--project-name",
                "p",
                "--model",
                llama,
                "--data-path",
                str(jsonl),
                "--text-column",
                "text",
                "--batch-size",
                "1",
                "--model-max-length",
                "128",
                "--block-size",
                "64",
                "--save-dir",
                "out",
                "--num-train-epochs",
                "16",
                "--learning-rate",
                "5e-5",
                "--add_eos_token",
                "--padding",
                "right",
                "--optimizer",
                "paged_adamw_8bit",
                "--logging_steps",
                "7",
                "--eval_strategy",
                "steps",
                "--save_total_limit",
                "3",
                "--valid_split",
                "validation",
                "--disable_gradient_checkpointing",
                "--use_flash_attention_2",
                "--use_apex",
                "--auto_find_batch_size",
                "--scheduler",
                "constant_with_warmup",
                "--use-peft",
                "--use_int8",
            ]
        ),
        [],
    )
    notes = capsys.readouterr().err
    assert workdir == "p" and cfg.optim.learning_rate == 5e-5 and cfg.data.text_field == "text"
    assert (cfg.data.block_size, cfg.data.batch_size, cfg.data.add_eos) == (64, 8, True)  # 1 x 8 devices
    assert (cfg.train.log_every, cfg.train.eval_every, cfg.checkpoint.keep, cfg.model.remat) == (7, 7, 3, "none")
    assert (cfg.model.attention, cfg.model.dtype, cfg.optim.schedule, cfg.lora.quantization) == (
        "auto",
        "float32",
        "constant",
        "int8",
    )
    assert cfg.train.steps == 2  # one row an epoch (the one short example), 8 rows a batch
    for flag in (
        "--padding",
        "--optimizer paged_adamw_8bit",
        "--valid_split",
        "--use_apex",
        "--use_flash_attention_2",
        "--auto_find_batch_size",
    ):
        assert f"jaxllm: note: {flag}" in notes, flag
    assert all(line.startswith("jaxllm: note: ") for line in notes.splitlines()) and len(notes.splitlines()) == 6
    assert _args(["--project", "x"]).project_name == "x"

    chat, _ = flags_to_config(
        _args(
            [
                "--model",
                llama,
                "--data_path",
                str(jsonl),
                "--text_column",
                "conv",
                "--chat_template",
                "chatml",
                "--eval_strategy",
                "no",
                "--train_split",
                "train",
                "--trainer",
                "sft",
            ]
        ),
        [],
    )
    assert (chat.data.format, chat.data.chat_template, chat.data.messages_field) == ("messages", "chatml", "conv")
    assert (chat.train.eval_every, chat.train.eval_at_start) == (0, False)
    folder = tmp_path / "ds"
    folder.mkdir()
    for split in ("train", "validation"):
        (folder / f"rows_{split}.jsonl").write_text(jsonl.read_text())
    picked, _ = flags_to_config(
        _args(["--model", llama, "--data_path", str(folder), "--train_split", "validation"]), []
    )
    assert picked.data.paths == (str(folder / "rows_validation.jsonl"),)
    capsys.readouterr()
    long, _ = flags_to_config(_args(["--model", llama, "--data_path", str(jsonl), "--model_max_length", "4096"]), [])
    assert long.data.block_size == 2048 and "the model's 2048 positions" in capsys.readouterr().err
    for argv, match in (
        (["--optimizer", "sgd"], "--optimizer sgd is not available"),
        (["--chat_template", "zephyr"], "--chat_template zephyr is not available"),
        (["--trainer", "sft", "--dpo_beta", "0.1"], "--dpo_beta applies to --trainer dpo"),
    ):
        with pytest.raises(JaxllmError, match=match):
            flags_to_config(_args(["--model", llama, "--data_path", str(jsonl), *argv]), [])


def test_help_groups_the_flags_as_autotrain(capsys):
    with pytest.raises(SystemExit):
        cli.run(["finetune", "--help"])
    out = capsys.readouterr().out
    groups = [
        "Basic:",
        "Data Processing:",
        "Training Configuration:",
        "Training Hyperparameters:",
        "PEFT/LoRA:",
        "Output:",
        "Hub Integration:",
    ]
    assert [out.index(g) for g in groups] == sorted(out.index(g) for g in groups)
    for flag in (
        "--llm",
        "--project-name",
        "--use_apex",
        "--chat_template",
        "--use_flash_attention_2",
        "--disable_gradient_checkpointing",
        "--save-dir",
        "--learning-rate",
    ):
        assert flag in out, flag


@pytest.mark.parametrize("recipe", ["configs/falcon_qlora.py", "configs/llama2_guanaco_qlora.py"])
def test_recipes_load_with_the_published_settings(recipe, llama):
    cfg, _ = flags_to_config(_args(["--config", recipe, "--model", llama, "--data_path", "embedded"]), [])
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.quantization, cfg.optim.learning_rate) == (64, 16.0, "nf4", 2e-4)
    assert (cfg.optim.schedule, cfg.optim.grad_clip, cfg.data.block_size, cfg.model.dtype) == (
        "constant",
        0.3,
        512,
        "bfloat16",
    )
    if "falcon" in recipe:  # batch 4 x accumulation 4, 500 steps, warmup ratio 0.03, dropout 0.1
        assert (
            cfg.data.batch_size,
            cfg.optim.grad_accum_steps,
            cfg.train.steps,
            cfg.optim.warmup_steps,
            cfg.lora.dropout,
        ) == (16, 4, 500, 15, 0.1)
    else:  # batch 16, 1875 steps, dropout 0.05, loss on the replies
        assert (cfg.data.batch_size, cfg.train.steps, cfg.lora.dropout, cfg.data.loss_on) == (
            16,
            1875,
            0.05,
            "assistant",
        )


def test_lora_finetune_exports_a_peft_adapter_and_a_merged_model(falcon, tmp_path, capsys):
    run_dir, save = str(tmp_path / "run"), str(tmp_path / "out")
    argv = [
        "finetune",
        "--model",
        falcon,
        "--data_path",
        "embedded",
        "--use_peft",
        "--lora_r",
        "4",
        "--lora_alpha",
        "8",
        "--max_steps",
        "8",
        "--batch_size",
        "1",
        "--block_size",
        "64",
        "--lr",
        "3e-3",
        "--project_name",
        run_dir,
        "--save_dir",
        save,
        "--merge_adapter",
        "--config.train.eval_every=4",
        *FAST,
    ]
    assert cli.run(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    val = [m["loss"] for m in metrics if m["split"] == "val"]
    assert len(val) == 3 and val[2] < val[1] < val[0]  # step 0 (the base), 4 and 8
    assert summary["initial_val_loss"] == val[0] and summary["written"]["adapter"].endswith("adapter")

    run, trainable, frozen = load_run(run_dir)  # the checkpoint holds the adapters alone
    assert {str(p[-1].key) for p, _ in jax.tree_util.tree_leaves_with_path(trainable)} == {
        "qkv_lora_a",
        "lora_a",
        "lora_b",
    }
    model, params, _, _ = load_trained(run_dir)
    ids, mask, positions = _padded_batch()
    ids = ids % 512
    ours = _jax_logits(model, params, ids, mask, positions)
    base = transformers.AutoModelForCausalLM.from_pretrained(falcon)
    peft_model = peft.PeftModel.from_pretrained(base, os.path.join(save, "adapter")).eval()
    _assert_close(ours, _hf_logits(peft_model, ids, mask, positions), mask, "finetuned adapter in PEFT")
    merged = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(save, "merged")).eval()
    _assert_close(ours, _hf_logits(merged, ids, mask, positions), mask, "merged export")
    assert os.path.isfile(os.path.join(save, "merged", "tokenizer.model"))

    assert (
        cli.run(
            [
                "generate",
                "--model",
                falcon,
                "--adapter",
                os.path.join(save, "adapter"),
                "--prompt",
                "### Human: What does print do?### Assistant:",
                "--max_new_tokens",
                "8",
                "--greedy",
            ]
        )
        == 0
    )
    assert "### Assistant:" in capsys.readouterr().out

    cont = str(tmp_path / "cont")  # continue training from the exported PEFT adapter
    argv = [
        "finetune",
        "--model",
        falcon,
        "--data_path",
        "embedded",
        "--use_peft",
        "--lora_r",
        "4",
        "--lora_alpha",
        "8",
        "--max_steps",
        "1",
        "--batch_size",
        "1",
        "--block_size",
        "64",
        "--lr",
        "1e-9",
        "--project_name",
        cont,
        f"--config.lora.init_adapter={os.path.join(save, 'adapter')}",
        *FAST,
    ]
    assert cli.run(argv) == 0
    _, cont_params, _ = load_run(cont)
    for a, b in zip(jax.tree.leaves(cont_params), jax.tree.leaves(trainable)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_qlora_finetune_trains_and_merges(llama, tmp_path, capsys):
    run_dir, save = str(tmp_path / "run"), str(tmp_path / "out")
    argv = [
        "finetune",
        "--model",
        llama,
        "--data_path",
        "embedded",
        "--use_peft",
        "--use_int4",
        "--lora_r",
        "4",
        "--max_steps",
        "6",
        "--batch_size",
        "1",
        "--block_size",
        "64",
        "--lr",
        "3e-3",
        "--project_name",
        run_dir,
        "--save_dir",
        save,
        "--merge_adapter",
        "--config.data.loss_on=assistant",
        "--config.train.eval_every=3",
        *FAST,
    ]
    assert cli.run(argv) == 0
    val = [m["loss"] for m in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl"))) if m["split"] == "val"]
    assert val[-1] < val[0]
    model, params, _, _ = load_trained(run_dir)
    assert model.cfg.quantization == "nf4" and params["layers"]["mlp"]["up_proj"]["kernel_nf4"].dtype == np.uint8
    ids, mask, positions = _padded_batch()
    ids = ids % 512
    merged = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(save, "merged")).eval()
    _assert_close(
        _jax_logits(model, params, ids, mask, positions),
        _hf_logits(merged, ids, mask, positions),
        mask,
        "QLoRA merged export",
    )


def test_bad_finetune_input(llama, tmp_path):
    bad = tmp_path / "rows.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    common = [
        "finetune",
        "--model",
        llama,
        "--use_peft",
        "--max_steps",
        "1",
        "--batch_size",
        "1",
        "--block_size",
        "32",
        "--project_name",
        str(tmp_path / "r"),
        *FAST,
    ]
    with pytest.raises(JaxllmError, match=r"no field 'text'.*question"):
        cli.run([*common, "--data_path", str(bad)])
    with pytest.raises(JaxllmError, match="unknown module 'query_key_value'"):
        cli.run([*common, "--data_path", "embedded", "--target_modules", "query_key_value"])
    with pytest.raises(JaxllmError, match="quant_block_size=47 must be a positive even number"):
        cli.run([*common, "--data_path", "embedded", "--use_int4", "--config.lora.quant_block_size=47"])
    rows = tmp_path / "three.jsonl"  # 2 training examples of ~28 tokens: 2 rows of 33 tokens, a batch needs 8
    rows.write_text("".join(json.dumps({"text": f"### Human: q{i}?### Assistant: a{i}."}) + "\n" for i in range(3)))
    with pytest.raises(
        JaxllmError,
        match=r"training split is too small for one batch: 2 documents \([\d,]+ tokens\) "
        r"fill 2 row\(s\) of 33 tokens, but one batch needs 8 rows",
    ):
        cli.run([*common, "--data_path", str(rows)])
    assert not (tmp_path / "r").exists()  # refused before the first step: no project folder left behind
    (tmp_path / "file").write_text("")
    with pytest.raises(JaxllmError, match="--save_dir .*file/out' is not a writable folder"):
        cli.run([*common, "--data_path", str(rows), "--save_dir", str(tmp_path / "file" / "out")])


def test_runs_without_project_name_keep_apart(llama, falcon, tmp_path, monkeypatch):
    """Each job's workdir is its --save_dir; a workdir holding another model's run is refused up front."""
    from jaxllm import autotrain
    from jaxllm.config import load_config, to_json
    from jaxllm.train import loop

    tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")
    monkeypatch.chdir(tmp_path)
    common = [
        "finetune",
        "--data_path",
        "embedded",
        "--max_steps",
        "1",
        "--batch_size",
        "1",
        "--block_size",
        "32",
        "--config.train.eval_batches=1",
        *FAST,
    ]
    for model, out in ((llama, "out1"), (falcon, "out2")):
        assert cli.run([*common, "--model", model, "--save_dir", out]) == 0
        assert json.load(open(tmp_path / out / "config.json"))["checkpoint"]["init_from"] == model
        assert os.path.isdir(tmp_path / out / "checkpoints" / "1") and os.path.isdir(tmp_path / out / "adapter")
    assert not os.path.exists(tmp_path / "runs")

    def no_work(*args, **kwargs):
        raise AssertionError("work started")

    for module, name in ((loop, "build_program"), (autotrain, "epochs_to_steps"), (autotrain, "_devices")):
        monkeypatch.setattr(module, name, no_work)
    with pytest.raises(
        JaxllmError,
        match=rf"^workdir 'out1' holds a run of another model \(init_from: {llama} there, "
        rf"{falcon} here\); resume it with that model, or .*another --workdir",
    ):
        cli.run([*common, "--model", falcon, "--epochs", "1", "--project_name", "out1"])
    (tmp_path / "scratch" / "checkpoints" / "3").mkdir(parents=True)  # `jaxllm train` from scratch: the shapes
    (tmp_path / "scratch" / "config.json").write_text(to_json(load_config(tiny, ["model.num_layers=4"])))
    from jaxllm.train.run import check_workdir

    check_workdir("scratch", load_config(tiny, ["model.num_layers=4", "model.dtype=float32"]))
    with pytest.raises(JaxllmError, match=r"'scratch' holds a run of another model \(num_layers: 4 there, 1 here\)"):
        loop.train(load_config(tiny, ["model.num_layers=1"]), "scratch")
    with pytest.raises(JaxllmError, match="name the run's folder: --project_name DIR .* or --save_dir DIR"):
        cli.run([*common, "--model", llama])


def test_pruning_through_the_training_loop(tmp_path):
    """Magnitude pruning as a run option: sparsity reaches its target, and validation is reported."""
    from jaxllm.config import load_config
    from jaxllm.train.loop import train

    cfg = load_config(
        "configs/tiny.py",
        [
            "train.steps=6",
            "train.log_every=3",
            "train.eval_every=3",
            "train.eval_batches=2",
            "train.progress=False",
            "model.num_layers=1",
            "prune.sparsity=0.5",
            "prune.start_step=0",
            "prune.end_step=3",
            "prune.every=1",
            "generate.max_new_tokens=0",
            "checkpoint.async_save=False",
        ],
    )
    result = train(cfg, str(tmp_path / "run"))
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    sparsity = [m["sparsity"] for m in metrics if "sparsity" in m]
    assert sparsity[-1] == pytest.approx(0.5, abs=1e-3) and sparsity[0] < 0.5
    assert np.isfinite(result["val_loss"])
    with pytest.raises(JaxllmError, match="prune.sparsity > 0 prunes trained weights"):
        train(
            load_config("configs/finetune.py", ["prune.sparsity=0.5", "checkpoint.model_from_init=False"]),
            str(tmp_path / "x"),
        )
