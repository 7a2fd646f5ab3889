"""Hugging Face interop: logits parity with transformers on tiny random Llama / Falcon / BLOOM models,
both directions (transformers -> jaxllm -> transformers), sharded checkpoints, meshes, bad inputs."""

import json
import os
import pickle

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxllm import JaxllmError, hf  # noqa: E402
from jaxllm import sharding as shd  # noqa: E402
from jaxllm.data.tokenizer import load_tokenizer_from_folder  # noqa: E402
from jaxllm.models.config import ModelConfig, preset  # noqa: E402

VOCAB = 101
COMMON = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, initializer_range=0.2, pad_token_id=0)
VARIANTS = {
    "llama_mha": ("llama", dict(intermediate_size=80, num_attention_heads=4, num_key_value_heads=4)),
    "llama_gqa": ("llama", dict(intermediate_size=80, num_attention_heads=6, num_key_value_heads=2)),
    "llama_tied": (
        "llama",
        dict(intermediate_size=80, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    ),
    "llama_theta": (
        "llama",
        dict(
            intermediate_size=80,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=500000.0,
            attention_bias=True,
            mlp_bias=True,
        ),
    ),
    "falcon_mq": (
        "falcon",
        dict(
            num_attention_heads=4,
            new_decoder_architecture=False,
            multi_query=True,
            parallel_attn=True,
            bias=False,
            alibi=False,
        ),
    ),
    "falcon_grouped": (
        "falcon",
        dict(num_attention_heads=6, num_kv_heads=2, new_decoder_architecture=True, bias=True, ffn_hidden_size=96),
    ),
    "falcon_sequential": (
        "falcon",
        dict(num_attention_heads=4, new_decoder_architecture=False, multi_query=False, parallel_attn=False, bias=True),
    ),
    "bloom": ("bloom", dict(n_head=6)),  # 6 heads: ALiBi slopes of a non-power-of-2 head count
}
CONFIGS = {"llama": transformers.LlamaConfig, "falcon": transformers.FalconConfig, "bloom": transformers.BloomConfig}


def _hf_model(variant: str):
    kind, fields = VARIANTS[variant]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[kind](**COMMON, **fields)).eval()
    with torch.no_grad():  # norms and biases start at 1 / 0: move them, so a layout mix-up would show
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _padded_batch():
    """Row 0 left-padded, row 1 right-padded, row 2 full; positions count real tokens only."""
    rng = np.random.RandomState(0)
    ids = rng.randint(1, VOCAB, (3, 12))
    mask = np.ones_like(ids)
    mask[0, :4] = 0
    mask[1, 9:] = 0
    ids[mask == 0] = 0
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return ids, mask, positions


def _hf_logits(model, ids, mask, positions):
    kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if model.config.model_type != "bloom":  # BLOOM's ALiBi positions come from the mask
        kwargs["position_ids"] = torch.tensor(positions)
    with torch.no_grad():
        return model(**kwargs).logits.float().numpy()


def _jax_logits(model, params, ids, mask, positions):
    return np.asarray(jax.jit(model.apply)({"params": params}, ids, positions, mask))


def _assert_close(ours, theirs, mask, what):
    real = mask.astype(bool)
    scale = float(np.abs(theirs[real]).max())
    diff = float(np.abs(ours[real] - theirs[real]).max())
    assert scale > 1.0, f"{what}: logits too small ({scale}) for the test to mean anything"
    assert diff < 1e-4 * scale, f"{what}: max abs diff {diff} at logit scale {scale}"
    return diff, scale


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers_both_ways(variant, tmp_path):
    theirs_model = _hf_model(variant)
    theirs_model.save_pretrained(tmp_path / "hf")
    ids, mask, positions = _padded_batch()
    theirs = _hf_logits(theirs_model, ids, mask, positions)

    scan = variant != "llama_mha"  # one variant through the per-layer (unscanned) path
    model, params = hf.load_pretrained(str(tmp_path / "hf"), scan_layers=scan)
    assert model.cfg.scan_layers == scan and model.cfg.tie_embeddings == theirs_model.config.tie_word_embeddings
    ours = _jax_logits(model, params, ids, mask, positions)
    diff, scale = _assert_close(ours, theirs, mask, f"{variant} import")
    print(f"{variant}: max abs diff {diff:.2e}, logit scale {scale:.2f}")

    hf.save_pretrained(model, params, str(tmp_path / "back"), max_shard_size="40KB")  # several shards
    assert os.path.isfile(tmp_path / "back" / "model.safetensors.index.json")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(back) is type(theirs_model)
    _assert_close(_hf_logits(back, ids, mask, positions), ours, mask, f"{variant} export")
    for name, p in theirs_model.state_dict().items():  # bit-exact float32 round trip
        np.testing.assert_array_equal(back.state_dict()[name].numpy(), p.numpy(), err_msg=name)


