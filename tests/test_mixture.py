"""Weighted source mixing and curriculum schedules in the training pipeline (jaxllm.data.mixture)."""

from __future__ import annotations

import dataclasses
import json
import re

import ml_collections
import numpy as np
import pytest

from jaxllm import JaxllmError
from jaxllm.config import apply_override, build
from jaxllm.data import lanes, mixture
from jaxllm.data.config import DataConfig
from jaxllm.data.pipeline import make_eval_iterator, make_train_iterator, split_documents

BLOCK, BATCH = 32, 4


def _doc(tag: str, i: int) -> str:
    rng = np.random.default_rng([ord(tag), i])
    words = rng.choice(["alpha", "beta", "gamma", "delta", "river", "stone", "light", "quiet"], rng.integers(3, 25))
    return f"doc{tag}{i:03d} " + " ".join(words) + "."


def _write(path, tag: str, n: int, bucket=None) -> str:
    rows = [{"text": _doc(tag, i), **({} if bucket is None else {"bucket": bucket(i)})} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def two_sources(tmp_path) -> dict:
    return {
        "a": {"source": "jsonl", "paths": (_write(tmp_path / "a.jsonl", "a", 80),), "weight": 3.0},
        "b": {"source": "jsonl", "paths": (_write(tmp_path / "b.jsonl", "b", 80),), "weight": 1.0},
    }


def _cfg(**kw) -> DataConfig:
    return DataConfig(**{**dict(block_size=BLOCK, batch_size=BATCH, val_fraction=0.1, shuffle_window=0), **kw})


def _text(tok, batch) -> str:
    """A batch's rows as text, row by row (documents cut across rows keep their marker in one row)."""
    return "\n".join(tok.decode(list(row) + [int(t[-1])]) for row, t in zip(batch["inputs"], batch["targets"]))


def _tags(tok, batch) -> list[str]:
    return re.findall(r"doc([a-z])\d{3}", _text(tok, batch))


def _same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_weights_set_the_share_of_each_source(two_sources, tok):
    it = make_train_iterator(_cfg(mixture=two_sources), tok)
    tags = [t for _ in range(200) for t in _tags(tok, next(it))]
    share = tags.count("a") / len(tags)
    assert len(tags) > 250 and 0.68 < share < 0.82, (len(tags), share)  # 3:1 -> 0.75, draws are random
    # Same config, same stream; another seed, another stream.
    again = make_train_iterator(_cfg(mixture=two_sources), tok)
    other = make_train_iterator(_cfg(mixture=two_sources, seed=1), tok)
    fresh = make_train_iterator(_cfg(mixture=two_sources), tok)
    first = [next(again) for _ in range(3)]
    assert _same(first, [next(fresh) for _ in range(3)])
    assert not _same(first, [next(other) for _ in range(3)])


def test_a_weight_schedule_switches_sources_at_the_step(two_sources, tok):
    two_sources["a"]["weight"] = ((0, 1.0), (5, 1.0), (6, 0.0))
    two_sources["b"]["weight"] = ((0, 0.0), (5, 0.0), (6, 1.0))
    it = make_train_iterator(_cfg(mixture=two_sources), tok)
    per_step = [set(_tags(tok, next(it))) for _ in range(16)]
    assert all(tags <= {"a"} for tags in per_step[:5]) and set().union(*per_step[:5]) == {"a"}, per_step
    assert all(tags <= {"b"} for tags in per_step[8:]) and set().union(*per_step[8:]) == {"b"}, (
        per_step
    )  # a document drawn at step 5.9 may reach step 7


def test_curriculum_schedule_follows_the_stages(tmp_path, tok):
    path = _write(tmp_path / "c.jsonl", "c", 150, bucket=lambda i: i % 3)
    schedule = ((0, (1, 0, 0)), (4, (1, 0, 0)), (5, (0, 1, 0)), (9, (0, 1, 0)), (10, (0, 0, 1)))
    cfg = _cfg(source="jsonl", paths=(path,), curriculum_field="bucket", curriculum_schedule=schedule)
    it = make_train_iterator(cfg, tok)
    stages = [{int(m) % 3 for m in re.findall(r"docc(\d{3})", _text(tok, next(it)))} for _ in range(16)]
    for expected, steps in ((0, stages[:4]), (1, stages[6:9]), (2, stages[11:])):
        assert all(s <= {expected} for s in steps) and set().union(*steps) == {expected}, stages


def test_curriculum_over_a_mixture_keeps_each_source_share(tmp_path, tok):
    """b holds stage 1 only: it waits while stage 1 has no weight, then takes its whole share from it."""
    mix = {
        "a": {"source": "jsonl", "paths": (_write(tmp_path / "a.jsonl", "a", 80, bucket=lambda i: i % 2),)},
        "b": {"source": "jsonl", "paths": (_write(tmp_path / "b.jsonl", "b", 80, bucket=lambda i: 1),)},
    }
    cfg = _cfg(mixture=mix, curriculum_field="bucket", curriculum_schedule=((0, (1, 0)), (10, (1, 0)), (11, (1, 1))))
    it = make_train_iterator(cfg, tok)
    early = "\n".join(_text(tok, next(it)) for _ in range(10))
    assert not re.findall(r"docb", early) and {int(m) % 2 for m in re.findall(r"doca(\d{3})", early)} == {0}
    [next(it) for _ in range(3)]
    late = "\n".join(_text(tok, next(it)) for _ in range(60))
    a_ids = [int(m) for m in re.findall(r"doca(\d{3})", late)]
    share = len(a_ids) / (len(a_ids) + len(re.findall(r"docb\d{3}", late)))
    assert 0.38 < share < 0.62, share  # equal source weights
    odd = sum(i % 2 for i in a_ids) / len(a_ids)
    assert 0.3 < odd < 0.7, odd  # a's two stages, equal weights


def test_mixture_resumes_exactly_from_its_state(two_sources, tok):
    two_sources["a"]["weight"] = ((0, 1.0), (6, 0.2))
    cfg = _cfg(mixture=two_sources, shuffle_window=16)
    it = make_train_iterator(cfg, tok)
    [next(it) for _ in range(5)]
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint writes
    expected = [next(it) for _ in range(8)]
    restored = make_train_iterator(cfg, tok)
    restored.set_state(state)
    assert _same([next(restored) for _ in range(8)], expected)
    wrong = make_train_iterator(_cfg(mixture={"a": two_sources["a"]}, shuffle_window=16), tok)
    with pytest.raises(JaxllmError, match="saved with data.batch_size=4, 2 source streams.*this config has 4, 1 "):
        wrong.set_state(state)


def test_workers_give_the_same_mixed_batches(two_sources, tok):
    cfg = _cfg(mixture=two_sources)
    expected = [next(make_train_iterator(cfg, tok)) for _ in range(1)]
    it = make_train_iterator(dataclasses.replace(cfg, num_workers=2), tok)
    assert _same([next(it)], expected)


@pytest.mark.parametrize("curriculum", [False, True])
def test_mixed_batches_do_not_depend_on_the_process_count(tmp_path, two_sources, tok, curriculum):
    """Mixtures and curricula draw per row of the global batch: 1, 2 or 4 processes get the same batches,
    and a state saved by 2 restores on 4 mid-schedule."""
    if curriculum:
        two_sources = {
            "a": {**two_sources["a"], "paths": (_write(tmp_path / "s.jsonl", "a", 80, bucket=lambda i: i % 2),)},
            "b": {**two_sources["b"], "paths": (_write(tmp_path / "t.jsonl", "b", 80, bucket=lambda i: 1),)},
        }
    two_sources["a"]["weight"] = ((0, 1.0), (6, 0.2))
    extra = dict(curriculum_field="bucket", curriculum_schedule=((0, (1, 0)), (4, (0, 1)))) if curriculum else {}
    cfg = _cfg(mixture=two_sources, shuffle_window=8, **extra)
    whole = [next(it) for it in [make_train_iterator(cfg, tok)] for _ in range(14)]
    for processes in (4, 2):
        parts = [make_train_iterator(cfg, tok, process_index=p, process_count=processes) for p in range(processes)]
        got = [[next(it) for _ in range(7)] for it in parts]
        state = lanes.merge_states([json.loads(json.dumps(it.get_state())) for it in parts])  # 2's is kept
        for i in range(7):
            for key in whole[i]:
                np.testing.assert_array_equal(whole[i][key], np.concatenate([g[i][key] for g in got]))
    quarters = [make_train_iterator(cfg, tok, process_index=p, process_count=4) for p in range(4)]
    for it in quarters:
        it.set_state(state)
    got = [[next(it) for _ in range(7)] for it in quarters]
    for i in range(7):
        for key in whole[i]:
            np.testing.assert_array_equal(whole[7 + i][key], np.concatenate([g[i][key] for g in got]))


def test_processes_read_disjoint_documents_of_every_source(two_sources, tok):
    cfg = _cfg(mixture=two_sources, batch_size=2 * BATCH)
    seen = []
    for p in range(2):
        it = make_train_iterator(cfg, tok, process_index=p, process_count=2)
        seen.append(set(re.findall(r"doc[ab]\d{3}", "\n".join(_text(tok, next(it)) for _ in range(12)))))
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert {s[3] for s in seen[0]} == {s[3] for s in seen[1]} == {"a", "b"}


def test_eval_and_tokenizer_see_every_source(two_sources, tok):
    cfg = _cfg(mixture=two_sources)
    train, val = split_documents(cfg)
    assert len(train) + len(val) == 160 and len(val) == 16
    assert {d[3] for d in val} == {"a", "b"} and {d[3] for d in train} == {"a", "b"}
    text = "\n".join(_text(tok, b) for b in make_eval_iterator(cfg, tok))
    assert {m for m in re.findall(r"doc([ab])\d{3}", text)} == {"a", "b"}


def test_schedules_interpolate_linearly():
    s = mixture.parse_schedule(((0, (1, 0)), (10, (0, 1))), "k")
    np.testing.assert_allclose(mixture.at(s, -3), [1, 0])
    np.testing.assert_allclose(mixture.at(s, 2.5), [0.75, 0.25])
    np.testing.assert_allclose(mixture.at(s, 50), [0, 1])
    assert mixture.parse_schedule(2, "k", scalar=True) == ((0.0, (2.0,)),)
    draws = [mixture.uniform(7, i) for i in range(20000)]
    assert min(draws) >= 0 and max(draws) < 1 and abs(np.mean(draws) - 0.5) < 0.01


def test_mixture_from_a_config_file_and_the_command_line(two_sources):
    cfg = ml_collections.ConfigDict(
        {"data": {"source": "embedded", "mixture": None, "curriculum_field": "", "curriculum_schedule": ()}}
    )
    apply_override(cfg, f"--config.data.mixture={two_sources!r}")
    apply_override(cfg, "--config.data.mixture.b.weight=2")
    data = build(DataConfig, cfg.data, "data")
    assert [(c.name, c.weight) for c in data.mixture] == [("a", ((0.0, (3.0,)),)), ("b", ((0.0, (2.0,)),))]
    apply_override(cfg, "--config.data.curriculum_schedule=((0, (1, 0)), (100, (0.5, 0.5)))")
    with pytest.raises(JaxllmError, match="go together"):
        build(DataConfig, cfg.data, "data")


@pytest.mark.parametrize(
    "kw, match",
    [
        (
            {"mixture": {"a": {"sorce": "jsonl"}}},
            r"unknown key data.mixture.a.sorce; did you mean data.mixture.a.source",
        ),
        ({"mixture": {"a": {"weight": -1}}}, "finite and >= 0"),
        ({"mixture": {"a": {"weight": ((5, 1), (2, 1))}}}, "increasing"),
        ({"mixture": {"a": {"source": "nope"}}}, r"data.mixture.a: data.source='nope' is not known"),
        ({"mixture": ["a"]}, "must be a dict"),
        ({"curriculum_field": "bucket"}, "go together"),
        (
            {"curriculum_field": "bucket", "curriculum_schedule": ((0, (1, 0)), (5, (1,)))},
            "every point needs 2 weights",
        ),
        (
            {"curriculum_field": "bucket", "curriculum_schedule": ((0, (1, 0)),), "source": "text", "paths": ("x",)},
            "needs records with fields",
        ),
    ],
)
def test_bad_mixture_configs_fail_clearly(kw, match):
    with pytest.raises(JaxllmError, match=match):
        _cfg(**kw)


def test_bad_curriculum_data_fails_clearly(tmp_path, tok):
    path = _write(tmp_path / "c.jsonl", "c", 40, bucket=lambda i: i % 4)
    cfg = _cfg(source="jsonl", paths=(path,), curriculum_field="bucket", curriculum_schedule=((0, (1, 0, 0)),))
    with pytest.raises(JaxllmError, match=r"c.jsonl.*curriculum field 'bucket' is 3, but .* 3 stages"):
        make_train_iterator(cfg, tok)
    cfg = dataclasses.replace(cfg, curriculum_field="level")
    with pytest.raises(JaxllmError, match=r"no field 'level'.*set data.curriculum_field"):
        make_train_iterator(cfg, tok)
    only_zero = _write(tmp_path / "z.jsonl", "z", 40, bucket=lambda i: 0)
    cfg = _cfg(
        source="jsonl", paths=(only_zero,), curriculum_field="bucket", curriculum_schedule=((0, (1, 0)), (10, (0, 1)))
    )
    with pytest.raises(JaxllmError, match="at step 10 every weighted source or curriculum stage is empty"):
        make_train_iterator(cfg, tok)
