"""End to end through the `jaxllm train` command: exact resume, preemption, early stopping, bad input."""

import json
import math
import os
import subprocess
import sys

import pytest
from runs import preempt_when

from jaxllm import JaxllmError
from jaxllm.cli import run as cli_run
from jaxllm.config import load_config
from jaxllm.train.loop import train
from jaxllm.train.metrics import read_metrics

CONFIG = "configs/tiny.py"
SMALL = [
    "model.num_layers=2",
    "model.embed_dim=64",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.mlp_dim=128",
    "model.vocab_size=512",
    "model.max_seq_len=64",
    "model.resid_dropout=0.1",
    "data.vocab_size=512",
    "data.block_size=32",
    "data.batch_size=8",
    "optim.learning_rate=3e-3",
    "optim.warmup_steps=5",
    "optim.decay_steps=20",
    "train.log_every=1",
    "train.eval_every=10",
    "train.eval_batches=2",
    "train.progress=false",
    "checkpoint.every=5",
    "generate.max_new_tokens=8",
]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmd(workdir, *overrides):
    return [sys.executable, "-m", "jaxllm.cli", "train", f"--config={CONFIG}", f"--workdir={workdir}"] + [
        f"--config.{o}" for o in (*SMALL, *overrides)
    ]


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(str(workdir)) if r["split"] == "train"}


def _run(cmd, **kw):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    proc = _run(_cmd(workdir, "train.steps=20"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc


def test_straight_run_learns_and_writes_everything(straight):
    workdir, proc = straight
    losses = _losses(workdir)
    assert sorted(losses) == list(range(1, 21))
    val = [r for r in read_metrics(str(workdir)) if r["split"] == "val"]
    assert [r["step"] for r in val] == [10, 20]
    assert val[-1]["loss"] < val[0]["loss"] and val[-1]["loss"] < math.log(512) - 0.5  # learning, well below uniform
    assert val[-1]["perplexity"] == pytest.approx(math.exp(val[-1]["loss"]), rel=1e-6)
    rec = [r for r in read_metrics(str(workdir)) if r["split"] == "train"][-1]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "tflops_per_device"):
        assert key in rec
    assert "mfu" not in rec  # CPU has no published peak
    assert json.loads((workdir / "config.json").read_text())["model"]["num_layers"] == 2
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))
    assert "sample:" in proc.stdout
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["step"] == 20


def test_exact_resume_after_the_process_ends(straight, tmp_path):
    first = _run(_cmd(tmp_path, "train.steps=10"))
    assert first.returncode == 0, first.stderr[-3000:]
    second = _run(_cmd(tmp_path, "train.steps=20"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout
    want, got = _losses(straight[0]), _losses(tmp_path)
    assert sorted(got) == list(range(1, 21))
    for step in range(1, 21):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6), step


def test_sigterm_checkpoints_exits_cleanly_and_resumes_exactly(straight, tmp_path):
    proc = subprocess.Popen(
        _cmd(tmp_path, "train.steps=20", "checkpoint.every=0"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = preempt_when(proc, lambda: any(s >= 4 for s in _losses(tmp_path)))
    assert proc.returncode == 0, err[-3000:]
    stopped = json.loads(out.strip().splitlines()[-1])
    assert stopped["preempted"] and 4 <= stopped["step"] < 20
    assert str(stopped["step"]) in os.listdir(tmp_path / "checkpoints")
    again = _run(_cmd(tmp_path, "train.steps=20", "checkpoint.every=0"))
    assert again.returncode == 0, again.stderr[-3000:]
    want, got = _losses(straight[0]), _losses(tmp_path)
    assert sorted(got) == list(range(1, 21))
    for step in range(1, 21):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6), step


def test_early_stopping(tmp_path):
    cfg = load_config(
        CONFIG,
        [
            *SMALL,
            "train.steps=40",
            "train.eval_every=5",
            "train.early_stop_patience=2",
            "train.early_stop_min_delta=100.0",
            "generate.max_new_tokens=0",
        ],
    )
    result = train(cfg, str(tmp_path))
    assert result["early_stopped"] and result["step"] == 15  # first eval sets best; two more fail to beat it
    assert (tmp_path / "checkpoints" / "15").is_dir()


def test_object_store_workdir_and_tokenizer_cache(memory_root, tmp_path, monkeypatch):
    """A run and its resume with the workdir and the tokenizer cache on an object store (memory://
    standing in for gs://): config.json, metrics.jsonl, TensorBoard events and the tokenizer go there.
    Orbax's TensorStore writes local files and gs:// only, so here (alone) checkpoints go to a local folder."""
    from etils import epath

    from jaxllm.train import loop

    orbax = loop.Checkpointer
    monkeypatch.setattr(loop, "checkpoint_dir", lambda directory: directory)
    monkeypatch.setattr(loop, "Checkpointer", lambda directory, cfg: orbax(str(tmp_path / "checkpoints"), cfg))
    monkeypatch.setenv("JAXLLM_CACHE_DIR", memory_root + "/cache")
    workdir = memory_root + "/run"
    train(load_config(CONFIG, [*SMALL, "train.steps=6", "generate.max_new_tokens=0"]), workdir)
    root = epath.Path(workdir)
    assert sorted(p.name for p in root.iterdir()) == ["config.json", "metrics.jsonl", "tensorboard"]
    assert json.loads((root / "config.json").read_text())["train"]["steps"] == 6
    assert [r["step"] for r in read_metrics(workdir) if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [p.name.startswith("events.out.tfevents.") for p in (root / "tensorboard").iterdir()] == [True]
    assert [p.suffix for p in epath.Path(memory_root, "cache", "tokenizers").iterdir()] == [".model"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["5", "6"]
    train(load_config(CONFIG, [*SMALL, "train.steps=8", "generate.max_new_tokens=0"]), workdir)  # resumes at 6
    assert [r["step"] for r in read_metrics(workdir) if r["split"] == "train"] == list(range(1, 9))


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["model.num_layer=2"], "did you mean 'model.num_layers'"),
        (["data.source=text", "data.paths=['/nonexistent/*.txt']"], "nonexistent"),
        (["model.vocab_size=100"], "model.vocab_size"),
        (["mesh.tensor=3"], "does not divide"),
        (["data.batch_size=12"], "multiple of 8"),
    ],
)
def test_user_errors_are_one_clear_line(tmp_path, overrides, match):
    argv = ["train", f"--config={CONFIG}", f"--workdir={tmp_path}"] + [f"--config.{o}" for o in (*SMALL, *overrides)]
    with pytest.raises(JaxllmError, match=match) as info:
        cli_run(argv)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")


def test_cli_prints_one_line_error_and_exit_code(tmp_path):
    proc = _run([sys.executable, "-m", "jaxllm.cli", "train", f"--config={CONFIG}", "--config.optim.lr=1"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("jaxllm: error: unknown config key 'optim.lr'")


def test_generate_command_from_a_workdir(straight, capsys):
    workdir, _ = straight
    argv = [
        "generate",
        f"--model={workdir}",
        "--prompt=The for statement",
        "--prompt=x",
        "--greedy",
        "--max_new_tokens=6",
        "--width=0",
    ]
    assert cli_run(argv) == 0
    first = capsys.readouterr().out
    assert cli_run(argv) == 0
    assert capsys.readouterr().out == first  # greedy is deterministic
    lines = [line for line in first.splitlines() if line]
    assert lines[0].startswith("The for statement") and lines[1].startswith("x") and len(lines) == 2
    with pytest.raises(JaxllmError, match="neither a Hugging Face model folder"):
        cli_run(["generate", "--model=/nonexistent", "--prompt=x"])
