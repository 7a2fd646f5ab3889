"""`jaxllm finetune --push_to_hub` and `jaxllm push` through huggingface_hub's own upload code, against a small
Hub server on 127.0.0.1 (repository creation, preupload, YAML check, NDJSON commit): what arrives, the model
card, the token's whereabouts, and failed uploads."""

import base64
import contextlib
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_finetune import FAST, _base  # noqa: E402  (skips without torch/transformers/peft)

from jaxllm import JaxllmError, cli, push  # noqa: E402

TOKEN = "hf_jaxllmTestToken0123456789abcdefXYZ"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
MAX_BODY = 64 << 20


class FakeHub(ThreadingHTTPServer):
    """The Hub endpoints huggingface_hub calls for create_repo + create_commit of small files; stores what it
    gets. `fail` maps an endpoint name (create, preupload, commit) to the HTTP status it answers instead."""

    daemon_threads = True

    def __init__(self, fail: dict[str, int] | None = None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.fail = dict(fail or {})
        self.repos: dict[str, dict] = {}  # repo id -> {"visibility": ..., "files": {path: bytes}, "commits": n}
        self.auth: list[str | None] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()
        self.thread.join(timeout=10)

    def answer(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        if method == "POST" and path == "/api/repos/create":
            if "create" in self.fail:
                return self.fail["create"], {"error": "Invalid credentials in Authorization header"}
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
            self.repos[repo_id] = {
                "visibility": payload.get("visibility"),
                "type": payload.get("type"),
                "files": {},
                "commits": 0,
            }
            return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(preupload|commit)/([^/]+))?", path)
        if not m or m.group(1) not in self.repos:
            return 404, {"error": "Repository not found"}
        repo, op = self.repos[m.group(1)], m.group(2)
        if op in self.fail:
            return self.fail[op], {"error": "Internal Error - We're working hard to fix this as soon as possible!"}
        if op == "preupload":
            files = json.loads(body)["files"]
            return 200, {
                "files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files
                ]
            }
        if op == "commit":
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            assert lines[0]["key"] == "header" and lines[0]["value"]["summary"]
            for line in lines[1:]:
                assert line["key"] == "file" and line["value"]["encoding"] == "base64", line["key"]
                repo["files"][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            repo["commits"] += 1
            return 200, {
                "commitUrl": f"{self.url}/{m.group(1)}/commit/{COMMIT}",
                "commitOid": COMMIT,
                "pullRequestUrl": None,
            }
        return 404, {"error": "not served here"}


class _Handler(BaseHTTPRequestHandler):
    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        assert length <= MAX_BODY
        body = self.rfile.read(length)
        self.server.auth.append(self.headers.get("Authorization"))
        status, payload = self.server.answer(method, urlparse(self.path).path, body)
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802
        self._serve("POST")

    def do_GET(self):  # noqa: N802
        self._serve("GET")

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _hub_env(mp: pytest.MonkeyPatch, hub: FakeHub, home: str):
    """huggingface_hub pointed at `hub`, with an empty HF_HOME (no stored login) and no HF_TOKEN."""
    mp.setenv("HF_ENDPOINT", hub.url)
    mp.setenv("HF_HUB_DISABLE_XET", "1")
    mp.setenv("HF_HOME", home)
    mp.delenv("HF_TOKEN", raising=False)
    mp.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    yield hub


def _main(argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of the `jaxllm` command."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    return exit_.value.code, out.getvalue(), err.getvalue()


def _tree(root: str) -> dict[str, str]:
    """relative path -> sha256 of every file under `root`."""
    return {
        os.path.relpath(os.path.join(d, f), root): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
        for d, _, files in os.walk(root)
        for f in files
    }


def _files(folder: str) -> dict[str, bytes]:
    return {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny LoRA finetune (with --merge_adapter) of a base that lies in a Hub cache snapshot folder, pushed
    with --push_to_hub --repo_id --token to a fake Hub."""
    base = _base(tmp_path_factory, "llama")
    snapshot = os.path.join(str(tmp_path_factory.mktemp("hub")), "models--tiny-org--tiny-llama", "snapshots", COMMIT)
    shutil.move(base, snapshot)
    root = tmp_path_factory.mktemp("pushed")
    run = str(root / "run")
    argv = [
        "finetune",
        "--model",
        snapshot,
        "--data_path",
        "embedded",
        "--use_peft",
        "--lora_r",
        "4",
        "--max_steps",
        "2",
        "--batch_size",
        "1",
        "--block_size",
        "32",
        "--project_name",
        run,
        "--merge_adapter",
        "--push_to_hub",
        "--repo_id",
        "tiny-org/tiny-llama-chat",
        "--token",
        TOKEN,
        "--config.train.eval_batches=1",
        *FAST,
    ]
    with pytest.MonkeyPatch.context() as mp, FakeHub() as hub, _hub_env(mp, hub, str(root / "hf_home")):
        mp.setenv("JAXLLM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "jaxllm-cache"))
        code, out, err = _main(argv)
    return dict(run=run, snapshot=snapshot, hub=hub, code=code, out=out, err=err, argv=argv, root=str(root))


def test_finetune_pushes_the_merged_model_with_a_model_card(trained):
    run, hub = trained["run"], trained["hub"]
    assert trained["code"] == 0, trained["err"]
    summary = json.loads(trained["out"].strip().splitlines()[-1])
    assert summary["pushed"]["repo_id"] == "tiny-org/tiny-llama-chat" and summary["pushed"]["commit"] == COMMIT
    repo = hub.repos["tiny-org/tiny-llama-chat"]
    assert repo["visibility"] == "private" and repo["commits"] == 1
    local = _files(os.path.join(run, "merged"))  # --merge_adapter: the merged model goes up
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= set(local)
    assert {k: v for k, v in repo["files"].items() if k != "README.md"} == local

    card = repo["files"]["README.md"].decode()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "base_model: tiny-org/tiny-llama" in front and "- jaxllm" in front and "library_name: transformers" in front
    assert f"revision `{COMMIT}`" in body and "--data_path embedded" in body
    records = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    train = [r for r in records if r["split"] == "train"][-1]
    val = [r for r in records if r["split"] == "val"][-1]
    assert "- Steps: 2" in body
    assert f"Final train loss: {train['loss']:.4f} (step 2)" in body
    assert f"Final validation loss: {val['loss']:.4f} (step 2)" in body
    command = shlex.join(["jaxllm", *[a for a in trained["argv"] if a not in ("--token", TOKEN)]])
    assert command in body and "--push_to_hub" in command
    assert 'AutoModelForCausalLM.from_pretrained("tiny-org/tiny-llama-chat")' in body

    # the token: sent as a bearer token on every request, and nowhere else
    assert hub.auth and set(hub.auth) == {f"Bearer {TOKEN}"}
    assert not [name for name, data in repo["files"].items() if TOKEN.encode() in data]
    for folder, _, files in os.walk(trained["root"]):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                assert TOKEN.encode() not in f.read(), os.path.join(folder, name)
    assert TOKEN not in trained["out"] + trained["err"]


def test_push_command_uploads_an_adapter_folder(trained, tmp_path, monkeypatch):
    adapter = os.path.join(trained["run"], "adapter")
    before = _tree(trained["run"])
    with FakeHub() as hub, _hub_env(monkeypatch, hub, str(tmp_path / "hf_home")):
        monkeypatch.setenv("HF_TOKEN", TOKEN)  # no --token: the environment's
        code, out, err = _main(["push", "--workdir", adapter, "--repo_id", "tiny-org/adapter", "--public"])
    assert code == 0, err
    assert json.loads(out)["folder"] == adapter
    repo = hub.repos["tiny-org/adapter"]
    assert repo["visibility"] == "public" and set(hub.auth) == {f"Bearer {TOKEN}"}
    assert {k: v for k, v in repo["files"].items() if k != "README.md"} == _files(adapter)
    card = repo["files"]["README.md"].decode()
    assert "library_name: peft" in card and "base_model: tiny-org/tiny-llama" in card and "- lora" in card
    assert 'PeftModel.from_pretrained(base, "tiny-org/adapter")' in card
    assert "--push_to_hub" in card and TOKEN not in card  # the run's command line, from the run's export record
    assert _tree(trained["run"]) == before  # nothing local changed


@pytest.mark.parametrize("failure", ["commit 500", "create 401", "no server"])
def test_a_failed_upload_is_one_line_with_the_command_that_retries_it(trained, tmp_path, monkeypatch, failure):
    run = trained["run"]
    before = _tree(run)
    what, _, status = failure.partition(" ")
    with FakeHub(fail={what: int(status)} if status.isdigit() else None) as hub:
        if failure == "no server":
            hub.shutdown()
            hub.server_close()  # connection refused
        with _hub_env(monkeypatch, hub, str(tmp_path / "hf_home")):
            code, out, err = _main(["push", "--workdir", run, "--repo_id", "tiny-org/retry", "--token", TOKEN])
    assert code == 1 and out == ""
    assert len(err.splitlines()) == 1 and "Traceback" not in err and TOKEN not in err, err
    assert err.startswith("jaxllm: error: upload to the Hub repository tiny-org/retry failed: ")
    assert (status if status.isdigit() else "connection refused") in err.lower()
    retry = err.strip().split("retry with: ")[1]
    assert retry == shlex.join(["jaxllm", "push", f"--workdir={run}", "--repo_id=tiny-org/retry"])
    assert _tree(run) == before

    with FakeHub() as hub, _hub_env(monkeypatch, hub, str(tmp_path / "hf_home")):  # the printed command works
        code, _, err = _main([*shlex.split(retry)[1:], "--token", TOKEN])
    assert code == 0, err
    assert (
        hub.repos["tiny-org/retry"]["files"]["model.safetensors"]
        == _files(os.path.join(run, "merged"))["model.safetensors"]
    )


def test_finetune_whose_upload_fails_exits_1_and_keeps_its_outputs(trained, tmp_path, monkeypatch):
    run, out_dir = str(tmp_path / "run"), str(tmp_path / "out")
    shutil.copytree(trained["run"], run)  # the finished run again: resumed at its last step, exported, pushed
    argv = [
        *trained["argv"][: trained["argv"].index("--project_name")],
        "--project_name",
        run,
        "--save_dir",
        out_dir,
        "--push_to_hub",
        "--username",
        "tiny-org",
        "--config.train.eval_batches=1",
        *FAST,
    ]
    with FakeHub(fail={"commit": 503}) as hub, _hub_env(monkeypatch, hub, str(tmp_path / "hf_home")):
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        code, out, err = _main(argv)
    assert code == 1
    assert json.loads(out.strip().splitlines()[-1])["written"]["adapter"].endswith("adapter")  # trained, exported
    error = err.strip().splitlines()[-1]
    assert error.startswith("jaxllm: error: upload to the Hub repository tiny-org/run failed: ") and "503" in error
    assert "Traceback" not in err and TOKEN not in err
    assert error.endswith(shlex.join(["jaxllm", "push", f"--workdir={run}", "--repo_id=tiny-org/run"]))
    assert os.path.isfile(os.path.join(out_dir, "adapter", "adapter_model.safetensors"))

    with FakeHub() as hub, _hub_env(monkeypatch, hub, str(tmp_path / "hf_home")):  # the retry: the --save_dir's adapter
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        code, _, err = _main(shlex.split(error.split("retry with: ")[1])[1:])
    assert code == 0, err
    files = hub.repos["tiny-org/run"]["files"]
    assert files["adapter_model.safetensors"] == _files(os.path.join(out_dir, "adapter"))["adapter_model.safetensors"]
    assert "--username tiny-org" in files["README.md"].decode() and "- Steps: 2" in files["README.md"].decode()


def test_push_settings_are_checked_before_training(trained, tmp_path, monkeypatch, capsys):
    from test_finetune import _args

    from jaxllm.autotrain import flags_to_config

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    common = [
        "finetune",
        "--model",
        trained["snapshot"],
        "--data_path",
        "embedded",
        "--max_steps",
        "1",
        "--batch_size",
        "1",
        "--block_size",
        "32",
        "--project_name",
        str(tmp_path / "my-run"),
        "--push_to_hub",
        *FAST,
    ]
    with pytest.raises(JaxllmError, match=r"--push_to_hub needs the repository: --repo_id ORG/NAME, or --username"):
        cli.run(common)
    with pytest.raises(JaxllmError, match=r"needs a token with write access: --token TOKEN, the HF_TOKEN"):
        cli.run([*common, "--username", "me"])
    with pytest.raises(JaxllmError, match=r"--repo_id 'a/b/c' is not a Hub repository name"):
        cli.run([*common, "--repo_id", "a/b/c", "--token", TOKEN])
    with pytest.raises(JaxllmError, match=r"give the owner too, as ORG/NAME"):
        cli.run([*common, "--repo_id", "name", "--token", TOKEN])
    assert not (tmp_path / "my-run" / "checkpoints").exists()  # refused before the first step
    assert push.resolve_repo_id(None, "me", str(tmp_path / "my-run")) == "me/my-run"

    capsys.readouterr()
    flags_to_config(
        _args(["--model", trained["snapshot"], "--data_path", "embedded", "--token", TOKEN, "--repo_id", "a/b"]), []
    )
    err = capsys.readouterr().err
    assert "--repo_id, --token apply with --push_to_hub" in err and TOKEN not in err

    assert push.redact(
        ["jaxllm", "finetune", "--token", TOKEN, "--tok=" + TOKEN, "--model", "m", f"x{TOKEN}"], TOKEN
    ) == ["jaxllm", "finetune", "--model", "m", "x***"]
    code, _, err = _main(["push", "--workdir", str(tmp_path / "none"), "--repo_id", "a/b", "--token", TOKEN])
    assert code == 2 and "is not a folder" in err and len(err.splitlines()) == 1
    code, _, err = _main(["push", "--workdir", str(tmp_path), "--repo_id", "a/b", "--token", TOKEN])
    assert code == 2 and "holds no exported model" in err
