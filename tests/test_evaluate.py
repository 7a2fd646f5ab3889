"""`jaxllm eval` and train.tasks.run_tasks against lm-evaluation-harness's own `hf` backend, offline: a tiny
random Llama (float32, a byte-level BPE tokenizer that adds BOS as Llama's does) and YAML tasks over
local JSON-lines files (multiple choice, generate_until with exact_match, loglikelihood_rolling)."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MC = [
    ("The capital of France is", ["Paris", "blue", "four", "the sky"], 0),
    ("Two plus two is", ["four", "green", "Paris", "red"], 0),
    ("The colour of the sky is", ["blue", "France", "two", "capital"], 0),
    ("Question: what is red?", ["a colour", "a number", "a city", "a question"], 0),
    ("Green and blue are", ["colours", "numbers", "cities", "answers"], 0),
]
GEN = [
    ("What is the capital of France?", "Paris"),
    ("What is two plus two?", "four"),
    ("Name a colour.", "red"),
    ("What colour is the sky?", "blue"),
]
TEXTS = ["The capital of France is Paris. " * 40, "red green blue sky", "Question: what is two plus two? Answer: four"]


def _tokenizer(folder):
    """A byte-level BPE tokenizer.json whose encode adds BOS (Llama's convention; tokenizer_config.json
    says add_bos_token as Llama-2's does), trained on the task texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [q + " " + " ".join(c) for q, c, _ in MC] + [q + " " + a for q, a in GEN] + TEXTS
    tok.train_from_iterator(
        corpus * 20,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))


def _write_tasks(folder, cache):
    folder.mkdir()
    rows = {
        "mc": [{"question": q, "choices": c, "answer": a} for q, c, a in MC],
        "gen": [{"question": q, "answer": a} for q, a in GEN],
        "ppl": [{"text": t} for t in TEXTS],
    }
    for name, items in rows.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))

    def data(name):
        return (
            f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / name}.jsonl\n"
            f"  cache_dir: {cache}\ntest_split: test\n"
        )

    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + data("mc") + "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (folder / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + data("gen") + "output_type: generate_until\n"
        'doc_to_text: "Q: {{question}}\\nA:"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 12\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    (folder / "tiny_ppl.yaml").write_text(
        "task: tiny_ppl\n" + data("ppl") + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """No network and a fresh Hugging Face home for this module (and the processes it starts); the
    tasks' data sets are cached under their own cache_dir."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in (
            ("HF_HUB_OFFLINE", "1"),
            ("HF_DATASETS_OFFLINE", "1"),
            ("HF_HOME", str(tmp_path_factory.mktemp("hf_home"))),
        ):
            mp.setenv(key, value)
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model folder, task folder): a tiny random Llama with a 64-token context and the tokenizer's 300
    tokens (the hf backend with `peft=` cuts a larger embedding down to the tokenizer's size)."""
    root = tmp_path_factory.mktemp("eval")
    model = root / "llama"
    model.mkdir()
    _tokenizer(model)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(model)
    _write_tasks(root / "tasks", root / "datasets")
    return model, root / "tasks"


def _harness(lm, tasks, include, **kwargs):
    import lm_eval

    from jaxllm.train.tasks import task_manager

    return lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=task_manager(str(include)), log_samples=True, bootstrap_iters=0, **kwargs
    )


def _samples(results, task):
    return {s["doc_id"]: s for s in results["samples"][task]}


