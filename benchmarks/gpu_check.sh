#!/usr/bin/env bash
# One prepared accelerator check: attention paths agree on packed inputs; train-step throughput and MFU.
# Usage (on a GPU/TPU host, repo root): OUT=/tmp/out bash benchmarks/gpu_check.sh
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp}"
nvidia-smi -L || true
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
python3 benchmarks/attention_check.py --seq=2048 --batch=4 | tee -a "$OUT/gpu.jsonl"
MODEL="--embed_dim=2048 --num_layers=24 --num_heads=16 --vocab_size=32000 --seq=2048"
python3 benchmarks/train_step.py $MODEL --batch=8 --attention=auto | tee -a "$OUT/gpu.jsonl"
python3 benchmarks/train_step.py $MODEL --batch=16 --remat=save_dots_no_batch --attention=auto | tee -a "$OUT/gpu.jsonl"
# GQA (4 KV heads) and a 4096 context
python3 benchmarks/train_step.py --embed_dim=2048 --num_layers=24 --num_heads=16 --num_kv_heads=4 --seq=4096 \
  --batch=8 --remat=save_dots_no_batch | tee -a "$OUT/gpu.jsonl"
