"""Config files: overrides typed by the value they replace; typos are errors, never silent defaults."""

import dataclasses
import json
import pathlib
import re

import numpy as np
import pytest

from jaxllm import JaxllmError, cli
from jaxllm.cli import json_line
from jaxllm.config import build, load_config
from jaxllm.train.start import parse

TINY = "configs/tiny.py"


def test_tiny_config_parses_into_dataclasses():
    run = parse(load_config(TINY))
    assert run.model.num_layers >= 1 and run.data.source == "embedded"
    assert dataclasses.is_dataclass(run.optim) and run.mesh.data == -1


def test_overrides_are_typed():
    cfg = load_config(
        TINY,
        [
            "model.num_layers=3",
            "optim.learning_rate=1e-3",
            "train.progress=false",
            "data.paths=['a.txt','b.txt']",
            "generate.prompt=def f(x):",
            "optim.warmup_steps=0",
        ],
    )
    assert cfg.model.num_layers == 3 and cfg.optim.learning_rate == 1e-3 and cfg.train.progress is False
    assert list(cfg.data.paths) == ["a.txt", "b.txt"] and cfg.generate.prompt == "def f(x):"
    assert isinstance(load_config(TINY, ["optim.learning_rate=1"]).optim.learning_rate, float)
    bare = load_config(TINY, ["train.trackers=wandb", "data.paths=org/name:train,more/*.jsonl"])  # no quotes
    assert tuple(bare.train.trackers) == ("wandb",) and tuple(bare.data.paths) == ("org/name:train", "more/*.jsonl")


@pytest.mark.parametrize(
    "override,match",
    [
        ("model.num_layer=3", "did you mean 'model.num_layers'"),
        ("modle.num_layers=3", "unknown config key"),
        ("model.num_layers=three", "expects int"),
        ("train.progress=maybe", "is a bool"),
        ("model=3", "is a section"),
        ("model.num_layers", "must look like"),
    ],
)
def test_bad_overrides(override, match):
    with pytest.raises(JaxllmError, match=match):
        load_config(TINY, [override])


