"""Every test sees 8 fake CPU devices, so mesh and sharding tests run anywhere."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    """Tokenizers trained by tests are cached in one temporary folder per session, not in ~/.cache."""
    monkeypatch.setenv("JAXLLM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "jaxllm-cache"))


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """The 512-piece tokenizer trained on the embedded corpus, once per session in the session cache."""
    from jaxllm.data.config import DataConfig
    from jaxllm.data.pipeline import tokenizer_for

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXLLM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "jaxllm-cache"))
        return tokenizer_for(DataConfig(vocab_size=512))
