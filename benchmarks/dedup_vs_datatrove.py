"""Near-duplicate removal: `jaxllm prep` (dedup only) against datatrove's MinHash pipeline with FineWeb's
settings (14 buckets x 8 hashes over word 5-grams, 64-bit hashes, no verification), on one generated corpus.

    pip install -e '.[bench]'                    # datatrove, with spaCy (its English word tokenizer) and xxhash
    python benchmarks/dedup_vs_datatrove.py
    python benchmarks/dedup_vs_datatrove.py --words=120 --replaced=3 --groups=60 --unrelated=300 --halves=60
    python benchmarks/dedup_vs_datatrove.py --jaxllm=dedup.threshold=0.8 --jaxllm=dedup.bands=16 \\
        --jaxllm=dedup.num_perm=128             # jaxllm at other dedup settings (repeatable config overrides)

The corpus (seeded, shuffled, one JSONL file): `groups` originals of `words` words, each with one near copy in
which `replaced` of its words are replaced by other words; `unrelated` further documents; `halves` documents
made of the first half of an original and a new second half (word 5-gram Jaccard about 0.33), which must stay.

Scoring does not care which document of a pair survives: a removal is right when it leaves one document of
its original-and-copy pair; removing an unrelated or half-overlapping document, or both of a pair, is wrong.
recall = right removals / copies planted, precision = right removals / all removals.

Each side runs in its own process, in that process alone (jaxllm `num_workers=1`; datatrove's tasks one after
another): docs/s is over the whole run (read the JSONL, deduplicate, write what is kept), imports excluded;
peak memory is the process's high-water resident set (VmHWM) from its start, imports included.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREP_CONFIG = os.path.join(ROOT, "configs", "prep_default.py")
DEDUP_ONLY = [
    "clean.enabled=False",
    "quality.enabled=False",
    "augment.enabled=False",
    "tokenize.enabled=False",
    "curriculum.enabled=False",
    "num_workers=1",
    "progress=False",
]


def make_corpus(args: argparse.Namespace, folder: str) -> dict:
    """Writes folder/corpus/part-0000.jsonl ({"id", "text"}); returns each document's kind and group (documents
    of one group should collapse to one) and the mean word 5-gram Jaccard of the planted pairs and halves."""
    import numpy as np

    from jaxllm.prep import synthetic

    rng = np.random.default_rng([args.seed, 0x646475])
    base = args.seed * 10_000_000
    docs: list[tuple[str, str, int]] = []  # (text, kind, group)
    originals = [synthetic.document(base + g, args.words, args.words + 1) for g in range(args.groups)]
    copies = [synthetic.edit(d, args.replaced / args.words, rng) for d in originals]
    for g, (orig, copy) in enumerate(zip(originals, copies)):
        docs += [(orig, "original", g), (copy, "near_copy", g)]
    for i in range(args.unrelated):
        docs.append((synthetic.document(base + 3_000_000 + i, args.words, args.words + 1), "unrelated", -1))
    half = args.words // 2
    halves = []
    for i in range(args.halves):
        fresh = synthetic.document(base + 6_000_000 + i, args.words - half, args.words - half + 1)
        halves.append(
            (originals[i % args.groups], " ".join(originals[i % args.groups].split(" ")[:half] + fresh.split(" ")))
        )
        docs.append((halves[-1][1], "half_overlap", -1))
    docs = [docs[i] for i in rng.permutation(len(docs))]
    if len({text for text, _, _ in docs}) != len(docs):
        raise AssertionError("generated documents must be distinct texts")
    os.makedirs(os.path.join(folder, "corpus"))
    with open(os.path.join(folder, "corpus", "part-0000.jsonl"), "w") as f:
        for i, (text, _, _) in enumerate(docs):
            f.write(json.dumps({"id": str(i), "text": text}) + "\n")
    return {
        "kind": [k for _, k, _ in docs],
        "group": [g for _, _, g in docs],
        "pair_jaccard": float(np.mean([synthetic.jaccard(a, b) for a, b in zip(originals, copies)])),
        "half_jaccard": float(np.mean([synthetic.jaccard(a, b) for a, b in halves])) if halves else None,
    }


def run_jaxllm(folder: str, overrides: list[str]) -> list[str]:
    """`jaxllm prep` on the corpus with every stage but dedup off; returns the ids of the documents kept."""
    import contextlib

    from array_record.python.array_record_module import ArrayRecordReader

    from jaxllm.cli import run

    inputs = os.path.join(folder, "corpus", "*.jsonl")
    out = os.path.join(folder, "jaxllm_out")
    with contextlib.redirect_stdout(sys.stderr):
        run(
            ["prep", f"--input={inputs}", f"--output={out}", f"--config={PREP_CONFIG}"]
            + [f"--config.{o}" for o in DEDUP_ONLY + overrides]
        )
    kept_texts = set()
    for name in sorted(os.listdir(out)):
        if name.endswith(".array_record"):
            reader = ArrayRecordReader(os.path.join(out, name))
            kept_texts.update(json.loads(r)["text"] for r in reader.read_all())
            reader.close()
    with open(os.path.join(folder, "corpus", "part-0000.jsonl")) as f:
        return [row["id"] for row in map(json.loads, f) if row["text"] in kept_texts]


def run_datatrove(folder: str) -> list[str]:
    """datatrove's four MinHash stages as FineWeb runs them (signatures, buckets, clusters, filter), in this
    process; returns the ids of the documents kept."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    cfg = MinhashConfig(hash_config=HashConfig(precision=64), num_buckets=14, hashes_per_bucket=8, n_grams=5)
    corpus, work = os.path.join(folder, "corpus"), os.path.join(folder, "datatrove")
    stages = [
        ([JsonlReader(corpus), MinhashDedupSignature(output_folder=f"{work}/signatures", config=cfg)], 1),
        (
            [MinhashDedupBuckets(input_folder=f"{work}/signatures", output_folder=f"{work}/buckets", config=cfg)],
            cfg.num_buckets,
        ),
        ([MinhashDedupCluster(input_folder=f"{work}/buckets", output_folder=f"{work}/remove_ids", config=cfg)], 1),
        (
            [
                JsonlReader(corpus),
                MinhashDedupFilter(input_folder=f"{work}/remove_ids"),
                JsonlWriter(f"{work}/kept", compression=None),
            ],
            1,
        ),
    ]
    for i, (pipeline, tasks) in enumerate(stages):
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=1, logging_dir=f"{work}/logs/{i}").run()
    kept = []
    for name in sorted(os.listdir(f"{work}/kept")):
        with open(os.path.join(work, "kept", name)) as f:
            kept += [json.loads(line)["id"] for line in f]
    return kept


