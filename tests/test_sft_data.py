"""Tests for SFT data: rendering, exact loss masks, packing, sources with dict rows, resume."""

from __future__ import annotations

import dataclasses
import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxllm import JaxllmError
from jaxllm.data import corpus, sft
from jaxllm.data.config import CHAT_TEMPLATES, DataConfig, make_source
from jaxllm.data.pipeline import make_eval_iterator, make_train_iterator, split_indices, tokenizer_for

KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_weights")
NUM_ROWS = 40


def _qa(i: int) -> tuple[str, str]:
    rng = np.random.default_rng(i)
    words = ["alpha", "beta", "gamma", "river", "stone", "light"]
    return f"q{i:03d} {rng.choice(words)}?", f"a{i:03d} " + " ".join(rng.choice(words, rng.integers(1, 5)))


def _guanaco(i: int) -> str:
    q, a = _qa(i)
    return f"### Human: {q}### Assistant: {a}"


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def qa_cfg(tmp_path) -> DataConfig:
    """NUM_ROWS one-turn chats, each question and answer tagged qNNN / aNNN, in every format's fields."""
    rows = []
    for i in range(NUM_ROWS):
        q, a = _qa(i)
        messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        rows.append({"text": _guanaco(i), "messages": messages, "prompt": f"Q: {q}\nA:", "completion": f" {a}"})
    path = _write_jsonl(tmp_path / "chat.jsonl", rows)
    return DataConfig(
        source="jsonl",
        paths=(path,),
        format="sft_text",
        loss_on="assistant",
        block_size=128,
        batch_size=4,
        val_fraction=0.25,
    )


def _take(it, n: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(n)]


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in KEYS)


def _rows(batches):
    """(inputs, targets, segment_ids, positions, loss_weights) of every row."""
    for batch in batches:
        yield from zip(*(batch[k] for k in KEYS))


def _segments(batches):
    """Each packed example's token ids, rebuilt from the shifted rows."""
    out = []
    for inputs, targets, seg, _, _ in _rows(batches):
        for s in np.unique(seg[seg > 0]):
            idx = np.nonzero(seg == s)[0]
            ids = inputs[idx].tolist()
            if idx[-1] + 1 == len(seg) and targets[-1] != 0:  # a full row: its last token is only a target
                ids.append(int(targets[-1]))
            out.append(ids)
    return out


def _weighted_runs(batches) -> list[list[int]]:
    """Target ids of each contiguous run of loss weight 1."""
    runs = []
    for _, targets, _, _, weights in _rows(batches):
        run: list[int] = []
        for t, w in zip(targets.tolist(), weights.tolist()):
            if w:
                run.append(t)
            elif run:
                runs.append(run)
                run = []
        if run:
            runs.append(run)
    return runs


def _example_ids(tok, pieces, assistant_only=True, **kw) -> tuple[list[int], list[int]]:
    out = sft.Tokenize(tok, add_bos=True, add_eos=True, assistant_only=assistant_only, max_tokens=10**6, **kw)(pieces)
    return out["tokens"].tolist(), out["mask"].tolist()


# ---------------------------------------------------------------- rendering


def test_parse_guanaco_multi_turn():
    text = "### Human: Hi there### Assistant: Hello! How can I help?### Human: 2+2?### Assistant: 4."
    assert sft.parse_guanaco(text) == [
        ("### Human: Hi there### Assistant:", False),
        (" Hello! How can I help?", True),
        ("### Human: 2+2?### Assistant:", False),
        (" 4.", True),
    ]
    assert sft.text_of(sft.parse_guanaco(text)) == text
    assert sft.parse_guanaco("just text") == [("just text", False)]
    # A stray marker inside an answer stays part of the answer (answers end only at "### Human:").
    assert sft.parse_guanaco("### Human: q### Assistant: a ### Assistant: b") == [
        ("### Human: q### Assistant:", False),
        (" a ### Assistant: b", True),
    ]


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Goodbye."},
]


