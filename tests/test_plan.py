"""`jaxllm plan`: slice names, ahead-of-time compiles for a real TPU topology (XLA's TPU compiler via
libtpu, no TPU needed), the memory levers each moving memory the right way, `--search`, and `train`
stopping before any data is read when the step does not fit."""

import json

import pytest

from jaxllm import JaxllmError
from jaxllm import plan as pl
from jaxllm.cli import main
from jaxllm.config import load_config
from jaxllm.train.program import OutOfMemory

# A small model whose activations dominate its memory (so every lever shows), on a 4-chip v5p-8.
SMALL = [
    "model.num_layers=2",
    "model.embed_dim=256",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.mlp_dim=1024",
    "model.max_seq_len=1024",
    "model.dtype=bfloat16",
    "data.block_size=1024",
    "data.batch_size=16",
    "mesh.data=1",
    "mesh.fsdp=-1",
    "model.scan_layers=True",
]


def _plan(*overrides, topology="v5p-8", read_cost=False, **kw):
    return pl.plan(load_config("configs/tiny.py", SMALL + list(overrides)), topology, read_cost=read_cost, **kw)


@pytest.mark.parametrize(
    "name, chips, topo",
    [
        ("v5p-512", 256, "v5:4x8x8"),
        ("v5p-8", 4, "v5:2x2x1"),
        ("v4-32", 16, "v4:2x2x4"),
        ("v4-128", 64, "v4:4x4x4"),
        ("v5e-256", 256, "v5e:16x16"),
        ("v5litepod-16", 16, "v5e:4x4"),
        ("v6e-64", 64, "v6e:8x8"),
        ("v6e-8", 8, "v6e:2x4"),
        ("v5p-2048", 1024, "v5:8x8x16"),
    ],
)
def test_slice_names(name, chips, topo):
    _, n, t = pl.parse_slice(name)
    assert (n, t) == (chips, topo)


@pytest.mark.parametrize("name", ["v5p", "v7-8", "v5p-12", "v5p-7", "tpu-8"])
def test_bad_slice_names_are_one_line_errors(name):
    with pytest.raises(JaxllmError, match="topology"):
        pl.parse_slice(name)


def test_the_compilers_refusal_is_read():
    text = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (512.00G) "
        "exceeds available HBM (95.74G).\nmore"
    )
    oom = OutOfMemory.parse(text)
    assert oom.needed == 512 * 2**30 and oom.capacity == pytest.approx(95.74 * 2**30)
    assert OutOfMemory.parse("INVALID_ARGUMENT: something else") is None


@pytest.fixture(scope="module")
def base():
    return _plan(read_cost=True)