def test_bfloat16_checkpoint_and_sharded_mesh_load(tmp_path):
    theirs_model = _hf_model("falcon_grouped")
    theirs_model.to(torch.bfloat16).save_pretrained(tmp_path / "hf", max_shard_size="30KB")
    assert os.path.isfile(tmp_path / "hf" / "model.safetensors.index.json")
    ids, mask, positions = _padded_batch()
    mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=2, tensor=2), jax.devices()[:4])
    model, params = hf.load_pretrained(str(tmp_path / "hf"), mesh=mesh)
    q = params["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.dtype == np.float32 and q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert len(q.sharding.device_set) == 4
    with shd.activate(mesh):
        ours = _jax_logits(model, params, ids, mask, positions)
    # transformers reloaded in float32 (a bf16 model's rotary inv_freq buffer is bf16-rounded, too)
    theirs_f32 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    _assert_close(ours, _hf_logits(theirs_f32, ids, mask, positions), mask, "bf16 falcon on a mesh")
    model16, params16 = hf.load_pretrained(str(tmp_path / "hf"), dtype="bfloat16")
    assert params16["embed_tokens"]["embedding"].dtype == jax.numpy.bfloat16
    hf.save_pretrained(model16, params16, str(tmp_path / "back"), dtype="bfloat16")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    assert back.dtype == torch.bfloat16
    np.testing.assert_array_equal(
        back.state_dict()["lm_head.weight"].float().numpy(), theirs_model.state_dict()["lm_head.weight"].float().numpy()
    )


def test_alibi_slopes_match_transformers():
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    from jaxllm.models.attention.reference import alibi_slopes

    for heads in (1, 4, 6, 12, 16, 112):
        theirs = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), heads, torch.float32)[:, 0, 1].numpy()
        np.testing.assert_allclose(alibi_slopes(heads), theirs, rtol=1e-6)


_PRESET_HF = {
    "llama2_70b": (
        "llama",
        dict(
            vocab_size=32000,
            hidden_size=8192,
            intermediate_size=28672,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
        ),
    ),
    "falcon_7b": (
        "falcon",
        dict(
            vocab_size=65024,
            hidden_size=4544,
            num_hidden_layers=32,
            num_attention_heads=71,
            multi_query=True,
            parallel_attn=True,
            bias=False,
        ),
    ),
    "falcon_40b": (
        "falcon",
        dict(
            vocab_size=65024,
            hidden_size=8192,
            num_hidden_layers=60,
            num_attention_heads=128,
            num_kv_heads=8,
            new_decoder_architecture=True,
        ),
    ),
    "falcon_180b": (
        "falcon",
        dict(
            vocab_size=65024,
            hidden_size=14848,
            num_hidden_layers=80,
            num_attention_heads=232,
            num_kv_heads=8,
            new_decoder_architecture=True,
        ),
    ),
    "bloom_560m": ("bloom", dict(vocab_size=250880, hidden_size=1024, n_layer=24, n_head=16)),
    "bloom_7b1": ("bloom", dict(vocab_size=250880, hidden_size=4096, n_layer=30, n_head=32)),
    "bloom_176b": ("bloom", dict(vocab_size=250880, hidden_size=14336, n_layer=70, n_head=112)),
}


@pytest.mark.parametrize("name", list(_PRESET_HF))
def test_presets_are_the_published_models(name):
    """The HF config of each published model maps to our preset, and transformers (on the meta device:
    nothing allocated) counts the same parameters as jaxllm."""
    kind, fields = _PRESET_HF[name]
    config = CONFIGS[kind](**fields)
    ours = hf.model_config_from_hf(config.to_dict())
    assert ours == ModelConfig(**preset(name, max_seq_len=ours.max_seq_len, rope_theta=ours.rope_theta))
    with torch.device("meta"):
        theirs = transformers.AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in theirs.parameters()) == ours.num_params()


def test_falcon_legacy_config_names():
    rw7b = dict(
        model_type="RefinedWebModel",
        vocab_size=65024,
        n_embed=4544,
        n_layer=32,
        n_head=71,
        multi_query=True,
        parallel_attn=True,
        bias=False,
        layer_norm_epsilon=1e-5,
    )
    assert hf.model_config_from_hf(rw7b) == ModelConfig(**preset("falcon_7b"))
    rw40b = dict(
        model_type="RefinedWeb",
        vocab_size=65024,
        n_embed=8192,
        n_layer=60,
        n_head=128,
        n_head_kv=8,
        parallel_attn=True,
        bias=False,
    )
    assert hf.model_config_from_hf(rw40b) == ModelConfig(**preset("falcon_40b"))


def _saved(tmp_path, variant="llama_gqa", **save_kwargs):
    folder = tmp_path / "hf"
    _hf_model(variant).save_pretrained(folder, **save_kwargs)
    return folder


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_unknown_model_type(tmp_path):
    folder = _saved(tmp_path)
    _edit_config(folder, model_type="gpt2")
    with pytest.raises(JaxllmError, match=r"config.json: model_type 'gpt2' is not supported; .*llama, falcon, bloom"):
        hf.load_pretrained(str(folder))
    with pytest.raises(JaxllmError, match="config.json.*not found"):
        hf.load_pretrained(str(tmp_path / "nowhere"))