def test_matches_the_harness_hf_backend(setup):
    """Log-likelihoods, greedy flags, accuracies, rolling log-likelihoods, generations: jaxllm's LM gives
    what the harness's `hf` backend gives on the same model and tasks."""
    from lm_eval.models.huggingface import HFLM

    from jaxllm.evaluate import JaxllmLM
    from jaxllm.train.tasks import _score_fn

    model, tasks = setup
    names = ["tiny_mc", "tiny_gen", "tiny_ppl"]
    hf_lm = HFLM(pretrained=str(model), dtype="float32", batch_size=4, device="cpu")
    ours = JaxllmLM(str(model), batch_size=4)
    assert ours.max_length == hf_lm.max_length == 64 and ours.prefix_token_id == hf_lm.prefix_token_id == 1
    for text in ("The capital of France", "<s>red sky", ""):
        assert ours.tok_encode(text) == hf_lm.tok_encode(text)
    want = _harness(hf_lm, names, tasks, num_fewshot=1)
    got = _harness(ours, names, tasks, num_fewshot=1)
    assert _score_fn(ours.model.cfg)._cache_size() <= 3  # rows of 16, 32 or 64 tokens: one program each

    mc_want, mc_got = _samples(want, "tiny_mc"), _samples(got, "tiny_mc")
    assert sorted(mc_got) == list(range(len(MC)))
    for doc in mc_want:
        lls_want = np.array([r[0][0] for r in mc_want[doc]["resps"]])
        lls_got = np.array([r[0][0] for r in mc_got[doc]["resps"]])
        np.testing.assert_allclose(lls_got, lls_want, atol=1e-4, rtol=0)
        assert [r[0][1] for r in mc_got[doc]["resps"]] == [r[0][1] for r in mc_want[doc]["resps"]]
    assert len({round(float(r[0][0]), 3) for s in mc_want.values() for r in s["resps"]}) > 10  # a real spread
    for metric in ("acc,none", "acc_norm,none"):
        assert abs(got["results"]["tiny_mc"][metric] - want["results"]["tiny_mc"][metric]) <= 1e-4

    ppl_want, ppl_got = _samples(want, "tiny_ppl"), _samples(got, "tiny_ppl")
    for doc in ppl_want:
        np.testing.assert_allclose(ppl_got[doc]["resps"][0][0], ppl_want[doc]["resps"][0][0], rtol=1e-5, atol=1e-4)
    long = ours.tok_encode(TEXTS[0])
    assert len(long) > 2 * ours.max_length  # the first text spans several rolling windows
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        np.testing.assert_allclose(got["results"]["tiny_ppl"][metric], want["results"]["tiny_ppl"][metric], rtol=1e-5)

    gen_want, gen_got = _samples(want, "tiny_gen"), _samples(got, "tiny_gen")
    assert [gen_got[d]["resps"] for d in sorted(gen_got)] == [gen_want[d]["resps"] for d in sorted(gen_want)]
    assert any(r[0] for s in gen_want.values() for r in s["resps"])  # some non-empty generations to compare
    assert got["results"]["tiny_gen"]["exact_match,none"] == want["results"]["tiny_gen"]["exact_match,none"]

    class Request:
        def __init__(self, *args):
            self.args = args

    direct = [Request(t) for t in TEXTS] + [Request("x")]
    np.testing.assert_allclose(
        ours.loglikelihood_rolling(direct), hf_lm.loglikelihood_rolling(direct), atol=2e-4, rtol=1e-6
    )
    pairs = [Request("", "The capital"), Request("Two plus", " two"), Request("The colour ", "of the sky")]
    for (a, ga), (b, gb) in zip(ours.loglikelihood(pairs), hf_lm.loglikelihood(pairs)):
        assert abs(a - b) <= 1e-4 and ga == gb
    prompt = ours.tok_encode("The capital of France is")  # the model's own greedy continuation: is_greedy
    with torch.no_grad():
        mask = torch.ones(1, len(prompt), dtype=torch.long)
        greedy = hf_lm.model.generate(torch.tensor([prompt]), attention_mask=mask, max_new_tokens=3, do_sample=False)[
            0, len(prompt) :
        ].tolist()
    requests = [
        (None, prompt, greedy),
        (None, prompt, greedy[:2] + [(greedy[2] + 1) % 300]),
        (None, prompt * 15, greedy),
    ]  # the last longer than the context: cut on the left
    got, want = ours._loglikelihood_tokens(requests), hf_lm._loglikelihood_tokens(requests)
    assert [g for _, g in got] == [g for _, g in want] and [g for _, g in want][:2] == [True, False]
    assert len(prompt) * 15 > ours.max_length + 1
    np.testing.assert_allclose([x for x, _ in got], [x for x, _ in want], atol=1e-4, rtol=0)


