"""Hugging Face Hub ids wherever a model, adapter or tokenizer path is taken, through huggingface_hub's own
resolution code on a cache built here in its layout (HF_HUB_OFFLINE=1: no network)."""

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, os.path.dirname(__file__))
from hubcache import offline, put_repo  # noqa: E402

from jaxllm import JaxllmError  # noqa: E402
from jaxllm.cli import main as cli_main  # noqa: E402
from jaxllm.cli import run as cli_run  # noqa: E402
from jaxllm.hf import hub  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _byte_level_tokenizer(path, vocab_size=300):
    """A tokenizer.json of BLOOM's kind (byte-level BPE), trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["The meaning of life is a question people ask.", "hi there, how are you?"] * 50
    tok.train_from_iterator(
        text,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.save(str(path))


def _bloom(folder, seed=0):
    """A tiny random BLOOM as bigscience/bloom-560m ships: model.safetensors, pytorch_model.bin, tokenizer.json."""
    torch.manual_seed(seed)
    config = transformers.BloomConfig(
        vocab_size=320,
        hidden_size=64,
        n_layer=2,
        n_head=4,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    model = transformers.BloomForCausalLM(config)
    model.save_pretrained(folder)  # config.json + model.safetensors
    torch.save(model.state_dict(), os.path.join(folder, "pytorch_model.bin"))
    _byte_level_tokenizer(os.path.join(folder, "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def bloom_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bloom")
    return _bloom(root / "main", seed=0), _bloom(root / "v1", seed=1)


@pytest.fixture
def cache(tmp_path, monkeypatch, bloom_dirs):
    """A Hub cache holding bigscience/bloom-560m (main and the tag v1, two different models)."""
    main, v1 = bloom_dirs
    home = tmp_path / "hf"
    files = lambda d: {name: d / name for name in os.listdir(d)}  # noqa: E731
    commits = {
        "main": put_repo(home, "bigscience/bloom-560m", files(main)),
        "v1": put_repo(home, "bigscience/bloom-560m", files(v1), revision="v1", commit="1" * 40),
    }
    offline(monkeypatch, home)
    return home, commits


def _generate(argv, capsys):
    assert cli_run(["generate", "--prompt=hi", "--max_new_tokens=8", "--greedy", "--width=0", *argv]) == 0
    return capsys.readouterr().out


def test_generate_by_hub_id_equals_the_local_folder(cache, bloom_dirs, capsys):
    home, commits = cache
    by_id = _generate(["--model=bigscience/bloom-560m"], capsys)
    assert by_id == _generate([f"--model={bloom_dirs[0]}"], capsys)
    assert by_id.startswith("hi") and len(by_id.strip()) > len("hi")
    # a revision, inline or as a flag, is another model; the commit id works too
    tagged = _generate(["--model=bigscience/bloom-560m@v1"], capsys)
    assert tagged == _generate(["--model=bigscience/bloom-560m", "--revision=v1"], capsys)
    assert tagged == _generate([f"--model=bigscience/bloom-560m@{commits['v1']}"], capsys)
    assert tagged == _generate([f"--model={bloom_dirs[1]}"], capsys)
    assert tagged != by_id


def test_only_the_needed_files_and_safetensors_first():
    files = [
        "config.json",
        "model.safetensors",
        "pytorch_model.bin",
        "flax_model.msgpack",
        "tokenizer.json",
        "onnx/model.safetensors",
        "README.md",
    ]
    assert hub._patterns("model", files, "o/n") == ["config.json", "tokenizer.json", "model.safetensors"]
    shards = ["config.json", "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer_config.json"] + [
        f"pytorch_model-{i:05d}-of-00015.bin" for i in range(1, 16)
    ]
    picked = hub._patterns("model", shards, "o/n")
    assert picked[:3] == ["config.json", "tokenizer.json", "tokenizer_config.json"] and len(picked) == 3 + 16
    assert hub._patterns("tokenizer", files, "o/n") == ["tokenizer.json", "config.json"]
    adapter = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md"]
    assert hub._patterns("adapter", adapter, "o/n") == ["adapter_config.json", "adapter_model.safetensors"]


def test_a_local_path_wins_and_ids_are_told_from_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not hub.is_hub_id("org/name") and hub.local("org/name") == "org/name"
    assert hub.is_hub_id("bigscience/bloom-560m") and hub.is_hub_id("Riiid/sheep-duck-llama-2-70b-v1.1@main")
    for path in (
        "./a/b",
        "/abs/path",
        "~/x/y",
        "gs://bucket/model",
        "a/b/c",
        "single",
        "",
        "prepared/tokenizer.model",
        "data/train.jsonl",
    ):
        assert not hub.is_hub_id(path), path
    assert hub.split_id("org/m@v2") == ("org/m", "v2")
    with pytest.raises(JaxllmError, match="names revision 'v2' but --revision is 'v3'"):
        hub.split_id("org/m@v2", "v3")


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--model=bigscience/not-cached"],
            "bigscience/not-cached is not a local path, and model bigscience/not-cached is "
            "not in the Hugging Face cache",
        ),
        (
            ["--model=bigscience/bloom-560m@v9"],
            "model bigscience/bloom-560m at revision 'v9' is not in the Hugging Face cache",
        ),
        (
            ["--model=bigscience/bloom-560m", "--adapter=someone/missing-adapter"],
            "someone/missing-adapter is not a local path",
        ),
    ],
)
def test_missing_repositories_and_revisions_are_one_line(cache, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["generate", "--prompt=hi", *argv])
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("jaxllm: error:")]  # besides progress bars
    assert exit_.value.code == 2 and message in line and "HF_HUB_OFFLINE" in line and "Traceback" not in err


def test_an_incomplete_cache_is_named(cache, monkeypatch, capsys):
    home, commits = cache
    blob = home / "hub" / "models--bigscience--bloom-560m" / "snapshots" / commits["main"] / "model.safetensors"
    blob.unlink()
    with pytest.raises(SystemExit):
        cli_main(["generate", "--prompt=hi", "--model=bigscience/bloom-560m"])
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("jaxllm: error:")]
    assert (
        "the cached copy of bigscience/bloom-560m (commit " in line
        and "is incomplete: it lacks model.safetensors" in line
    )
    assert "Traceback" not in err


def test_config_keys_resolve_to_cached_snapshots(cache):
    from jaxllm.config import load_config
    from jaxllm.train.start import resolve

    home, commits = cache
    cfg = load_config(
        os.path.join(ROOT, "configs", "tiny.py"),
        ["checkpoint.init_from=bigscience/bloom-560m@v1", "data.tokenizer=bigscience/bloom-560m"],
    )
    resolved = resolve(cfg)
    snapshots = home / "hub" / "models--bigscience--bloom-560m" / "snapshots"
    assert resolved.checkpoint.init_from == str(snapshots / commits["v1"])
    assert resolved.data.tokenizer == str(snapshots / commits["main"])
    assert cfg.checkpoint.init_from == "bigscience/bloom-560m@v1"  # the run records the id, not the cache path


AGREE = """
import os, sys
from jaxllm.distributed import DistributedConfig, initialize
initialize(DistributedConfig())
import jax
from jaxllm.hf import hub
print("FOLDER", jax.process_index(), os.path.basename(hub.local("org/tiny", what="tokenizer")), flush=True)
"""


def test_every_process_reads_the_commit_process_0_resolved(tmp_path):
    """Process 1's cache says main is commit B, process 0's says A (as if the branch moved between two
    hosts' look-ups; each host has its own cache here): both read A."""
    files = {"config.json": "{}", "tokenizer.json": "{}"}
    a, b = "a" * 40, "b" * 40
    for pid, head in ((0, a), (1, b)):
        home = tmp_path / f"hf{pid}"
        put_repo(home, "org/tiny", files, commit=a)
        put_repo(home, "org/tiny", files, commit=b, revision="other")
        (home / "hub" / "models--org--tiny" / "refs" / "main").write_text(head)
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    wrapper = (
        "import os, runpy; os.environ['HF_HOME'] = os.environ['HF_HOME_BASE'] + os.environ['JAXLLM_PROCESS_ID']; "
        f"runpy.run_path({str(script)!r})"
    )
    env = dict(os.environ, HF_HOME_BASE=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, json; from jaxllm.distributed import launch_local; "
            "sys.exit(max(launch_local(json.loads(sys.argv[1]), num_processes=2, timeout=120)))",
            json.dumps([sys.executable, "-c", wrapper]),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    folders = sorted(line.split()[-2:] for line in (out.stdout + out.stderr).splitlines() if "FOLDER" in line)
    assert folders == [["0", a], ["1", a]], out.stdout + out.stderr


class _FakeHub:
    """The read side of the Hub's HTTP API on 127.0.0.1, for huggingface_hub's online code path: repo info,
    the recursive tree listing and file downloads of the repositories in `repos` ({repo_id: {revision:
    (commit, {path: bytes})}}); "gated/*" ids answer as gated repositories do. It records each download."""

    def __init__(self, repos):
        import hashlib
        import http.server
        import threading

        self.repos, self.downloads = repos, []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, body=b"", headers=None, head=False):
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _error(self, status, code, head=False):
                self._send(
                    status,
                    json.dumps({"error": code}).encode(),
                    {"X-Error-Code": code, "Content-Type": "application/json"},
                    head,
                )

            def _find(self, repo, revision):
                if repo.startswith("gated/"):
                    return "GatedRepo"
                if repo not in hub.repos:
                    return "RepoNotFound"
                for rev, (commit, files) in hub.repos[repo].items():
                    if revision in (rev, commit):
                        return commit, files
                return "RevisionNotFound"

            def do_GET(self, head=False):  # noqa: N802
                from urllib.parse import unquote, urlsplit

                path = unquote(urlsplit(self.path).path)
                parts = path.strip("/").split("/")
                kind = ""  # a data set's paths: /api/datasets/ORG/NAME/..., /datasets/ORG/NAME/resolve/...
                if parts[:2] == ["api", "datasets"] or parts[:1] == ["datasets"]:
                    kind = "datasets/"
                    parts = ["api", "models", *parts[2:]] if parts[0] == "api" else parts[1:]
                if parts[:2] == ["api", "models"] and len(parts) == 4:  # repo info at the default branch
                    parts += ["revision", "main"]
                if parts[:2] == ["api", "models"] and parts[4] in ("revision", "tree"):
                    found = self._find(kind + "/".join(parts[2:4]), parts[5])
                    if isinstance(found, str):
                        status = 401 if found == "GatedRepo" else 404
                        return self._error(status, found, head)
                    commit, files = found
                    if parts[4] == "revision":
                        body = {
                            "id": "/".join(parts[2:4]),
                            "sha": commit,
                            "private": False,
                            "siblings": [{"rfilename": name} for name in sorted(files)],
                        }
                    else:
                        body = [
                            {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                            for name, data in sorted(files.items())
                        ]
                    return self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)
                if len(parts) > 4 and parts[2] == "resolve":
                    found = self._find(kind + "/".join(parts[:2]), parts[3])
                    if isinstance(found, str):
                        return self._error(401 if found == "GatedRepo" else 404, found, head)
                    commit, files = found
                    name = "/".join(parts[4:])
                    if name not in files:
                        return self._error(404, "EntryNotFound", head)
                    if not head:
                        hub.downloads.append(kind + name)
                    etag = '"' + hashlib.sha1(files[name]).hexdigest() + '"'
                    return self._send(200, files[name], {"X-Repo-Commit": commit, "ETag": etag}, head)
                return self._error(404, "NotFound", head)

            def do_HEAD(self):  # noqa: N802
                self.do_GET(head=True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def online(tmp_path, monkeypatch, bloom_dirs):
    """huggingface_hub online, against a fake Hub on 127.0.0.1 holding bigscience/bloom-560m as it ships
    (safetensors, a pickle, Flax and ONNX weights), with an empty cache."""
    import huggingface_hub.constants as c

    main = bloom_dirs[0]
    files = {name: (main / name).read_bytes() for name in os.listdir(main)}
    files.update({"flax_model.msgpack": b"\0" * 64, "onnx/model.safetensors": b"\0" * 64, "README.md": b"# bloom"})
    guanaco = {
        "openassistant_best_replies_train.jsonl": b'{"text": "### Human: hi### Assistant: hello"}\n' * 8,
        "openassistant_best_replies_eval.jsonl": b'{"text": "### Human: q### Assistant: a"}\n' * 4,
        "README.md": b"---\nlicense: apache-2.0\n---\n# guanaco",
    }
    server = _FakeHub(
        {
            "bigscience/bloom-560m": {"main": ("c" * 40, files)},
            "datasets/timdettmers/openassistant-guanaco": {"main": ("d" * 40, guanaco)},
        }
    )
    home = tmp_path / "hf"
    for name, value in (("HF_HOME", str(home)), ("HF_HUB_CACHE", str(home / "hub")), ("HF_ENDPOINT", server.url)):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(c, "ENDPOINT", server.url)
    monkeypatch.setattr(c, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
    yield server, home
    server.close()


def test_online_fetches_only_what_the_command_needs(online, bloom_dirs, capsys):
    server, home = online
    text = _generate(["--model=bigscience/bloom-560m"], capsys)
    assert text == _generate([f"--model={bloom_dirs[0]}"], capsys)
    needed = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]  # not the pickle,
    assert sorted(server.downloads) == needed  # the Flax or ONNX weights, nor the README
    snapshot = home / "hub" / "models--bigscience--bloom-560m" / "snapshots" / ("c" * 40)
    assert sorted(os.listdir(snapshot)) == needed
    assert (home / "hub" / "models--bigscience--bloom-560m" / "refs" / "main").read_text() == "c" * 40


def test_online_fetches_only_the_splits_a_run_reads(online):
    from jaxllm.data.splits import split_files

    server, home = online
    source, files = split_files("timdettmers/openassistant-guanaco", "test")
    assert source == "jsonl" and [os.path.basename(f) for f in files] == ["openassistant_best_replies_eval.jsonl"]
    assert sorted(server.downloads) == ["datasets/README.md", "datasets/openassistant_best_replies_eval.jsonl"]
    assert open(files[0]).read().count("\n") == 4
    split_files("timdettmers/openassistant-guanaco", "train")
    assert "datasets/openassistant_best_replies_train.jsonl" in server.downloads and len(server.downloads) == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--model=gated/llama"],
            "gated/llama is gated: accept its licence on https://huggingface.co/gated/llama "
            "(logged in), then set HF_TOKEN",
        ),
        (["--model=bigscience/bloom-560m@v9"], "bigscience/bloom-560m has no revision 'v9'"),
        (
            ["--model=bigscience/nothing"],
            "bigscience/nothing is neither a local path nor a model repository on the Hugging Face Hub",
        ),
    ],
)
def test_online_refusals_are_one_line(online, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["generate", "--prompt=hi", *argv])
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("jaxllm: error:")]
    assert exit_.value.code == 2 and message in line and "Traceback" not in err


