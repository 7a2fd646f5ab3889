"""Throughput and memory of `jaxllm prep` (clean + quality + exact/near dedup + tokenize + shards), and
the recall / precision of its MinHash-LSH stage on planted near-duplicates.

    python benchmarks/prep_throughput.py                       # 25 and 100 MB generated corpora
    python benchmarks/prep_throughput.py --sizes_mb=5 --dedup_quality
    python benchmarks/prep_throughput.py --input='corpus/*.jsonl'   # your own data, once

Each size runs in a fresh process, so its peak RSS is its own (main process and largest worker are
reported apart). The generated corpus repeats 5% of its documents exactly and 5% with a few words
changed, so both dedup stages have work. The tokenizer is trained on every run (empty cache).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_corpus(folder: str, megabytes: float, seed: int = 0, file_mb: float = 10.0) -> list[str]:
    """JSONL files of generated documents, 5% exact and 5% near copies mixed in."""
    import numpy as np

    from jaxllm.prep import synthetic

    rng = np.random.default_rng(seed)
    paths, f, written, file_bytes, i = [], None, 0, 0, 0
    while written < megabytes * 1e6:
        if f is None or file_bytes >= file_mb * 1e6:
            if f is not None:
                f.close()
            paths.append(os.path.join(folder, f"part-{len(paths):04d}.jsonl"))
            f, file_bytes = open(paths[-1], "w"), 0
        doc = synthetic.document(seed * 1_000_003 + i)
        roll = rng.random()
        if roll < 0.05 and i > 10:
            doc = synthetic.document(seed * 1_000_003 + int(rng.integers(i)))
        elif roll < 0.10 and i > 10:
            doc = synthetic.edit(synthetic.document(seed * 1_000_003 + int(rng.integers(i))), 0.01, rng)
        line = json.dumps({"text": doc}) + "\n"
        f.write(line)
        written += len(line)
        file_bytes += len(line)
        i += 1
    f.close()
    return paths


def run_one(inputs: list[str], workers: int, vocab_size: int) -> dict:
    """One prepare() in this process; throughput and peak memory."""
    import dataclasses

    from jaxllm.prep import PrepConfig, prepare

    cfg = PrepConfig(num_workers=workers, progress=False)
    cfg = dataclasses.replace(cfg, tokenize=dataclasses.replace(cfg.tokenize, vocab_size=vocab_size))
    sampler = WorkerMemory()
    with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory() as cache:
        os.environ["JAXLLM_CACHE_DIR"] = cache
        start = time.time()
        sampler.start()
        stats = prepare(inputs, os.path.join(out, "prepared"), cfg)
        seconds = time.time() - start
        sampler.stop()
    mb_in = stats["stages"]["input"]["bytes_out"] / 1e6
    docs_in = stats["stages"]["input"]["docs_out"]
    return {
        "mb_in": round(mb_in, 2),
        "docs_in": docs_in,
        "records_out": stats["output"]["records"],
        "tokens_out": stats["output"]["tokens"],
        "seconds": round(seconds, 2),
        "mb_per_s": round(mb_in / seconds, 2),
        "docs_per_s": round(docs_in / seconds, 1),
        "pass_seconds": stats["pass_seconds"],
        "workers": workers,
        "removed": {name: st["removed"] for name, st in stats["stages"].items() if st["removed"]},
        "peak_rss_main_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_largest_worker_mb": round(sampler.peak_kb / 1024, 1),
    }


class WorkerMemory:
    """Samples the resident memory of this process's worker processes (Linux /proc) every 0.2 s.

    Not RUSAGE_CHILDREN: a child started by fork + exec inherits the parent's high-water mark at exec,
    so that figure reports the parent's memory, not the worker's.
    """

    def __init__(self):
        import threading

        self.peak_kb = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        me = str(os.getpid())
        while not self._done.wait(0.2):
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{pid}/status") as f:
                        status = dict(line.split(":", 1) for line in f if ":" in line)
                except OSError:
                    continue  # gone already
                if status.get("PPid", "").strip() == me and "VmRSS" in status:
                    self.peak_kb = max(self.peak_kb, int(status["VmRSS"].split()[0]))


def dedup_quality(threshold: float | None, seed: int = 0) -> list[dict]:
    """Recall per planted Jaccard band and overall precision of the near-dedup stage."""
    import numpy as np

    from jaxllm.prep import synthetic
    from jaxllm.prep.config import DedupConfig
    from jaxllm.prep.dedup import Deduplicator, MinHasher

    rows = []
    cfg = DedupConfig(exact=False, **({} if threshold is None else {"threshold": threshold}))
    for lo, hi in ((0.95, 1.0), (0.9, 0.95), (0.85, 0.9), (0.8, 0.85), (0.7, 0.8), (0.5, 0.7), (0.2, 0.5)):
        docs, _, jac = synthetic.planted_duplicates(300, 200, 0, seed=seed, duplicate_jaccard=(lo, hi))
        hasher, dedup = MinHasher(cfg), Deduplicator(cfg)
        dropped = np.array([dedup.check(None, hasher.signature(d)) != "" for d in docs])
        rows.append(
            {
                "jaccard": f"{lo:.2f}-{hi:.2f}",
                "dropped_fraction": round(float(dropped[300:].mean()), 3),
                "sources_dropped": int(dropped[:300].sum()),
            }
        )
    docs, is_dup, _ = synthetic.planted_duplicates(500, 250, 250, seed=seed)
    hasher, dedup = MinHasher(cfg), Deduplicator(cfg)
    dropped = np.array([dedup.check(None, hasher.signature(d)) != "" for d in docs])
    is_dup = np.array(is_dup)
    rows.append(
        {
            "jaccard": "dups 0.85-1 vs related 0.2-0.6",
            "recall": round(float((dropped & is_dup).sum() / is_dup.sum()), 3),
            "precision": round(float((dropped & is_dup).sum() / max(1, dropped.sum())), 3),
        }
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes_mb", default="25,100", help="generated corpus sizes, comma-separated")
    parser.add_argument("--input", action="append", default=[], help="measure these inputs instead (repeatable)")
    parser.add_argument("--workers", type=int, default=0, help="0 = all cores")
    parser.add_argument("--vocab_size", type=int, default=8000)
    parser.add_argument("--dedup_quality", action="store_true", help="also measure near-dedup recall/precision")
    parser.add_argument("--threshold", type=float, default=None, help="near-dedup threshold (default: the config's)")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)  # JSON: one measurement, this process
    args = parser.parse_args()
    if args.child:
        job = json.loads(args.child)
        print(json.dumps(run_one(job["inputs"], job["workers"], job["vocab_size"])))
        return
    jobs = [("input", args.input)] if args.input else [(f"{mb} MB", float(mb)) for mb in args.sizes_mb.split(",")]
    for label, what in jobs:
        with tempfile.TemporaryDirectory() as folder:
            inputs = what if isinstance(what, list) else make_corpus(folder, what)
            child = json.dumps({"inputs": inputs, "workers": args.workers, "vocab_size": args.vocab_size})
            done = subprocess.run(
                [sys.executable, os.path.abspath(__file__), f"--child={child}"], capture_output=True, text=True
            )
            if done.returncode:
                sys.exit(f"{label}: failed\n{done.stderr[-3000:]}")
            print(json.dumps({"corpus": label, **json.loads(done.stdout.strip().splitlines()[-1])}))
    if args.dedup_quality:
        for row in dedup_quality(args.threshold):
            print(json.dumps(row))


if __name__ == "__main__":
    main()