@pytest.mark.parametrize(
    "template,want",
    [
        (
            "guanaco",
            [
                ("Be brief.\n\n### Human: Hi### Assistant:", False),
                (" Hello.", True),
                ("### Human: Bye### Assistant:", False),
                (" Goodbye.", True),
            ],
        ),
        (
            "chatml",
            [
                (
                    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
                    False,
                ),
                ("Hello.<|im_end|>\n", True),
                ("<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n", False),
                ("Goodbye.<|im_end|>\n", True),
            ],
        ),
        (
            "llama2",
            [
                ("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]", False),
                (" Hello.", True),
                (None, True),
                ("[INST] Bye [/INST]", False),
                (" Goodbye.", True),
            ],
        ),
    ],
)
def test_render_messages_templates(template, want):
    assert sft.render_messages(CHAT, template) == want


def test_guanaco_messages_render_as_the_dataset_text():
    q, a = _qa(3)
    messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    assert sft.render_messages(messages, "guanaco") == sft.parse_guanaco(_guanaco(3))
    assert sft.text_of(sft.render_messages(messages, "guanaco")) == f"### Human: {q}### Assistant: {a}"
    # TFDS stores a sequence of dicts as a dict of lists.
    columns = {"role": ["user", "assistant"], "content": [q, a]}
    assert sft.render_messages(columns, "chatml") == sft.render_messages(messages, "chatml")


def test_bad_messages_raise():
    for bad, match in [
        ([], "non-empty list"),
        ([{"role": "human", "content": "x"}], "role 'human'"),
        ([{"role": "user"}], "text 'content'"),
        ([{"role": "user", "content": "x"}, {"role": "system", "content": "s"}], "only the first"),
    ]:
        with pytest.raises(JaxllmError, match=match):
            sft.render_messages(bad, "guanaco")


def test_continuation_encoding_concatenates_exactly(tok):
    for a, b in [("### Human: hi### Assistant:", " It is 4."), ("x = [1,", " 2]\n  y"), ("<|im_start|>user\n", "Hi")]:
        ids = tok.encode(a) + tok.encode_continuation(b)
        assert tok.decode(ids) == a + b
    assert tok.decode(tok.encode("a") + tok.encode("b")) == "a b"  # why continuations need their own encoding


# ---------------------------------------------------------------- loss masks


def test_guanaco_assistant_mask_is_exact(tmp_path, tok):
    """Weight-1 targets are exactly each answer's tokens, and the EOS after the last answer."""
    texts = [
        "### Human: What is 2+2?### Assistant: It is 4.### Human: And 3+3?### Assistant: Six, of course.",
        "### Human: Name a river.### Assistant: The Nile.",
    ]
    path = _write_jsonl(tmp_path / "g.jsonl", [{"text": t} for t in texts] * 3)
    cfg = DataConfig(
        source="jsonl",
        paths=(path,),
        format="sft_text",
        loss_on="assistant",
        packing=False,
        block_size=128,
        batch_size=2,
        val_fraction=0.0,
        shuffle=False,
    )
    batch = next(make_train_iterator(cfg, tok))
    runs = _weighted_runs([batch])
    answers = [" It is 4.", " Six, of course.", " The Nile."]
    want = [
        tok.encode_continuation(answers[0]),
        tok.encode_continuation(answers[1]) + [tok.eos_id],
        tok.encode_continuation(answers[2]) + [tok.eos_id],
    ]
    assert runs == want
    assert [tok.decode(r) for r in runs] == [a.lstrip() for a in answers]  # EOS decodes to ""
    # A row is BOS + the pieces, each tokenized on its own + EOS, then padding; it decodes to the text.
    ids = _segments([batch])
    cont = tok.encode_continuation
    assert ids[0] == (
        [tok.bos_id]
        + tok.encode("### Human: What is 2+2?### Assistant:")
        + cont(" It is 4.")
        + cont("### Human: And 3+3?### Assistant:")
        + cont(" Six, of course.")
        + [tok.eos_id]
    )
    assert tok.decode(ids[0]) == texts[0] and tok.decode(ids[1]) == texts[1]


