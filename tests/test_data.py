"""Tests for jaxllm.data: corpus, tokenizer, sources and the Grain pipelines."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordWriter

from jaxllm import JaxllmError
from jaxllm.data import corpus, lanes
from jaxllm.data import tokenizer as tok_lib
from jaxllm.data.config import DataConfig, make_source
from jaxllm.data.pipeline import check_splits, make_eval_iterator, make_train_iterator, split_indices, tokenizer_for

KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_weights")
NUM_DOCS = 60


def _doc(i: int) -> str:
    rng = np.random.default_rng(i)
    vocab = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "quiet"]
    words = rng.choice(vocab, rng.integers(3, 60))
    return f"doc{i:03d} " + " ".join(words) + "."


@pytest.fixture
def docs_cfg(tmp_path) -> DataConfig:
    """NUM_DOCS documents, each starting with a unique 'docNNN' marker, in a JSONL file."""
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": _doc(i), "id": i}) + "\n" for i in range(NUM_DOCS)))
    return DataConfig(
        source="jsonl", paths=(str(path),), block_size=32, batch_size=4, val_fraction=0.2, shuffle_window=0
    )  # batches in stream order, so tests can undo the packing


def _take(it, n: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(n)]


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in KEYS)


def _epoch_batches(tok, doc_ids, rows: int, block_size: int) -> int:
    """Batches that surely cover one pass over `doc_ids`: lanes share the documents unevenly (a lane of
    long ones lags), so twice the average, plus slack."""
    tokens = sum(len(tok.encode(_doc(int(i)))) + 2 for i in doc_ids)
    return 2 * tokens // (rows * (block_size + 1)) + 3


def _lane(batches: list[dict], r: int) -> list[int]:
    """Undoes shift + packing of lane (row) r: each row is block[:-1] / block[1:], blocks consecutive."""
    out: list[int] = []
    for batch in batches:
        out.extend(batch["inputs"][r].tolist() + [int(batch["targets"][r, -1])])
    return out


def _markers(tok, batches) -> set[int]:
    """The documents whose markers the rows hold (each lane decoded on its own: rows in stream order)."""
    return {
        int(m)
        for r in range(len(batches[0]["inputs"]))
        for m in re.findall(r"doc(\d{3})", tok.decode(_lane(batches, r)))
    }


# ---------------------------------------------------------------- corpus and tokenizer


def test_embedded_corpus_is_deterministic_and_megabytes():
    docs = corpus.embedded_documents()
    assert docs == corpus.embedded_documents()
    assert len(set(docs)) == len(docs) > 500
    assert 2e6 < sum(map(len, docs)) < 6e6
    assert set(corpus.DOCSTRING_MODULES).isdisjoint(corpus.SOURCE_MODULES)
    assert any("class ArgumentParser" in d for d in docs) and any("lambda" in d for d in docs)


def test_tokenizer_round_trip_and_special_ids(tok):
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (512, 0, 2, 3)
    for text in ["The quick brown fox.", "def f(x):\n    return x  +  1\n\n", " lead\ttab  café 日本 🙂", ""]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode([tok.pad_id] + ids + [tok.pad_id, tok.pad_id]) == text
    assert len(tok.encode("the " * 50)) < 100  # a real subword model, not bytes


def test_a_continuation_keeps_the_space_after_its_prompt(tok):
    from jaxllm.models.generation import continuation

    prompt_ids = tok.encode("The for statement")
    new_ids = tok.encode("The for statement is used to iterate")[len(prompt_ids) :]  # as a model continues it
    assert tok.decode(new_ids) == "is used to iterate"  # decoded alone, SentencePiece drops the space
    assert "The for statement" + continuation(tok, prompt_ids, new_ids) == "The for statement is used to iterate"


def test_tokenizer_cache_hit(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLLM_CACHE_DIR", str(tmp_path))
    documents = [_doc(i) for i in range(200)]
    first = tok_lib.load_tokenizer("", 300, documents)
    assert first.path.startswith(str(tmp_path / "tokenizers")) and os.path.isfile(first.path)

    def no_training(*args):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(tok_lib, "_train", no_training)
    second = tok_lib.load_tokenizer("", 300, documents)
    assert second.path == first.path and second.encode(documents[0]) == first.encode(documents[0])
    assert os.listdir(tmp_path / "tokenizers") == [os.path.basename(first.path)]  # no temp files left
    with pytest.raises(AssertionError):  # another vocab size is another model
        tok_lib.load_tokenizer("", 301, documents)
    loaded = tok_lib.load_tokenizer(first.path)
    assert loaded.encode("doc001 river") == first.encode("doc001 river")


_TRAIN_IN_SUBPROCESS = """
import hashlib
from jaxllm.data import corpus, tokenizer as t
t._TRAIN_MAX_SENTENCES = 1000  # forces line subsampling
texts = t._training_sample(corpus.embedded_documents()[:200])
print(hashlib.sha256(t._train(texts, dict(t._TRAINER_SETTINGS, vocab_size=400))).hexdigest())
"""


def test_tokenizer_training_is_deterministic_across_processes():
    """Hosts with separate caches each train a copy; the copies must be byte-identical.

    (SentencePiece's own sentence sampling differs from process to process, even when seeded.)
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    digests = [
        subprocess.run(
            [sys.executable, "-c", _TRAIN_IN_SUBPROCESS], env=env, capture_output=True, text=True, check=True
        ).stdout
        for _ in range(2)
    ]
    assert digests[0] == digests[1] and len(digests[0].strip()) == 64


def test_tokenizer_pickles(tok):
    import pickle

    copy = pickle.loads(pickle.dumps(tok))
    assert copy.encode("stone light") == tok.encode("stone light") and copy.path == tok.path


# ---------------------------------------------------------------- sources


def test_text_source_file_and_paragraph(tmp_path):
    a_text = "first para\nline two\n\n  \nsecond para\n\n\n"
    (tmp_path / "a.txt").write_text(a_text)
    (tmp_path / "b.txt").write_text("only one")
    glob = str(tmp_path / "*.txt")
    by_file = make_source(DataConfig(source="text", paths=[glob]))
    assert [by_file[i] for i in range(len(by_file))] == [a_text, "only one"]
    by_para = make_source(DataConfig(source="text", paths=(glob,), text_split="paragraph"))
    assert [by_para[i] for i in range(len(by_para))] == ["first para\nline two", "second para", "only one"]


def test_jsonl_source(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "héllo"}\n\n{"text": "world", "n": 1}\n')
    src = make_source(DataConfig(source="jsonl", paths=(str(path),)))
    assert len(src) == 2 and (src[0], src[1]) == ("héllo", "world")


def test_array_record_source(tmp_path):
    path = str(tmp_path / "docs.array_record")
    writer = ArrayRecordWriter(path, "group_size:1")
    for record in ["plain text doc", json.dumps({"body": "json doc", "x": 1}), "{not json, but text"]:
        writer.write(record.encode())
    writer.close()
    src = make_source(DataConfig(source="array_record", paths=(path,), text_field="body"))
    assert [src[i] for i in range(len(src))] == ["plain text doc", "json doc", "{not json, but text"]


class TinyTextDocs(tfds.core.GeneratorBasedBuilder):
    """A local TFDS dataset: generated from Python, nothing downloaded."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict({"content": tfds.features.Text(), "id": np.int64})
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(NUM_DOCS)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"content": _doc(i), "id": i}


def test_tfds_source_and_pipeline(tmp_path, tok):
    TinyTextDocs(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    cfg = DataConfig(
        source="tfds",
        tfds_name="tiny_text_docs",
        tfds_data_dir=str(tmp_path),
        text_field="content",
        block_size=32,
        batch_size=2,
    )
    src = make_source(cfg)
    assert sorted(src[i] for i in range(len(src))) == sorted(_doc(i) for i in range(NUM_DOCS))
    assert next(make_train_iterator(cfg, tok))["inputs"].shape == (2, 32)
    with pytest.raises(JaxllmError, match="no field 'text'.*'content'"):
        make_source(DataConfig(source="tfds", tfds_name="tiny_text_docs", tfds_data_dir=str(tmp_path)))
    with pytest.raises(JaxllmError, match="cannot open TFDS dataset 'no_such_set'"):
        make_source(DataConfig(source="tfds", tfds_name="no_such_set", tfds_data_dir=str(tmp_path)))


# ---------------------------------------------------------------- pipeline


def _every_source_kind(tmp_path) -> dict[str, dict]:
    """The same NUM_DOCS documents as each kind of source (the embedded corpus as itself)."""
    docs = [_doc(i) for i in range(NUM_DOCS)]
    (tmp_path / "txt").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "txt" / f"{i:03d}.txt").write_text(d)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs}), str(tmp_path / "d.parquet"), row_group_size=7)
    writer = ArrayRecordWriter(str(tmp_path / "d.array_record"), "group_size:1")
    for d in docs:
        writer.write(d.encode())
    writer.close()
    TinyTextDocs(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
    return {
        "embedded": dict(source="embedded"),
        "text": dict(source="text", paths=(str(tmp_path / "txt/*.txt"),)),
        "jsonl": dict(source="jsonl", paths=(str(tmp_path / "d.jsonl"),)),
        "parquet": dict(source="parquet", paths=(str(tmp_path / "d.parquet"),)),
        "array_record": dict(source="array_record", paths=(str(tmp_path / "d.array_record"),)),
        "tfds": dict(
            source="tfds", tfds_name="tiny_text_docs", tfds_data_dir=str(tmp_path / "tfds"), text_field="content"
        ),
    }


def test_every_source_kind_gives_the_same_global_batches_on_any_process_count(tmp_path, tok):
    for kind, keys in _every_source_kind(tmp_path).items():
        cfg = DataConfig(**keys, block_size=32, batch_size=4, shuffle_window=8)
        whole = _take(make_train_iterator(cfg, tok), 6)
        halves = [_take(make_train_iterator(cfg, tok, process_index=p, process_count=2), 6) for p in range(2)]
        for i in range(6):
            for key in KEYS:
                np.testing.assert_array_equal(
                    whole[i][key], np.concatenate([h[i][key] for h in halves]), err_msg=f"{kind}, batch {i}, {key}"
                )


def test_batch_format_and_determinism(docs_cfg, tok):
    a = _take(make_train_iterator(docs_cfg, tok), 6)
    for batch in a:
        assert set(batch) == set(KEYS)
        for key in KEYS:
            assert batch[key].shape == (4, 32)
            assert batch[key].dtype == (np.float32 if key == "loss_weights" else np.int32)
    assert _same(a, _take(make_train_iterator(docs_cfg, tok), 6))
    other = dataclasses.replace(docs_cfg, seed=1)
    assert not _same(a, _take(make_train_iterator(other, tok), 6))


def test_packing_reproduces_the_documents(docs_cfg, tok):
    """Unshuffled, lane r is exactly BOS + tokens + EOS of train docs r, r + B, r + 2B, ... in order."""
    cfg = dataclasses.replace(docs_cfg, shuffle=False)
    train_idx, _ = split_indices(NUM_DOCS, cfg.val_fraction)
    batches = _take(make_train_iterator(cfg, tok), 12)
    for r in range(cfg.batch_size):
        want = [t for i in train_idx[r :: cfg.batch_size] for t in [tok.bos_id] + tok.encode(_doc(i)) + [tok.eos_id]]
        got = _lane(batches, r)
        assert len(got) == 12 * 33 and got == want[: len(got)]


@pytest.mark.parametrize("add_bos,add_eos", [(True, True), (False, True)])
def test_segments_positions_and_loss_weights(docs_cfg, tok, add_bos, add_eos):
    cfg = dataclasses.replace(docs_cfg, add_bos=add_bos, add_eos=add_eos)
    for batch in _take(make_train_iterator(cfg, tok), 10):
        inputs, targets, seg, pos, weights = (batch[k] for k in KEYS)
        assert np.array_equal(inputs[:, 1:], targets[:, :-1])
        starts = np.ones_like(seg, bool)
        starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
        assert np.array_equal(pos == 0, starts)  # positions restart exactly at each segment
        assert np.all(pos[:, 1:][~starts[:, 1:]] == pos[:, :-1][~starts[:, 1:]] + 1)
        assert np.all(seg >= 1) and np.all(np.diff(seg, axis=1) >= 0)  # training rows hold no padding
        # A target is masked exactly when it starts the next document (BOS) / the input ends one (EOS).
        boundary = targets == tok.bos_id if add_bos else inputs == tok.eos_id
        assert np.array_equal(weights == 0, boundary)
        assert set(np.unique(weights)) <= {0.0, 1.0}


def test_eval_padding_is_masked_and_repeatable(docs_cfg, tok):
    cfg = dataclasses.replace(docs_cfg, batch_size=1)
    batches = list(make_eval_iterator(cfg, tok))
    assert _same(batches, list(make_eval_iterator(cfg, tok)))
    last = batches[-1]
    pad = last["segment_ids"] == 0
    assert pad.any(), "the finite eval stream ends in a padded block"
    assert np.all(last["inputs"][pad] == 0) and np.all(last["loss_weights"][pad] == 0)
    assert np.all(last["loss_weights"][last["targets"] == 0] == 0)
    assert all(not (b["segment_ids"] == 0).any() for b in batches[:-1])


def test_eval_batches_are_global_and_pad_what_runs_out(docs_cfg, tok):
    """Validation batches are the same on any number of processes; a lane that runs out is padding,
    and a process without documents gets one all-padding batch."""

    def weight(batches):
        return sum(float(b["loss_weights"].sum()) for b in batches)

    one = list(make_eval_iterator(docs_cfg, tok))
    shards = [list(make_eval_iterator(docs_cfg, tok, process_index=p, process_count=2)) for p in range(2)]
    assert weight(one) == weight(shards[0]) + weight(shards[1]) > 0
    for i, batch in enumerate(one):
        for key in KEYS:
            parts = [s[i][key] if i < len(s) else np.zeros_like(s[0][key]) for s in shards]
            np.testing.assert_array_equal(batch[key], np.concatenate(parts))
    big = list(make_eval_iterator(dataclasses.replace(docs_cfg, batch_size=64), tok))  # 12 documents, 64 lanes
    real = np.any(big[0]["segment_ids"] != 0, axis=1)
    assert big[0]["inputs"].shape == (64, 32) and real[:12].all() and not real[12:].any()
    few = dataclasses.replace(docs_cfg, source="jsonl", val_fraction=0.02)  # 1 validation document, 2 processes
    shards = [list(make_eval_iterator(few, tok, process_index=p, process_count=2)) for p in range(2)]
    assert len(shards[1]) == 1 and weight(shards[1]) == 0 and shards[1][0]["inputs"].shape == (2, 32)
    assert weight(shards[0]) > 0


def test_train_val_split_disjoint(docs_cfg, tok):
    train_idx, val_idx = split_indices(NUM_DOCS, 0.2)
    assert len(val_idx) == 12 and not set(train_idx) & set(val_idx)
    assert sorted([*train_idx, *val_idx]) == list(range(NUM_DOCS))
    assert np.array_equal(split_indices(NUM_DOCS, 0.2)[1], val_idx)
    cfg = dataclasses.replace(docs_cfg, batch_size=1)
    assert _markers(tok, list(make_eval_iterator(cfg, tok))) == set(val_idx.tolist())
    n = _epoch_batches(tok, train_idx, 4, 32)
    assert _markers(tok, _take(make_train_iterator(docs_cfg, tok), n)) == set(train_idx.tolist())


@pytest.mark.parametrize("processes", [2, 4])
def test_global_batches_do_not_depend_on_the_process_count(docs_cfg, tok, processes, monkeypatch):
    """Each process gets its rows of the very batches one process sees, and reads only their documents:
    disjoint shares of the training split that together cover it."""
    cfg = dataclasses.replace(docs_cfg, shuffle_window=8)  # windows of 2 steps: cross several
    train_idx, _ = split_indices(NUM_DOCS, cfg.val_fraction)
    n = _epoch_batches(tok, train_idx, 4, 32)
    whole = _take(make_train_iterator(cfg, tok), n)
    parts = [
        _take(make_train_iterator(cfg, tok, process_index=p, process_count=processes), n) for p in range(processes)
    ]
    for i, batch in enumerate(whole):
        for key in KEYS:
            np.testing.assert_array_equal(batch[key], np.concatenate([part[i][key] for part in parts]))
    local = cfg.batch_size // processes
    for p in range(processes):  # process p reads only the global positions of its rows' lanes
        reads = []
        monkeypatch.setattr(
            lanes._Read,
            "__call__",
            lambda self, s, g, f=lanes._Read.__call__, seen=reads: seen.append(g) or f(self, s, g),
        )
        _take(make_train_iterator(cfg, tok, process_index=p, process_count=processes), n)
        monkeypatch.undo()
        assert reads and {g % cfg.batch_size for g in reads} == set(range(p * local, (p + 1) * local))
    plain = _take(make_train_iterator(docs_cfg, tok), n)  # lanes in stream order: their documents decode
    assert _markers(tok, plain) == set(train_idx.tolist())
    rows = make_train_iterator(cfg, tok, rows=[3, 0])  # any rows, e.g. a mesh's non-contiguous ones
    got = _take(rows, 3)
    for key in KEYS:
        np.testing.assert_array_equal(got[2][key], whole[2][key][[3, 0]])  # in the order given


def test_window_shuffle_permutes_sequences_and_resumes_mid_window(docs_cfg, tok):
    plain = _take(make_train_iterator(docs_cfg, tok), 8)  # 32 sequences in stream order
    cfg = dataclasses.replace(docs_cfg, shuffle_window=16)
    shuffled = _take(make_train_iterator(cfg, tok), 8)
    assert _same(shuffled, _take(make_train_iterator(cfg, tok), 8))

    def rows(batches):
        return sorted(tuple(b["inputs"][i].tolist()) for b in batches for i in range(len(b["inputs"])))

    assert rows(shuffled) == rows(plain)  # the same sequences (two whole windows) ...
    assert not _same(shuffled, plain)  # ... in another order
    it = make_train_iterator(cfg, tok)
    _take(it, 5)  # mid-window (windows hold 4 batches)
    state = json.loads(json.dumps(it.get_state()))
    restored = make_train_iterator(cfg, tok)
    restored.set_state(state)
    assert _same(_take(it, 6), _take(restored, 6))


def test_resume_from_state(docs_cfg, tok):
    it = make_train_iterator(docs_cfg, tok)
    _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint writes
    want = _take(it, 3)
    restored = make_train_iterator(docs_cfg, tok)
    restored.set_state(state)
    assert _same(want, _take(restored, 3))


def test_resume_from_fresh_state(docs_cfg, tok):
    it = make_train_iterator(docs_cfg, tok)
    state = json.loads(json.dumps(it.get_state()))
    restored = make_train_iterator(docs_cfg, tok)
    restored.set_state(state)
    assert _same(_take(it, 3), _take(restored, 3))


@pytest.mark.parametrize("skip", [5, 9])  # mid-window, and at a window's start
def test_a_global_state_resumes_on_another_process_count(docs_cfg, tok, skip):
    """The merged state of 2 processes restores on 1 and on 4, past several windows, to the same rows."""
    cfg = dataclasses.replace(docs_cfg, shuffle_window=12)  # 3-step windows
    pair = [make_train_iterator(cfg, tok, process_index=p, process_count=2) for p in range(2)]
    for it in pair:
        _take(it, skip)
    state = lanes.merge_states([json.loads(json.dumps(it.get_state())) for it in pair])
    assert state["step"] == skip and sorted(state["lanes"], key=int) == ["0", "1", "2", "3"]
    assert any(pos != [0, -1, 0, 0] for pos in state["lanes"].values())  # lanes moved on: a real test
    want = _take(make_train_iterator(cfg, tok), skip + 4)[skip:]
    one = make_train_iterator(cfg, tok)
    one.set_state(state)
    assert _same(want, _take(one, 4))
    quarters = [make_train_iterator(cfg, tok, process_index=p, process_count=4) for p in range(4)]
    for it in quarters:
        it.set_state(state)
    got = [_take(it, 4) for it in quarters]
    for i in range(4):
        for key in KEYS:
            np.testing.assert_array_equal(want[i][key], np.concatenate([g[i][key] for g in got]))
    with pytest.raises(JaxllmError, match="saved with data.batch_size=4.*this config has 8"):
        make_train_iterator(dataclasses.replace(cfg, batch_size=8), tok).set_state(state)


def assert_orbax_resume(cfg, tok, path, skip: int, take: int):
    """An iterator saved by the Checkpointer after `skip` batches restores to give the same next `take`."""
    from jaxllm.train.checkpoint import CheckpointConfig, Checkpointer

    it = make_train_iterator(cfg, tok)
    _take(it, skip)
    ckpt = Checkpointer(str(path), CheckpointConfig(async_save=False))
    ckpt.save(skip, {"w": np.zeros(2, np.float32)}, it)
    ckpt.close()
    want = _take(it, take)
    restored = make_train_iterator(cfg, tok)
    ckpt = Checkpointer(str(path), CheckpointConfig())
    ckpt.restore({"w": np.zeros(2, np.float32)}, restored)
    ckpt.close()
    assert _same(want, _take(restored, take))


def test_resume_through_orbax(docs_cfg, tok, tmp_path):
    assert_orbax_resume(dataclasses.replace(docs_cfg, shuffle_window=8), tok, tmp_path / "ckpt", 5, 3)


def test_workers_give_the_same_batches(docs_cfg, tok):
    want = _take(make_train_iterator(docs_cfg, tok), 4)
    it = make_train_iterator(dataclasses.replace(docs_cfg, num_workers=2), tok)
    try:
        assert _same(want, _take(it, 4))
    finally:
        it.close()


# ---------------------------------------------------------------- errors


def test_config_validation():
    assert DataConfig(paths=["a", "b"]).paths == ("a", "b") and DataConfig(paths="a").paths == ("a",)
    for bad, match in [
        (dict(source="xlsx"), "data.source='xlsx' is not known"),
        (dict(block_size=0), "block_size must be a positive"),
        (dict(val_fraction=1.0), r"val_fraction must be in \[0, 1\)"),
        (dict(text_split="line"), "text_split='line'"),
    ]:
        with pytest.raises(JaxllmError, match=match):
            DataConfig(**bad)


def test_bad_inputs_raise_clear_errors(tmp_path, docs_cfg, tok):
    def error(**kwargs) -> str:
        with pytest.raises(JaxllmError) as info:
            make_source(DataConfig(**kwargs))
        return str(info.value)

    assert "matches no files" in error(source="text", paths=(str(tmp_path / "nope*.txt"),))
    assert "needs data.paths" in error(source="jsonl")
    (tmp_path / "empty.txt").write_text("")
    assert "empty.txt' is empty" in error(source="text", paths=(str(tmp_path / "empty.txt"),))
    (tmp_path / "empty.jsonl").write_text("\n")
    assert "has no rows" in error(source="jsonl", paths=(str(tmp_path / "empty.jsonl"),))
    (tmp_path / "nofield.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    msg = error(source="jsonl", paths=(str(tmp_path / "nofield.jsonl"),))
    assert "nofield.jsonl:2: no field 'text' (fields: 'body')" in msg and "data.text_field" in msg
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n\n{"text": "unterminated\n')
    assert "bad.jsonl:3: not valid JSON" in error(source="jsonl", paths=(str(tmp_path / "bad.jsonl"),))

    with pytest.raises(JaxllmError, match="batch_size=4 is not divisible by the 3 processes"):
        make_train_iterator(docs_cfg, tok, process_index=0, process_count=3)
    with pytest.raises(JaxllmError, match="tokenizer file .*missing.model' not found"):
        tok_lib.load_tokenizer(str(tmp_path / "missing.model"))
    with pytest.raises(JaxllmError, match="validation split is empty.*raise data.val_fraction"):
        make_eval_iterator(dataclasses.replace(docs_cfg, val_fraction=0.0), tok)
    with pytest.raises(JaxllmError, match="validation split is empty .60 documents"):
        check_splits(dataclasses.replace(docs_cfg, val_fraction=0.0), tok)
    with pytest.raises(
        JaxllmError,
        match=r"too small for one batch: 48 documents \([\d,]+ tokens\) fill \d+ "
        r"row\(s\) of 1025 tokens, but one batch needs 16 rows \(data.batch_size=16\)",
    ):
        check_splits(dataclasses.replace(docs_cfg, block_size=1024, batch_size=16), tok)
    check_splits(dataclasses.replace(docs_cfg, block_size=1024, batch_size=1), tok)  # one row of a batch of one
    with pytest.raises(JaxllmError, match="vocab_size=270 is too small"):
        tok_lib.load_tokenizer("", 270, [_doc(i) for i in range(50)])


def test_vocab_size_errors_say_which_way_to_go(tmp_path):
    docs = tmp_path / "d.jsonl"
    docs.write_text("".join(json.dumps({"text": _doc(i)}) + "\n" for i in range(40)))
    cfg = DataConfig(source="jsonl", paths=(str(docs),), vocab_size=5000)
    with pytest.raises(JaxllmError, match=r"data.vocab_size=5000 is too large for this corpus \(at most \d+\); lower"):
        tokenizer_for(cfg)
    with pytest.raises(JaxllmError, match=r"data.vocab_size=8 is too small for this corpus .*increase"):
        tokenizer_for(dataclasses.replace(cfg, vocab_size=8))


def test_workers_of_a_killed_process_exit_too(docs_cfg, tok, tmp_path):
    """SIGKILL of a training process (an OOM kill, a lost host) leaves none of its worker processes behind."""
    import signal
    import time

    script = tmp_path / "train_like.py"
    script.write_text(
        "import os, sys, time\n"
        "from jaxllm.data.config import DataConfig\n"
        "from jaxllm.data.pipeline import make_train_iterator, tokenizer_for\n"
        "if __name__ == '__main__':\n"
        f"    cfg = DataConfig(source='jsonl', paths=({docs_cfg.paths[0]!r},), block_size=32, batch_size=4,\n"
        f"                     tokenizer={tok.path!r}, num_workers=2)\n"
        "    it = make_train_iterator(cfg, tokenizer_for(cfg))\n"
        "    next(it)\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))},
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        children = []
        for task in os.listdir(f"/proc/{proc.pid}/task"):
            with open(f"/proc/{proc.pid}/task/{task}/children") as f:
                children += [int(c) for c in f.read().split()]
        assert len(children) >= 2, children  # the workers (and multiprocessing's resource tracker)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{c}") for c in children):
            time.sleep(0.2)
        left = [c for c in children if os.path.exists(f"/proc/{c}")]
        for c in left:
            os.kill(c, signal.SIGKILL)
        assert not left, f"orphaned workers {left}"
    finally:
        proc.kill()


def test_jsonl_line_over_the_cap_is_refused_without_reading_it_whole(tmp_path, monkeypatch):
    from jaxllm.data import sources

    monkeypatch.setattr(sources, "MAX_LINE_BYTES", 1000)
    path = tmp_path / "long.jsonl"
    path.write_text(
        json.dumps({"text": "short"})
        + "\n"
        + json.dumps({"text": "x" * 980})
        + "\n"
        + json.dumps({"text": "y" * 5000})
        + "\n"
    )
    with pytest.raises(JaxllmError, match=r"long.jsonl:3: line longer than 1,000 bytes .*split that document"):
        sources.JsonlSource([str(path)])
    path.write_text(json.dumps({"text": "short"}) + "\n" + json.dumps({"text": "x" * 980}) + "\n")
    assert [len(t) for t in sources.JsonlSource([str(path)])] == [5, 980]


@pytest.mark.parametrize("line", ["[" * 100_000, '{"text": ' + "1" * 5000 + "}"])
def test_jsonl_rows_that_break_the_json_parser_name_their_line(tmp_path, line):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(JaxllmError, match=r"bad.jsonl:2: not valid JSON"):
        make_source(DataConfig(source="jsonl", paths=(str(path),)))


def test_garbage_tokenizer_files_are_one_line_errors(tmp_path):
    model = tmp_path / "bad.model"
    model.write_bytes(b"\x00\x01 not a sentencepiece model \xff" * 10)
    with pytest.raises(JaxllmError, match=r"tokenizer file '.*bad.model' is not a SentencePiece model"):
        tok_lib.load_tokenizer(str(model))
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes(b'{"version": "1.0", "model": \xff\xfe')
    with pytest.raises(JaxllmError, match=r"tokenizer.json is not UTF-8 JSON"):
        tok_lib.load_tokenizer(str(folder))
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"')
    with pytest.raises(JaxllmError, match=r"tokenizer.json is not a tokenizers file"):
        tok_lib.load_tokenizer(str(folder))
    (folder / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(JaxllmError, match=r"tokenizer_config.json holds a JSON list, not an object"):
        tok_lib.load_tokenizer(str(folder))
