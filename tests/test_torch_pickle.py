"""PyTorch `.bin` checkpoints read without torch and without running their pickles: parity with the
safetensors of the same model and with transformers' logits, views of shared storages, refusal of
pickles that would run code, and one-line errors for malformed checkpoint files."""

import io
import json
import os
import pickle
import pickletools
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, os.path.dirname(__file__))
from test_hf import _assert_close, _hf_logits, _hf_model, _jax_logits, _padded_batch, _tokenizer_files  # noqa: E402

from jaxllm import JaxllmError, cli, hf  # noqa: E402
from jaxllm.hf.torch_pickle import TorchFile  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _state_dict(variant: str, dtype: str):
    """The model's state dict in `dtype` ("mixed": bf16 matrices, fp32 vectors), and a float32 model
    holding exactly those values (the reference for logits)."""
    model = _hf_model(variant)
    sd = {}
    for name, p in model.state_dict().items():
        want = (torch.float32 if p.ndim == 1 else torch.bfloat16) if dtype == "mixed" else DTYPES[dtype]
        sd[name] = p.to(want)
    if model.config.tie_word_embeddings and "lm_head.weight" in sd:  # tied: one storage, as torch.save keeps it
        embed = next(n for n in sd if "embed" in n and n.endswith(".weight") and "layernorm" not in n)
        sd["lm_head.weight"] = sd[embed]
    reference = _hf_model(variant)
    reference.load_state_dict({k: v.float() for k, v in sd.items()})
    return model.config, sd, reference.eval()


def _write_bin(folder, config, sd, shards: int = 1):
    """config.json + pytorch_model.bin, or `shards` files + pytorch_model.bin.index.json, as transformers names them."""
    os.makedirs(folder, exist_ok=True)
    config.save_pretrained(folder)
    if shards == 1:
        torch.save(sd, os.path.join(folder, "pytorch_model.bin"))
        return
    names = list(sd)
    weight_map = {}
    for i in range(shards):
        part = {n: sd[n] for n in names[i::shards]}
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save(part, os.path.join(folder, file))
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)


def _write_safetensors(folder, config, sd):
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    config.save_pretrained(folder)
    save_file(
        {k: v.clone().contiguous() for k, v in sd.items()},
        os.path.join(folder, "model.safetensors"),
        metadata={"format": "pt"},
    )


@pytest.mark.parametrize(
    "variant,dtype,shards",
    [
        ("llama_gqa", "float32", 1),
        ("llama_tied", "float16", 3),
        ("falcon_grouped", "bfloat16", 3),
        ("bloom", "float32", 2),
        ("llama_theta", "mixed", 1),
    ],
)
def test_bin_loads_as_its_safetensors_and_matches_transformers(variant, dtype, shards, tmp_path):
    config, sd, reference = _state_dict(variant, dtype)
    if config.model_type == "llama":  # an old-style persistent rotary buffer: in the file, never read
        sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.full((6,), float("nan"))
    _write_bin(tmp_path / "bin", config, sd, shards)
    _write_safetensors(tmp_path / "st", config, sd)
    model, params = hf.load_pretrained(str(tmp_path / "bin"))
    _, expected = hf.load_pretrained(str(tmp_path / "st"))
    assert jax.tree.structure(params) == jax.tree.structure(expected)
    for path, a in jax.tree_util.tree_leaves_with_path(params):
        b = expected
        for key in path:
            b = b[key.key]
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    ids, mask, positions = _padded_batch()
    _assert_close(
        _jax_logits(model, params, ids, mask, positions),
        _hf_logits(reference, ids, mask, positions),
        mask,
        f"{variant} {dtype} .bin",
    )


def test_unused_tensors_are_never_read(tmp_path, monkeypatch):
    config, sd, _ = _state_dict("llama_gqa", "float32")
    sd["model.layers.1.self_attn.rotary_emb.inv_freq"] = torch.ones(6)
    _write_bin(tmp_path, config, sd)
    read = []
    original = TorchFile.read
    monkeypatch.setattr(TorchFile, "read", lambda self, name: read.append(name) or original(self, name))
    hf.load_pretrained(str(tmp_path))
    assert sorted(read) == sorted(n for n in sd if not n.endswith("inv_freq"))


