"""Compiles every shipped huge config for the Cloud TPU slice its docstring names (XLA's TPU compiler
through libtpu; no TPU needed) and prints a markdown table: fits, HBM per chip, headroom, compile time,
and MaxText's figure for the same model, slice and batch where one exists.

    python benchmarks/plan_configs.py                       # all of them (about an hour on 2 CPU cores)
    python benchmarks/plan_configs.py llama2_70b llama2_7b  # some of them

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
PRETRAIN = ("llama2_7b", "llama2_13b", "llama2_70b", "falcon_7b", "falcon_40b", "falcon_180b", "bloom_560m",
            "bloom_7b1", "bloom_176b")
FINETUNE = {"llama2_70b_qlora": ("configs/llama2_70b_qlora.py", "llama2_70b"),
            "falcon_180b_qlora": ("configs/falcon_qlora.py", "falcon_180b")}


def _hf_folder(root: str, name: str) -> str:
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config_from_model(ModelConfig(**preset(name)), "bfloat16"), f)
    return folder


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
            rows.append(f"| {name} | {r['topology']} | {' '.join(f'{k}={v}' for k, v in r['mesh'].items())} | "
                        f"{r['remat']} | {r['global_batch']} x {r['seq_len']} ({r['per_chip_batch']:g}/chip"
                        f"{', accum ' + str(r['grad_accum_steps']) if r['grad_accum_steps'] > 1 else ''}) | "
                        f"{'yes' if r['fits'] else 'NO'} | {r['hbm_per_chip_gib']:.1f} | {r['headroom_gib']:.1f} | "
                        f"{r['compile_s']:.0f} | {MAXTEXT.get(name, '')} | {100 * est.get('mfu_bound', 0):.0f}% |")
            print(rows[-1], flush=True)
    print("\n| config | slice | mesh | remat | batch x seq | fits | HBM/chip (GiB) | headroom (GiB) | compile (s) "
          "| MaxText (GiB) | MFU bound |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
