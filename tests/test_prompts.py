"""Prompt sources: column detection, ids, dedup, sampling, and the errors a user sees."""

from __future__ import annotations

import time

import datasets
import orjson
import pyarrow.parquet as pq
import pytest

from hegelion_queue.errors import HegelionError
from hegelion_queue.sources.read import normalized, prompt_id
from hegelion_queue.sources.sample import load_prompts

from .conftest import FIXTURES, ULTRA


def load(path, split="train_prefs", **kw):
    return load_prompts(str(path), split, **kw)


@pytest.mark.parametrize(
    "name, column",
    [
        ("ultrafeedback_binarized", "prompt"),
        ("alpaca.jsonl", "instruction"),
        ("dolly.jsonl", "instruction"),
        ("no_robots.parquet", "prompt"),
        ("lmsys.jsonl", "conversation"),
        ("sharegpt.jsonl", "conversations"),
        ("prompts.txt", "prompt"),
    ],
)
def test_column_detection_on_every_schema(name, column):
    prompts, stats = load(FIXTURES / name)
    assert stats.column == column
    assert prompts and all(p.text.strip() for p in prompts)
    assert all(not p.text.startswith("…") for p in prompts)  # never the assistant turn


def test_instruction_gets_its_input_or_context_appended():
    alpaca, _ = load(FIXTURES / "alpaca.jsonl")
    dolly, _ = load(FIXTURES / "dolly.jsonl")
    assert any(p.text.endswith("\n\nContext: a small town of 5,000 people.") for p in alpaca)
    assert any(p.text.endswith("\n\nAssume a European country.") for p in dolly)
    assert not any(p.text.endswith("\n\n") for p in alpaca + dolly)  # empty inputs add nothing


def test_sharegpt_takes_first_human_turn_not_system():
    prompts, _ = load(FIXTURES / "sharegpt.jsonl")
    assert all(p.text != "Be brief." for p in prompts)


def test_ids_equal_the_datasets_prompt_id_column():
    prompts, stats = load(ULTRA)
    table = pq.read_table(ULTRA / "data" / "train_prefs-00000-of-00001.parquet").to_pydict()
    assert stats.id_mismatches == 0
    for p in prompts:
        assert p.prompt_id == table["prompt_id"][p.row] == prompt_id(table["prompt"][p.row])


def test_dedup_empty_and_too_long_are_counted_not_silent():
    _, stats = load(ULTRA, max_prompt_chars=1000)
    assert stats.rows == 80
    assert stats.duplicates == 2  # an exact and a whitespace-variant duplicate
    assert stats.skipped_empty == 1
    assert stats.skipped_too_long == 1  # the 2,000-character prompt
    assert stats.usable == 80 - 2 - 1 - 1


def test_non_ascii_prompt_is_kept_verbatim():
    prompts, _ = load(ULTRA)
    assert any("thèse" in p.text and "日本語" in p.text for p in prompts)


def test_sample_is_pinned_for_a_seed_and_matches_dataset_shuffle():
    prompts, stats = load(ULTRA, limit=5, seed=42)
    assert [p.row for p in prompts] == [58, 32, 36, 29, 24]
    everything, _ = load(ULTRA, seed=42)
    order = datasets.Dataset.from_dict({"i": list(range(stats.usable))}).shuffle(seed=42)["i"]
    usable_rows = sorted(p.row for p in everything)
    assert [p.row for p in everything] == [usable_rows[i] for i in order]
    again, _ = load(ULTRA, limit=5, seed=42)
    other, _ = load(ULTRA, limit=5, seed=7)
    assert [p.prompt_id for p in again] == [p.prompt_id for p in prompts]
    assert [p.prompt_id for p in other] != [p.prompt_id for p in prompts]


def test_limit_counts_usable_prompts():
    prompts, stats = load(ULTRA, limit=77)
    assert len(prompts) == 77 == stats.usable
    assert len({normalized(p.text) for p in prompts}) == 77


def test_every_split_of_the_hub_fixture_loads():
    for split in ("train_prefs", "test_prefs", "train_sft", "test_sft", "train_gen", "test_gen"):
        prompts, stats = load(ULTRA, split=split)
        assert stats.usable == stats.rows - 3


def test_missing_column_lists_the_columns():
    with pytest.raises(HegelionError, match="not found; the dataset has: prompt, prompt_id, chosen"):
        load(ULTRA, column="question")


def test_no_prompt_column_lists_the_columns(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"a": 1, "b": "x"}\n')
    with pytest.raises(HegelionError, match="no prompt column found; the dataset has: a, b"):
        load(f)


def test_non_string_prompt_column_is_a_clear_error(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"prompt": 1}\n{"prompt": 2}\n')
    with pytest.raises(HegelionError, match="'prompt' holds values that are not text"):
        load(f)
    with pytest.raises(HegelionError, match="holds int values, not text"):
        load(f, column="prompt")


def test_forced_message_column_extracts_the_user_turn():
    prompts, stats = load(ULTRA, column="chosen")
    assert stats.column == "chosen"
    assert all(p.text for p in prompts)


def test_invalid_utf8_lines_are_skipped_and_reported(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"prompt": "good one"}\n{"prompt": "bad \xff\xfe"}\n{"prompt": "good two"}\n')
    (tmp_path / "a.txt").write_bytes(b"good one\nbad \xff\ngood two\n")
    (tmp_path / "a.csv").write_bytes(b"prompt\ngood one\nbad \xff\ngood two\n")
    for name in ("a.jsonl", "a.txt", "a.csv"):
        prompts, stats = load(tmp_path / name)
        assert sorted(p.text for p in prompts) == ["good one", "good two"]
        assert stats.skipped_invalid == 1 and stats.warnings


