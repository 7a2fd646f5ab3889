"""jaxllm.atomic on a local folder and on an object store (memory://, fsspec's in-memory filesystem
standing in for gs://): whole files and folders, appends, the write check, and the writers built on it."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import pytest
from etils import epath
from flax import linen as nn

from jaxllm import JaxllmError, atomic


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("memory_root")


def _names(folder: str) -> list[str]:
    return sorted(p.name for p in epath.Path(folder).iterdir())


def test_write_and_copy_are_whole_and_leave_no_temp_files(root, tmp_path):
    atomic.write(os.path.join(root, "a", "x.json"), '{"a": 1}')
    atomic.write(os.path.join(root, "a", "x.json"), b'{"a": 2}')
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 << 20))
    atomic.copy(str(src), os.path.join(root, "a", "y.bin"))
    assert json.loads(epath.Path(root, "a", "x.json").read_text()) == {"a": 2}
    assert epath.Path(root, "a", "y.bin").read_bytes() == src.read_bytes()
    assert _names(os.path.join(root, "a")) == ["x.json", "y.bin"]


def test_a_failed_copy_leaves_nothing_under_the_name(root, tmp_path, monkeypatch):
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 1000)

    def broken(reader, writer, length=0):
        writer.write(reader.read(10))
        raise OSError("connection reset")

    monkeypatch.setattr(shutil, "copyfileobj", broken)
    atomic.as_path(root).mkdir(parents=True, exist_ok=True)
    with pytest.raises(OSError, match="connection reset"):
        atomic.copy(str(src), os.path.join(root, "y.bin"))
    assert _names(root) == []


def test_folder_replaces_the_old_one_with_its_last_file_last(root, monkeypatch):
    target = os.path.join(root, "model")
    with atomic.folder(target, last=["config.json"]) as tmp:
        for name in ("config.json", "b.bin", "a.bin", "stale.bin"):
            with open(os.path.join(tmp, name), "w") as f:
                f.write(name)
    order = []
    copy = atomic.copy
    monkeypatch.setattr(atomic, "copy", lambda src, dst: (order.append(os.path.basename(dst)), copy(src, dst)))
    with atomic.folder(target, last=["config.json"]) as tmp:
        for name in ("config.json", "b.bin", "a.bin"):
            with open(os.path.join(tmp, name), "w") as f:
                f.write(name + "2")
    assert _names(target) == ["a.bin", "b.bin", "config.json"]  # the old folder's files are gone
    assert epath.Path(target, "config.json").read_text() == "config.json2"
    if atomic.is_url(root):
        assert order == ["a.bin", "b.bin", "config.json"]
    with pytest.raises(RuntimeError, match="crash"):
        with atomic.folder(target, last=["config.json"]) as tmp:
            with open(os.path.join(tmp, "a.bin"), "w") as f:
                f.write("half")
            raise RuntimeError("crash")
    assert epath.Path(target, "a.bin").read_text() == "a.bin2"  # a failed write changes nothing
    assert _names(root) == ["model"]


def test_appender_uploads_whole_objects_at_most_every_interval(root):
    path = os.path.join(root, "metrics.jsonl")
    log = atomic.Appender(path, interval=3600)
    log.write("one\n")
    log.flush()
    if atomic.is_url(root):
        assert not epath.Path(path).exists()  # within the interval nothing is uploaded
        log.flush(force=True)
    assert epath.Path(path).read_text() == "one\n"
    log.write(b"two\n")
    log.close()
    assert epath.Path(path).read_text() == "one\ntwo\n"
    again = atomic.Appender(path)  # a restart appends to what is there
    again.write("three\n")
    again.close()
    assert epath.Path(path).read_text() == "one\ntwo\nthree\n"


def test_check_writable(root, tmp_path):
    atomic.check_writable(os.path.join(root, "run"), "workdir")
    assert _names(os.path.join(root, "run")) == []  # the probe is removed
    (tmp_path / "file").write_text("x")
    with pytest.raises(JaxllmError, match=r"workdir '.*file/run' is not a writable folder"):
        atomic.check_writable(str(tmp_path / "file" / "run"), "workdir")


def test_checkpoints_accept_only_what_orbax_writes(memory_root, tmp_path):
    """Orbax's TensorStore writes local files and gs:// only: another scheme is refused, before a run."""
    from jaxllm.train.checkpoint import checkpoint_dir
    from jaxllm.train.loop import train

    assert checkpoint_dir(str(tmp_path / "c")) == str(tmp_path / "c")
    with pytest.raises(JaxllmError, match="Orbax writes to local paths .* and gs:// only"):
        checkpoint_dir(memory_root + "/checkpoints")
    from jaxllm.config import load_config

    cfg = load_config("configs/tiny.py", ["data.vocab_size=512", "model.vocab_size=512"])
    with pytest.raises(JaxllmError, match="Orbax writes to local paths"):
        train(cfg, memory_root)