@pytest.mark.parametrize("template", CHAT_TEMPLATES)
def test_messages_mask_per_template(tok, template):
    pieces = sft.render_messages(CHAT, template)
    ids, mask = _example_ids(tok, pieces)
    counted = [i for i, m in zip(ids, mask) if m]
    answers = [p for p, assistant in pieces if assistant and p is not None]
    if template == "llama2":  # "[INST] ... [/INST] Hello.</s><s>[INST] Bye ...": each turn encoded on its own
        cut = ids.index(tok.bos_id, 1)
        assert ids[cut - 1] == tok.eos_id and mask[cut - 1] == 1 and mask[cut] == 0  # the turn's EOS counts, BOS not
        assert ids[cut + 1 :] == tok.encode("[INST] Bye [/INST]") + tok.encode_continuation(" Goodbye.") + [tok.eos_id]
        assert tok.decode(ids[:cut]) == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello."
        assert counted == tok.encode_continuation(answers[0]) + [tok.eos_id] + tok.encode_continuation(answers[1]) + [
            tok.eos_id
        ]
    else:
        assert tok.decode(ids) == sft.text_of(pieces)
        assert counted == sum((tok.encode_continuation(a) for a in answers), []) + [tok.eos_id]
    assert not any(mask[: ids.index(tok.encode_continuation(answers[0])[-1])])  # system + first question: none


def test_messages_pipeline_matches_sft_text(qa_cfg, tok):
    """The same chats as Guanaco text or as messages give the same batches."""
    as_text = _take(make_train_iterator(qa_cfg, tok), 4)
    as_messages = _take(make_train_iterator(dataclasses.replace(qa_cfg, format="messages"), tok), 4)
    assert _same(as_text, as_messages)
    cfg = dataclasses.replace(qa_cfg, format="messages", chat_template="chatml")
    row = next(make_train_iterator(cfg, tok))["inputs"][0]
    text = tok.decode(row)
    assert text.startswith("<|im_start|>user\nq") and "<|im_end|>\n<|im_start|>assistant\na" in text


def test_prompt_completion_counts_only_the_completion_by_default(qa_cfg, tok):
    cfg = dataclasses.replace(qa_cfg, format="prompt_completion", loss_on="auto", packing=False, shuffle=False)
    batch = next(make_train_iterator(cfg, tok))
    train_idx, _ = split_indices(NUM_ROWS, cfg.val_fraction)
    runs = _weighted_runs([batch])
    for row, i in zip(range(len(runs)), train_idx):
        q, a = _qa(int(i))
        assert runs[row] == tok.encode_continuation(f" {a}") + [tok.eos_id]
        assert tok.decode(batch["inputs"][row]).startswith(f"Q: {q}\nA: {a}")  # prompt, then completion: no template


def test_loss_on_all_counts_every_target_in_the_example(qa_cfg, tok):
    for fmt, loss_on in [("sft_text", "all"), ("sft_text", "auto"), ("messages", "auto"), ("prompt_completion", "all")]:
        cfg = dataclasses.replace(qa_cfg, format=fmt, loss_on=loss_on)
        for _, _, seg, _, weights in _rows(_take(make_train_iterator(cfg, tok), 3)):
            same = np.append(seg[1:] == seg[:-1], True) & (seg > 0)  # last column: the row is full (len L+1)
            inside = weights[:-1] == 1
            assert np.array_equal(inside, same[:-1]), (fmt, loss_on)


# ---------------------------------------------------------------- packing


def test_packing_isolates_whole_examples(qa_cfg, tok):
    cfg = dataclasses.replace(qa_cfg, batch_size=1, val_fraction=0.5)
    batches = list(make_eval_iterator(cfg, tok))
    _, val_idx = split_indices(NUM_ROWS, cfg.val_fraction)
    want = sorted(_example_ids(tok, sft.parse_guanaco(_guanaco(int(i))))[0] for i in val_idx)
    assert sorted(_segments(batches)) == want  # every example whole, none cut across rows
    assert max(len(np.unique(b["segment_ids"])) for b in batches) >= 3  # several examples share a row
    for inputs, targets, seg, pos, weights in _rows(batches):
        starts = np.ones_like(seg, bool)
        starts[1:] = seg[1:] != seg[:-1]
        assert np.array_equal(pos[seg > 0] == 0, starts[seg > 0])  # positions restart at each example
        assert np.all(pos[1:][~starts[1:] & (seg[1:] > 0)] == pos[:-1][~starts[1:] & (seg[1:] > 0)] + 1)
        crossing = np.append(seg[1:] != seg[:-1], False)
        assert not np.any(weights[crossing]), "a target from the next example counts"
        assert np.all(targets[crossing] == np.where(seg[np.nonzero(crossing)[0] + 1] > 0, tok.bos_id, 0))
        assert np.all(weights[seg == 0] == 0) and np.all(inputs[seg == 0] == 0)


