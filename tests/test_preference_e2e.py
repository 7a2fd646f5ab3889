"""DPO, ORPO and reward models through `jaxllm finetune` as a user runs them: they learn, resume exactly,
precompute the reference, run on QLoRA and meshes, compile in `jaxllm plan`, and export what PEFT and
transformers load."""

import json
import os
import random
import shutil
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

sys.path.insert(0, os.path.dirname(__file__))
from test_finetune import FAST, _base  # noqa: E402
from trl_reference import make_adapter  # noqa: E402

from jaxllm import JaxllmError, cli  # noqa: E402
from jaxllm import plan as pl  # noqa: E402
from jaxllm.config import load_config  # noqa: E402
from jaxllm.train.start import load_run  # noqa: E402

WORDS = (
    "the function returns a list of values from the module and the class defines a method for each object "
    "in the file when the loop runs over items"
).split()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _base(tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Prompts of random words; the chosen answer starts with " yes", the rejected one with " no", and the
    rest is the same: a preference a model can learn in a few steps, on unseen prompts too."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    with open(path, "w") as f:
        for _ in range(96):
            prompt = "Question: " + " ".join(rng.choices(WORDS, k=5)) + "?\nAnswer:"
            tail = " " + " ".join(rng.choices(WORDS, k=3)) + "."
            f.write(json.dumps({"prompt": prompt, "chosen": " yes," + tail, "rejected": " no," + tail}) + "\n")
    return str(path)


def _finetune(base, data, workdir, trainer, *extra):
    argv = [
        "finetune",
        "--model",
        base,
        "--data_path",
        data,
        "--trainer",
        trainer,
        "--use_peft",
        "--lora_r",
        "4",
        "--lora_alpha",
        "8",
        "--batch_size",
        "1",
        "--block_size",
        "64",
        "--lr",
        "5e-3",
        "--project_name",
        workdir,
        "--config.train.log_every=1",
        "--config.data.val_fraction=0.25",
        *FAST,
        *extra,
    ]
    assert cli.run(argv) == 0
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def _train_steps(metrics):
    return {m["step"]: m for m in metrics if m.get("split") == "train"}


def test_dpo_learns_the_preference_and_resumes_exactly(llama, pairs, tmp_path):
    """From an SFT adapter (B not zero: the reference is that adapter as it starts), 20 steps: the
    chosen-over-rejected accuracy on held-out pairs goes well above chance; a run resumed at step 10
    (reference rebuilt, not saved) ends with the same params and metrics as one that never stopped."""
    adapter = make_adapter(tmp_path / "sft", llama, "llama", targets=("q_proj", "v_proj"), r=4, alpha=8, b_std=0.02)
    run = str(tmp_path / "dpo")
    args = [
        "--adapter",
        adapter,
        "--max_steps",
        "20",
        "--config.checkpoint.every=10",
        "--config.train.eval_every=10",
        "--dpo_beta",
        "0.2",
    ]
    metrics = _finetune(llama, pairs, run, "dpo", *args)
    val = [m for m in metrics if m.get("split") == "val"]
    assert val[0]["rewards/accuracies"] == 0.0 and abs(val[0]["loss"] - np.log(2)) < 1e-6  # policy = reference
    assert val[-1]["rewards/accuracies"] >= 0.9 and val[-1]["rewards/margins"] > 0 and val[-1]["loss"] < 0.6
    train = _train_steps(metrics)
    assert set(train[1]) >= {
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "grad_norm",
        "pairs",
    }

    resumed = str(tmp_path / "resumed")
    shutil.copytree(run, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "20"))
    with open(os.path.join(resumed, "metrics.jsonl")) as f:  # as the run was at its step-10 checkpoint
        kept = [line for line in f if json.loads(line).get("step", 0) <= 10]
    with open(os.path.join(resumed, "metrics.jsonl"), "w") as f:
        f.writelines(kept)
    again = _train_steps(_finetune(llama, pairs, resumed, "dpo", *args))
    for step in range(11, 21):
        for key in ("loss", "rewards/margins", "logps/chosen"):
            np.testing.assert_allclose(again[step][key], train[step][key], rtol=1e-5, err_msg=f"{key} {step}")
    for a, b in zip(jax.tree.leaves(load_run(resumed)[1]), jax.tree.leaves(load_run(run)[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_precomputed_reference_trains_as_the_reference_forward_does(llama, pairs, tmp_path):
    """--precompute_ref_log_probs: one pass before training, kept in the workdir (reused on resume); the
    losses equal the run that runs the reference (the base, adapters off) at every step."""
    live = _train_steps(_finetune(llama, pairs, str(tmp_path / "live"), "dpo", "--max_steps", "2"))
    run = str(tmp_path / "pre")
    pre = _train_steps(_finetune(llama, pairs, run, "dpo", "--max_steps", "2", "--precompute_ref_log_probs"))
    for step in (1, 2):
        for key in ("loss", "rewards/chosen", "rewards/rejected"):
            np.testing.assert_allclose(pre[step][key], live[step][key], rtol=2e-5, atol=1e-6)
    saved = os.path.join(run, "reference_logps.npz")
    values = np.load(saved)
    assert values["train"].shape == (72, 2) and values["val"].shape == (24, 2) and np.isfinite(values["train"]).all()
    before = os.stat(saved).st_mtime_ns
    _finetune(llama, pairs, run, "dpo", "--max_steps", "3", "--precompute_ref_log_probs")
    assert os.stat(saved).st_mtime_ns == before  # read back, not recomputed


def test_orpo_and_reward_models_train_and_export(llama, pairs, tmp_path):
    """ORPO learns without a reference and its adapter loads in PEFT; a reward model's adapter (SEQ_CLS,
    `score` saved) and merged folder load in transformers with jaxllm's scores."""
    run = str(tmp_path / "orpo")
    metrics = _finetune(
        llama, pairs, run, "orpo", "--max_steps", "8", "--dpo_beta", "0.5", "--config.train.eval_every=8"
    )
    val = [m for m in metrics if m.get("split") == "val"]
    assert {"nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/accuracies"} <= set(val[-1])
    assert val[-1]["loss"] < val[0]["loss"] and val[-1]["rewards/accuracies"] >= 0.9
    assert os.path.isfile(os.path.join(run, "adapter", "adapter_model.safetensors"))

    run = str(tmp_path / "reward")
    metrics = _finetune(
        llama, pairs, run, "reward", "--max_steps", "8", "--merge_adapter", "--config.train.eval_every=8"
    )
    val = [m for m in metrics if m.get("split") == "val"]
    assert val[-1]["rewards/accuracies"] >= 0.75 and val[-1]["loss"] < val[0]["loss"]  # 0.81 after 8 steps
    from jaxllm.load import load_trained

    model, params, tokenizer, add_bos = load_trained(run)
    row = json.loads(open(pairs).readline())
    ids = [tokenizer.bos_id] + tokenizer.encode(row["prompt"] + row["chosen"]) + [tokenizer.eos_id]
    ours = float(model.apply({"params": params}, np.asarray([ids]))[0, -1, 0])
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(os.path.join(run, "merged")).eval()
    base = transformers.AutoModelForSequenceClassification.from_pretrained(llama, num_labels=1)
    base.config.pad_token_id = merged.config.pad_token_id
    adapted = peft.PeftModel.from_pretrained(base, os.path.join(run, "adapter")).eval()
    with torch.no_grad():
        for hf in (merged, adapted):
            np.testing.assert_allclose(float(hf(torch.tensor([ids])).logits[0, 0]), ours, rtol=1e-4, atol=1e-5)


def test_qlora_dpo_on_a_mesh_and_in_plan(llama, pairs, tmp_path):
    """QLoRA (NF4 base) DPO on data x fsdp x tensor, and `jaxllm plan` compiling a DPO step with a frozen
    reference copy for a TPU slice."""
    metrics = _finetune(
        llama,
        pairs,
        str(tmp_path / "q"),
        "dpo",
        "--use_int4",
        "--max_steps",
        "2",
        "--config.mesh.data=2",
        "--config.mesh.fsdp=2",
        "--config.mesh.tensor=2",
    )
    assert all(np.isfinite(m["loss"]) for m in metrics)
    cfg = load_config(
        "configs/finetune.py",
        [
            f"checkpoint.init_from={llama}",
            "lora.r=0",
            "train.objective=dpo",
            "data.format=preference",
            "data.block_size=64",
            "data.batch_size=8",
            "mesh.data=1",
            "mesh.fsdp=-1",
        ],
    )
    result = pl.plan(cfg, "v5p-8")
    assert result["fits"] and result["reference"] == "start"
    assert result["breakdown"]["reference_gib"] == pytest.approx(result["breakdown"]["params_gib"])


def test_bad_preference_input_is_one_line(llama, pairs, tmp_path, monkeypatch):
    """Bad pairs anywhere in the data (here the last row) stop the run before anything compiles."""
    from jaxllm.train import program

    def no_compile(self):
        raise AssertionError("compiled before the data was checked")

    monkeypatch.setattr(program.Program, "compile_train_step", no_compile)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(pairs).read() + json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    long = tmp_path / "long.jsonl"
    long.write_text(
        open(pairs).read() + json.dumps({"prompt": "the list " * 80, "chosen": "a", "rejected": "b"}) + "\n"
    )
    cases = [
        (["--data_path", str(bad), "--trainer", "dpo"], "bad.jsonl:97: .*rejected_text_column"),
        (
            ["--data_path", str(long), "--trainer", "orpo"],
            r"long.jsonl:97: the chosen answer has no tokens left.*"
            "data.max_prompt_length",
        ),
        (["--data_path", pairs, "--trainer", "orpo", "--model_ref", llama], "applies to --trainer dpo"),
        (["--data_path", pairs, "--trainer", "sft", "--dpo_beta", "0.2"], "applies to --trainer dpo, orpo or reward"),
        (["--data_path", pairs, "--trainer", "dpo", "--config.preference.loss_type=hinge"], "preference.loss_type"),
    ]
    for argv, needle in cases:
        with pytest.raises(JaxllmError, match=needle) as e:
            cli.run(
                ["finetune", "--model", llama, "--project_name", str(tmp_path / "x"), "--max_steps", "1", *argv, *FAST]
            )
        assert "\n" not in str(e.value)