def test_plan_compiles_for_a_tpu_slice_and_reports(base):
    assert base["fits"] is True and base["chips"] == 4 and "TPU v5" in base["device_kind"]
    assert base["hbm_capacity_gib"] == pytest.approx(95.74, abs=0.1)  # what the compiler says a v5p chip has
    assert base["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert base["global_batch"] == 16 and base["seq_len"] == 1024 and base["per_chip_batch"] == 4
    b = base["breakdown"]
    total = b["params_gib"] + b["opt_state_gib"] + b["batch_gib"] + b["temporaries_gib"] + b["outputs_not_aliased_gib"]
    assert base["hbm_per_chip_gib"] == pytest.approx(total, rel=0.01)  # the TPU pads small arrays to its tiles
    assert b["opt_state_gib"] == pytest.approx(2 * b["params_gib"], rel=0.01)  # Adam's mu and nu, as sharded
    assert base["estimate"]["step_s"] > 0 and 0 < base["estimate"]["mfu_bound"] <= 1


def test_remat_policies_order_memory(base):
    minimal = _plan("model.remat=minimal")["breakdown"]["temporaries_gib"]
    full = _plan("model.remat=full")["breakdown"]["temporaries_gib"]
    assert full < minimal < base["breakdown"]["temporaries_gib"]  # base: remat none


def test_chunked_loss_drops_the_logits():
    whole = _plan("model.vocab_size=32768")
    chunked = _plan("model.vocab_size=32768", "train.loss_chunk=128")
    saved = whole["breakdown"]["temporaries_gib"] - chunked["breakdown"]["temporaries_gib"]
    logits = 4 * 1024 * 32768 * 4 / 2**30  # float32 [4, 1024, 32768] per chip
    assert saved > logits


def test_sequence_parallel_splits_the_residual_stream_over_tensor():
    """Full remat keeps each layer's input: [16, 1024, 1024] per device, a quarter of it with the
    length split over tensor=4."""
    wide = (
        "model.num_layers=8",
        "model.embed_dim=1024",
        "model.num_heads=8",
        "model.num_kv_heads=8",
        "mesh.fsdp=1",
        "mesh.tensor=4",
        "model.remat=full",
    )
    on, off = _plan(*wide), _plan(*wide, "model.sequence_parallel=False")
    saved = off["breakdown"]["temporaries_gib"] - on["breakdown"]["temporaries_gib"]
    assert saved > 0.75 * 8 * 16 * 1024 * 1024 * 2 * 0.75 / 2**30


def test_host_offload_moves_the_optimizer_state(base):
    """Between steps the optimizer state lives in host memory; the compiled step reads and writes it
    there (host arguments and outputs), bringing it to the device only for the update."""
    off = _plan("optim.host_offload=True", read_cost=True)
    assert off["breakdown"]["opt_state_gib"] == 0
    assert off["breakdown"]["host_state_gib"] == pytest.approx(base["breakdown"]["opt_state_gib"], rel=1e-6)
    assert off["host_arguments_gib"] >= off["breakdown"]["host_state_gib"] and base["host_arguments_gib"] == 0
    moved = off["cost"]["host_offload_bytes"] / 2**30  # in to the device and back out, every step
    assert (
        moved == pytest.approx(2 * off["breakdown"]["host_state_gib"], rel=0.01)
        and base["cost"]["host_offload_bytes"] == 0
    )


def test_a_step_the_compiler_refuses_answers_fits_false():
    result = _plan("data.batch_size=4096", topology="v5e-4")  # 1024 sequences of 1024 per 16 GiB chip
    assert result["fits"] is False and result["hbm_per_chip_gib"] > result["hbm_capacity_gib"] == pytest.approx(15.75)
    assert "RESOURCE_EXHAUSTED" in result["compiler"]


def test_cli_json(capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--config=configs/tiny.py", "--topology=v5p-8", "--json"] + [f"--config.{o}" for o in SMALL])
    assert e.value.code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in (
        "fits",
        "hbm_per_chip_gib",
        "hbm_capacity_gib",
        "chips",
        "mesh",
        "global_batch",
        "seq_len",
        "params",
        "compile_s",
        "breakdown",
        "cost",
    ):
        assert key in out
    assert out["cost"]["flops_per_chip"] > 0 and out["cost"]["method"].startswith("extrapolated")


def test_search_on_local_devices_finds_a_setting_that_fits():
    cfg = load_config("configs/tiny.py", SMALL[:-3] + ["data.batch_size=16", "model.dtype=float32"])
    full = pl.plan(cfg, "local")  # 8 fake CPU devices, data=-1
    budget = full["hbm_per_chip_gib"] * 0.7  # the default setting cannot fit this budget
    found = pl.search(cfg, "local", hbm_gib=budget, max_compiles=12, log=lambda line: None)
    assert found["best"] is not None and found["best"]["fits"]
    assert found["best"]["hbm_per_chip_gib"] <= budget
    assert found["tried"][-1]["fits"] and not any(t["fits"] for t in found["tried"][:-1])
    # no compiled time on CPU: the analytic order ranks, so the search stops at the first setting that fits
    assert "analytic estimate" in found["best"]["cost"]["method"]
    assert found["tried"][-1]["estimated_step_s"] == found["best"]["cost"]["estimated_step_s"] > 0
    again = pl.plan(
        load_config("configs/tiny.py", SMALL[:-3] + ["data.batch_size=16", "model.dtype=float32"] + found["overrides"]),
        "local",
        hbm_gib=budget,
    )
    assert again["fits"]


def test_train_stops_before_reading_data_when_the_step_does_not_fit(tmp_path, monkeypatch):
    from jaxllm.train import program
    from jaxllm.train.loop import train

    def refuse(self):
        raise OutOfMemory("RESOURCE_EXHAUSTED: out of memory", 300 * 2**30, 95.74 * 2**30)

    monkeypatch.setattr(program.Program, "compile_train_step", refuse)
    cfg = load_config(
        "configs/tiny.py",
        ["data.source=text", f"data.paths=('{tmp_path}/missing/*.txt',)", f"data.tokenizer={tmp_path}/missing.model"],
    )
    with pytest.raises(JaxllmError, match=r"does not fit: it needs 300.0 GiB .*jaxllm plan"):
        train(cfg, str(tmp_path / "run"))


def test_missing_libtpu_is_a_one_line_error(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_libtpu(name, *a, **k):
        if name == "libtpu":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_libtpu)
    pl._tpu_devices.cache_clear()
    with pytest.raises(JaxllmError, match=r"needs libtpu: pip install"):
        pl.topology_devices("v4-16")


def test_a_qlora_step_compiles_for_a_tpu_slice(tmp_path):
    """The frozen NF4 base (from a Hugging Face folder's config.json alone: plan reads no weights) and
    the trainable adapters, compiled as a fine-tuning run would run them; MLP width 96 is no multiple of
    the 64-weight quantization blocks."""
    from jaxllm.hf.config import hf_config_from_model
    from jaxllm.models.config import ModelConfig

    shapes = ModelConfig(
        vocab_size=512, num_layers=2, embed_dim=128, num_heads=4, num_kv_heads=2, mlp_dim=96, max_seq_len=512
    )
    (tmp_path / "config.json").write_text(json.dumps(hf_config_from_model(shapes, "bfloat16")))
    cfg = load_config(
        "configs/finetune.py",
        [
            f"checkpoint.init_from={tmp_path}",
            "lora.quantization=nf4",
            "lora.r=8",
            "data.block_size=512",
            "data.batch_size=8",
            "mesh.data=1",
            "mesh.fsdp=-1",
            "model.dtype=bfloat16",
        ],
    )
    result = pl.plan(cfg, "v5p-8")
    assert result["fits"] and result["params"] == shapes.num_params()
    assert result["cost"]["flops_per_chip"] > 0  # the adapters' step, compiled again with fewer layers if scanned
    b = result["breakdown"]
    assert b["frozen_base_gib"] > 0 and b["params_gib"] < b["frozen_base_gib"]  # adapters train, the base is frozen
    nf4_bytes = shapes.num_params() * 0.6 / 4 / 2**30  # ~4.1 bits per quantized weight, 4 chips (embeddings float)
    assert b["frozen_base_gib"] > nf4_bytes


def test_multi_slice_puts_the_data_axis_across_slices():
    two = _plan("mesh.data=2", num_slices=2)
    assert two["fits"] and two["chips"] == 8 and two["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(JaxllmError, match="multiple of 2"):
        _plan("mesh.data=1", num_slices=2)


# ------------------------------------------------------------------------------------------ compiled cost


def test_plan_reads_the_steps_cost(base):
    """Splash attention is a Pallas kernel (3 custom calls per layer: forward, dq, dkv) that the cost
    analysis does not count; the rest of the step's matmuls it does."""
    c = base["cost"]
    assert c["method"] == "extrapolated from 1 and 2 unrolled layers"
    assert c["kernel_calls"] == 3 * 2
    assert c["collective_bytes"]["all-gather"] > 0 and c["collective_bytes"]["reduce-scatter"] > 0
    assert c["estimated_step_s"] == c["optimal_seconds"] > 0 and 0 < c["mfu_bound"] <= 1
    assert c["host_offload_bytes"] == 0
    rows = pl.table(base)
    assert "custom kernel calls not counted" in rows and "all-gather" in rows and "MFU <=" in rows
