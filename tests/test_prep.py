"""Tests for jaxllm.prep: readers, stages, dedup quality, shards the training pipeline reads, the CLI."""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import re
import sys

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from jaxllm import JaxllmError
from jaxllm.config import load_config
from jaxllm.prep import PrepConfig, augment, curriculum, prepare, synthetic
from jaxllm.prep.clean import clean, quality
from jaxllm.prep.config import AugmentConfig, CleanConfig, DedupConfig, InputConfig, QualityConfig
from jaxllm.prep.dedup import Deduplicator, MinHasher, exact_key
from jaxllm.prep.readers import Reader, resolve_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREP_CONFIG = os.path.join(ROOT, "configs", "prep_default.py")


def _cfg(**sections) -> PrepConfig:
    """The default config with small-corpus settings and section overrides, e.g. dedup=dict(near=False)."""
    base = PrepConfig(num_workers=1, progress=False)
    changes = {"tokenize": dataclasses.replace(base.tokenize, vocab_size=320)}
    for name, value in sections.items():
        changes[name] = (
            dataclasses.replace(changes.get(name, getattr(base, name)), **value) if isinstance(value, dict) else value
        )
    return dataclasses.replace(base, **changes)


def _records(folder) -> list[dict]:
    out = []
    for path in sorted(glob.glob(os.path.join(str(folder), "*.array_record"))):
        reader = ArrayRecordReader(path)
        out += [json.loads(r) for r in reader.read_all()]
        reader.close()
    return out


def _write_jsonl(path, docs, field="text") -> str:
    path.write_text("".join(json.dumps({field: d, "level": i % 7}) + "\n" for i, d in enumerate(docs)))
    return str(path)


# ---------------------------------------------------------------- config and CLI


def test_default_config_builds_and_rejects_unknown_keys():
    cfg = PrepConfig.from_config(load_config(PREP_CONFIG))
    assert cfg == PrepConfig()  # the file and the dataclass defaults agree
    with open(PREP_CONFIG) as f:
        body = f.read().split("def get_config", 1)[1]
    keys = [
        line
        for line in body.splitlines()
        if re.match(r"\s+(c\.)?\w+ = |\s+\w+=", line) and not line.strip().startswith("c = ")
    ]
    assert len(keys) > 50 and [k for k in keys if "#" not in k] == []  # every key says what it does
    with pytest.raises(JaxllmError, match="unknown config key 'dedup.treshold'; did you mean 'dedup.threshold'"):
        load_config(PREP_CONFIG, ["dedup.treshold=0.5"])
    with pytest.raises(JaxllmError, match="unknown config key clean.foo"):
        PrepConfig.from_config({"clean": {"foo": 1}})
    with pytest.raises(JaxllmError, match="num_perm=128 must be a multiple of dedup.bands=20"):
        PrepConfig.from_config({"dedup": {"num_perm": 128}})
    with pytest.raises(JaxllmError, match="clean.unicode='NFD' is not known"):
        PrepConfig.from_config({"clean": {"unicode": "NFD"}})