def test_long_examples_are_truncated_to_one_row(tmp_path, tok):
    long = "### Human: tell me### Assistant: " + "stone river light " * 40
    path = _write_jsonl(tmp_path / "long.jsonl", [{"text": long}, {"text": "### Human: hi### Assistant: yo"}] * 4)
    cfg = DataConfig(
        source="jsonl", paths=(path,), format="sft_text", block_size=32, batch_size=2, val_fraction=0.0, shuffle=False
    )
    full, _ = _example_ids(tok, sft.parse_guanaco(long))
    assert len(full) > 33
    rows = list(_rows(_take(make_train_iterator(cfg, tok), 2)))
    long_rows = [r for r in rows if r[0][0] == full[0] and r[0].tolist() == full[:32]]
    assert long_rows, "the long example fills a row on its own"
    inputs, targets, seg, _, weights = long_rows[0]
    assert targets.tolist() == full[1:33] and np.all(seg == 1)  # cut at block_size + 1 tokens, no EOS
    short, _ = _example_ids(tok, sft.parse_guanaco("### Human: hi### Assistant: yo"))
    segments = _segments(_take(make_train_iterator(cfg, tok), 4))
    assert full[:33] in segments and short in segments and all(ids in (full[:33], short) for ids in segments)


def test_no_packing_pads_one_example_per_row(qa_cfg, tok):
    cfg = dataclasses.replace(qa_cfg, packing=False, shuffle=False)
    batches = _take(make_train_iterator(cfg, tok), 3)
    train_idx, _ = split_indices(NUM_ROWS, cfg.val_fraction)
    want = [_example_ids(tok, sft.parse_guanaco(_guanaco(int(i))))[0] for i in train_idx[:12]]
    assert _segments(batches) == want  # in order, one per row
    for inputs, _, seg, pos, weights in _rows(batches):
        n = int((seg == 1).sum())
        assert set(np.unique(seg)) == {0, 1} and np.all(seg[:n] == 1)
        assert np.array_equal(pos[:n], np.arange(n)) and np.all(pos[n:] == 0)
        assert inputs[n - 1] == tok.eos_id and weights[n - 2] == 1  # the EOS is the last target that counts
        assert np.all(inputs[n:] == 0) and np.all(weights[n - 1 :] == 0)


# ---------------------------------------------------------------- sources with dict rows


def test_parquet_source_rows_formats_and_errors(tmp_path, tok):
    rows = [
        {
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            "text": _guanaco(i),
            "id": i,
        }
        for i, (q, a) in ((i, _qa(i)) for i in range(NUM_ROWS))
    ]
    folder = tmp_path / "data"
    folder.mkdir()
    table = pa.Table.from_pylist(rows)
    pq.write_table(table.slice(0, 25), folder / "train-00000-of-00002.parquet", row_group_size=4)
    pq.write_table(table.slice(25), folder / "train-00001-of-00002.parquet", row_group_size=4)
    glob = str(folder / "train-*.parquet")
    src = make_source(DataConfig(source="parquet", paths=(glob,), format="messages"))
    assert len(src) == NUM_ROWS
    for i in (39, 0, 26, 3, 24, 25):  # across row groups and files, in any order
        assert src[i]["messages"] == rows[i]["messages"]
    assert pickle.loads(pickle.dumps(src))[7]["messages"] == rows[7]["messages"]
    text_src = make_source(DataConfig(source="parquet", paths=(glob,)))
    assert text_src[30] == _guanaco(30)
    cfg = DataConfig(
        source="parquet", paths=(glob,), format="messages", block_size=128, batch_size=4, val_fraction=0.25
    )
    jsonl = _write_jsonl(tmp_path / "same.jsonl", rows)
    assert _same(
        _take(make_train_iterator(cfg, tok), 3),
        _take(make_train_iterator(dataclasses.replace(cfg, source="jsonl", paths=(jsonl,)), tok), 3),
    )
    with pytest.raises(
        JaxllmError,
        match=r"train-00000-of-00002.parquet: row 0: no field 'prompt' "
        r"\(fields: 'id', 'messages', 'text'\); set data.prompt_field",
    ):
        make_source(DataConfig(source="parquet", paths=(glob,), format="prompt_completion"))
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(JaxllmError, match="not a readable Parquet file"):
        make_source(DataConfig(source="parquet", paths=(str(tmp_path / "bad.parquet"),)))


