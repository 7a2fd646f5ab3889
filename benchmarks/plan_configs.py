"""Compiles every shipped huge config for the Cloud TPU slice its docstring names (XLA's TPU compiler
through libtpu; no TPU needed) and prints a markdown table: fits, HBM per chip, headroom, compile time,
MaxText's figure for the same model, slice and batch where one exists, and the step's compiled cost
(`jaxllm.cost`: the compiler's seconds per step, MFU bound, flops, collective and host-transfer bytes;
scanned layers cost two more compiles, of 1 and 2 unrolled layers).

    python benchmarks/plan_configs.py                       # all of them (about an hour on 2 CPU cores)
    python benchmarks/plan_configs.py llama2_70b llama2_7b  # some of them
    python benchmarks/plan_configs.py --levers              # each memory lever on and off
    python benchmarks/plan_configs.py --vs_maxtext          # Llama-2 7B/13B/70B beside MaxText (see below)

`--vs_maxtext [NAMES]` compiles each config MaxText also has (Llama-2 7B, 13B, 70B on v5p-512 at 1024 x
4096) on both sides in this one process, so both use the same compiler: it needs Python >= 3.12 and
`pip install -e '.[maxtext]'` (maxtext[tpu]). Memory is each side's shipped step (MaxText: its recipe's
remat policy, scanned layers). The cost analysis counts a loop body once, so cost comes from layers
unrolled on both sides: the whole unrolled step where it compiles, else (70B) 4 and 8 unrolled layers
extrapolated per layer (`jaxllm.cost.extrapolate`). Collectives are result bytes summed over the HLO with
loop trip counts (`jaxllm.cost.read`). About 1.5 hours on 2 CPU cores.

The fine-tuning recipes take their shapes from a Hugging Face folder; plan reads only its config.json,
so this script writes one for the published model (from jaxllm's presets) into a temporary folder.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

from jaxllm.config import load_config
from jaxllm.hf.config import hf_config_from_model
from jaxllm.models.config import ModelConfig, preset
from jaxllm.plan import plan

# MaxText's compiled figure for the same model, slice and per-chip batch (GiB per chip), where measured.
MAXTEXT = {"llama2_70b": 76.6, "llama2_7b": 44.6}
PRETRAIN = (
    "llama2_7b",
    "llama2_13b",
    "llama2_70b",
    "falcon_7b",
    "falcon_40b",
    "falcon_180b",
    "bloom_560m",
    "bloom_7b1",
    "bloom_176b",
)
FINETUNE = {
    "llama2_70b_qlora": ("configs/llama2_70b_qlora.py", "llama2_70b"),
    "falcon_180b_qlora": ("configs/falcon_qlora.py", "falcon_180b"),
}


def _hf_folder(root: str, name: str) -> str:
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config_from_model(ModelConfig(**preset(name)), "bfloat16"), f)
    return folder


# (what, config, the setting with the lever, without it): one lever changed at a time.
_70B = ["model.remat=save_dot_except_mlpwi"]  # MaxText's policy for this model and slice
_TP = ["mesh.fsdp=32", "mesh.tensor=8", "model.remat=full"]
_FEW = ["data.batch_size=128", "model.remat=save_dot_except_mlp"]
LEVERS = [
    ("flash attention (Splash), Llama-2-70B", "llama2_70b", _70B, _70B + ["model.attention=xla"], None),
    ("chunked cross-entropy (256 positions), BLOOM-7B1", "bloom_7b1", [], ["train.loss_chunk=0"], None),
    (
        "sequence parallelism, Llama-2-70B fsdp=32 tensor=8",
        "llama2_70b",
        _TP,
        _TP + ["model.sequence_parallel=False"],
        None,
    ),
    ("queries offloaded to host vs MaxText's save_dot_except_mlpwi, Llama-2-70B", "llama2_70b", [], _70B, None),
    ("save_dot_except_mlpwi vs MaxText's minimal, Llama-2-7B", "llama2_7b", [], ["model.remat=minimal"], None),
    ("full remat vs save_dot_except_mlpwi, Llama-2-70B", "llama2_70b", ["model.remat=full"], _70B, None),
    (
        "optimizer state in host memory, Llama-2-70B on v5p-128, 2 sequences per chip",
        "llama2_70b",
        _FEW + ["optim.host_offload=True"],
        _FEW,
        "v5p-128",
    ),
]


def levers() -> None:
    rows = []
    for what, name, on, off, topology in LEVERS:
        got = []
        for items in (on, off):
            cfg = load_config(f"configs/pretrain.py:{name}", items)
            r = plan(cfg, topology or cfg.mesh.slice, read_cost=False)
            got.append(f"{r['hbm_per_chip_gib']:.1f}" + ("" if r["fits"] else " (does not fit)"))
        flags = " ".join(f"--config.{o}" for o in on) or "(as shipped)"
        rows.append(f"| {what} | {got[0]} | {got[1]} | `{flags}` vs `{' '.join(f'--config.{o}' for o in off)}` |")
        print(rows[-1], flush=True)
    print("\n| lever | with (GiB/chip) | without (GiB/chip) | settings |\n|---|---|---|---|\n" + "\n".join(rows))


def main(names: list[str]) -> None:
    names = names or list(PRETRAIN) + list(FINETUNE)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for name in names:
            if name in FINETUNE:
                path, model = FINETUNE[name]
                cfg = load_config(path, [f"checkpoint.init_from={_hf_folder(root, model)}"])
            else:
                cfg = load_config(f"configs/pretrain.py:{name}")
            r = plan(cfg, cfg.mesh.slice)
            c = r.get("cost") or {}
            compiled = (
                f"{c['estimated_step_s']:.2f} | {100 * c['mfu_bound']:.0f}% | {c['flops_per_chip'] / 1e12:,.0f} T "
                f"({100 * c['recompute_share']:.0f}%) | {sum(c['collective_bytes'].values()) / 1e9:.1f} | "
                f"{c['host_offload_bytes'] / 1e9:.1f}"
                if c
                else " | | | | "
            )
            rows.append(
                f"| {name} | {r['topology']} | {' '.join(f'{k}={v}' for k, v in r['mesh'].items())} | "
                f"{r['remat']} | {r['global_batch']} x {r['seq_len']} ({r['per_chip_batch']:g}/chip"
                f"{', accum ' + str(r['grad_accum_steps']) if r['grad_accum_steps'] > 1 else ''}) | "
                f"{'yes' if r['fits'] else 'NO'} | {r['hbm_per_chip_gib']:.1f} | {r['headroom_gib']:.1f} | "
                f"{r['compile_s']:.0f} | {MAXTEXT.get(name, '')} | {compiled} |"
            )
            print(rows[-1], flush=True)
    print(
        "\n| config | slice | mesh | remat | batch x seq | fits | HBM/chip (GiB) | headroom (GiB) | compile (s) "
        "| MaxText (GiB) | compiled s/step | MFU bound | XLA flops/chip (recomputed) | collectives (GB) "
        "| host transfers (GB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


# ------------------------------------------------------------------------------------------- --vs_maxtext
# The same model, slice and global batch on MaxText with its own recipe (remat policy) for that model; the
# layer counts whose unrolled compiles are extrapolated where a whole unrolled step does not compile.
MAXTEXT_RECIPES = {
    "llama2_7b": ("llama2-7b", "minimal", None),
    "llama2_13b": ("llama2-13b", "minimal", None),
    "llama2_70b": ("llama2-70b", "save_dot_except_mlpwi", (4, 8)),
}
COST_KEYS = ["flops", "bytes_accessed", "optimal_seconds", "collective_bytes"]


def _hbm_gib(compiled) -> float:
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes) / 2**30


def _jaxllm_step(name: str, items: list[str]):
    from jaxllm import sharding as shd
    from jaxllm.plan import topology_devices
    from jaxllm.train.program import build
    from jaxllm.train.start import parse

    cfg = load_config(f"configs/pretrain.py:{name}", items)
    run = parse(cfg)
    return build(run, shd.make_mesh(run.mesh, topology_devices(cfg.mesh.slice))).compile_train_step()


def _maxtext_step(model: str, items: list[str], topology: str = "v5p-512"):
    import maxtext
    from flax.core.spmd import logical_axis_rules
    from maxtext.configs import pyconfig
    from maxtext.trainers.pre_train import train, train_compile
    from maxtext.utils import maxtext_utils, sharding

    base = os.path.join(os.path.dirname(maxtext.__file__), "configs", "base.yml")
    config = pyconfig.initialize(
        [None, base, f"model_name={model}", f"compile_topology={topology}", "compile_topology_num_slices=1"]
        + ["dataset_type=synthetic", "run_name=vs_jaxllm", f"base_output_directory={tempfile.gettempdir()}", *items]
    )
    mesh = train_compile.get_topology_mesh(config)
    args, kwargs, state_sh, _, model_ = train_compile.get_shaped_inputs(mesh, config)
    params_sh, state_sh = sharding.maybe_update_params_sharding_with_opt(config, state_sh)
    state_in = sharding.build_zero1_input_state_mesh_shardings(config, state_sh, params_sh)
    fn, ins, outs, static, donate = maxtext_utils.get_functional_train_with_signature(
        train.train_step, sharding.get_input_data_sharding(config, mesh), state_in, model_, config, params_sh
    )
    rules = logical_axis_rules(config.logical_axis_rules)
    return train_compile.jit_and_compile(fn, args, kwargs, mesh, ins, outs, static, donate, config, rules)


def _side(compile_step, unrolled, layers: int, small) -> dict:
    """HBM of the shipped step; cost of the unrolled one (whole, or `small` layer counts extrapolated)."""
    from jaxllm import cost

    compiled = {(): compile_step([])}
    out = {"hbm_gib": _hbm_gib(compiled[()])}
    read = lambda n: cost.read(compiled.get(tuple(unrolled(n))) or compile_step(unrolled(n)))  # noqa: E731
    if small is None:
        out.update(read(layers))
    else:
        out.update(cost.extrapolate({n: read(n) for n in small}, layers, COST_KEYS))
    return out


def vs_maxtext(names: list[str]) -> None:
    from jaxllm.plan import parse_slice

    rows = []
    for name in names or list(MAXTEXT_RECIPES):
        model, remat, small = MAXTEXT_RECIPES[name]
        cfg = load_config(f"configs/pretrain.py:{name}")
        layers, scanned = cfg.model.num_layers, cfg.model.scan_layers
        per_chip = cfg.data.batch_size // parse_slice(cfg.mesh.slice)[1]
        mt = [f"per_device_batch_size={per_chip}", f"max_target_length={cfg.data.block_size}", f"remat_policy={remat}"]
        j = _side(
            lambda items: _jaxllm_step(name, items),
            lambda n: [] if n == layers and not scanned else ["model.scan_layers=False", f"model.num_layers={n}"],
            layers,
            small,
        )
        m = _side(
            lambda items: _maxtext_step(model, mt + items, cfg.mesh.slice),
            lambda n: ["scan_layers=false", f"base_num_decoder_layers={n}", "override_model_config=true"],
            layers,
            small,
        )
        how = "whole step unrolled" if small is None else f"{small[0]} and {small[1]} unrolled layers extrapolated"
        for what, get, unit in (
            ("HBM per chip", lambda x: x["hbm_gib"], "GiB"),
            ("XLA flops per chip", lambda x: x["flops"] / 1e12, "T"),
            ("bytes accessed per chip", lambda x: x["bytes_accessed"] / 1e9, "GB"),
            ("all-gather result bytes", lambda x: x["collective_bytes"]["all-gather"] / 1e9, "GB"),
            ("all-reduce + reduce-scatter result bytes", _reductions, "GB"),
            ("compiler's optimal_seconds", lambda x: x["optimal_seconds"], "s"),
        ):
            a, b = get(j), get(m)
            digits = 3 if unit == "s" else 1
            rows.append(f"| {name} ({how}) | {what} | {a:,.{digits}f} {unit} | {b:,.{digits}f} {unit} | {a / b:.3f} |")
            print(rows[-1], flush=True)
    print("\n| config (cost method) | per chip per step | jaxllm | MaxText | ratio |\n|---|---|---|---|---|")
    print("\n".join(rows))


def _reductions(x: dict) -> float:
    return (x["collective_bytes"]["all-reduce"] + x["collective_bytes"]["reduce-scatter"]) / 1e9


if __name__ == "__main__":
    if sys.argv[1:] == ["--levers"]:
        levers()
    elif sys.argv[1:2] == ["--vs_maxtext"]:
        vs_maxtext(sys.argv[2:])
    else:
        main(sys.argv[1:])
