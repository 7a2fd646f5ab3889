"""Score (reward) models: the decoder's `score` head against transformers' *ForSequenceClassification on
tiny random Llama / Falcon / BLOOM models (import, export, PEFT SEQ_CLS adapters both ways), a causal LM
starting a score model with a fresh head, the pad_token_id an export gets, and the family-table error."""

import json
import os
import sys

import jax
import numpy as np
import pytest
from flax import linen as nn

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

sys.path.insert(0, os.path.dirname(__file__))
from test_peft import _trained_adapters  # noqa: E402

from jaxllm import JaxllmError, hf, tree  # noqa: E402
from jaxllm import sharding as shd  # noqa: E402
from jaxllm.hf import config as hf_config  # noqa: E402
from jaxllm.models import lora  # noqa: E402
from jaxllm.models.config import ModelConfig  # noqa: E402
from jaxllm.models.decoder import Decoder, abstract_params, head_DV, score_DS  # noqa: E402

VOCAB, PAD, BOS, EOS = 101, 0, 1, 2
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    num_hidden_layers=2,
    initializer_range=0.2,
    pad_token_id=PAD,
    bos_token_id=BOS,
    eos_token_id=EOS,
)
FAMILIES = {  # family -> (config class, fields, num_labels)
    "llama": (transformers.LlamaConfig, dict(intermediate_size=80, num_attention_heads=4, num_key_value_heads=2), 1),
    "falcon": (
        transformers.FalconConfig,
        dict(num_attention_heads=6, num_kv_heads=2, new_decoder_architecture=True, bias=True, ffn_hidden_size=96),
        2,
    ),
    "bloom": (transformers.BloomConfig, dict(n_head=6), 1),
}
LORA = lora.LoraConfig(r=4, alpha=8.0, target_modules=("all-linear",))
RTOL = 1e-5


def _hf_config(family, **extra):
    cls, fields, num_labels = FAMILIES[family]
    return cls(**COMMON, **fields, num_labels=num_labels, **extra)


def _moved(model):
    """Norms and biases start at 1 / 0: move them, so a layout mix-up would show."""
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def _hf_score_model(family):
    torch.manual_seed(0)
    return _moved(transformers.AutoModelForSequenceClassification.from_config(_hf_config(family)))


def _right_padded(pad=PAD):
    """Rows of different lengths, right-padded with `pad`; real tokens never equal it (nor EOS, but the last)."""
    rng = np.random.RandomState(0)
    lengths = np.array([12, 9, 5, 1])
    ids = rng.randint(3, VOCAB, (len(lengths), 12))
    mask = (np.arange(12)[None] < lengths[:, None]).astype(np.int32)
    ids[np.arange(len(lengths)), lengths - 1] = EOS  # sequences end in EOS, as jaxllm's preference rows do
    ids[mask == 0] = pad
    return ids, mask, lengths