def test_jsonl_dict_rows_and_missing_field_errors(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path = _write_jsonl(tmp_path / "data.jsonl", [good, good, {"question": "q", "answer": "a"}])
    with pytest.raises(JaxllmError) as info:
        make_source(DataConfig(source="jsonl", paths=(path,), format="messages"))
    assert str(info.value) == (
        f"{path}:3: no field 'messages' (fields: 'answer', 'question'); set data.messages_field "
        "to the field that holds it"
    )
    with pytest.raises(JaxllmError, match=r"data.jsonl:1: no field 'text' \(fields: 'messages'\); set data.text_field"):
        make_source(DataConfig(source="jsonl", paths=(path,), format="sft_text"))
    ok = _write_jsonl(tmp_path / "ok.jsonl", [good, {**good, "extra": 1}])
    src = make_source(DataConfig(source="jsonl", paths=(ok,), format="messages"))
    assert src[0] == good and src[1]["extra"] == 1  # the whole row
    bad_role = _write_jsonl(tmp_path / "role.jsonl", [good, {"messages": [{"role": "gpt", "content": "x"}]}])
    cfg = DataConfig(source="jsonl", paths=(bad_role,), format="messages", val_fraction=0.0, shuffle=False)
    with pytest.raises(JaxllmError, match=r"role.jsonl:2: message 0 has role 'gpt'"):
        sft.Examples(make_source(cfg), cfg)[1]


def test_array_record_and_text_sources_in_sft_formats(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    path = str(tmp_path / "chat.array_record")
    writer = ArrayRecordWriter(path, "group_size:1")
    for record in [json.dumps({"prompt": "P", "completion": " C"}), "plain"]:
        writer.write(record.encode())
    writer.close()
    src = make_source(DataConfig(source="array_record", paths=(path,), format="prompt_completion"))
    assert src[0] == {"prompt": "P", "completion": " C"}
    with pytest.raises(JaxllmError, match="record 1: plain text, but data.format needs fields 'prompt', 'completion'"):
        src[1]
    (tmp_path / "a.txt").write_text(_guanaco(2))
    text_src = make_source(DataConfig(source="text", paths=(str(tmp_path / "a.txt"),), format="sft_text"))
    assert text_src[0] == {"text": _guanaco(2)}


# ---------------------------------------------------------------- embedded SFT set


def test_embedded_sft_set():
    records = corpus.embedded_sft_records()
    assert records == corpus.embedded_sft_records()
    assert 300 <= len(records) <= 2000
    questions = [r["messages"][0]["content"] for r in records]
    assert len(set(questions)) == len(records)
    assert "What does the `for` statement do in Python?" in questions and "What does json.dumps do?" in questions
    for r in records:
        q, a = r["messages"][0]["content"], r["messages"][1]["content"]
        assert r["text"] == f"### Human: {q}### Assistant: {a}" == r["prompt"] + r["completion"]
        assert 30 <= len(a) <= corpus.SFT_MAX_ANSWER_CHARS and "\n" not in a
    for fmt in ("sft_text", "messages", "prompt_completion"):
        cfg = DataConfig(source="embedded_sft", format=fmt)
        examples = sft.Examples(make_source(cfg), cfg)
        assert [examples[i] for i in (0, 500, len(records) - 1)] == [
            sft.parse_guanaco(records[i]["text"]) for i in (0, 500, len(records) - 1)
        ]
    for template in ("chatml", "llama2"):
        cfg = DataConfig(source="embedded_sft", format="messages", chat_template=template)
        assert sum(a for _, a in sft.Examples(make_source(cfg), cfg)[10]) == 1
    assert make_source(DataConfig(source="embedded_sft"))[0] == records[0]["text"]


def test_tokenizer_trains_on_rendered_sft_text(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLLM_CACHE_DIR", str(tmp_path))
    cfg = DataConfig(source="embedded_sft", format="messages", chat_template="chatml", vocab_size=400)
    tok = tokenizer_for(cfg)
    assert len(tok.encode("<|im_start|>assistant\n")) < len("<|im_start|>assistant\n") // 2  # learnt the markers


# ---------------------------------------------------------------- split, shards, resume


def _tags(tok, batches, letter="q") -> set[int]:
    import re

    return {int(m) for row in _rows(batches) for m in re.findall(letter + r"(\d{3})", tok.decode(row[0]))}


def test_split_and_process_shards(qa_cfg, tok):
    train_idx, val_idx = split_indices(NUM_ROWS, qa_cfg.val_fraction)
    cfg = dataclasses.replace(qa_cfg, batch_size=2)
    assert _tags(tok, list(make_eval_iterator(dataclasses.replace(cfg, batch_size=1), tok))) == set(val_idx.tolist())
    whole = _take(make_train_iterator(cfg, tok), 12)
    halves = [_take(make_train_iterator(cfg, tok, process_index=p, process_count=2), 12) for p in range(2)]
    for i, batch in enumerate(whole):  # each process gets its row of the one global batch
        for key in KEYS:
            np.testing.assert_array_equal(batch[key], np.concatenate([h[i][key] for h in halves]))
    assert _tags(tok, whole) == set(train_idx.tolist())
    assert not _same(
        _take(make_train_iterator(qa_cfg, tok), 3),
        _take(make_train_iterator(dataclasses.replace(qa_cfg, seed=1), tok), 3),
    )


@pytest.mark.parametrize("packing,skip", [(True, 0), (True, 5), (True, 9), (True, 19), (False, 4)])
def test_resume_from_state(qa_cfg, tok, packing, skip):
    """A restored iterator continues with exactly the next batch (states JSON round-tripped), also on
    another process count (the state is global)."""
    cfg = dataclasses.replace(qa_cfg, packing=packing)
    it = make_train_iterator(cfg, tok)
    _take(it, skip)
    state = json.loads(json.dumps(it.get_state()))
    want = _take(it, 6)
    restored = make_train_iterator(cfg, tok)
    restored.set_state(state)
    assert _same(want, _take(restored, 6))
    last = make_train_iterator(cfg, tok, process_index=cfg.batch_size - 1, process_count=cfg.batch_size)
    last.set_state(state)
    got = _take(last, 6)
    for i in range(6):
        for key in KEYS:
            np.testing.assert_array_equal(got[i][key], want[i][key][-1:])


def test_resume_through_orbax(qa_cfg, tok, tmp_path):
    from test_data import assert_orbax_resume

    assert_orbax_resume(
        dataclasses.replace(qa_cfg, format="messages", chat_template="llama2"), tok, tmp_path / "ckpt", 7, 4
    )


def test_sft_parts_pickle_for_workers(qa_cfg, tok):
    examples = sft.Examples(make_source(qa_cfg), qa_cfg)
    tokenize = sft.Tokenize(tok, add_bos=True, add_eos=True, assistant_only=True, max_tokens=49)
    ex2, tok2 = pickle.loads(pickle.dumps((examples, tokenize)))
    a, b = tokenize(examples[3]), tok2(ex2[3])
    assert all(np.array_equal(a[k], b[k]) for k in ("tokens", "mask"))


# ---------------------------------------------------------------- config


def test_config_validation():
    for bad, match in [
        (dict(format="chat"), "data.format='chat' is not known"),
        (dict(format="messages", chat_template="vicuna"), "data.chat_template='vicuna' is not known"),
        (dict(format="sft_text", loss_on="answers"), "data.loss_on='answers' is not known"),
        (dict(loss_on="assistant"), "loss_on='assistant' needs data.format"),
        (dict(packing=False), "packing=False needs an SFT data.format"),
        (dict(format="sft_text", packing=1), "data.packing must be True or False"),
        (dict(format="messages", messages_field=""), "data.messages_field must name a field"),
        (dict(format="messages", source="text"), "data.format='messages' needs records with fields"),
        (dict(source="parquet"), None),
    ]:
        if match is None:
            DataConfig(**bad)  # a known source; paths are checked when it is opened
            continue
        with pytest.raises(JaxllmError, match=match):
            DataConfig(**bad)
    assert sft.assistant_only(DataConfig(source="embedded_sft", format="prompt_completion"))
    assert not sft.assistant_only(DataConfig(source="embedded_sft", format="messages"))