def test_tokenizer_cache_on_an_object_store(memory_root, monkeypatch, tok):
    from jaxllm.data import tokenizer as tokenizer_lib

    docs = ["a few words of text"] * 4
    monkeypatch.setenv("JAXLLM_CACHE_DIR", memory_root)
    monkeypatch.setattr(tokenizer_lib, "_train", lambda texts, settings, capped=False: tok.proto)  # the session's
    first = tokenizer_lib.load_tokenizer("", 512, docs)
    assert first.path.startswith(memory_root + "/tokenizers/")
    assert epath.Path(first.path).read_bytes() == tok.proto

    def untrainable(texts, settings, capped=False):
        raise AssertionError("trained again instead of reading the cache")

    monkeypatch.setattr(tokenizer_lib, "_train", untrainable)
    again = tokenizer_lib.load_tokenizer("", 512, docs)
    assert again.path == first.path and again.encode("hello world") == tok.encode("hello world")
    assert tokenizer_lib.load_tokenizer(first.path, 512).vocab_size == tok.vocab_size


def test_hf_export_and_adapter_on_an_object_store(memory_root, tmp_path):
    """save_pretrained and save_adapter to a bucket: the folder downloaded equals the local export."""
    from jaxllm import hf
    from jaxllm.models import lora
    from jaxllm.models.config import ModelConfig
    from jaxllm.models.decoder import Decoder

    cfg = ModelConfig(
        vocab_size=32, num_layers=2, embed_dim=16, num_heads=2, num_kv_heads=1, mlp_dim=32, max_seq_len=16
    )
    params = nn.meta.unbox(Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    hf.save_pretrained(Decoder(cfg), params, str(tmp_path / "local"), max_shard_size="10KB")
    remote = memory_root + "/model"
    hf.save_pretrained(Decoder(cfg), params, remote, max_shard_size="10KB")
    assert _names(remote) == sorted(os.listdir(tmp_path / "local")) and len(_names(remote)) > 3  # sharded
    for name in _names(remote):
        assert epath.Path(remote, name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    with pytest.raises(JaxllmError, match="exists and is not empty"):
        hf.save_pretrained(Decoder(cfg), params, remote)

    lcfg = lora.LoraConfig(r=2, target_modules=("q_proj", "v_proj"))
    adapted = lora.apply(lcfg, cfg)
    trainable = nn.meta.unbox(Decoder(adapted).init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"])
    hf.save_adapter(trainable, adapted, lcfg, str(tmp_path / "adapter"))
    hf.save_adapter(trainable, adapted, lcfg, memory_root + "/adapter")
    for name in os.listdir(tmp_path / "adapter"):
        assert epath.Path(memory_root, "adapter", name).read_bytes() == (tmp_path / "adapter" / name).read_bytes()
    assert (
        sorted(os.listdir(tmp_path / "adapter"))
        == _names(memory_root + "/adapter")
        == ["adapter_config.json", "adapter_model.safetensors"]
    )
