"""Every test sees 8 fake CPU devices, so mesh and sharding tests run anywhere."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    """Tokenizers trained by tests are cached in one temporary folder per session, not in ~/.cache."""
    monkeypatch.setenv("JAXLLM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "jaxllm-cache"))