def _hf_scores(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()


def _our_scores(model, params, ids, mask, lengths):
    """jaxllm's score at each sequence's last token (as the reward step takes it)."""
    scores_BLS = np.asarray(jax.jit(model.apply)({"params": params}, ids, None, mask))
    assert scores_BLS.shape == (*ids.shape, model.cfg.num_labels) and scores_BLS.dtype == np.float32
    return scores_BLS[np.arange(len(lengths)), lengths - 1]


def _assert_close(ours, theirs, what):
    scale = float(np.abs(theirs).max())
    diff = float(np.abs(ours - theirs).max())
    assert scale > 0.1, f"{what}: scores too small ({scale}) for the test to mean anything"
    assert diff <= RTOL * scale, f"{what}: max abs diff {diff} at score scale {scale} (rel {diff / scale:.2e})"


def _no_loading_surprises(cls, folder):
    model, info = cls.from_pretrained(str(folder), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_import_export_and_peft_parity(family, tmp_path):
    hf_model = _hf_score_model(family)
    assert type(hf_model).__name__ == hf_config.SCORE_ARCHITECTURES[family]
    hf_model.save_pretrained(tmp_path / "hf")
    ids, mask, lengths = _right_padded()
    theirs = _hf_scores(hf_model, ids, mask)

    # transformers -> jaxllm
    model, params = hf.load_pretrained(str(tmp_path / "hf"))
    num_labels = FAMILIES[family][2]
    assert model.cfg.num_labels == num_labels and "lm_head" not in params
    assert params["score"]["kernel"].shape == (48, num_labels)
    ours = _our_scores(model, params, ids, mask, lengths)
    _assert_close(ours, theirs, f"{family} import")
    hidden_BLD = jax.jit(lambda p, x, m: model.apply({"params": p}, x, None, m, hidden=True))(params, ids, mask)
    last = np.asarray(hidden_BLD @ score_DS(params, model.cfg))[np.arange(len(lengths)), lengths - 1]
    _assert_close(last, theirs, f"{family} hidden @ score_DS")
    with pytest.raises(JaxllmError, match="no language-model head"):
        head_DV(params, model.cfg)

    # jaxllm -> transformers: its own params, moved away from the import, unrolled layers
    cfg = ModelConfig(**{**model.cfg.__dict__, "scan_layers": False})
    moved = jax.tree.map(lambda x: x * 1.1, params)
    moved = {k: v for k, v in moved.items() if k != "layers"}
    moved.update({f"layers_{i}": jax.tree.map(lambda x, i=i: x[i] * 1.1, params["layers"]) for i in range(2)})
    ours = _our_scores(Decoder(cfg), moved, ids, mask, lengths)
    hf.save_pretrained(
        Decoder(cfg), moved, str(tmp_path / "out"), config_updates=dict(bos_token_id=BOS, eos_token_id=EOS)
    )
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == [hf_config.SCORE_ARCHITECTURES[family]]
    assert (config["num_labels"], config["pad_token_id"]) == (num_labels, BOS)  # no pad given: BOS, never last
    exported = _no_loading_surprises(transformers.AutoModelForSequenceClassification, tmp_path / "out")
    assert type(exported).__name__ == hf_config.SCORE_ARCHITECTURES[family]
    assert exported.config.num_labels == num_labels and exported.config.pad_token_id == BOS
    _assert_close(ours, _hf_scores(exported, *_right_padded(pad=BOS)[:2]), f"{family} export")
    prefix = "model." if family == "llama" else "transformer."
    with open(tmp_path / "out" / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header["score.weight"]["shape"] == [num_labels, 48]
    assert all(k.startswith(prefix) for k in header if k not in ("score.weight", "__metadata__"))

    # a LoRA score model: adapter -> PEFT on the exported base (score trained in full, saved with it)
    lcfg = LORA
    lora_cfg = lora.apply(lcfg, cfg)
    trainable_fn = lora.trainable_fn(lcfg, lora_cfg)
    assert trainable_fn(("score", "kernel")) and not trainable_fn(("embed_tokens", "embedding"))
    trainable, frozen = _trained_adapters(lora_cfg, lcfg, moved)  # B and the score moved away from the init
    assert [k for k in trainable if k not in frozen] == ["score"]
    ours_lora = _our_scores(Decoder(lora_cfg), tree.union(trainable, frozen), ids, mask, lengths)
    assert np.abs(ours_lora - ours).max() > 0.1  # the adapters and the new score matter
    hf.save_adapter(trainable, lora_cfg, lcfg, str(tmp_path / "adapter"))
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS" and adapter_config["modules_to_save"] == ["score"]
    base = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out"))
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    assert type(peft_model).__name__ == "PeftModelForSequenceClassification"
    _assert_close(ours_lora, _hf_scores(peft_model, *_right_padded(pad=BOS)[:2]), f"{family} PEFT")
    back, back_lcfg = hf.load_adapter(str(tmp_path / "adapter"), cfg)
    assert lora.apply(back_lcfg, cfg) == lora_cfg and back_lcfg.modules_to_save == ()
    assert jax.tree.structure(back) == jax.tree.structure(trainable)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(back), jax.tree.leaves(trainable)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    with pytest.raises(JaxllmError, match="SEQ_CLS"):
        hf.load_adapter(str(tmp_path / "adapter"), ModelConfig(**{**cfg.__dict__, "num_labels": 0}))


@pytest.mark.parametrize("family", ["llama", "falcon"])
def test_peft_made_seq_cls_adapter_imports(family, tmp_path):
    """An adapter PEFT itself saved for SEQ_CLS (modules_to_save ['classifier', 'score']) gives jaxllm PEFT's scores."""
    hf_model = _hf_score_model(family)
    hf_model.save_pretrained(tmp_path / "hf")
    peft_model = peft.get_peft_model(
        hf_model, peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules="all-linear")
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(0.3 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "adapter")
    ids, mask, lengths = _right_padded()
    theirs = _hf_scores(peft_model.eval(), ids, mask)
    model, params = hf.load_pretrained(str(tmp_path / "hf"))
    adapter_params, lcfg = hf.load_adapter(str(tmp_path / "adapter"), model.cfg)
    assert "score" in adapter_params
    ours = _our_scores(Decoder(lora.apply(lcfg, model.cfg)), tree.union(params, adapter_params), ids, mask, lengths)
    _assert_close(ours, theirs, f"{family} PEFT -> jaxllm")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_causal_lm_starts_a_score_model(family, tmp_path):
    """A *ForCausalLM folder loaded with num_labels=1: its base, lm_head ignored, a fresh score head; equal
    to transformers' *ForSequenceClassification built on the same folder once it has that head."""
    torch.manual_seed(0)
    causal = _moved(transformers.AutoModelForCausalLM.from_config(_hf_config(family, tie_word_embeddings=False)))
    causal.save_pretrained(tmp_path / "causal")
    lm, lm_params = hf.load_pretrained(str(tmp_path / "causal"))
    assert lm.cfg.num_labels == 0 and "lm_head" in lm_params

    model, params = hf.load_pretrained(str(tmp_path / "causal"), num_labels=1)
    assert model.cfg.num_labels == 1 and "lm_head" not in params
    base = {k: v for k, v in params.items() if k != "score"}
    lm_base = {k: v for k, v in lm_params.items() if k != "lm_head"}
    assert jax.tree.structure(base) == jax.tree.structure(lm_base)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(base), jax.tree.leaves(lm_base)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    score = np.asarray(params["score"]["kernel"])
    assert score.shape == (48, 1) and 0.01 < score.std() < 0.03  # normal(init_std=0.02), not lm_head's rows

    # transformers' *ForSequenceClassification on the same causal folder, given the same (scaled-up) head
    hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "causal"), num_labels=1)
    with torch.no_grad():
        hf_model.score.weight.copy_(torch.tensor(50 * score.T))
    ids, mask, lengths = _right_padded()
    ours = _our_scores(model, {**params, "score": {"kernel": 50 * score}}, ids, mask, lengths)
    _assert_close(ours, _hf_scores(hf_model.eval(), ids, mask), f"{family} causal base")

    # the run's path: load_init_params, from the folder and from a `jaxllm convert` output
    from jaxllm.convert import hf_to_checkpoint
    from jaxllm.train.start import load_init_params, source_model_config

    hf_to_checkpoint(str(tmp_path / "causal"), str(tmp_path / "converted"))
    mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    run_cfg = ModelConfig(**{**source_model_config(str(tmp_path / "causal")).__dict__, "num_labels": 1})
    for source in ("causal", "converted"):
        loaded = load_init_params(str(tmp_path / source), run_cfg, mesh, score_key=jax.random.key(3))
        assert sorted(loaded) == sorted(shd.unbox(abstract_params(run_cfg)))
        np.testing.assert_array_equal(
            np.asarray(loaded["embed_tokens"]["embedding"]), np.asarray(lm_params["embed_tokens"]["embedding"])
        )
        assert np.asarray(loaded["score"]["kernel"]).std() > 0.01
        # an adapter run's split: the fresh score is trained, the base frozen
        saved, _ = tree.partition(loaded, lora.trainable_fn(LORA, lora.apply(LORA, run_cfg)))
        assert list(saved) == ["score"]


def test_score_folder_loads_only_as_a_score_model(tmp_path):
    _hf_score_model("llama").save_pretrained(tmp_path / "hf")
    with pytest.raises(
        JaxllmError,
        match=r"is a score model \(num_labels=1, no lm_head\); load it with "
        r"model.num_labels=1",
    ):
        hf.load_pretrained(str(tmp_path / "hf"), num_labels=0)
    with pytest.raises(JaxllmError, match="num_labels=1"):
        hf.load_pretrained(str(tmp_path / "hf"), num_labels=3)


def test_family_without_a_score_head_is_refused_on_export(tmp_path, monkeypatch):
    """All three families have a *ForSequenceClassification in transformers 5; the check reads the table."""
    for family in FAMILIES:
        assert hasattr(transformers, hf_config.SCORE_ARCHITECTURES[family])
    monkeypatch.delitem(hf_config.SCORE_ARCHITECTURES, "bloom")
    cfg = hf.model_config_from_hf(_hf_config("bloom").to_dict(), num_labels=1)
    params = nn.meta.unbox(Decoder(cfg).init(jax.random.key(0), np.zeros((1, 1), np.int32))["params"])
    with pytest.raises(JaxllmError) as error:
        hf.save_pretrained(Decoder(cfg), params, str(tmp_path / "out"))
    assert "\n" not in str(error.value)
    assert str(error.value).startswith("bloom has no sequence-classification head in transformers; ")
    assert not (tmp_path / "out").exists()
    causal = {k: v for k, v in params.items() if k != "score"}  # (tied: no lm_head)
    hf.save_pretrained(Decoder(ModelConfig(**{**cfg.__dict__, "num_labels": 0})), causal, str(tmp_path / "causal"))


def test_pad_token_id_of_an_export():
    pick = hf_config.score_pad_token_id
    assert pick(0, 2, 1) == 0  # the tokenizer's pad
    assert pick(2, 2, 1) == 1  # pad = EOS (TRL's habit): BOS, which never ends a sequence
    assert pick(None, 11, 11) == 0  # Falcon: BOS = EOS, no pad
    assert pick(None, [0, 5], None) == 1
    assert pick(-1, None, None) == 0


def test_model_config_num_labels():
    with pytest.raises(JaxllmError, match="num_labels"):
        ModelConfig(num_labels=-1)
    with pytest.raises(JaxllmError, match="num_labels"):
        ModelConfig(num_labels=1.5)
    for tie in (False, True):
        for bloom in (False, True):
            family = (
                dict(norm="layer", position="alibi", mlp="gelu_tanh", use_bias=True, embed_norm=True) if bloom else {}
            )
            lm = ModelConfig(vocab_size=64, embed_dim=32, num_heads=4, mlp_dim=64, tie_embeddings=tie, **family)
            scorer = ModelConfig(**{**lm.__dict__, "num_labels": 3})
            shapes = shd.unbox(abstract_params(scorer))
            assert sum(x.size for x in jax.tree.leaves(shapes)) == scorer.num_params()
            assert shapes["score"]["kernel"].shape == (32, 3) and "lm_head" not in shapes
            head = 0 if tie else 64 * 32
            assert scorer.num_params() == lm.num_params() - head + 32 * 3
            # FLOPs: the embedding is a lookup, the score a matmul
            assert scorer.train_flops_per_token(16) - lm.train_flops_per_token(16) == 6 * (32 * 3 - 64 * 32)
    spec = nn.get_partition_spec(abstract_params(scorer))["score"]["kernel"]
    assert tuple(spec) == ("embed", None)
