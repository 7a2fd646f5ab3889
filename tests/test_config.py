"""Config files: overrides typed by the value they replace; typos are errors, never silent defaults."""

import dataclasses

import pytest

from jaxllm import JaxllmError
from jaxllm.config import build, load_config
from jaxllm.load import parse

TINY = "configs/tiny.py"


def test_tiny_config_parses_into_dataclasses():
    run = parse(load_config(TINY))
    assert run.model.num_layers >= 1 and run.data.source == "embedded"
    assert dataclasses.is_dataclass(run.optim) and run.mesh.data == -1


def test_overrides_are_typed():
    cfg = load_config(TINY, ["model.num_layers=3", "optim.learning_rate=1e-3", "train.progress=false",
                             "data.paths=['a.txt','b.txt']", "generate.prompt=def f(x):", "optim.warmup_steps=0"])
    assert cfg.model.num_layers == 3 and cfg.optim.learning_rate == 1e-3 and cfg.train.progress is False
    assert list(cfg.data.paths) == ["a.txt", "b.txt"] and cfg.generate.prompt == "def f(x):"
    assert isinstance(load_config(TINY, ["optim.learning_rate=1"]).optim.learning_rate, float)


@pytest.mark.parametrize("override,match", [
    ("model.num_layer=3", "did you mean 'model.num_layers'"),
    ("modle.num_layers=3", "unknown config key"),
    ("model.num_layers=three", "expects int"),
    ("train.progress=maybe", "is a bool"),
    ("model=3", "is a section"),
    ("model.num_layers", "must look like"),
])
def test_bad_overrides(override, match):
    with pytest.raises(JaxllmError, match=match):
        load_config(TINY, [override])


def test_typo_inside_config_file_is_rejected(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("import ml_collections\n"
                    "def get_config():\n"
                    "    c = ml_collections.ConfigDict()\n"
                    "    c.model = dict(num_layer=2)\n"
                    "    return c\n")
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
    layers = dict(llama2_7b=32, llama2_13b=40, llama2_70b=80, falcon_7b=32, falcon_40b=60, falcon_180b=80,
                  bloom_560m=24, bloom_7b1=30, bloom_176b=70)
    for name, n in layers.items():
        run = parse(load_config(f"configs/pretrain.py:{name}"))
        assert run.model.num_layers == n and run.model.dtype == "bfloat16"
        assert run.data.vocab_size == run.model.vocab_size and run.data.block_size == run.model.max_seq_len
    with pytest.raises(JaxllmError, match="unknown model"):
        load_config("configs/pretrain.py:llama2_8b")