def test_no_network_is_one_line(online, monkeypatch, capsys):
    import huggingface_hub.constants as c

    server, _ = online
    server.close()  # nothing listens there any more
    monkeypatch.setattr(c, "ENDPOINT", server.url)
    with pytest.raises(SystemExit):
        cli_main(["generate", "--prompt=hi", "--model=bigscience/bloom-560m"])
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("jaxllm: error:")]
    assert "cannot fetch model bigscience/bloom-560m from the Hugging Face Hub" in line and "HF_HUB_OFFLINE=1" in line


def _tiny_llama(folder, tok, seed):
    import shutil

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
        initializer_range=0.2,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    shutil.copy(tok.path, os.path.join(folder, "tokenizer.model"))
    return {name: folder / name for name in os.listdir(folder)}


def test_a_resumed_run_keeps_the_commit_it_started_from(tmp_path, monkeypatch, tok):
    """The run records org/name@<commit>; after the branch moves, a resume reads the same commit, and
    asking the workdir for the new revision is refused."""
    from jaxllm.config import load_config
    from jaxllm.train.loop import train

    home = tmp_path / "hf"
    first = put_repo(home, "org/tiny-llama", _tiny_llama(tmp_path / "a", tok, 0), commit="a" * 40)
    offline(monkeypatch, home)
    overrides = [
        "checkpoint.init_from=org/tiny-llama",
        "data.tokenizer=org/tiny-llama",
        "data.block_size=32",
        "data.batch_size=8",
        "train.eval_every=0",
        "train.eval_at_start=False",
        "train.eval_batches=1",
        "train.log_every=1",
        "train.progress=False",
        "checkpoint.every=2",
        "checkpoint.async_save=False",
        "generate.max_new_tokens=0",
    ]
    workdir = tmp_path / "run"
    train(load_config(os.path.join(ROOT, "configs/finetune.py"), [*overrides, "train.steps=2"]), str(workdir))
    recorded = json.loads((workdir / "config.json").read_text())
    assert recorded["checkpoint"]["init_from"] == recorded["data"]["tokenizer"] == f"org/tiny-llama@{first}"
    # main moves to a model of other shapes: resuming from it would fail on them
    llama = _tiny_llama(tmp_path / "b", tok, 1)
    config = json.loads(llama["config.json"].read_text())
    llama["config.json"].write_text(json.dumps({**config, "intermediate_size": 48}))
    put_repo(home, "org/tiny-llama", llama, commit="b" * 40)
    result = train(load_config(os.path.join(ROOT, "configs/finetune.py"), [*overrides, "train.steps=4"]), str(workdir))
    assert result["step"] == 4
    assert json.loads((workdir / "config.json").read_text())["checkpoint"]["init_from"] == f"org/tiny-llama@{first}"
    with pytest.raises(
        JaxllmError,
        match=f"was started from org/tiny-llama at commit {first}; "
        f"checkpoint.init_from=org/tiny-llama@{'b' * 40} is commit {'b' * 40}",
    ):
        train(
            load_config(
                os.path.join(ROOT, "configs/finetune.py"),
                [*overrides, "train.steps=6", f"checkpoint.init_from=org/tiny-llama@{'b' * 40}"],
            ),
            str(workdir),
        )
