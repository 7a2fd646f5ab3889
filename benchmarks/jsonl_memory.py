"""Peak host memory of reading a JSONL corpus through the training source (`JsonlSource`) and tokenizing
every row, for the same text as a few very long lines and as ordinary lines.

A line over `jaxllm.data.sources.MAX_LINE_BYTES` (16 MiB) is refused with one line naming file and line,
without being read whole; ordinary lines are read one at a time. Each case runs in a fresh process.

    python benchmarks/jsonl_memory.py [--mb 162] [--long_lines 3] [--workdir /tmp/jsonl_memory]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_CHILD = r"""
import resource, sys, time
from jaxllm import JaxllmError
from jaxllm.data.sources import JsonlSource
from jaxllm.data.tokenizer import load_tokenizer
tok = load_tokenizer(sys.argv[2], 0, ())
start = time.time()
try:
    src = JsonlSource([sys.argv[1]])
    tokens = sum(len(tok.encode(src[i])) for i in range(len(src)))
    result = f"{len(src)} rows, {tokens:,} tokens"
except JaxllmError as e:
    result = f"jaxllm: error: {e}"
print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB, "
      f"{time.time() - start:.1f} s; {result}")
"""


def _corpus(path: str, mb: int, lines: int) -> None:
    """About `mb` MB of the Python docs' text, as `lines` JSON lines."""
    from jaxllm.data.corpus import embedded_documents

    text = "\n\n".join(embedded_documents())
    per_line = mb * 1_000_000 // lines
    with open(path, "w") as f:
        for _ in range(lines):
            body = (text * (per_line // len(text) + 1))[:per_line]
            f.write(json.dumps({"text": body}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=162, help="size of the corpus text in MB")
    parser.add_argument("--long_lines", type=int, default=3, help="the corpus as this many lines")
    parser.add_argument("--normal_line_kb", type=int, default=10, help="line size of the ordinary layout")
    parser.add_argument("--workdir", default="/tmp/jsonl_memory")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    from jaxllm.data.config import DataConfig
    from jaxllm.data.pipeline import tokenizer_for

    tokenizer = tokenizer_for(DataConfig(vocab_size=512)).path  # trained once on the embedded docs, cached
    cases = {"long": args.long_lines, "normal": args.mb * 1000 // args.normal_line_kb}
    for name, lines in cases.items():
        path = os.path.join(args.workdir, f"{name}.jsonl")
        if not os.path.isfile(path):
            _corpus(path, args.mb, lines)
        out = (
            subprocess.run([sys.executable, "-c", _CHILD, path, tokenizer], capture_output=True, text=True, check=True)
            .stdout.strip()
            .splitlines()[-1]
        )
        print(f"{args.mb} MB as {lines:,} lines: {out}")


if __name__ == "__main__":
    main()
