#!/usr/bin/env python3
"""Run a jaxllm command as N cooperating JAX processes on this machine (a multi-host rehearsal on one box).

    python launch/local.py --num_processes=2 --devices_per_process=2 -- \
        jaxllm train --config=configs/tiny.py --workdir=runs/tiny_2proc

Each process joins a 127.0.0.1 coordinator through jaxllm's distributed "auto" mode; on CPU each gets
`devices_per_process` fake devices, on GPU its own slice of the local GPUs (set JAX_PLATFORMS=cuda).
Output lines are prefixed [p0], [p1], ...; if one process fails the others are stopped.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from jaxllm import JaxllmError  # noqa: E402
from jaxllm.distributed import launch_local  # noqa: E402


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print("usage: launch/local.py --num_processes=N [--devices_per_process=D] -- COMMAND...", file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="launch/local.py", description=__doc__.splitlines()[0])
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--devices_per_process", type=int, default=1)
    parser.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before all processes are stopped")
    args = parser.parse_args(argv[:split])
    try:
        codes = launch_local(
            argv[split + 1 :], args.num_processes, args.devices_per_process, port=args.port, timeout=args.timeout
        )
    except JaxllmError as e:
        print(f"launch/local.py: error: {e}", file=sys.stderr)
        return 2
    print(f"launch/local.py: exit codes {codes}", file=sys.stderr)
    if all(c == 0 for c in codes):
        return 0
    return next((c for c in codes if c > 0), 1)  # the process that failed, not the ones stopped after it


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
