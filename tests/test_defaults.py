"""Every config default is written once, in its section's dataclass: configs/common.py declares exactly the
dataclasses' fields with exactly their defaults, and every shipped config resolves and builds."""

import dataclasses
import glob
import importlib.util
import os

import pytest

from jaxllm import JaxllmError
from jaxllm.config import defaults, load_config
from jaxllm.data.config import DataConfig
from jaxllm.distributed import DistributedConfig
from jaxllm.models.config import SHAPE_FIELDS, ModelConfig, preset
from jaxllm.models.generation import GenerateConfig
from jaxllm.models.lora import LoraConfig
from jaxllm.sharding import MeshConfig
from jaxllm.train.checkpoint import CheckpointConfig
from jaxllm.train.optimizer import OptimConfig
from jaxllm.train.preference import PreferenceConfig
from jaxllm.train.prune import PruneConfig
from jaxllm.train.run import SECTIONS, TrainConfig, check_complete, from_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = os.path.join(ROOT, "configs", "common.py")
CLASSES = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "mesh": MeshConfig,
    "checkpoint": CheckpointConfig,
    "generate": GenerateConfig,
    "distributed": DistributedConfig,
    "lora": LoraConfig,
    "preference": PreferenceConfig,
    "prune": PruneConfig,
}
# ModelConfig fields the model section of common.py leaves out: the shapes and family switches (each config
# sets them, or checkpoint.model_from_init reads them from init_from, refusing them in the section) and what
# the lora section sets. A new ModelConfig field must be placed here or in common.MODEL_RUN_SWITCHES.
MODEL_NOT_RUN_SWITCHES = {
    "vocab_size",
    "num_layers",
    "embed_dim",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "mlp_dim",
    "max_seq_len",
    "rope_theta",
    "norm_eps",
    "tie_embeddings",
    "num_labels",
    "norm",
    "position",
    "mlp",
    "parallel_block",
    "num_block_norms",
    "use_bias",
    "embed_norm",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
    "lora_rslora",
    "quantization",
    "quant_block_size",
}


def _default(field: dataclasses.Field):
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def _same(a, b) -> bool:
    return type(a) is type(b) and a == b  # 0 is not 0.0, (1,) is not [1]


def test_common_declares_every_section_and_nothing_else():
    assert set(CLASSES) | {"seed"} == set(SECTIONS)
    assert sorted(load_config(COMMON).keys()) == sorted(SECTIONS)


@pytest.mark.parametrize("section", sorted(CLASSES))
def test_common_keys_and_values_are_the_dataclass_defaults(section):
    declared = load_config(COMMON)[section]
    fields = {f.name: f for f in dataclasses.fields(CLASSES[section])}
    if section == "model":
        fields = {k: f for k, f in fields.items() if k not in MODEL_NOT_RUN_SWITCHES}
    assert not MODEL_NOT_RUN_SWITCHES - {f.name for f in dataclasses.fields(ModelConfig)}  # no stale name
    missing, extra = sorted(set(fields) - set(declared)), sorted(set(declared) - set(fields))
    assert not missing and not extra, f"{section}: common.py lacks {missing}, has no dataclass field for {extra}"
    wrong = {k: (declared[k], _default(f)) for k, f in fields.items() if not _same(declared[k], _default(f))}
    assert not wrong, f"{section}: common.py value vs the dataclass default: {wrong}"


def test_model_section_holds_no_shape_key():
    """checkpoint.model_from_init refuses shape keys in the model section, so common.py must not hold any."""
    declared = set(load_config(COMMON).model)
    assert not declared & (set(SHAPE_FIELDS) | {"num_kv_heads", "head_dim"})


def test_defaults_helper():
    @dataclasses.dataclass(frozen=True)
    class C:
        a: int = 1
        b: tuple = ()
        c: list = dataclasses.field(default_factory=lambda: [2])

    assert defaults(C) == {"a": 1, "b": (), "c": [2]} and list(defaults(C)) == ["a", "b", "c"]
    assert defaults(C, only=("c", "a")) == {"c": [2], "a": 1}
    with pytest.raises(JaxllmError, match="C has no field 'z'"):
        defaults(C, only=("z",))

    @dataclasses.dataclass(frozen=True)
    class D:
        x: int

    with pytest.raises(JaxllmError, match=r"D.x has no default"):
        defaults(D)


def _shipped() -> list[str]:
    """Every configs/*.py, and configs/pretrain.py with each model it names."""
    out = []
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
        out.append(path)
        spec = importlib.util.spec_from_file_location("shipped_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out.extend(f"{path}:{name}" for name in getattr(module, "MODELS", {}))
    return out


def _init_model(cfg) -> ModelConfig:
    """A stand-in for checkpoint.init_from's config.json: the family the config's LoRA targets name."""
    falcon = any(t.startswith(("query_key_value", "dense")) for t in cfg.lora.target_modules)
    return ModelConfig(**preset("falcon_7b" if falcon else "llama2_7b"))


@pytest.mark.parametrize("path", _shipped(), ids=lambda p: os.path.relpath(p, ROOT))
def test_shipped_config_resolves_and_builds(path):
    cfg = load_config(path)
    if "train" not in cfg:  # a `jaxllm prep` config
        from jaxllm.prep import PrepConfig

        assert dataclasses.is_dataclass(PrepConfig.from_config(cfg))
        return
    check_complete(cfg, path)
    run = from_config(cfg, init_model=_init_model(cfg) if cfg.checkpoint.model_from_init else None)
    for section in CLASSES:
        assert isinstance(getattr(run, section), CLASSES[section])


@pytest.mark.parametrize("section", SECTIONS)
def test_check_complete_refuses_a_config_without_a_section(section):
    cfg = load_config(COMMON)
    check_complete(cfg, "exp.py")
    with cfg.unlocked():
        del cfg[section]
    with pytest.raises(JaxllmError, match=rf"'exp.py' lacks section\(s\) {section}; start it from configs/common.py"):
        check_complete(cfg, "exp.py")
