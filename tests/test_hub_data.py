"""Data sets by Hugging Face Hub id or folder (jaxllm.data.splits): split rules equal to the `datasets`
library's, the guanaco layout through `jaxllm finetune --valid_split`, CSV / Arrow / JSON sources against
the same rows in JSONL, `jaxllm prep` on a Hub id, and one-line errors. The Hub is a cache built on disk in
huggingface_hub's layout (tests/hubcache.py), read through huggingface_hub itself with HF_HUB_OFFLINE=1."""

import argparse
import csv
import json
import os
import sys

import pyarrow as pa
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from hubcache import offline, put_repo  # noqa: E402

from jaxllm import JaxllmError  # noqa: E402
from jaxllm.autotrain import add_arguments, flags_to_config  # noqa: E402
from jaxllm.config import build  # noqa: E402
from jaxllm.data import splits  # noqa: E402
from jaxllm.data.config import DataConfig, make_source  # noqa: E402
from jaxllm.data.pipeline import split_documents  # noqa: E402
from jaxllm.prep import synthetic  # noqa: E402

GUANACO = "timdettmers/openassistant-guanaco"
TRAIN_FILE, EVAL_FILE = "openassistant_best_replies_train.jsonl", "openassistant_best_replies_eval.jsonl"


def _turns(split: str, n: int) -> list[str]:
    return [f"### Human: {split} question {i}?### Assistant: {synthetic.document(i)}" for i in range(n)]


def _jsonl(texts: list[str]) -> str:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts)


@pytest.fixture
def guanaco_hub(tmp_path, monkeypatch):
    """The guanaco repository's layout (its two file names, a few dozen rows) in an offline Hub cache."""
    hf_home = tmp_path / "hf"
    commit = put_repo(
        hf_home,
        GUANACO,
        {
            TRAIN_FILE: _jsonl(_turns("train", 40)),
            EVAL_FILE: _jsonl(_turns("eval", 12)),
            "README.md": "---\nlicense: apache-2.0\n---\n# guanaco\n",
        },
        repo_type="dataset",
    )
    offline(monkeypatch, hf_home)
    return commit