def test_cli_prep(tmp_path, capsys):
    from jaxllm.cli import run

    src = _write_jsonl(tmp_path / "docs.jsonl", [synthetic.document(i) for i in range(30)])
    out = tmp_path / "out"
    assert (
        run(
            [
                "prep",
                f"--input={src}",
                f"--output={out}",
                "--config.progress=false",
                "--config.num_workers=1",
                "--config.tokenize.vocab_size=300",
                "--config.curriculum.num_buckets=2",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["records"] == 30 and summary["shards"] == 1 and os.path.isfile(summary["report"])
    assert {r["bucket"] for r in _records(out)} == {0, 1}
    with pytest.raises(JaxllmError, match="matches no files"):
        run(["prep", f"--input={tmp_path / 'missing' / '*.txt'}", f"--output={tmp_path / 'o2'}"])
    assert not os.path.exists(tmp_path / "o2")


def _short_docs(n: int, words: list[str]) -> list[str]:
    """`n` short documents of random sentences over a few `words`: few pieces for a tokenizer to learn."""
    rng = np.random.default_rng(0)
    return [
        " ".join(
            " ".join(rng.choice(words, rng.integers(6, 13))).capitalize() + "." for _ in range(rng.integers(6, 11))
        )
        + f" Page {i}.\n"
        for i in range(n)
    ]


def test_default_vocab_is_capped_to_a_small_corpus(tmp_path, capsys):
    """535 short files support too few pieces for 8000: the default trains the most the corpus supports,
    rounded down to a multiple of 128, else of 8, and says so; a vocab_size the user set still errs."""
    import sentencepiece as spm

    from jaxllm.cli import run
    from jaxllm.data import tokenizer

    (tmp_path / "small").mkdir()
    for i, doc in enumerate(_short_docs(535, ["river", "stone", "light", "garden", "winter"])):
        (tmp_path / "small" / f"{i:03d}.txt").write_text(doc)
    argv = ["prep", f"--input={tmp_path / 'small' / '*.txt'}", "--config.progress=false", "--config.num_workers=1"]
    with pytest.raises(
        JaxllmError, match=r"^tokenize.vocab_size=8000 is too large for this corpus \(at most \d+\)"
    ) as too_large:
        run([*argv, f"--output={tmp_path / 'set'}", "--config.tokenize.vocab_size=8000"])
    with pytest.raises(JaxllmError, match=r"^tokenize.vocab_size=100 is too small .* 100 vs \d+\)") as too_small:
        run([*argv, f"--output={tmp_path / 'set'}", "--config.tokenize.vocab_size=100"])
    most = int(re.search(r"at most (\d+)", str(too_large.value))[1])
    assert most // 128 * 128 < int(re.search(r"vs (\d+)", str(too_small.value))[1]) <= most // 8 * 8
    capsys.readouterr()
    assert run([*argv, f"--output={tmp_path / 'out'}"]) == 0
    pieces = spm.SentencePieceProcessor(model_file=str(tmp_path / "out" / "tokenizer.model")).get_piece_size()
    assert pieces == most // 8 * 8  # a multiple of 128 would not hold the corpus's characters
    assert (
        f"jaxllm: note: prep: this corpus supports fewer than 8000 tokenizer pieces; trained {pieces}"
        in capsys.readouterr().err
    )
    assert (
        f"tokenize.tokenizer = trained, {pieces} pieces (capped: the corpus supports fewer than 8000)"
        in (tmp_path / "out" / "report.md").read_text()
    )
    texts = _short_docs(535, ["river", "stone", "light", "garden", "winter", "morning"])
    settings = dict(tokenizer._TRAINER_SETTINGS, vocab_size=8000)
    with pytest.raises(JaxllmError, match=r"at most (\d+)") as too_large:
        tokenizer._train(texts, settings)
    most = int(re.search(r"at most (\d+)", str(too_large.value))[1])
    proto = tokenizer._train(texts, settings, capped=True)  # here the multiple of 128 holds them
    assert spm.SentencePieceProcessor(model_proto=proto).get_piece_size() == most // 128 * 128 > 256


# ---------------------------------------------------------------- inputs


def test_inputs_of_every_kind_and_bad_input_is_counted(tmp_path):
    good = [synthetic.document(i) for i in range(6)]
    (tmp_path / "a.txt").write_text(good[0])
    (tmp_path / "b.txt").write_bytes(good[1].encode() + b" caf\xe9 \xff")  # latin-1 and a stray byte
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("  \n\n ")
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"text": good[2]})
        + "\n\n"
        + '{"body": "no text field"}\n'
        + "{not json\n"
        + json.dumps({"text": 5})
        + "\n"
        + '["a list"]\n'
        + json.dumps({"text": "x" * 5000})
        + "\n"
    )
    (tmp_path / "d.json").write_text(json.dumps([{"text": good[3]}, {"text": good[4]}]))
    with gzip.open(tmp_path / "e.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": good[5]}) + "\n")
    (tmp_path / "huge.txt").write_text("y" * 6000)  # one 6 KB line
    reader = Reader(InputConfig(max_doc_bytes=4096))
    docs = list(reader.read(resolve_inputs([str(tmp_path / "*")])))
    texts = [d[0] for d in docs]
    assert good[0] in texts and good[2] in texts and good[3] in texts and good[5] in texts
    assert any(t.startswith(good[1]) and t.endswith("caf\ufffd \ufffd") for t in texts)
    assert "y" * 4096 in texts  # cut at the cap (no line end to cut at)
    assert reader.problems() == {
        "bad_json": 1,
        "empty_file": 2,
        "missing_field": 1,
        "not_an_object": 1,
        "not_text": 1,
        "too_long_dropped": 1,
        "too_long_truncated": 1,
        "undecodable": 1,
    }

    skip = Reader(InputConfig(decode_errors="skip", too_long="skip", max_doc_bytes=4096))
    texts = [d[0] for d in skip.read(resolve_inputs([str(tmp_path / "*.txt")]))]
    assert texts == [good[0]] and skip.counts["undecodable_dropped"] == 1 and skip.counts["too_long_dropped"] == 1
    ignore = Reader(InputConfig(decode_errors="ignore"))
    assert [d[0] for d in ignore.read([("text", str(tmp_path / "b.txt"))])] == [good[1] + " caf "]

    with pytest.raises(JaxllmError, match=r"^input '.*nope\*\.txt' matches no files; fix the path or glob$"):
        resolve_inputs([str(tmp_path / "nope*.txt")])
    with pytest.raises(JaxllmError, match="tfds:NAME:SPLIT"):
        resolve_inputs(["tfds:"])
    assert resolve_inputs(["tfds:my_set", f"json:{tmp_path / 'a.txt'}", str(tmp_path)])[:2] == [
        ("tfds", "my_set:train"),
        ("json", str(tmp_path / "a.txt")),
    ]


