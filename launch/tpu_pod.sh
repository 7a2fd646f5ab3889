#!/usr/bin/env bash
# Run a jaxllm command on every worker of a Cloud TPU VM slice (v4 / v5e / v5p / v6e pods).
#
# Usage:
#   launch/tpu_pod.sh TPU_NAME ZONE [PROJECT] -- jaxllm train --config=configs/X.py --workdir=/mnt/gcs/runs/X
#
# Steps, on all workers at once (gcloud ... --worker=all):
#   1. copy this checkout (tracked + untracked, not git-ignored files) to ~/jaxllm on each worker;
#   2. `pip install -e .[tpu]` there;
#   3. run the command with JAXLLM_TPU_POD=1, so jaxllm's distributed "auto" mode calls
#      jax.distributed.initialize() (JAX finds the other workers through the TPU metadata server).
#
# The workdir must be ONE directory every worker sees (checkpoints are written by all hosts together):
# a bucket URL (--workdir=gs://BUCKET/runs/X; the tpu extra brings gcsfs), or a gcsfuse / Filestore / NFS
# mount on each worker.
#
# Environment knobs:
#   JAXLLM_REMOTE_DIR   where the code goes on the workers (default: jaxllm, relative to the home dir)
#   JAXLLM_SKIP_SYNC=1  skip steps 1-2 (code already installed), just run the command
set -euo pipefail

usage() {
  echo "usage: $0 TPU_NAME ZONE [PROJECT] -- COMMAND..." >&2
  echo "  e.g. $0 my-v5p-64 us-east5-a my-project -- jaxllm train --config=configs/X.py --workdir=/mnt/gcs/runs/X" >&2
  exit 2
}

positional=()
while [[ $# -gt 0 && "$1" != "--" ]]; do positional+=("$1"); shift; done
[[ $# -gt 0 ]] || { echo "error: missing '--' before the command to run" >&2; usage; }
shift  # the --
[[ $# -gt 0 ]] || { echo "error: no command after '--'" >&2; usage; }
[[ ${#positional[@]} -ge 2 && ${#positional[@]} -le 3 ]] || { echo "error: need TPU_NAME ZONE [PROJECT]" >&2; usage; }
command -v gcloud >/dev/null 2>&1 || {
  echo "error: gcloud not found; install the Google Cloud SDK (https://cloud.google.com/sdk/docs/install)" >&2
  exit 127
}

tpu_name=${positional[0]}
zone=${positional[1]}
gcloud_flags=(--zone="$zone")
[[ ${#positional[@]} -eq 3 ]] && gcloud_flags+=(--project="${positional[2]}")
printf -v remote_dir '%q' "${JAXLLM_REMOTE_DIR:-jaxllm}"
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# The user's command, quoted for the remote shell.
printf -v user_cmd '%q ' "$@"

if [[ "${JAXLLM_SKIP_SYNC:-0}" != 1 ]]; then
  tarball=$(mktemp -t jaxllm-XXXXXX.tar.gz)
  trap 'rm -f "$tarball"' EXIT
  if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$repo" && git ls-files -z --cached --others --exclude-standard | tar -czf "$tarball" --null -T -)
  else
    tar -czf "$tarball" -C "$repo" --exclude=.git --exclude='*.egg-info' --exclude=__pycache__ .
  fi
  echo "copying $(du -h "$tarball" | cut -f1) of code to all workers of $tpu_name" >&2
  gcloud compute tpus tpu-vm scp "$tarball" "$tpu_name":jaxllm-src.tar.gz --worker=all "${gcloud_flags[@]}"
  setup="rm -rf $remote_dir && mkdir -p $remote_dir && tar -xzf ~/jaxllm-src.tar.gz -C $remote_dir && \
rm ~/jaxllm-src.tar.gz && cd $remote_dir && python3 -m pip install --quiet --upgrade pip && python3 -m pip install --quiet -e '.[tpu]' && "
else
  setup="cd $remote_dir && "
fi

remote="set -e; export PATH=\$HOME/.local/bin:\$PATH JAXLLM_TPU_POD=1; ${setup}${user_cmd}"
gcloud compute tpus tpu-vm ssh "$tpu_name" --worker=all "${gcloud_flags[@]}" --command="$remote"