def test_adapter_by_registered_name_matches_hf_with_peft(setup, tmp_path):
    """`simple_evaluate(model="jaxllm", model_args={pretrained, adapter})` (the harness's registry) scores
    a PEFT LoRA adapter on the base as the hf backend with `peft=` does, and differently from the base."""
    import peft

    model, tasks = setup
    torch.manual_seed(1)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(model), lora).save_pretrained(tmp_path / "a")
    from lm_eval.models.huggingface import HFLM

    import jaxllm.evaluate  # noqa: F401  (registers "jaxllm" with the harness)

    want = _harness(
        HFLM(pretrained=str(model), peft=str(tmp_path / "a"), dtype="float32", batch_size=4, device="cpu"),
        ["tiny_mc"],
        tasks,
        limit=3,
    )
    got = _harness(
        "jaxllm",
        ["tiny_mc"],
        tasks,
        limit=3,
        batch_size=4,
        model_args={"pretrained": str(model), "adapter": str(tmp_path / "a")},
    )
    base = _harness("jaxllm", ["tiny_mc"], tasks, limit=3, model_args={"pretrained": str(model)})
    lls = {
        name: np.array([r[0][0] for s in run["samples"]["tiny_mc"] for r in s["resps"]])
        for name, run in (("want", want), ("got", got), ("base", base))
    }
    np.testing.assert_allclose(lls["got"], lls["want"], atol=1e-4, rtol=0)
    assert np.abs(lls["base"] - lls["want"]).max() > 0.1  # the adapter changes the scores


def test_run_tasks_in_process_with_params_on_a_mesh(setup):
    """A training run's call: loaded objects, params sharded over a mesh of 8 devices, flat metric names."""
    import jax

    from jaxllm import sharding as shd
    from jaxllm.evaluate import JaxllmLM
    from jaxllm.load import load_model
    from jaxllm.models.decoder import abstract_params
    from jaxllm.train.tasks import run_tasks

    model_dir, tasks = setup
    model, params, tokenizer, add_bos = load_model(str(model_dir))
    mesh = shd.make_mesh(shd.MeshConfig(data=4, fsdp=2))
    params = jax.device_put(params, shd.shardings_for(abstract_params(model.cfg), mesh))
    scores = run_tasks(
        model, params, tokenizer, "tiny_mc,tiny_ppl", include_path=str(tasks), limit=3, batch_size=6, add_bos=add_bos
    )
    assert set(scores) == {
        "tiny_mc/acc",
        "tiny_mc/acc_norm",
        "tiny_ppl/word_perplexity",
        "tiny_ppl/byte_perplexity",
        "tiny_ppl/bits_per_byte",
    }
    lm = JaxllmLM(str(model_dir), batch_size=3)  # one device's params, replicated over the local devices
    assert lm.mesh.devices.size == 8 and lm.batch_size == 8  # rows round up to the batch shards
    again = _harness(lm, ["tiny_mc", "tiny_ppl"], tasks, limit=3)
    for key, value in scores.items():
        task, metric = key.split("/")
        assert value == pytest.approx(again["results"][task][f"{metric},none"], rel=1e-5)


def test_cli_prints_table_and_writes_json(setup, tmp_path, capsys):
    from jaxllm.cli import run as cli_run

    model, tasks = setup
    out = tmp_path / "out" / "results.json"
    argv = [
        "eval",
        f"--model={model}",
        "--tasks=tiny_mc,tiny_gen",
        "--num_fewshot=0",
        "--batch_size=4",
        "--limit=3",
        f"--include_path={tasks}",
        f"--output_path={out}",
        "--seed=1",
    ]
    assert cli_run(argv) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert f"wrote {out}" in printed
    assert re.search(r"^\| Tasks +\|Version\|Filter\|n-shot\| +Metric +\|", printed, re.M)  # the harness's table
    for task, metric in (("tiny_mc", "acc"), ("tiny_gen", "exact_match")):
        value = saved["results"][task][f"{metric},none"]
        assert 0 <= value <= 1
        assert re.search(rf"^\|{task} *\|Yaml *\|none *\| *0\|{metric} *\|. *\| *{value:.4f}\|", printed, re.M)
    assert saved["config"]["limit"] == 3 and saved["config"]["model_source"] == "jaxllm"
    assert saved["config"]["random_seed"] == saved["config"]["fewshot_seed"] == 1
    assert saved["n-shot"] == {"tiny_mc": 0, "tiny_gen": 0}
    assert sorted(p.name for p in out.parent.iterdir()) == ["results.json"]  # written whole, no temp left