def _args(argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def _documents(data: dict) -> tuple[list[str], list[str]]:
    train, val = split_documents(build(DataConfig, splits.resolve_data(data), "data"))
    return [train[i] for i in range(len(train))], [val[i] for i in range(len(val))]


def test_guanaco_by_hub_id_trains_on_train_and_evaluates_on_the_eval_file(guanaco_hub, capsys):
    train_rows, eval_rows = _turns("train", 40), _turns("eval", 12)
    common = ["--data_path", GUANACO, "--trainer", "default", "--project_name", ""]
    cfg, _ = flags_to_config(_args([*common, "--valid_split", "test"]), [])
    assert cfg.data.source == "jsonl" and [os.path.basename(p) for p in cfg.data.paths] == [TRAIN_FILE]
    assert [os.path.basename(p) for p in cfg.data.valid_paths] == [EVAL_FILE]
    assert guanaco_hub in cfg.data.paths[0]  # the cached snapshot of the commit the ref pointed at
    train, val = _documents(cfg.data)
    assert train == train_rows and val == eval_rows  # all of each file, nothing else
    assert "--valid_split" not in capsys.readouterr().err  # it applies now: no note

    cfg, _ = flags_to_config(_args(common), [])  # no --valid_split: a fraction of the train file held out
    assert tuple(cfg.data.valid_paths) == ()
    train, val = _documents(cfg.data)
    assert sorted(train + val) == sorted(train_rows) and len(val) == round(40 * cfg.data.val_fraction)

    # the run config `jaxllm train` reads: ids (a commit pinned, config:split) resolved where it is parsed
    data = {
        "source": "embedded",
        "paths": (f"{GUANACO}@{guanaco_hub}",),
        "valid_paths": (f"{GUANACO}:default:test",),
        "format": "text",
    }
    resolved = splits.resolve_data(data)
    assert resolved["source"] == "jsonl" and resolved["paths"] == cfg.data.paths
    assert _documents(data) == (train_rows, eval_rows)
    assert splits.resolve_data(resolved) == resolved  # files stay files


def test_missing_data_set_and_missing_split_are_one_line_each(guanaco_hub):
    with pytest.raises(JaxllmError) as e:
        splits.resolve_data({"paths": ("nobody/no-such-set",)})
    assert "\n" not in str(e.value) and "nobody/no-such-set" in str(e.value) and "HF_HUB_OFFLINE" in str(e.value)
    with pytest.raises(JaxllmError) as e:
        flags_to_config(_args(["--data_path", GUANACO, "--valid_split", "validation"]), [])
    assert str(e.value) == (
        f"--valid_split validation: data set '{GUANACO}' has no split 'validation'; its splits: "
        "train, test; name one of them"
    )
    with pytest.raises(JaxllmError, match=r"^data set .* has no split 'dev'; its splits: train, test; name one"):
        splits.resolve_data({"paths": (GUANACO,), "valid_paths": (f"{GUANACO}:dev",)})


def test_autotrain_local_layouts(tmp_path, capsys):
    """autotrain's `{data_path}/{split}.csv` folder, `config:split` naming a sub-folder, and a single file."""
    rows = _turns("x", 6)
    folder = tmp_path / "local"
    folder.mkdir()
    with open(folder / "mydata.csv", "w", newline="") as f:
        csv.writer(f).writerows([["text"]] + [[t] for t in rows])
    (folder / "held.jsonl").write_text(_jsonl(rows[:2]))
    (folder / "en").mkdir()
    (folder / "en" / "train.jsonl").write_text(_jsonl(rows[2:]))
    (folder / "en" / "dev.jsonl").write_text(_jsonl(rows[:1]))
    cfg, _ = flags_to_config(_args(["--data_path", str(folder), "--train_split", "mydata", "--trainer", "default"]), [])
    assert (cfg.data.source, cfg.data.paths) == ("csv", (str(folder / "mydata.csv"),))
    assert sorted(sum(_documents(cfg.data), [])) == sorted(rows)
    cfg, _ = flags_to_config(
        _args(
            [
                "--data_path",
                str(folder),
                "--train_split",
                "en:train",
                "--valid_split",
                "en:validation",
                "--trainer",
                "default",
            ]
        ),
        [],
    )
    assert _documents(cfg.data) == (rows[2:], rows[:1])
    with pytest.raises(JaxllmError, match=r"^--train_split fr:train: data set .* has no config 'fr'"):
        flags_to_config(_args(["--data_path", str(folder), "--train_split", "fr:train"]), [])
    mixture = splits.resolve_data(
        {
            "mixture": {
                "a": {"paths": (f"{folder}:en:train",), "weight": 2.0},
                "b": {"source": "jsonl", "paths": (str(folder / "held.jsonl"),)},
            }
        }
    )
    assert mixture["mixture"] == {
        "a": {"source": "jsonl", "paths": (str(folder / "en" / "train.jsonl"),), "weight": 2.0},
        "b": {"source": "jsonl", "paths": (str(folder / "held.jsonl"),)},
    }
    assert splits.parse_ref("corpus/missing.jsonl") is None  # a missing file is not taken for a Hub id
    from jaxllm.prep.readers import resolve_inputs

    assert resolve_inputs([f"{folder}:en:validation", str(folder / "en")]) == [  # a folder alone: all its files
        ("json", str(folder / "en" / "dev.jsonl")),
        ("json", str(folder / "en" / "train.jsonl")),
    ]
    single, _ = flags_to_config(_args(["--data_path", str(folder / "held.jsonl"), "--valid_split", "test"]), [])
    assert (
        single.data.paths == (str(folder / "held.jsonl"),)
        and "--valid_split test is accepted" in capsys.readouterr().err
    )


def test_valid_paths_need_one_file_source():
    with pytest.raises(JaxllmError, match=r"^data.valid_paths needs a source that reads files, not data.source='emb"):
        DataConfig(valid_paths=("v.jsonl",))
    with pytest.raises(JaxllmError, match="^data.valid_paths does not combine with data.mixture"):
        DataConfig(
            source="jsonl",
            paths=("a.jsonl",),
            valid_paths=("v.jsonl",),
            mixture={"a": {"paths": ("a.jsonl",)}, "b": {"paths": ("b.jsonl",)}},
        )
    assert DataConfig(source="csv", paths="a.csv", valid_paths="v.csv").valid_paths == ("v.csv",)


# ---------------------------------------------------------------- the split rules, against `datasets`

README_CONFIGS = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: "main/*.jsonl"
  - split: test
    path: "held/*.jsonl"
- config_name: other
  data_files: "other/*.csv"
- config_name: fr
  data_dir: fr
---
"""
LAYOUTS = {
    "csv_pair": ["train.csv", "test.csv"],
    "parquet_shards": [
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
        "data/validation-00000-of-00001.parquet",
        "data/test-00000-of-00001.parquet",
        "data/extra-00000-of-00001.parquet",
    ],
    "guanaco": [TRAIN_FILE, EVAL_FILE],
    "dev_word": ["train.jsonl", "dev.jsonl", "develop.jsonl"],
    "folders": ["train/a.jsonl", "train/b.jsonl", "validation/c.jsonl", "nested/test-set/d.jsonl"],
    "digits_and_words": ["train_0.csv", "train_1.csv", "test_0.csv", "my-training-set.csv", "evaluation.csv"],
    "no_keywords": ["mytrain.jsonl", "trainee.jsonl", "notes.txt", "sub/x.jsonl"],
    "hidden_and_metadata": [
        "data.jsonl",
        ".hidden/train.jsonl",
        "__pycache__/test.jsonl",
        "dataset_info.json",
        "config.json",
    ],
    "save_to_disk": ["data-00000-of-00001.arrow", "state.json", "dataset_info.json"],
    "mixed_formats": ["train.jsonl", "train.json", "train.txt", "test.jsonl", "test.csv"],
    "readme_configs": [
        "README.md",
        "main/a.jsonl",
        "main/b.jsonl",
        "held/c.jsonl",
        "other/x.csv",
        "fr/train.jsonl",
        "fr/test.jsonl",
    ],
}


def _make(folder, names):
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(README_CONFIGS if name == "README.md" else '{"text": "x"}\n')


def _theirs(folder, config: str | None) -> dict[str, list[str]]:
    from datasets import load_dataset_builder

    files = load_dataset_builder(str(folder), name=config).config.data_files
    return {
        str(split): sorted({os.path.relpath(f, folder).replace(os.sep, "/") for f in found})
        for split, found in files.items()
    }


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_split_rules_equal_the_datasets_library(layout, tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / layout
    _make(folder, LAYOUTS[layout])
    for config in [None, "other", "fr"] if layout == "readme_configs" else [None]:
        ours = splits.data_files(str(folder), config or "")
        assert ours == _theirs(folder, config), (layout, config)
        assert list(ours) == list(_theirs(folder, config))  # the same order of splits too


# ---------------------------------------------------------------- CSV, Arrow and JSON sources

ROWS = [
    {"text": "plain", "prompt": "p0", "completion": "c0"},
    {"text": 'a "quoted", comma\nand a second line', "prompt": "p1", "completion": "c1"},
    {"text": "123", "prompt": "3.5", "completion": "true"},  # text that looks like a number stays text
    {"text": "caf\u00e9 \u2014 \u65e5\u672c", "prompt": "p3", "completion": "c3"},
]


def test_csv_arrow_and_json_read_the_rows_jsonl_holds(tmp_path):
    datasets = pytest.importorskip("datasets")
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    table = pa.Table.from_pylist(ROWS)
    with pa.ipc.new_stream(str(tmp_path / "stream.arrow"), table.schema) as w:
        for batch in table.to_batches(max_chunksize=3):
            w.write_batch(batch)
    with pa.ipc.new_file(str(tmp_path / "file.arrow"), table.schema) as w:
        w.write_table(table)
    (tmp_path / "array.json").write_text(json.dumps(ROWS))
    ds = datasets.Dataset.from_list(ROWS)  # the files `datasets` itself writes
    ds.to_csv(str(tmp_path / "datasets.csv"), index=False)
    ds.save_to_disk(str(tmp_path / "saved"))  # its cache format: data-00000-of-00001.arrow (IPC stream)
    cases = {"csv": ["datasets.csv"], "arrow": ["stream.arrow", "file.arrow"], "json": ["array.json", "rows.jsonl"]}
    for fmt in ("text", "prompt_completion"):
        rows = lambda source: [
            source[i] if fmt == "text" else (source[i]["prompt"], source[i]["completion"])  # noqa
            for i in range(len(source))
        ]
        want = rows(make_source(DataConfig(source="jsonl", paths=(str(tmp_path / "rows.jsonl"),), format=fmt)))
        assert len(want) == len(ROWS)
        for source, names in cases.items():
            for name in names:
                got = make_source(DataConfig(source=source, paths=(str(tmp_path / name),), format=fmt))
                assert rows(got) == want, (source, name, fmt)
        saved = splits.resolve_data({"paths": (str(tmp_path / "saved"),), "format": fmt})
        assert saved["source"] == "arrow" and len(saved["paths"]) == 1
        assert rows(make_source(build(DataConfig, saved, "data"))) == want
    # whatever `datasets` reads from the CSV is what the CSV source reads
    theirs = datasets.load_dataset(
        "csv",
        data_files=str(tmp_path / "datasets.csv"),
        split="train",
        cache_dir=str(tmp_path / "cache"),
        features=ds.features,
    )
    assert [r["text"] for r in theirs] == [r["text"] for r in ROWS]
    with pytest.raises(JaxllmError, match=r"^.*datasets\.csv: row 0: no field 'body'"):
        make_source(DataConfig(source="csv", paths=(str(tmp_path / "datasets.csv"),), text_field="body"))
    with pytest.raises(JaxllmError, match="is not an Arrow IPC file"):
        make_source(DataConfig(source="arrow", paths=(str(tmp_path / "rows.jsonl"),)))
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.csv").write_text("text\nx\n")
    (tmp_path / "mixed" / "b.parquet").write_text("x")
    with pytest.raises(JaxllmError, match=r"^data.paths mixes arrow, csv, parquet files; give files of one format$"):
        splits.resolve_data(
            {
                "paths": (
                    str(tmp_path / "mixed" / "a.csv"),
                    str(tmp_path / "mixed" / "b.parquet"),
                    str(tmp_path / "saved"),
                )
            }
        )


# ---------------------------------------------------------------- jaxllm prep


def test_prep_reads_a_split_of_a_cached_hub_data_set(guanaco_hub, tmp_path, capsys):
    from jaxllm.cli import run

    out = tmp_path / "out"
    assert (
        run(
            [
                "prep",
                f"--input={GUANACO}:test",
                f"--output={out}",
                "--config.progress=false",
                "--config.num_workers=1",
                "--config.tokenize.enabled=false",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    stats = json.load(open(out / "stats.json"))
    assert stats["files"] == 1 and stats["stages"]["input"]["docs_out"] == 12
    assert summary["records"] <= 12 and summary["records"] > 0
    with pytest.raises(JaxllmError, match="has no split 'validation'"):
        run(["prep", f"--input={GUANACO}:validation", f"--output={tmp_path / 'o2'}"])