def test_typo_inside_config_file_is_rejected(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text(
        "import ml_collections\n"
        "def get_config():\n"
        "    c = ml_collections.ConfigDict()\n"
        "    c.model = dict(num_layer=2)\n"
        "    return c\n"
    )
    with pytest.raises(JaxllmError, match="model.num_layer; did you mean model.num_layers"):
        parse(load_config(str(path)))
    path.write_text("import ml_collections\ndef get_config():\n    return ml_collections.ConfigDict(dict(optm={}))\n")
    with pytest.raises(JaxllmError, match="did you mean 'optim'"):
        parse(load_config(str(path)))


def test_missing_config_file_and_wrong_types():
    with pytest.raises(JaxllmError, match="not found"):
        load_config("configs/nope.py")

    @dataclasses.dataclass(frozen=True)
    class C:
        a: int = 1

    with pytest.raises(JaxllmError, match="c.a expects int"):
        build(C, {"a": "x"}, "c")


def test_pretrain_configs_load_every_named_model():
    layers = dict(
        llama2_7b=32,
        llama2_13b=40,
        llama2_70b=80,
        falcon_7b=32,
        falcon_40b=60,
        falcon_180b=80,
        bloom_560m=24,
        bloom_7b1=30,
        bloom_176b=70,
    )
    for name, n in layers.items():
        run = parse(load_config(f"configs/pretrain.py:{name}"))
        assert run.model.num_layers == n and run.model.dtype == "bfloat16"
        assert run.data.vocab_size == run.model.vocab_size and run.data.block_size == run.model.max_seq_len
    with pytest.raises(JaxllmError, match="unknown model"):
        load_config("configs/pretrain.py:llama2_8b")


@pytest.mark.parametrize(
    "override,key",
    [
        ("optim.learning_rate=1e999", "optim.learning_rate=inf"),
        ("optim.learning_rate=-1e-3", "optim.learning_rate"),
        ("optim.warmup_steps=-1", "optim.warmup_steps"),
        ("optim.decay_steps=-5", "optim.decay_steps"),
        ("optim.end_lr_ratio=2.0", "optim.end_lr_ratio"),
        ("optim.b1=1.0", "optim.b1"),
        ("optim.b2=-0.1", "optim.b2"),
        ("optim.eps=0.0", "optim.eps"),
        ("optim.weight_decay=-0.1", "optim.weight_decay"),
        ("optim.grad_clip=-1.0", "optim.grad_clip"),
        ("optim.grad_accum_steps=0", "optim.grad_accum_steps"),
        ("train.steps=0", "train.steps"),
        ("train.log_every=0", "train.log_every"),
        ("train.eval_every=-1", "train.eval_every"),
        ("train.eval_batches=0", "train.eval_batches"),
        ("train.z_loss=-1e-4", "train.z_loss"),
        ("train.loss_chunk=-1", "train.loss_chunk"),
        ("train.early_stop_min_delta=1e999", "train.early_stop_min_delta"),
        ("checkpoint.every=-1", "checkpoint.every"),
        ("checkpoint.keep=0", "checkpoint.keep"),
        ("checkpoint.keep_best=-1", "checkpoint.keep_best"),
        ("checkpoint.preemption_deadline_s=1e999", "checkpoint.preemption_deadline_s"),
        ("lora.r=-1", "lora.r"),
        ("lora.alpha=0.0", "lora.alpha"),
        ("lora.dropout=1.0", "lora.dropout"),
        ("model.attn_dropout=1.5", "model.attn_dropout"),
        ("model.resid_dropout=-0.1", "model.resid_dropout"),
        ("model.norm_eps=0.0", "model.norm_eps"),
        ("model.rope_theta=-1.0", "model.rope_theta"),
        ("model.init_std=1e999", "model.init_std"),
        ("generate.temperature=-1.0", "generate.temperature"),
        ("generate.top_k=-1", "generate.top_k"),
        ("generate.top_p=0.0", "generate.top_p"),
        ("generate.top_p=2.0", "generate.top_p"),
        ("generate.max_new_tokens=-1", "generate.max_new_tokens"),
    ],
)
def test_out_of_range_values_name_their_key(override, key):
    with pytest.raises(JaxllmError, match=re.escape(key) + ".* is out of range: use "):
        parse(load_config(TINY, [override]))


def test_nan_learning_rate_is_refused():
    cfg = load_config(TINY)
    with cfg.unlocked():
        cfg.optim.learning_rate = float("nan")
    with pytest.raises(JaxllmError, match="optim.learning_rate=nan is out of range"):
        parse(cfg)


def test_summary_line_is_strict_json():
    line = json_line(
        {
            "loss": float("nan"),
            "val": np.float32("inf"),
            "ok": np.float64(1.5),
            "steps": np.int64(3),
            "hist": [float("-inf"), 2.0],
            "path": pathlib.Path("w"),
        }
    )
    assert json.loads(line) == {
        "loss": "nan",
        "val": "inf",
        "ok": 1.5,
        "steps": 3,
        "hist": ["-inf", 2.0],
        "path": "w",
    }  # as metrics.jsonl writes them
    json.loads(line, parse_constant=lambda name: pytest.fail(f"bare {name} in {line}"))


def _write(tmp_path, body: str) -> str:
    path = tmp_path / "exp.py"
    path.write_text(body)
    return str(path)


def test_config_file_must_declare_every_section(tmp_path):
    path = _write(tmp_path, "def get_config():\n    return {'model': {'num_layers': 2}}\n")
    for command in ("train", "plan"):
        with pytest.raises(
            JaxllmError,
            match=r"lacks section\(s\) seed, data, optim, train, .*configs/common.py.*"
            r"load_config\(os.path.join\(os.path.dirname\(__file__\), \"common.py\"\)\)",
        ):
            cli.run([command, f"--config={path}"])


@pytest.mark.parametrize(
    "body,match",
    [
        ("def get_config(:\n    pass\n", r"exp.py' line 1 failed to load: SyntaxError"),
        (
            "import ml_collections\n\ndef get_config():\n    x = 1\n    return x / 0\n",
            r"exp.py' line 5: get_config\(\) failed: ZeroDivisionError: division by zero",
        ),
        ("raise KeyError('boom')\n", r"exp.py' line 1 failed to load: KeyError"),
        ("x = 1\n", r"has no get_config\(\) function"),
        ("def get_config():\n    return 3\n", r"get_config\(\) returned int; return a ConfigDict"),
        ("\x00\x01binary", r"exp.py' failed to load: SyntaxError"),
    ],
)
def test_broken_config_file_is_one_line_naming_file_and_line(tmp_path, body, match):
    path = _write(tmp_path, body)
    with pytest.raises(JaxllmError, match=match) as info:
        load_config(path)
    assert "\n" not in str(info.value)