def test_unknown_task_fails_before_loading(setup, tmp_path, capsys):
    from jaxllm.cli import main

    with pytest.raises(SystemExit) as exit_info:  # a model path that does not exist: never reached
        main(["eval", f"--model={tmp_path / 'missing'}", "--tasks=tiny_mc,tiny_nope", f"--include_path={setup[1]}"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("jaxllm: error: unknown task 'tiny_nope'; `lm-eval ls tasks`") and "--include_path" in err


def test_missing_harness_is_one_line():
    code = (
        "import sys; sys.modules['lm_eval'] = None\n"
        "from jaxllm.cli import main\n"
        "main(['eval', '--model=m', '--tasks=arc_easy'])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "jaxllm: error: benchmark evaluation needs lm-evaluation-harness: pip install 'jaxllm[eval]'"
    )


def test_run_tasks_never_imports_torch(setup):
    """Scoring tasks in a training process leaves torch unimported (the harness imports it only in its own
    hf backend and in simple_evaluate's environment report and torch seeding, which run_tasks skips)."""
    model, tasks = setup
    code = (
        "import sys\n"
        "from jaxllm.train.tasks import run_tasks\n"
        "from jaxllm.load import load_model\n"
        f"model, params, tokenizer, add_bos = load_model({str(model)!r})\n"
        f"scores = run_tasks(model, params, tokenizer, 'tiny_mc,tiny_gen', include_path={str(tasks)!r}, limit=2)\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'\n"
        "print(sorted(scores))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "['tiny_gen/exact_match', 'tiny_mc/acc', 'tiny_mc/acc_norm']"


def test_training_run_scores_tasks_at_every_validation(setup, tmp_path):
    """train.eval_tasks: each validation pass writes the harness's scores (split "tasks") with the step,
    equal to scoring the saved params afterwards; an unknown task stops the run before it compiles."""
    from jaxllm import JaxllmError
    from jaxllm.config import load_config
    from jaxllm.load import load_trained
    from jaxllm.train.loop import train
    from jaxllm.train.tasks import run_tasks

    model_dir, tasks = setup
    overrides = [
        f"checkpoint.init_from={model_dir}",
        f"data.tokenizer={model_dir}",
        "lora.r=4",
        "train.steps=2",
        "train.eval_every=1",
        "train.eval_batches=1",
        "train.progress=False",
        "checkpoint.async_save=False",
        "generate.max_new_tokens=0",
        "data.block_size=32",
        "data.batch_size=8",
        "model.dtype=float32",
        "train.eval_tasks=('tiny_mc',)",
        "train.eval_tasks_limit=3",
        f"train.eval_tasks_include_path={tasks}",
        "optim.learning_rate=0.05",
    ]
    workdir = str(tmp_path / "run")
    train(load_config(os.path.join(ROOT, "configs", "finetune.py"), overrides), workdir)
    scored = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    scored = {m["step"]: m for m in scored if m.get("split") == "tasks"}
    assert sorted(scored) == [0, 1, 2] and set(scored[2]) >= {"tiny_mc/acc", "tiny_mc/acc_norm"}
    model, params, tokenizer, add_bos = load_trained(workdir)
    again = run_tasks(
        model, params, tokenizer, "tiny_mc", include_path=str(tasks), limit=3, batch_size=8, add_bos=add_bos
    )
    assert scored[2]["tiny_mc/acc"] == pytest.approx(again["tiny_mc/acc"])

    bad = load_config(
        os.path.join(ROOT, "configs", "finetune.py"),
        overrides[:-4] + ["train.eval_tasks=('tiny_nope',)", f"train.eval_tasks_include_path={tasks}"],
    )
    with pytest.raises(JaxllmError, match="unknown task 'tiny_nope'"):
        train(bad, str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()