def test_paragraphs_long_lines_and_whole_pipeline_never_crashes(tmp_path):
    (tmp_path / "p.txt").write_bytes(b"first block\nline two\n\n\n  \nsecond\r\n\r\n" + b"z" * 3000 + b"\nend\n")
    reader = Reader(InputConfig(text_split="paragraph", max_doc_bytes=1000))
    texts = [d[0] for d in reader.read([("text", str(tmp_path / "p.txt"))])]
    assert texts[:2] == ["first block\nline two", "second"] and len(texts) == 3
    assert texts[2] == "z" * 1000 and reader.counts["too_long_line"] == 1  # the line is cut, then the block
    assert reader.counts["too_long_truncated"] == 1
    # Bad input of every kind through prepare: counted in stats, never an exception.
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "\xff\xfe"}\n{"nope": 1}\n{oops\n\n')
    stats = prepare(
        [str(tmp_path / "*")],
        str(tmp_path / "out"),
        _cfg(
            input=dict(text_split="paragraph", max_doc_bytes=1000),
            quality=dict(enabled=False),
            tokenize=dict(enabled=False),
        ),
    )
    assert stats["stages"]["input"]["removed"] == {"bad_json": 1, "missing_field": 1}
    assert stats["stages"]["input"]["notes"]["undecodable"] == 1
    assert stats["output"]["records"] == 4 and stats["output"]["tokens"] is None


def test_parquet_and_tfds_inputs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import tensorflow_datasets as tfds

    docs = [synthetic.document(i) for i in range(8)]
    pq.write_table(
        pa.table({"content": docs[:5], "level": [5, 4, 3, 2, 1]}), tmp_path / "train-0.parquet", row_group_size=2
    )
    pq.write_table(pa.table({"other": ["x"]}), tmp_path / "nofield.parquet")

    class PrepTinyDocs(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict({"content": tfds.features.Text()})
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, d in enumerate(docs[5:]):
                yield i, {"content": d}

    PrepTinyDocs(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
    cfg = _cfg(
        input=dict(text_field="content", tfds_data_dir=str(tmp_path / "tfds")),
        tokenize=dict(enabled=False),
        curriculum=dict(length_weight=0.0, field_weight=1.0, field="level", num_buckets=5),
    )
    stats = prepare([str(tmp_path / "*.parquet"), "tfds:prep_tiny_docs:train"], str(tmp_path / "out"), cfg)
    assert stats["stages"]["input"]["removed"] == {"missing_field": 1}
    records = _records(tmp_path / "out")
    assert sorted(r["text"] for r in records) == sorted(docs)
    # field score: TFDS rows have no level (lowest), then levels 1..5 easy to hard
    parquet = [r for r in records if r["source"].endswith(".parquet")]
    assert [docs.index(r["text"]) for r in parquet] == [4, 3, 2, 1, 0]
    assert all(r["source"] == "tfds:prep_tiny_docs:train" for r in records[:3])


# ---------------------------------------------------------------- stages


def test_clean_normalizes_and_filters():
    text = "Ｆｕｌｌ\u200b width\x07 cafe\u0301  \r\nline   \r\n\n\n\n\nnext\t \n"
    nfc, _ = clean(text, CleanConfig())
    assert nfc == "Ｆｕｌｌ width café\nline\n\nnext"
    nfkc, _ = clean(text, CleanConfig(unicode="NFKC", whitespace="all"))
    assert nfkc == "Full width café\nline\n\nnext"
    assert clean(text, CleanConfig(unicode="none", strip_control=False, whitespace="none"))[0] == text
    assert clean("\x00\u200b \n", CleanConfig()) == (None, "empty_after_clean")
    assert clean("short", CleanConfig(min_chars=10)) == (None, "too_short")
    assert clean("long" * 10, CleanConfig(max_chars=10)) == (None, "too_long")


@pytest.mark.parametrize(
    "text,reason",
    [
        ("word " * 10, "too_few_words"),
        ("a b c de " * 20, "mean_word_length_low"),
        ("extraordinarily " * 60, "mean_word_length_high"),
        ("# heading words here\n" * 30, "symbol_word_ratio"),
        ("\n".join(f"- bullet item number {i} here" for i in range(30)), "bullet_lines"),
        (
            "\n".join(
                f"trailing line {synthetic.VOCAB[i]} words more..."
                if i % 2
                else f"plain line {synthetic.VOCAB[i]} good words"
                for i in range(40)
            ),
            "ellipsis_lines",
        ),
        (" ".join(f"{i} 3.5 7x9 1990" if i % 2 else f"word{synthetic.VOCAB[i]}" for i in range(60)), "non_alpha_words"),
        (
            "\n".join(
                ["the same line repeats itself here"] * 10 + [f"unique {w} line {w} text" for w in synthetic.VOCAB[:12]]
            ),
            "duplicate_lines",
        ),
        ((("turn the handle ") * 30) + " ".join(synthetic.VOCAB[:30]), "top_2gram_fraction"),
    ],
)
def test_each_gopher_rule_fires(text, reason):
    cfg = QualityConfig(
        max_duplicate_line_fraction=0.3 if reason == "duplicate_lines" else 0.0,
        top_ngram_max_fractions=(0.2, 0.18, 0.16) if reason.startswith("top_") else (),
    )
    assert quality(text, cfg)[:2] == (None, reason)
    assert quality(synthetic.document(3), QualityConfig())[1] == ""  # generated prose passes every rule


def test_c4_rules():
    doc = synthetic.document(5)
    lines = doc.split("\n") + ["Enable JavaScript to view this page.", "no punctuation here", "Ok."]
    text = "\n".join(lines)
    kept, reason, removed = quality(text, QualityConfig(c4_javascript=True))
    assert reason == "" and removed == 1 and "JavaScript" not in kept and "no punctuation here" in kept
    kept, _, removed = quality(text, QualityConfig(c4_terminal_punctuation=True, c4_min_words_per_line=2))
    assert "no punctuation here" not in kept and "\nOk." not in kept and removed == 2
    assert quality(doc + "\nLorem ipsum dolor.", QualityConfig(c4_lorem_ipsum=True))[1] == "c4_lorem_ipsum"
    assert quality(doc + "\nx = {1}.", QualityConfig(c4_curly_bracket=True))[1] == "c4_curly_bracket"


ENGLISH = (
    "In the morning the river moves slowly through the valley while the fishermen wait on the bank. "
    "Children walk to school talking about their plans for the holidays, the bakers open their doors, "
    "and the smell of warm bread spreads through the narrow streets of the village. Later the market "
    "fills with people, neighbours share the news, and everyone prepares the midday meal with care."
)
FRENCH = (
    "Le matin, la rivière traverse lentement la vallée et les pêcheurs attendent sur la rive. Les enfants "
    "marchent vers l'école en parlant de leurs projets pour les vacances, tandis que les boulangers ouvrent "
    "leurs portes et que l'odeur du pain chaud se répand dans les rues étroites du village. Plus tard, le "
    "marché s'anime, les voisins échangent des nouvelles et chacun prépare le repas de midi avec soin."
)


def test_language_filter(monkeypatch):
    from jaxllm.prep import clean as clean_lib

    english = ENGLISH
    assert quality(english, QualityConfig(languages=("en",)))[1] == ""
    assert quality(english, QualityConfig(languages=("fr", "de")))[1] == "language"
    assert quality(FRENCH, QualityConfig())[1] == ""  # passes every Gopher rule
    assert quality(FRENCH, QualityConfig(languages=("en",)))[1] == "language"
    assert quality(FRENCH, QualityConfig(languages=("en", "fr")))[1] == ""
    lang, prob = clean_lib.language(FRENCH, QualityConfig(language_sample_chars=40))  # less text, less sure
    assert lang == "fr" and 0.5 < prob < 0.99
    short = dict(languages=("fr",), language_sample_chars=40)
    assert quality(FRENCH, QualityConfig(**short, min_language_score=0.5))[1] == ""
    assert quality(FRENCH, QualityConfig(**short, min_language_score=0.99))[1] == "language"
    monkeypatch.setattr(clean_lib, "_LANGID", None)
    monkeypatch.setitem(sys.modules, "langid.langid", None)  # as if not installed
    with pytest.raises(JaxllmError, match=r"quality.languages needs langid: pip install 'jaxllm\[langid\]'"):
        QualityConfig(languages=("en",))
    QualityConfig(languages=("en",), enabled=False)  # off: not needed


def test_exact_dedup_normalizes_case_and_space():
    dedup = Deduplicator(DedupConfig(near=False))
    assert dedup.check(exact_key("Hello  World\n"), None) == ""
    assert dedup.check(exact_key("hello world"), None) == "exact_duplicate"
    assert dedup.check(exact_key("hello world!"), None) == ""


def test_minhash_estimates_jaccard_and_is_deterministic():
    hasher = MinHasher(DedupConfig(num_perm=256, bands=16))
    rng = np.random.default_rng(0)
    errors = []
    for i in range(20):
        a = synthetic.document(i, 200, 300)
        b = synthetic.edit(a, rng.uniform(0.01, 0.2), rng)
        errors.append(np.mean(hasher.signature(a) == hasher.signature(b)) - synthetic.jaccard(a, b))
    assert abs(np.mean(errors)) < 0.03 and np.sqrt(np.mean(np.square(errors))) < 0.06  # sd of 256 perms ~0.03
    assert np.array_equal(MinHasher(DedupConfig()).signature(a), MinHasher(DedupConfig()).signature(a))
    assert not np.array_equal(MinHasher(DedupConfig(seed=1)).signature(a), MinHasher(DedupConfig()).signature(a))


def test_near_dedup_recall_and_precision_on_planted_duplicates():
    """Planted copies at Jaccard 0.85-1.0 must go, related docs at Jaccard 0.2-0.6 must stay."""
    docs, is_dup, _ = synthetic.planted_duplicates(200, 80, 80, seed=3)
    cfg = DedupConfig(exact=False)
    hasher, dedup = MinHasher(cfg), Deduplicator(cfg)
    dropped = np.array([dedup.check(None, hasher.signature(d)) == "near_duplicate" for d in docs])
    is_dup = np.array(is_dup)
    recall = (dropped & is_dup).sum() / is_dup.sum()
    precision = (dropped & is_dup).sum() / max(1, dropped.sum())
    assert recall >= 0.9 and precision >= 0.9, (recall, precision)
    assert not dropped[:200].any()  # the first occurrence is kept


def test_default_dedup_removes_near_copies_and_keeps_the_rest(tmp_path):
    """`prepare` at the default dedup settings, on 120-word documents: copies with 3 words replaced
    (word 5-gram Jaccard about 0.77) go; unrelated and half-overlapping documents (Jaccard about 0.33) stay."""
    rng = np.random.default_rng(7)
    originals = [synthetic.document(100 + i, 120, 121) for i in range(40)]
    copies = [synthetic.edit(d, 3 / 120, rng) for d in originals]
    unrelated = [synthetic.document(500 + i, 120, 121) for i in range(40)]
    halves = [
        " ".join(d.split(" ")[:60] + synthetic.document(900 + i, 60, 61).split(" "))
        for i, d in enumerate(originals[:20])
    ]
    must_stay = originals + unrelated + halves
    src = _write_jsonl(tmp_path / "d.jsonl", originals + unrelated + halves + copies)
    stats = prepare([src], str(tmp_path / "out"), _cfg(tokenize=dict(enabled=False)))
    kept = {r["text"] for r in _records(tmp_path / "out")}
    removed_copies = sum(c not in kept for c in copies)
    assert removed_copies >= 0.8 * len(copies), removed_copies
    assert [d for d in must_stay if d not in kept] == []
    assert stats["stages"]["near_dedup"]["removed"] == {"near_duplicate": removed_copies}


def test_first_index_keeps_the_first_value_across_merges(monkeypatch):
    from jaxllm.prep import dedup

    monkeypatch.setattr(dedup, "_MIN_MERGE", 7)  # merge into the sorted arrays often
    index, reference = dedup.FirstIndex(), {}
    rng = np.random.default_rng(0)
    for value in range(300):
        keys = np.unique(rng.integers(0, 400, 16).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
        assert index.get(keys).tolist() == [reference.get(int(k), -1) for k in keys]
        index.setdefault(keys, value)
        for k in keys.tolist():
            reference.setdefault(k, value)
    assert len(index) == len(reference) == 400 and len(index._recent) < len(reference)


def test_eda_augmentation():
    cfg = AugmentConfig(enabled=True, rate=0.2, copies=3, seed=1)
    text = "The big house is quite old.\nA happy child can begin to speak fast."
    variants = augment.variants(text, cfg)
    assert len(variants) == 3 and len(set(variants)) == 3 and variants == augment.variants(text, cfg)
    assert all(v.count("\n") == 1 for v in variants)
    assert augment.variants(text, dataclasses.replace(cfg, seed=2)) != variants
    only_syn = augment.variants(text, dataclasses.replace(cfg, ops=("synonym",), copies=1, rate=0.5))[0]
    changed = [(a, b) for a, b in zip(text.split(), only_syn.split()) if a != b]
    assert changed and all(augment._bare(b) in augment.SYNONYMS[augment._bare(a)] for a, b in changed)
    assert len(augment.variants(text, dataclasses.replace(cfg, ops=("delete",), copies=1))[0].split()) < len(
        text.split()
    )


def test_paraphrase_hook_calls_generate_text(tmp_path, monkeypatch):
    from jaxllm import load
    from jaxllm.models import generation as generate

    calls = []
    monkeypatch.setattr(load, "load_model", lambda path: calls.append(path) or ("model", "params", "tok", True))

    def fake_generate_text(model, params, tokenizer, prompts, gen, *, add_bos, batch_size):
        assert (model, tokenizer, add_bos, gen.max_new_tokens) == ("model", "tok", True, 16)
        return [" " + p.split("Text: ")[1].split("\n")[0].upper() for p in prompts]

    monkeypatch.setattr(generate, "generate_text", fake_generate_text)
    docs = [synthetic.document(i) for i in range(10)]
    src = _write_jsonl(tmp_path / "d.jsonl", docs)
    cfg = _cfg(
        augment=dict(
            enabled=True,
            ops=(),
            paraphrase_model=str(tmp_path / "model"),
            paraphrase_max_new_tokens=16,
            paraphrase_fraction=0.5,
        ),
        tokenize=dict(enabled=False),
    )
    stats = prepare([src], str(tmp_path / "out"), cfg)
    paraphrased = [r for r in _records(tmp_path / "out") if r["source"].startswith("paraphrase:")]
    n = sum(augment.wants_paraphrase(d, cfg.augment) for d in docs)
    assert calls == [str(tmp_path / "model")] and 0 < n < 10 and len(paraphrased) == n
    assert stats["stages"]["augment"]["notes"]["paraphrases"] == n
    assert all(r["text"] == r["text"].upper() for r in paraphrased)


def test_curriculum_scores_buckets_and_order():
    assert np.allclose(curriculum.percentile_ranks(np.array([3.0, 1.0, 2.0, 2.0, np.nan])), [1, 0.25, 0.625, 0.625, 0])
    cfg = PrepConfig().curriculum
    score = curriculum.scores(cfg, np.array([50.0, 10, 30, 20, 40, 60, 70, 80]), None, np.zeros(8))
    bucket, order = curriculum.buckets_and_order(cfg, score)
    assert order.tolist() == [1, 3, 2, 4, 0, 5, 6, 7] and bucket.tolist() == [2, 0, 1, 0, 1, 2, 3, 3]
    log_freq = curriculum.log_frequencies(np.array([100, 1, 0]))
    assert curriculum.rarity(np.array([1, 2]), log_freq) > curriculum.rarity(np.array([0, 0]), log_freq)


# ---------------------------------------------------------------- prepare end to end


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """30 documents, 3 exact and 4 near duplicates, 3 junk documents, in JSONL and text files."""
    folder = tmp_path_factory.mktemp("corpus")
    docs = [synthetic.document(i) for i in range(30)]
    rng = np.random.default_rng(0)
    dups = [docs[0], docs[1].upper(), docs[2] + "\n"] + [synthetic.edit(docs[i], 0.01, rng) for i in range(3, 7)]
    junk = ["too short", "$$ 12 34 ## 56 ...\n" * 20, "- a\n- b\n" * 40]
    _write_jsonl(folder / "a.jsonl", docs[:20] + dups[:4] + junk)
    for i, doc in enumerate(docs[20:] + dups[4:]):
        (folder / f"doc{i:02d}.txt").write_text(doc)
    return folder


def test_prepare_end_to_end(corpus_dir, tmp_path):
    out = tmp_path / "out"
    stats = prepare([str(corpus_dir / "*.jsonl"), str(corpus_dir / "*.txt")], str(out), _cfg())
    st = stats["stages"]
    assert st["input"]["docs_out"] == 40
    assert sum(st["quality"]["removed"].values()) == 3 and st["exact_dedup"]["removed"] == {"exact_duplicate": 3}
    assert st["near_dedup"]["removed"] == {"near_duplicate": 4}
    for a, b in zip(list(st.values())[1:-1], list(st.values())[2:]):
        assert a["docs_out"] == b["docs_in"] and a["bytes_out"] == b["bytes_in"]
    assert sorted(os.listdir(out)) == ["data-00000-of-00001.array_record", "report.md", "stats.json", "tokenizer.model"]
    assert json.loads((out / "stats.json").read_text())["output"] == stats["output"]
    records = _records(out)
    assert len(records) == 30 == stats["output"]["records"]
    assert sorted(r["text"] for r in records) == sorted(synthetic.document(i) for i in range(30))
    from jaxllm.data.tokenizer import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.model"))
    assert tok.vocab_size == 320 and all(r["tokens"] == tok.encode(r["text"]) for r in records)
    assert stats["output"]["tokens"] == sum(len(r["tokens"]) for r in records) == stats["output"]["shards"][0]["tokens"]
    lengths = [len(r["tokens"]) for r in records]
    assert lengths == sorted(lengths)  # easy (short) to hard (long)
    assert [r["bucket"] for r in records] == sorted(r["bucket"] for r in records) and records[-1]["bucket"] == 3
    report = (out / "report.md").read_text()
    for needle in ("| exact_dedup | yes | 37 | 34 |", "near_duplicate: 4", "## Length histogram (tokens", "tokens: "):
        assert needle in report
    with pytest.raises(JaxllmError, match="already holds prep output"):
        prepare([str(corpus_dir / "*.jsonl")], str(out), _cfg())
    prepare(
        [str(corpus_dir / "*.jsonl")],
        str(out),
        _cfg(output=dict(overwrite=True, records_per_shard=7), tokenize=dict(enabled=False)),
    )
    names = sorted(os.listdir(out))
    assert names == [f"data-0000{i}-of-00003.array_record" for i in range(3)] + ["report.md", "stats.json"]


def test_rarity_curriculum_input_order_and_augmented_records(corpus_dir, tmp_path):
    cfg = _cfg(
        curriculum=dict(length_weight=0.0, rarity_weight=1.0, order="input", num_buckets=3),
        augment=dict(enabled=True, copies=1, rate=0.1),
        tokenize=dict(write_tokens=False),
    )
    stats = prepare([str(corpus_dir / "*.jsonl")], str(tmp_path / "out"), cfg)
    records = _records(tmp_path / "out")
    assert "tokens" not in records[0] and len(records) == 2 * 20 == stats["output"]["records"]
    assert [r["source"].split(":")[0] for r in records[:2]] == [str(corpus_dir / "a.jsonl"), "eda"]
    assert records[1]["text"] != records[0]["text"] and stats["stages"]["augment"]["notes"]["eda_variants"] == 20
    assert sorted({r["bucket"] for r in records}) == [0, 1, 2]
    # input order is kept; rarity ranks do not follow length
    scores = [r["score"] for r in records]
    assert scores != sorted(scores)


def test_workers_do_not_change_the_output(corpus_dir, tmp_path):
    inputs = [str(corpus_dir / "*.jsonl"), str(corpus_dir / "*.txt")]
    one = prepare(inputs, str(tmp_path / "one"), _cfg())
    two = prepare(inputs, str(tmp_path / "two"), dataclasses.replace(_cfg(), num_workers=2))
    assert _records(tmp_path / "one") == _records(tmp_path / "two")
    assert one["stages"] == two["stages"]


def test_a_failed_run_leaves_no_shards(corpus_dir, tmp_path, monkeypatch):
    from jaxllm.prep import core

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(core.ShardWriter, "finish", boom)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        prepare([str(corpus_dir / "*.jsonl")], str(out), _cfg())
    assert os.listdir(out) == []  # no shard, no stats.json, no temp folder


def test_bucket_output(corpus_dir, tmp_path, memory_root, monkeypatch):
    """--output on an object store (memory:// standing in for gs://): the local run's files, uploaded
    stats.json last; overwrite removes the old stats.json first; a failed run uploads nothing."""
    from etils import epath

    from jaxllm import atomic
    from jaxllm.prep import core
    from jaxllm.prep.output import render_report

    inputs = [str(corpus_dir / "*.jsonl")]
    local = prepare(inputs, str(tmp_path / "local"), _cfg())
    uploaded, removed, copy = [], [], atomic.copy
    monkeypatch.setattr(atomic, "copy", lambda src, dst: (uploaded.append(os.path.basename(dst)), copy(src, dst)))
    remote = prepare(inputs, memory_root, _cfg())
    root = epath.Path(memory_root)
    assert sorted(p.name for p in root.iterdir()) == sorted(os.listdir(tmp_path / "local")) == sorted(uploaded)
    assert uploaded[-1] == "stats.json" and uploaded[0].endswith(".array_record")
    for name in ("data-00000-of-00001.array_record", "tokenizer.model"):
        assert (root / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    stats = json.loads((root / "stats.json").read_text())
    assert stats["output"] == remote["output"] == local["output"]
    assert stats["tokenizer"] == memory_root + "/tokenizer.model"
    assert (root / "report.md").read_text() == render_report(stats)
    with pytest.raises(JaxllmError, match="already holds prep output"):
        prepare(inputs, memory_root, _cfg())
    unlink = type(root).unlink
    monkeypatch.setattr(type(root), "unlink", lambda self, **kw: (removed.append(self.name), unlink(self, **kw)))
    prepare(inputs, memory_root, _cfg(output={"overwrite": True, "records_per_shard": 7}, tokenize={"enabled": False}))
    removed = [name for name in removed if not name.startswith(".jaxllm-write-check")]
    assert removed[0] == "stats.json" and "tokenizer.model" in removed
    assert sorted(p.name for p in root.iterdir()) == [f"data-0000{i}-of-00003.array_record" for i in range(3)] + [
        "report.md",
        "stats.json",
    ]

    monkeypatch.setattr(core.ShardWriter, "finish", lambda self: (_ for _ in ()).throw(RuntimeError("disk full")))
    failed = memory_root + "/failed"
    with pytest.raises(RuntimeError, match="disk full"):
        prepare(inputs, failed, _cfg())
    assert not epath.Path(failed).exists() or list(epath.Path(failed).iterdir()) == []


def test_training_pipeline_reads_prep_shards(corpus_dir, tmp_path):
    from jaxllm.data.config import DataConfig
    from jaxllm.data.pipeline import make_train_iterator, tokenizer_for

    out = tmp_path / "out"
    prepare([str(corpus_dir / "*.jsonl"), str(corpus_dir / "*.txt")], str(out), _cfg())
    cfg = DataConfig(
        source="array_record",
        paths=(str(out / "*.array_record"),),
        text_field="text",
        tokenizer=str(out / "tokenizer.model"),
        block_size=32,
        batch_size=4,
        val_fraction=0.1,
    )
    tok = tokenizer_for(cfg)
    it = make_train_iterator(cfg, tok)
    for _ in range(3):
        batch = next(it)
        assert batch["inputs"].shape == (4, 32) and batch["inputs"].max() < tok.vocab_size
    text = tok.decode(batch["inputs"][0].tolist())
    assert any(text[5:40] in synthetic.document(i) for i in range(30))

    # A curriculum over prep's buckets: with all weight on bucket 0, training reads its records alone.
    records = _records(out)
    easy = [f",{','.join(map(str, r['tokens']))}," for r in records if r["bucket"] == 0]
    it = make_train_iterator(
        dataclasses.replace(cfg, curriculum_field="bucket", curriculum_schedule=((0, (1, 0, 0, 0)),)), tok
    )
    special = {tok.bos_id, tok.eos_id}
    for _ in range(4):
        batch = next(it)
        for inputs, segments in zip(batch["inputs"], batch["segment_ids"]):
            for seg in set(segments.tolist()):
                piece = [t for t in inputs[segments == seg].tolist() if t not in special]
                assert not piece or any(f",{','.join(map(str, piece))}," in e for e in easy)


# ---------------------------------------------------------------- the Apache Beam runner

BEAM_OPTIONS = ["--direct_num_workers=1", "--direct_running_mode=in_memory"]


@pytest.fixture(scope="module")
def messy_dir(corpus_dir, tmp_path_factory):
    """corpus_dir plus the bad input a crawl holds: undecodable bytes, an empty file, bad JSON rows."""
    folder = tmp_path_factory.mktemp("messy")
    for path in corpus_dir.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "latin1.txt").write_bytes(("caf\xe9 au lait, " * 60).encode("latin-1"))
    (folder / "empty.txt").write_bytes(b"")
    (folder / "b.jsonl").write_text('{"body": 1}\n{not json\n' + json.dumps({"text": synthetic.document(40)}) + "\n")
    return folder


def _same_output(local, beam, a: dict, b: dict) -> None:
    assert a["stages"] == b["stages"] and a["output"] == b["output"]
    assert _records(local) == _records(beam)
    assert sorted(os.listdir(local)) == sorted(os.listdir(beam))
    saved = [json.loads((folder / "stats.json").read_text()) for folder in (local, beam)]
    assert set(saved[1]) == set(b) == set(saved[0]) | {"runner"}  # what the Beam run returns; nothing internal
    if os.path.exists(local / "tokenizer.model"):
        assert (local / "tokenizer.model").read_bytes() == (beam / "tokenizer.model").read_bytes()


@pytest.mark.parametrize(
    "sections",
    [
        {},
        dict(
            augment=dict(enabled=True, copies=2, rate=0.1),
            output=dict(records_per_shard=7),
            curriculum=dict(length_weight=0.0, rarity_weight=1.0, order="input", num_buckets=3),
        ),
        dict(tokenize=dict(enabled=False), dedup=dict(exact=False), curriculum=dict(field="level", field_weight=1.0)),
    ],
    ids=["default", "augment_rarity_shards", "untokenized_field_curriculum"],
)
def test_beam_runner_equals_local(messy_dir, tmp_path, sections):
    from jaxllm.prep.beam import prepare_beam

    inputs, cfg = [str(messy_dir / "*.jsonl"), str(messy_dir / "*.txt")], _cfg(**sections)
    local = prepare(inputs, str(tmp_path / "local"), cfg)
    beam = prepare_beam(inputs, str(tmp_path / "beam"), cfg, options=BEAM_OPTIONS)
    _same_output(tmp_path / "local", tmp_path / "beam", local, beam)
    st = beam["stages"]
    assert st["near_dedup"]["removed"].get("near_duplicate", 0) >= (4 if cfg.dedup.exact else 0)
    assert st["input"]["removed"] and st["input"]["notes"]["undecodable"] == 1  # bad input was met and counted
    assert not [p for p in os.listdir(tmp_path / "beam") if p.startswith(".prep-tmp")]


def test_beam_cli_and_errors(corpus_dir, tmp_path, capsys, monkeypatch):
    from jaxllm.cli import run
    from jaxllm.prep import beam

    src, out = str(corpus_dir / "*.jsonl"), tmp_path / "out"
    assert (
        run(
            [
                "prep",
                f"--input={src}",
                f"--output={out}",
                "--runner=DirectRunner",
                f"--beam_options={' '.join(BEAM_OPTIONS)}",
                "--config.tokenize.vocab_size=320",
                "--config.progress=false",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["records"] == 20 and json.loads((out / "stats.json").read_text())["runner"] == "beam"
    with pytest.raises(JaxllmError, match="already holds prep output"):
        beam.prepare_beam([src], str(out), _cfg(), options=BEAM_OPTIONS)
    with pytest.raises(JaxllmError, match="--runner='NoSuchRunner'"):
        beam.prepare_beam([src], str(tmp_path / "o1"), _cfg(), runner="NoSuchRunner")
    with pytest.raises(JaxllmError, match="paraphrase_model .* needs|Beam runner does not"):
        beam.prepare_beam([src], str(tmp_path / "o1"), _cfg(augment=dict(enabled=True, paraphrase_model="m")))
    with pytest.raises(JaxllmError, match="matches no files"):
        beam.prepare_beam([str(tmp_path / "none*.txt")], str(tmp_path / "o1"), _cfg())
    with pytest.raises(JaxllmError, match="--beam_options needs a Beam --runner"):
        run(["prep", f"--input={src}", f"--output={tmp_path / 'o1'}", "--beam_options=--x=1"])
    # A user error inside a worker arrives as the one-line JaxllmError, and no output is left.
    with pytest.raises(JaxllmError, match=r"^tokenize.vocab_size=100000 is too large for this corpus"):
        beam.prepare_beam([src], str(tmp_path / "o2"), _cfg(tokenize=dict(vocab_size=100000)), options=BEAM_OPTIONS)
    assert os.listdir(tmp_path / "o2") == []

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(beam, "_write_shard", boom)
    with pytest.raises(Exception, match="disk full"):
        beam.prepare_beam([src], str(tmp_path / "o3"), _cfg(), options=BEAM_OPTIONS)
    assert os.listdir(tmp_path / "o3") == []


@pytest.fixture(scope="module")
def reference_model(corpus_dir, tmp_path_factory):
    """A tiny random-init Llama in a Hugging Face folder, with a SentencePiece tokenizer of the corpus."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from jaxllm import hf
    from jaxllm.models.config import ModelConfig
    from jaxllm.models.decoder import Decoder

    folder = tmp_path_factory.mktemp("reference")
    out = folder / "prepared"
    prepare([str(corpus_dir / "*.jsonl")], str(out), _cfg())
    cfg = ModelConfig(
        vocab_size=320,
        num_layers=2,
        embed_dim=32,
        num_heads=4,
        num_kv_heads=2,
        mlp_dim=64,
        max_seq_len=80,
        dtype="float32",
        init_std=0.3,
    )
    model = Decoder(cfg)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    hf.save_pretrained(model, params, str(folder / "model"))
    (folder / "model" / "tokenizer.model").write_bytes((out / "tokenizer.model").read_bytes())
    return str(folder / "model")


def test_reference_model_loss_orders_the_curriculum(messy_dir, reference_model, tmp_path):
    from jaxllm.prep import curriculum
    from jaxllm.prep.beam import prepare_beam

    cfg = _cfg(
        curriculum=dict(
            length_weight=0.0, model_weight=1.0, model=reference_model, model_max_tokens=64, model_batch_size=4
        )
    )
    inputs = [str(messy_dir / "*.jsonl"), str(messy_dir / "*.txt")]
    local = prepare(inputs, str(tmp_path / "local"), cfg)
    records = _records(tmp_path / "local")
    scorer = curriculum.ModelLoss(reference_model, 64, 4)
    loss = np.asarray(scorer([r["text"] for r in records]))
    assert len(set(loss.tolist())) > len(loss) // 2  # the model tells documents apart
    assert loss.tolist() == sorted(loss.tolist())  # easy (low loss) to hard
    np.testing.assert_allclose([r["score"] for r in records], curriculum.percentile_ranks(loss), atol=1e-6)
    assert scorer([records[3]["text"]]) == [loss[3]]  # a text's loss does not depend on its batch
    beam = prepare_beam(inputs, str(tmp_path / "beam"), cfg, options=BEAM_OPTIONS)
    _same_output(tmp_path / "local", tmp_path / "beam", local, beam)
    with pytest.raises(JaxllmError, match="curriculum.model_weight needs curriculum.model"):
        _cfg(curriculum=dict(model_weight=1.0))


@pytest.mark.parametrize("runner", ["local", "beam"])
def test_no_usable_record_is_an_error_and_writes_nothing(tmp_path, runner):
    src = tmp_path / "in.jsonl"
    src.write_text('{"body": "a document under another field"}\n{"body": "another"}\nnot json\n')
    out = tmp_path / "out"
    if runner == "local":
        run = lambda: prepare([str(src)], str(out), _cfg())  # noqa: E731
    else:
        from jaxllm.prep.beam import prepare_beam

        run = lambda: prepare_beam([str(src)], str(out), _cfg(), options=BEAM_OPTIONS)  # noqa: E731
    with pytest.raises(
        JaxllmError,
        match=r"no usable record in the inputs \(3 documents read; removed: "
        r"bad_json 1, missing_field 2\); nothing was written",
    ):
        run()
    assert os.listdir(out) == []  # no stats.json (the mark of a complete output), no shard, no temp folder
