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


@pytest.fixture
def memory_root():
    """A fresh folder on `memory://`: fsspec's in-memory filesystem registered with etils.epath, an
    offline object store standing in for gs:// (no rename, no folders, no appends through jaxllm)."""
    import uuid

    import fsspec
    from etils import epath
    from etils.epath import backend, gpath

    if "memory://" not in epath.register._URI_PREFIXES_TO_CLS:  # pylint: disable=protected-access

        class MemoryBackend(backend._FileSystemSpecBackend):  # pylint: disable=protected-access
            def fs(self, path):
                return fsspec.filesystem("memory")

        memory = MemoryBackend()

        @epath.register_path_cls("memory://")
        class MemoryPath(gpath.PosixGPath):  # pylint: disable=unused-variable
            def __new__(cls, *parts):
                full = "/".join(os.fspath(p) for p in parts)
                if full.startswith("memory://"):
                    full = "/memory/" + full[len("memory://") :]
                return super().__new__(cls, full)

            @property
            def _uri_scheme(self):
                return "memory" if self.parts[:2] == ("/", "memory") else None

            @property
            def _backend(self):
                return memory

    root = f"memory://bucket-{uuid.uuid4().hex[:8]}/run"
    yield root
    try:
        fsspec.filesystem("memory").rm(root.split("://", 1)[1].split("/")[0], recursive=True)
    except FileNotFoundError:
        pass
