"""Peak host memory of `jaxllm.hf.load_pretrained`, as a multiple of the checkpoint's size on disk.

Builds a random float32 Llama with transformers (hidden 1024, 12 layers, vocab 32000: ~0.9 GB), saves it
sharded (max_shard_size=100MB; with --format=bin as PyTorch pickle shards pytorch_model-*.bin + index, as
torch.save writes them), then loads it with jaxllm in a fresh process (no torch imported there) and reports
peak RSS (ru_maxrss) minus the RSS after `import jax`, divided by the bytes on disk.
The target is < 1.3x: a loader that held the model twice (host copy + device copy) would show ~2x.

    python benchmarks/hf_load_memory.py [--workdir /tmp/hf_load_memory] [--scan_layers true|false]
        [--format safetensors|bin]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_CHILD = r"""
import json, os, resource, sys, time

def status_mb(key):  # VmRSS (now) / VmHWM (peak) of this process image, from /proc
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024

def peak_mb():  # ru_maxrss; the parent is kept small, as Linux carries its peak across fork + exec
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

import jax
jax.devices()
after_jax = peak_mb()
import jaxllm.hf
after_jaxllm = peak_mb()
start = time.time()
model, params = jaxllm.hf.load_pretrained(sys.argv[1], scan_layers=sys.argv[2] == "true")
jax.block_until_ready(params)
seconds = time.time() - start
n_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
print(json.dumps(dict(after_jax_mb=after_jax, after_jaxllm_mb=after_jaxllm, peak_mb=peak_mb(),
                      hwm_mb=status_mb("VmHWM"), final_rss_mb=status_mb("VmRSS"), params_mb=n_bytes / 2**20,
                      load_s=seconds)))
"""


_BUILD = r"""
import sys, torch, transformers
torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                                  num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=16)
transformers.LlamaForCausalLM(config).save_pretrained(sys.argv[1], max_shard_size="100MB")
"""


# the same model as PyTorch pickle shards of about 100 MB, as older Hub checkpoints ship
_TO_BIN = r"""
import json, os, sys, torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
state, shards, current, size = model.state_dict(), [], {}, 0
for name, tensor in state.items():
    if current and size + tensor.numel() * 4 > 100e6:
        shards.append(current)
        current, size = {}, 0
    current[name] = tensor.contiguous()
    size += tensor.numel() * 4
shards.append(current)
os.makedirs(sys.argv[2], exist_ok=True)
model.config.save_pretrained(sys.argv[2])
weight_map = {}
for i, shard in enumerate(shards):
    file = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
    torch.save(shard, os.path.join(sys.argv[2], file))
    weight_map.update(dict.fromkeys(shard, file))
with open(os.path.join(sys.argv[2], "pytorch_model.bin.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": sum(t.numel() * 4 for t in state.values())}, "weight_map": weight_map}, f)
"""

WEIGHTS = {"safetensors": ".safetensors", "bin": ".bin"}


def build(folder: str, fmt: str = "safetensors") -> str:
    """In its own process, so this one stays small (its peak RSS would show in the child's ru_maxrss);
    returns the folder of the checkpoint in `fmt`."""
    if not os.path.isfile(os.path.join(folder, "model.safetensors.index.json")):
        subprocess.run([sys.executable, "-c", _BUILD, folder], check=True, capture_output=True)
    if fmt == "safetensors":
        return folder
    out = folder + "_bin"
    if not os.path.isfile(os.path.join(out, "pytorch_model.bin.index.json")):
        subprocess.run([sys.executable, "-c", _TO_BIN, folder, out], check=True, capture_output=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/hf_load_memory")
    parser.add_argument("--scan_layers", default="true", choices=["true", "false"])
    parser.add_argument("--format", default="safetensors", choices=sorted(WEIGHTS))
    args = parser.parse_args()
    folder = build(os.path.join(args.workdir, "llama_1024x12"), args.format)
    ext = WEIGHTS[args.format]
    disk = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(ext))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")  # one CPU device, as a plain user would have
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, folder, args.scan_layers], env=env, check=True, capture_output=True, text=True
    ).stdout
    r = json.loads(out.strip().splitlines()[-1])
    disk_mb = disk / 2**20
    shards = len([f for f in os.listdir(folder) if f.endswith(ext)])
    print(
        f"checkpoint on disk ({args.format}): {disk_mb:.0f} MiB in {shards} shards; params loaded: "
        f"{r['params_mb']:.0f} MiB"
        f" in {r['load_s']:.1f} s (scan_layers={args.scan_layers})"
    )
    print(
        f"RSS after import jax: {r['after_jax_mb']:.0f} MiB; after import jaxllm.hf: {r['after_jaxllm_mb']:.0f} MiB;"
        f" peak during load: ru_maxrss {r['peak_mb']:.0f} MiB (VmHWM {r['hwm_mb']:.0f} MiB);"
        f" after load: {r['final_rss_mb']:.0f} MiB"
    )
    print(
        f"peak - after-jax = {r['peak_mb'] - r['after_jax_mb']:.0f} MiB = "
        f"{(r['peak_mb'] - r['after_jax_mb']) / disk_mb:.2f}x the checkpoint "
        f"({(r['peak_mb'] - r['after_jaxllm_mb']) / disk_mb:.2f}x counting from after import jaxllm.hf);"
        " target < 1.3x"
    )


if __name__ == "__main__":
    main()