def test_missing_shard(tmp_path):
    folder = _saved(tmp_path, max_shard_size="30KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    os.remove(folder / shard)
    with pytest.raises(JaxllmError, match=f"{shard}: shard listed in .*index.json is missing"):
        hf.load_pretrained(str(folder))


def test_missing_tensor_and_shape_mismatch(tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = _saved(tmp_path)
    file = folder / "model.safetensors"
    tensors = load_file(file)
    _edit_config(folder, intermediate_size=96)
    with pytest.raises(
        JaxllmError,
        match=r"model.safetensors: tensor 'model.layers.0.mlp.gate_proj.weight' has "
        r"shape \(80, 48\) but config.json implies \(96, 48\)",
    ):
        hf.load_pretrained(str(folder))
    _edit_config(folder, intermediate_size=80)
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(JaxllmError, match="tensor 'model.layers.1.self_attn.v_proj.weight' is missing"):
        hf.load_pretrained(str(folder))


def test_export_refuses_what_no_hf_architecture_computes(tmp_path):
    from jaxllm.models.decoder import Decoder

    cfg = ModelConfig(vocab_size=16, num_layers=1, embed_dim=8, num_heads=2, mlp_dim=16, position="alibi")
    with pytest.raises(JaxllmError, match="matches no Hugging Face"):
        hf.save_pretrained(Decoder(cfg), {}, str(tmp_path / "out"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    model, params = hf.load_pretrained(str(_saved(tmp_path)))
    with pytest.raises(JaxllmError, match="exists and is not empty"):
        hf.save_pretrained(model, params, str(tmp_path / "full"))


def test_dtype_as_name_or_numpy_or_jnp_dtype(tmp_path):
    import jax.numpy as jnp

    from jaxllm import convert, load

    folder = _saved(tmp_path)
    _tokenizer_files(folder, ["hello", "world"])
    folder = str(folder)
    for given in ("float32", jnp.float32, np.float32, np.dtype("float32")):
        model, params = hf.load_pretrained(folder, dtype=given)
        assert model.cfg.param_dtype == model.cfg.dtype == "float32"
    model, params = hf.load_pretrained(folder, dtype=jnp.bfloat16, compute_dtype=np.dtype("float32"))
    assert (model.cfg.param_dtype, model.cfg.dtype) == ("bfloat16", "float32")
    assert params["embed_tokens"]["embedding"].dtype == jnp.bfloat16
    hf.save_pretrained(model, params, str(tmp_path / "back"), dtype=jnp.bfloat16)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load.load_model(folder, dtype=np.float16)[0].cfg.param_dtype == "float16"
    assert convert.hf_to_checkpoint(folder, str(tmp_path / "conv"), dtype=jnp.float32).dtype == "float32"
    json.dumps(ModelConfig(param_dtype=jnp.bfloat16, dtype=np.float32).__dict__)  # workdirs store it as JSON
    for bad in ("fp8", np.int32, None):
        with pytest.raises(JaxllmError, match=r"^dtype=.*; choose one of float32, bfloat16, float16"):
            hf.load_pretrained(folder, dtype=bad)
    with pytest.raises(JaxllmError, match=r"^compute_dtype=.*int8.*; choose one of"):
        hf.load_pretrained(folder, compute_dtype=jnp.int8)
    with pytest.raises(JaxllmError, match=r"^dtype=.*float64.*; choose one of"):
        hf.save_pretrained(model, params, str(tmp_path / "other"), dtype=np.float64)


def _tokenizer_files(folder, words):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)
    return fast


def test_tokenizer_from_folder(tmp_path):
    folder = _saved(tmp_path)
    theirs = _tokenizer_files(folder, ["hello", "world", "jax"])
    ours = load_tokenizer_from_folder(str(folder))
    assert (ours.vocab_size, ours.pad_id, ours.bos_id, ours.eos_id) == (7, 0, 1, 2)
    text = "hello jax world"
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False) == [4, 6, 5]
    assert ours.decode([0, 4, 6, 5, 0]) == theirs.decode([4, 6, 5])
    assert pickle.loads(pickle.dumps(ours)).encode(text) == [4, 6, 5]  # Grain workers pickle it
    _tokenizer_files(folder, [f"w{i}" for i in range(VOCAB)])  # 105 tokens > the model's 101
    with pytest.raises(JaxllmError, match=r"tokenizer.json has 105 tokens but the model's vocab_size is 101"):
        load_tokenizer_from_folder(str(folder))


def test_sentencepiece_tokenizer_from_folder(tmp_path):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["hello world", "jax and flax", "the quick fox"] * 20),
        model_prefix=str(tmp_path / "tokenizer"),
        vocab_size=24,
        minloglevel=2,
    )
    tok = load_tokenizer_from_folder(str(tmp_path), vocab_size=32)
    assert tok.vocab_size == 24 and tok.decode(tok.encode("hello world")) == "hello world"
    with pytest.raises(JaxllmError, match="has 24 tokens but the model's vocab_size is 16"):
        load_tokenizer_from_folder(str(tmp_path), vocab_size=16)