def test_nul_bytes_and_whitespace_prompts_are_skipped(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"prompt": "a\\u0000b"}\n{"prompt": " \\t\\n"}\n{"prompt": "fine"}\n')
    prompts, stats = load(f)
    assert [p.text for p in prompts] == ["fine"]
    assert stats.skipped_invalid == 1 and stats.skipped_empty == 1


def test_missing_path_and_corrupt_parquet(tmp_path):
    with pytest.raises(HegelionError, match="does not exist"):
        load(tmp_path / "nope.parquet")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(HegelionError, match="not a readable parquet file"):
        load(bad)


def test_prompts_file_skips_blank_lines():
    prompts, stats = load_prompts("", "", prompts_file=str(FIXTURES / "prompts.txt"))
    assert stats.rows == 12 and len(prompts) == 12


def test_offline_hub_is_one_clear_error_within_seconds():
    t0 = time.monotonic()
    with pytest.raises(HegelionError, match="unreachable; pass a local file or directory"):
        load_prompts("HuggingFaceH4/ultrafeedback_binarized", "train_prefs")
    assert time.monotonic() - t0 < 15


def test_a_1mb_prompt_is_skipped_and_counted_not_cut(tmp_path):
    f = tmp_path / "big.jsonl"
    big = "word " * 200_000  # 1 MB
    f.write_text(orjson.dumps({"prompt": big}).decode() + "\n" + '{"prompt": "a normal question"}\n')
    prompts, stats = load(f)
    assert [p.text for p in prompts] == ["a normal question"]
    assert stats.skipped_too_long == 1


# ---------------------------------------------------------------- the streaming sampler against the old one

LEGACY_COMMIT = "93b5f39"  # the last commit whose producer held every row in memory


@pytest.fixture(scope="module")
def legacy():
    """hegelion_queue/prompts.py as it was before sampling streamed, loaded from git history."""
    import importlib.util
    import subprocess
    import sys

    from .conftest import ROOT

    src = subprocess.run(["git", "show", f"{LEGACY_COMMIT}:hegelion_queue/prompts.py"], cwd=ROOT, capture_output=True,
                         text=True)
    assert src.returncode == 0, f"the old producer is not in this clone's history: {src.stderr}"
    spec = importlib.util.spec_from_loader("hegelion_queue._legacy_prompts", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "hegelion_queue"
    sys.modules[spec.name] = module
    exec(compile(src.stdout, "legacy_prompts.py", "exec"), module.__dict__)
    yield module
    del sys.modules[spec.name]


def _mixed_parquet(path):
    """A parquet of 1,000 rows across several row groups: duplicates, variants, empty, long, NUL and null rows."""
    import random

    import pyarrow as pa

    rng = random.Random(3)
    words = "thesis antithesis synthesis reason state spirit history freedom".split()
    texts = []
    for i in range(1000):
        kind = rng.random()
        if kind < 0.1 and texts:
            texts.append(rng.choice([t for t in texts if isinstance(t, str)] or ["x"]))  # exact duplicate
        elif kind < 0.15 and texts:
            texts.append("  " + (texts[-1] or "y").replace(" ", "\n", 1) + " ")  # whitespace variant
        elif kind < 0.17:
            texts.append(rng.choice(["", "   ", None, "a\x00b", "long " * 2000]))
        else:
            texts.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) + f" {i % 400}")
    pq.write_table(pa.table({"prompt": texts}), path, row_group_size=97)
    return path


@pytest.mark.parametrize("batch_rows, chunk", [(7, 5), (65_536, 100_000)])
def test_streaming_sample_equals_the_old_producer_on_every_fixture(legacy, monkeypatch, tmp_path, batch_rows, chunk):
    from hegelion_queue.sources import read as prompts
    from hegelion_queue.sources import sample as streaming

    monkeypatch.setattr(prompts, "BATCH_ROWS", batch_rows)  # many batches and chunks on small fixtures
    monkeypatch.setattr(streaming, "CHUNK", chunk)
    cases = [(str(ULTRA), split, {}) for split in ("train_prefs", "test_prefs", "train_sft", "test_sft", "train_gen",
                                                     "test_gen")]
    cases += [(str(FIXTURES / name), "train", {}) for name in ("alpaca.jsonl", "dolly.jsonl", "no_robots.parquet",
                                                                "lmsys.jsonl", "sharegpt.jsonl", "prompts.txt")]
    cases += [(str(ULTRA), "train_prefs", {"column": "chosen"}), (str(ULTRA), "train_prefs", {"max_prompt_chars": 1000}),
              ("", "", {"prompts_file": str(FIXTURES / "prompts.txt")}),
              (str(FIXTURES / "demo_prompts.txt"), "", {}), (str(_mixed_parquet(tmp_path / "mixed.parquet")), "", {})]
    (tmp_path / "bad.jsonl").write_bytes(b'{"prompt": "one"}\nnot json\n{"prompt": "two"}\n{"prompt": "one"}\n')
    cases.append((str(tmp_path / "bad.jsonl"), "", {}))
    for dataset, split, kw in cases:
        for limit, seed in ((None, 42), (5, 42), (7, 7), (10_000, 1)):
            old, old_stats = legacy.load_prompts(dataset, split, limit=limit, seed=seed, **kw)
            new, new_stats = streaming.load_prompts(dataset, split, limit=limit, seed=seed, **kw)
            assert [(p.text, p.prompt_id, p.row) for p in new] == [(p.text, p.prompt_id, p.row) for p in old], dataset
            assert new_stats.as_dict() == old_stats.as_dict(), (dataset, kw)
