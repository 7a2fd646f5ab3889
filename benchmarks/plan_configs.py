"""Compiles every shipped huge config for the Cloud TPU slice its docstring names (XLA's TPU compiler
through libtpu; no TPU needed) and prints a markdown table: fits, HBM per chip, headroom, compile time,
and MaxText's figure for the same model, slice and batch where one exists.

    python benchmarks/plan_configs.py                       # all of them (about an hour on 2 CPU cores)
    python benchmarks/plan_configs.py llama2_70b llama2_7b  # some of them
    python benchmarks/plan_configs.py --levers              # each memory lever on and off

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
            r = plan(cfg, topology or cfg.mesh.slice)
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
            est = r.get("estimate") or {}
            rows.append(
                f"| {name} | {r['topology']} | {' '.join(f'{k}={v}' for k, v in r['mesh'].items())} | "
                f"{r['remat']} | {r['global_batch']} x {r['seq_len']} ({r['per_chip_batch']:g}/chip"
                f"{', accum ' + str(r['grad_accum_steps']) if r['grad_accum_steps'] > 1 else ''}) | "
                f"{'yes' if r['fits'] else 'NO'} | {r['hbm_per_chip_gib']:.1f} | {r['headroom_gib']:.1f} | "
                f"{r['compile_s']:.0f} | {MAXTEXT.get(name, '')} | {100 * est.get('mfu_bound', 0):.0f}% |"
            )
            print(rows[-1], flush=True)
    print(
        "\n| config | slice | mesh | remat | batch x seq | fits | HBM/chip (GiB) | headroom (GiB) | compile (s) "
        "| MaxText (GiB) | MFU bound |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    if sys.argv[1:] == ["--levers"]:
        levers()
    else:
        main(sys.argv[1:])