def test_views_of_shared_storages(tmp_path):
    """Transposes, slices, strided rows, broadcasts and tied weights: views of few storages, read right."""
    torch.manual_seed(0)
    base, wide = torch.randn(5, 7), torch.randn(10, 6, dtype=torch.bfloat16)
    tensors = {
        "base": base,
        "transposed": base.t(),
        "block": base[1:3, 2:5],
        "tied": base,
        "row": wide[2],
        "column": wide[:, 1],
        "expanded": torch.randn(3, 1).expand(3, 4),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "half": torch.randn(4, 4).half(),
        "ids": torch.arange(6),
        "mask": torch.tensor([True, False]),
        "param": torch.nn.Parameter(torch.randn(2, 3)),
    }
    torch.save(tensors, tmp_path / "views.bin")
    file = TorchFile(str(tmp_path / "views.bin"))
    assert file.keys() == list(tensors)
    for name, t in tensors.items():
        got = file.read(name)
        want = t.detach().float().numpy() if t.dtype == torch.bfloat16 else t.detach().numpy()
        assert got.shape == tuple(t.shape) and got.flags.c_contiguous, name
        np.testing.assert_array_equal(got.astype(want.dtype), want, err_msg=name)
    row = file.read("row")
    assert row.dtype.name == "bfloat16"
    while row.base is not None:  # only the row's 6 elements were read, not its 60-element storage
        row = row.base
    assert row.nbytes == 6 * 2
    assert file.tensors["tied"].storage == file.tensors["transposed"].storage

    # the same archive re-zipped with compression and written big-endian (byteorder file + swapped
    # storages) reads the same values
    big = tmp_path / "big.bin"
    with zipfile.ZipFile(tmp_path / "views.bin") as src, zipfile.ZipFile(big, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename:
                key = info.filename.rsplit("/", 1)[1]
                ref = next(r for r in file.tensors.values() if r.storage.key == key)
                size = np.dtype(ref.dtype).itemsize
                data = np.frombuffer(data, f"<u{size}").astype(f">u{size}").tobytes() if size > 1 else data
            dst.writestr(info.filename, data, compress_type=zipfile.ZIP_DEFLATED)
    swapped = TorchFile(str(big))
    assert swapped.big_endian and zipfile.ZipFile(big).getinfo(swapped._entries["base"].filename).compress_type
    for name in tensors:
        np.testing.assert_array_equal(swapped.read(name), file.read(name), err_msg=name)


class _Calls:
    """Pickles as a call of `fn(*args)`: what a malicious checkpoint holds."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _torch_style_zip(path, payload) -> None:
    """A zip laid out as torch.save writes it, whose data.pkl is `payload` (inside a state dict)."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"model.embed_tokens.weight": payload}, protocol=2))
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")


@pytest.mark.parametrize("call", ["os.system", "builtins.eval", "subprocess.Popen", "builtins.__import__"])
def test_pickles_that_run_code_are_refused(call, tmp_path):
    marker = tmp_path / "MARKER"
    payload = {
        "os.system": _Calls(os.system, f"touch {marker}"),
        "builtins.eval": _Calls(eval, f"open({str(marker)!r}, 'w')"),
        "subprocess.Popen": _Calls(subprocess.Popen, ["touch", str(marker)]),
        "builtins.__import__": _Calls(__import__, "os"),
    }[call]
    shown = {"os.system": os.system.__module__ + ".system"}.get(call, call)  # posix.system on Linux
    _write_bin(tmp_path / "zip", _hf_model("llama_gqa").config, {})
    _torch_style_zip(tmp_path / "zip" / "pytorch_model.bin", payload)
    os.makedirs(tmp_path / "plain")
    (tmp_path / "plain" / "config.json").write_text((tmp_path / "zip" / "config.json").read_text())
    (tmp_path / "plain" / "pytorch_model.bin").write_bytes(pickle.dumps(payload))
    for folder in ("zip", "plain"):
        file = tmp_path / folder / "pytorch_model.bin"
        with pytest.raises(JaxllmError) as e:
            hf.load_pretrained(str(tmp_path / folder))
        assert str(e.value) == (
            f"{file}: refused to load: the pickle calls {shown}; jaxllm reads only tensors "
            "from .bin files (convert it to safetensors with a tool you trust)"
        )
    assert not marker.exists()


def test_a_pickle_cannot_alter_the_callables_it_may_use(tmp_path):
    """BUILD on an allowed global (its __dict__, or attributes by slot state) fails; later loads are unharmed."""
    rebuild = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n"
    text = lambda s: b"X" + len(s).to_bytes(4, "little") + s.encode()  # noqa: E731
    for build in (b"}" + text("__defaults__") + b"K\x01sb.", b"N}" + text("_fn") + b"K\x01s\x86b."):
        path = tmp_path / "build.bin"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", rebuild + build)
        pickletools.dis(rebuild + build, out=io.StringIO())  # a well-formed pickle: refused for what it does
        with pytest.raises(JaxllmError, match="build.bin: the pickle is corrupt or not a state dict"):
            TorchFile(str(path))
    torch.save({"w": torch.ones(2, 3)}, tmp_path / "ok.bin")
    np.testing.assert_array_equal(TorchFile(str(tmp_path / "ok.bin")).read("w"), np.ones((2, 3), np.float32))


def test_refused_through_the_cli_and_legacy_format(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    _write_bin(tmp_path / "m", _hf_model("llama_gqa").config, {})
    _torch_style_zip(tmp_path / "m" / "pytorch_model.bin", _Calls(os.system, f"touch {marker}"))
    lines = _cli_error(["generate", "--model", str(tmp_path / "m"), "--prompt", "hi"], capsys)
    assert "pytorch_model.bin: refused to load: the pickle calls" in lines and not marker.exists()

    config, sd, _ = _state_dict("llama_gqa", "float32")
    os.remove(tmp_path / "m" / "pytorch_model.bin")
    torch.save(sd, tmp_path / "m" / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(
        JaxllmError,
        match=r"pytorch_model.bin: written in PyTorch's legacy .* re-save it with "
        r"torch.save .* or convert it to safetensors$",
    ):
        hf.load_pretrained(str(tmp_path / "m"))


def _cli_error(argv, capsys) -> str:
    """The one line `jaxllm ARGV` prints when it fails with exit status 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and err.startswith("jaxllm: error: "), err
    return err


def _safetensors_folder(tmp_path, **save):
    folder = tmp_path / "hf"
    _hf_model("llama_gqa").save_pretrained(folder, **save)
    return folder


def _corrupt_cases(tmp_path):
    """(folder, file to name, message pattern) for each malformed-file case."""
    cases = []

    def case(name, setup, file, pattern, **save):
        folder = _safetensors_folder(tmp_path / name, **save)
        setup(folder)
        cases.append((name, folder, folder / file if file else None, pattern))

    index = "model.safetensors.index.json"
    cut = lambda path: path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # noqa: E731
    case("truncated_index", lambda f: cut(f / index), index, "is not valid JSON", max_shard_size="30KB")
    case(
        "index_list",
        lambda f: (f / index).write_text("[1, 2]"),
        index,
        "holds a JSON list, not an object",
        max_shard_size="30KB",
    )
    case(
        "weight_map_list",
        lambda f: (f / index).write_text('{"weight_map": ["a"]}'),
        index,
        'no "weight_map" object',
        max_shard_size="30KB",
    )
    case(
        "weight_map_int",
        lambda f: (f / index).write_text('{"weight_map": {"a": 3}}'),
        index,
        r"weight_map\['a'\] is 3, not a file name",
        max_shard_size="30KB",
    )

    def escape(folder, target):
        outside = folder.parent / "outside"
        outside.mkdir()
        weight_map = json.loads((folder / index).read_text())["weight_map"]
        first = next(iter(weight_map))
        (outside / "x.safetensors").write_bytes((folder / weight_map[first]).read_bytes())
        weight_map[first] = target if target else str(outside / "x.safetensors")
        (folder / index).write_text(json.dumps({"weight_map": weight_map}))

    case(
        "dotdot",
        lambda f: escape(f, "../outside/x.safetensors"),
        index,
        r"refused file '../outside/x.safetensors': weight files must lie inside the model folder",
        max_shard_size="30KB",
    )
    case(
        "absolute",
        lambda f: escape(f, ""),
        index,
        "refused file '/.*': weight files must lie inside",
        max_shard_size="30KB",
    )
    case(
        "truncated_safetensors",
        lambda f: cut(f / "model.safetensors"),
        "model.safetensors",
        "not a valid safetensors file",
    )
    case(
        "absurd_header",
        lambda f: (f / "model.safetensors").write_bytes((2**60).to_bytes(8, "little") + b"{}"),
        "model.safetensors",
        "not a valid safetensors file",
    )
    case(
        "garbage_header",
        lambda f: (f / "model.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b"{garbage}" * 3),
        "model.safetensors",
        "not a valid safetensors file",
    )
    case(
        "config_list", lambda f: (f / "config.json").write_text("[]"), "config.json", "holds a JSON list, not an object"
    )
    return cases


def test_malformed_checkpoint_files_are_one_line_errors(tmp_path, capsys):
    for name, folder, file, pattern in _corrupt_cases(tmp_path):
        with pytest.raises(JaxllmError, match=pattern) as e:
            hf.load_pretrained(str(folder))
        assert str(file) in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
        if name in ("truncated_index", "dotdot", "config_list"):
            err = _cli_error(["generate", "--model", str(folder), "--prompt", "hi"], capsys)
            assert str(file) in err, (name, err)


def test_malformed_bin_files_are_one_line_errors(tmp_path, capsys):
    config, sd, _ = _state_dict("llama_gqa", "float32")
    _write_bin(tmp_path / "m", config, sd, shards=2)
    shard = tmp_path / "m" / "pytorch_model-00001-of-00002.bin"
    good = shard.read_bytes()
    for content, pattern in [
        (good[: len(good) // 2], "not a PyTorch checkpoint"),
        (os.urandom(4096), "not a PyTorch checkpoint"),
        (None, "the pickle is corrupt or not a state dict"),
        (None, "storage '0' is missing from the archive"),
        (b"", "not a PyTorch checkpoint"),
    ]:
        if content is None:  # a zip archive whose pickle is garbage, or that lost a storage entry
            buffer = io.BytesIO()
            with zipfile.ZipFile(io.BytesIO(good)) as src, zipfile.ZipFile(buffer, "w") as dst:
                for info in src.infolist():
                    if "garbage" in pattern or "corrupt" in pattern:
                        dst.writestr(
                            info, b"\x80\x02}q\x00(X" if info.filename.endswith("data.pkl") else src.read(info)
                        )
                    elif not info.filename.endswith("/data/0"):
                        dst.writestr(info, src.read(info))
            content = buffer.getvalue()
        shard.write_bytes(content)
        with pytest.raises(JaxllmError, match=pattern) as e:
            hf.load_pretrained(str(tmp_path / "m"))
        assert str(e.value).startswith(f"{shard}: "), str(e.value)
    err = _cli_error(
        ["convert", "--from_hf", str(tmp_path / "m"), "--output", str(tmp_path / "out"), "--format", "safetensors"],
        capsys,
    )
    assert f"{shard}: not a PyTorch checkpoint" in err
    index = tmp_path / "m" / "pytorch_model.bin.index.json"
    index.write_text(index.read_text()[:40])
    with pytest.raises(JaxllmError, match=f"^{index} is not valid JSON"):
        hf.load_pretrained(str(tmp_path / "m"))


def test_safetensors_preferred_and_convert_bin_to_safetensors(tmp_path, capsys):
    config, sd, reference = _state_dict("llama_gqa", "bfloat16")
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(6)
    _write_bin(tmp_path / "m", config, sd, shards=2)
    _tokenizer_files(tmp_path / "m", ["hello", "world"])
    with pytest.raises(SystemExit) as e:
        cli.main(
            ["convert", "--from_hf", str(tmp_path / "m"), "--output", str(tmp_path / "st"), "--format", "safetensors"]
        )
    assert e.value.code == 0
    out = tmp_path / "st"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    for name, tensor in theirs.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), reference.state_dict()[name].numpy(), err_msg=name)
    ids, mask, positions = _padded_batch()
    np.testing.assert_array_equal(_hf_logits(theirs, ids, mask, positions), _hf_logits(reference, ids, mask, positions))
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "numpy") as f:
        assert "model.layers.0.self_attn.rotary_emb.inv_freq" not in f.keys()
        assert f.get_slice("model.norm.weight").get_dtype() == "BF16"

    # a folder holding both formats loads its safetensors: a broken .bin beside them is never opened
    os.rename(out / "model.safetensors", tmp_path / "m" / "model.safetensors")
    (tmp_path / "m" / "pytorch_model-00001-of-00002.bin").write_bytes(b"broken")
    model, params = hf.load_pretrained(str(tmp_path / "m"))
    _assert_close(
        _jax_logits(model, params, ids, mask, positions),
        _hf_logits(reference, ids, mask, positions),
        mask,
        "safetensors beside .bin",
    )


def test_peft_adapter_bin_and_adapter_config_errors(tmp_path):
    peft = pytest.importorskip("peft")
    base = _hf_model("llama_gqa")
    base.save_pretrained(tmp_path / "base")
    model, _ = hf.load_pretrained(str(tmp_path / "base"))
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    peft_model.save_pretrained(tmp_path / "st")
    peft_model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert os.listdir(tmp_path / "bin") and (tmp_path / "bin" / "adapter_model.bin").is_file()
    expected, lcfg = hf.load_adapter(str(tmp_path / "st"), model.cfg)
    got, lcfg_bin = hf.load_adapter(str(tmp_path / "bin"), model.cfg)
    assert lcfg_bin == lcfg and jax.tree.structure(got) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b)

    file = tmp_path / "st" / "adapter_config.json"
    good = json.loads(file.read_text())
    for content, pattern in [
        ({k: v for k, v in good.items() if k != "r"}, r'"r" is None; .* positive integer'),
        ({**good, "r": "8"}, r"\"r\" is '8'"),
        ({**good, "lora_alpha": "x"}, '"lora_alpha" is'),
        ({**good, "target_modules": 5}, '"target_modules" is 5'),
        ([good], "JSON list"),
        ('{"r": 2', "is not valid JSON"),
    ]:
        file.write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(JaxllmError, match=pattern) as e:
            hf.load_adapter(str(tmp_path / "st"), model.cfg)
        assert str(e.value).startswith(str(file)), str(e.value)
