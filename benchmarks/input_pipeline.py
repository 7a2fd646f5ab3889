"""Input throughput of the training iterator, and how evenly processes share the reading.

    python benchmarks/input_pipeline.py                       # every case below, 1 and 2 simulated hosts
    python benchmarks/input_pipeline.py --cases=text --batches=200

Each case builds `make_train_iterator` for the embedded corpora (the tokenizer is trained once and
cached), takes `--warmup` batches, then times `--batches` more. `--processes=P` builds the iterator
of every process p < P in turn in this one Python process (what each host of a P-host run would read)
and reports each one's tokens per second and the characters of documents it read: the read load.
Figures are for this machine's cores shared with whatever else runs; compare runs made side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CASES = {
    "text": dict(source="embedded", block_size=128, batch_size=16, vocab_size=1024),
    "text_workers": dict(source="embedded", block_size=128, batch_size=16, vocab_size=1024, num_workers=2),
    "sft": dict(source="embedded_sft", format="sft_text", block_size=128, batch_size=16, vocab_size=1024),
    "mixture": dict(
        source="embedded",
        block_size=128,
        batch_size=16,
        vocab_size=1024,
        mixture={"docs": dict(source="embedded", weight=3.0), "qa": dict(source="embedded_sft", weight=1.0)},
    ),
}


def _count_reads():
    """Counts the characters every source hands out (documents read), in this process's threads."""
    from jaxllm.data import sources

    counter = {"chars": 0}
    original = sources.RowSource.__getitem__

    def counted(self, index):
        row = original(self, index)
        counter["chars"] += len(row) if isinstance(row, str) else len(json.dumps(row, default=str))
        return row

    sources.RowSource.__getitem__ = counted
    return counter


def run_case(name: str, batches: int, warmup: int, processes: int) -> list[dict]:
    from jaxllm.data.config import DataConfig
    from jaxllm.data.pipeline import make_train_iterator, tokenizer_for

    cfg = DataConfig(**CASES[name])
    tok = tokenizer_for(dataclasses.replace(cfg, mixture=None) if cfg.mixture else cfg)
    counter = _count_reads()
    out = []
    for p in range(processes):
        counter["chars"] = 0
        t0 = time.perf_counter()
        it = make_train_iterator(cfg, tok, process_index=p, process_count=processes)
        for _ in range(warmup):
            next(it)
        t1 = time.perf_counter()
        tokens = 0
        for _ in range(batches):
            tokens += int(next(it)["inputs"].size)
        t2 = time.perf_counter()
        out.append(
            dict(
                case=name,
                processes=processes,
                process=p,
                first_batches_s=round(t1 - t0, 2),
                batches_per_s=round(batches / (t2 - t1), 1),
                tokens_per_s=round(tokens / (t2 - t1)),
                chars_read=counter["chars"],
                workers=cfg.num_workers,
            )
        )
        close = getattr(it, "close", None)
        if close:
            close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--processes", default="1,2")
    args = parser.parse_args()
    for name in args.cases.split(","):
        for processes in map(int, args.processes.split(",")):
            for row in run_case(name, args.batches, args.warmup, processes):
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