def peak_rss_mb() -> float:
    """This process's high-water resident set since it started (Linux VmHWM; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(side: str, folder: str, overrides: list[str]) -> None:
    if side == "jaxllm":  # imports outside the timed part
        import jaxllm.cli  # noqa: F401
        import jaxllm.prep  # noqa: F401
    else:
        import datatrove.pipeline.dedup.minhash  # noqa: F401
        import spacy  # noqa: F401  (datatrove's English word tokenizer imports it on first use)
    start = time.perf_counter()
    kept = run_jaxllm(folder, overrides) if side == "jaxllm" else run_datatrove(folder)
    seconds = time.perf_counter() - start
    print(json.dumps({"kept": kept, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}))


def score(corpus: dict, kept_ids: list[str]) -> dict:
    kept = set(map(int, kept_ids))
    removed = [i not in kept for i in range(len(corpus["kind"]))]
    per_group: dict[int, list[bool]] = {}
    for g, r in zip(corpus["group"], removed):
        if g >= 0:
            per_group.setdefault(g, []).append(r)
    right = sum(min(sum(rs), len(rs) - 1) for rs in per_group.values())
    wanted = sum(len(rs) - 1 for rs in per_group.values())
    total = sum(removed)
    by_kind = {}
    for kind, r in zip(corpus["kind"], removed):
        by_kind[kind] = by_kind.get(kind, 0) + r
    return {
        "recall": round(right / max(1, wanted), 3),
        "precision": round(right / total, 3) if total else 1.0,
        "removed": total,
        "pairs_collapsed": right,
        "pairs": wanted,
        "pairs_fully_removed": sum(all(rs) for rs in per_group.values()),
        "unrelated_removed": by_kind.get("unrelated", 0),
        "halves_removed": by_kind.get("half_overlap", 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=300, help="originals, each with one near copy")
    parser.add_argument("--unrelated", type=int, default=2400, help="documents with no copy")
    parser.add_argument("--halves", type=int, default=300, help="half of an original + a new half (must stay)")
    parser.add_argument("--words", type=int, default=120, help="words per document")
    parser.add_argument("--replaced", type=int, default=3, help="words replaced in each near copy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--jaxllm",
        action="append",
        default=[],
        help="config override for jaxllm's side, e.g. dedup.threshold=0.8 (repeatable)",
    )
    parser.add_argument("--sides", default="jaxllm,datatrove")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)  # JSON: one side, this process
    args = parser.parse_args()
    if args.child:
        job = json.loads(args.child)
        child(job["side"], job["folder"], job["overrides"])
        return
    with tempfile.TemporaryDirectory() as folder:
        corpus = make_corpus(args, folder)
        n = len(corpus["kind"])
        print(
            json.dumps(
                {
                    "corpus": {
                        "docs": n,
                        "originals": args.groups,
                        "near_copies": args.groups,
                        "unrelated": args.unrelated,
                        "halves": args.halves,
                        "words": args.words,
                        "replaced": args.replaced,
                        "pair_jaccard_mean": round(corpus["pair_jaccard"], 3),
                        "half_jaccard_mean": corpus["half_jaccard"] and round(corpus["half_jaccard"], 3),
                    }
                }
            )
        )
        for side in args.sides.split(","):
            job = json.dumps({"side": side, "folder": folder, "overrides": args.jaxllm if side == "jaxllm" else []})
            done = subprocess.run(
                [sys.executable, os.path.abspath(__file__), f"--child={job}"], capture_output=True, text=True
            )
            if done.returncode:
                sys.exit(f"{side}: failed\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            settings = (
                "14 buckets x 8 hashes, 5-grams, no verification"
                if side == "datatrove"
                else " ".join(args.jaxllm) or "defaults"
            )
            print(
                json.dumps(
                    {
                        "side": side,
                        "settings": settings,
                        **score(corpus, result["kept"]),
                        "seconds": round(result["seconds"], 2),
                        "docs_per_s": round(n / result["seconds"], 1),
                        "peak_rss_mb": round(result["peak_rss_mb"], 1),
                    }
                )
            )


if __name__ == "__main__":
    main()
