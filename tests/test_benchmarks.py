"""The throughput benchmarks still run against the package's API, at toy sizes (their figures are
measured by running them whole; here only what cannot drift with machine load is asserted)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = ["--vocab_size=256", "--embed_dim=32", "--num_layers=2", "--num_heads=4", "--num_kv_heads=2", "--mlp_dim=64"]


def _run(script: str, *args: str) -> list[dict]:
    # one CPU device, as the benchmarks run (the suite's conftest fakes 8 for the sharding tests)
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | dict(JAX_PLATFORMS="cpu")
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_vs_pytorch_runs_both_sides_on_the_same_model():
    lines = _run(
        "vs_pytorch.py",
        *TOY,
        "--batch=2",
        "--seq=32",
        "--prompt_len=4",
        "--new_tokens=8",
        "--repeats=1",
        "--steps=1",
        "--torch_threads=1",
    )
    first = {r["what"]: r["first_loss"] for r in lines if "first_loss" in r}
    for what in ("train", "lora"):  # the same weights and batch: the same loss before any update
        assert abs(first[what]["jaxllm"] - first[what]["torch_1t"]) < 1e-3, first
    same = {r["what"]: r["greedy_tokens_equal"] for r in lines if "greedy_tokens_equal" in r}
    assert same == {"decode1": 1.0, "decode8": 1.0}  # greedy decoding picks the same tokens
    ratios = {r["what"]: r["ratio"] for r in lines if "ratio" in r}
    assert set(ratios) == {"train", "lora", "decode1", "decode8"} and all(v > 0 for v in ratios.values())


def test_scaling_sweeps_print_a_point_per_setting():
    lines = _run("scaling.py", "--seqs=32,64", "--tokens=128", "--sizes=1m", "--steps=1", "--repeats=1", "--plot=")
    points = [r for r in lines if "sweep" in r]
    assert [(p["sweep"], p["seq"], p["batch"]) for p in points] == [("seq", 32, 4), ("seq", 64, 2), ("size", 256, 8)]
    assert all(p["tokens_per_s"] > 0 and p["tflops"] > 0 for p in points)
    assert 0.5e6 < points[-1]["params"] < 2e6  # the "1m" shape


def test_jsonl_memory_reads_both_layouts(tmp_path, tok):
    """At 2 MB no line passes the 16 MiB limit: both layouts read every row (tok: the cached tokenizer)."""
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "jsonl_memory.py"),
            "--mb=2",
            "--long_lines=1",
            f"--workdir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("2 MB as 1 lines: peak RSS") and "1 rows" in lines[0]
    assert lines[1].startswith("2 MB as 200 lines: peak RSS") and "200 rows" in lines[1]


def test_preference_step_times_every_objective_on_the_same_rows():
    lines = _run("preference_step.py", *TOY, "--batch=2", "--seq=32", "--steps=1", "--repeats=1")
    rows = {r["objective"]: r for r in lines if "objective" in r}
    assert set(rows) == {"lm", "dpo", "dpo_precomputed", "orpo", "reward"}
    assert rows["dpo"]["reference"] == "base" and rows["dpo_precomputed"]["reference"] == "batch"  # LoRA r=16
    assert all(r["step_time_s"] > 0 and r["loss"] == r["loss"] for r in rows.values())
    assert set(lines[-1]["ratios_to_sft"]) == set(rows)
