"""Generator JSONL -> mlx-lm training data: formats, chat templates, think tags, skips, the split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from .make_tiny_model import build_tokenizer, sample_rows

from hegelion_queue.training import convert as cv
from hegelion_queue.errors import HegelionError

# DeepSeek-R1's template in short: it keeps only what follows </think> in an assistant turn.
R1_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<｜User｜>{{ message['content'] }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "<｜Assistant｜>{{ content }}<｜end▁of▁sentence｜>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}"
)


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers", reason="transformers comes with the train extra")
    d = tmp_path_factory.mktemp("tok")
    build_tokenizer(d)
    return transformers.AutoTokenizer.from_pretrained(str(d))


def test_invalid_lines_are_skipped_and_counted(tmp_path):
    good = sample_rows(5)
    no_output = {k: v for k, v in good[0].items() if k != "output"}
    not_dialectic = {**good[1], "output": "Just an answer, no thesis at all."}
    bad_input = {**good[2], "input": ["not", "a", "string"]}
    src = write_jsonl(tmp_path / "run.jsonl", good + ["{not json", "", "[1, 2]", no_output, bad_input, not_dialectic])
    stats = cv.convert(src, tmp_path / "out", fmt="messages")
    assert stats.as_dict() == {
        "read": 10, "written": 5, "train": 4, "valid": 1, "skipped_bad_json": 1,
        "skipped_missing_fields": 3, "skipped_invalid_dialectic": 1,
    }
    assert stats.skipped == 5
    assert len(read_jsonl(tmp_path / "out" / "train.jsonl")) == 4
    assert len(read_jsonl(tmp_path / "out" / "valid.jsonl")) == 1


def test_messages_format_and_instruction_plus_input(tmp_path):
    sample = {**sample_rows(1)[0], "input": "Some context."}
    src = write_jsonl(tmp_path / "run.jsonl", [sample])
    cv.convert(src, tmp_path / "out", fmt="messages", single_file=tmp_path / "all.jsonl")
    (row,) = read_jsonl(tmp_path / "all.jsonl")
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
    assert row["messages"][0]["content"] == sample["system"]
    assert row["messages"][1]["content"] == f"{sample['instruction']}\n\nSome context."
    assert row["messages"][2]["content"] == sample["output"]
    assert read_jsonl(tmp_path / "out" / "train.jsonl") == [row]  # one sample: all of it trains
    assert read_jsonl(tmp_path / "out" / "valid.jsonl") == []


def test_text_format_falls_back_to_chatml_without_a_template(tmp_path):
    sample = sample_rows(1)[0]
    src = write_jsonl(tmp_path / "run.jsonl", [sample])
    cv.convert(src, tmp_path / "out", fmt="text")
    (row,) = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert row["text"] == (
        f"<|im_start|>system\n{sample['system']}<|im_end|>\n<|im_start|>user\n{sample['instruction']}<|im_end|>\n"
        f"<|im_start|>assistant\n{sample['output']}<|im_end|>\n"
    )


def test_text_format_uses_the_tokenizer_chat_template(tmp_path, hf_tokenizer):
    hf_tokenizer.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}[/{{ m['role'] }}]{% endfor %}"
    )
    try:
        sample = sample_rows(1)[0]
        src = write_jsonl(tmp_path / "run.jsonl", [sample])
        cv.convert(src, tmp_path / "out", tokenizer=hf_tokenizer)
        (row,) = read_jsonl(tmp_path / "out" / "train.jsonl")
        assert row["text"] == (
            f"[system]{sample['system']}[/system][user]{sample['instruction']}[/user]"
            f"[assistant]{sample['output']}[/assistant]"
        )
    finally:
        hf_tokenizer.chat_template = None


def test_tokenizer_without_template_gets_chatml(hf_tokenizer):
    hf_tokenizer.chat_template = None
    msgs = cv.sample_messages(sample_rows(1)[0])
    assert cv.render_text(msgs, hf_tokenizer) == cv.chatml(msgs)


def test_r1_template_keeps_the_thought_block(hf_tokenizer):
    """R1's template drops everything up to </think> in assistant turns; the converter must not."""
    hf_tokenizer.chat_template = R1_TEMPLATE
    try:
        msgs = cv.sample_messages(sample_rows(1)[0], think_tags=True)
        dropped = hf_tokenizer.apply_chat_template(msgs, tokenize=False)
        assert "**THESIS**" not in dropped  # what rendering the whole conversation would do
        prompt, completion = cv.split_chat(msgs, hf_tokenizer)
        assert prompt.endswith("<｜User｜>" + msgs[1]["content"] + "<｜Assistant｜>")
        assert completion.startswith("<think>\n**THESIS**: ")
        assert completion.endswith("<｜end▁of▁sentence｜>")
        assert cv.render_text(msgs, hf_tokenizer) == prompt + completion
    finally:
        hf_tokenizer.chat_template = None


def test_think_tags_auto_on_for_deepseek_r1_and_overridable(tmp_path):
    src = write_jsonl(tmp_path / "run.jsonl", sample_rows(1))
    for model, override, tagged in [
        ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", None, True),
        ("/models/deepseek-r1-distill-local", None, True),
        ("Qwen/Qwen2.5-0.5B-Instruct", None, False),
        ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", False, False),
        ("Qwen/Qwen2.5-0.5B-Instruct", True, True),
    ]:
        cv.convert(src, tmp_path / "out", fmt="messages", model_name=model, think_tags=override)
        answer = read_jsonl(tmp_path / "out" / "train.jsonl")[0]["messages"][-1]["content"]
        assert answer.startswith("<think>\n**THESIS**") is tagged, model
        assert ("</think>\n" in answer) is tagged and ("<thought>" in answer) is not tagged


def test_split_is_deterministic_and_keeps_one_valid_sample():
    assert cv.split_indices(40, 0.05, 42) == cv.split_indices(40, 0.05, 42)
    assert cv.split_indices(40, 0.05, 42) != cv.split_indices(40, 0.05, 7)
    train, valid = cv.split_indices(40, 0.05, 42)
    assert len(valid) == 2 and sorted(train + valid) == list(range(40))
    assert len(cv.split_indices(2, 0.05)[1]) == 1  # at least one valid example from 2 samples
    assert cv.split_indices(1, 0.05) == ([0], [])
    assert cv.split_indices(10, 0.0) == (list(range(10)), [])
    with pytest.raises(ValueError):
        cv.split_indices(10, 1.0)


def test_split_files_are_the_single_file_partitioned(tmp_path):
    src = write_jsonl(tmp_path / "run.jsonl", sample_rows(40))
    stats = cv.convert(
        src, tmp_path / "out", fmt="text", valid_fraction=0.1, seed=3, single_file=tmp_path / "all.jsonl"
    )
    train, valid = read_jsonl(tmp_path / "out" / "train.jsonl"), read_jsonl(tmp_path / "out" / "valid.jsonl")
    assert (stats.train, stats.valid) == (36, 4) == (len(train), len(valid))
    everything = read_jsonl(tmp_path / "all.jsonl")
    assert sorted(r["text"] for r in train + valid) == sorted(r["text"] for r in everything)
    cv.convert(src, tmp_path / "again", fmt="text", valid_fraction=0.1, seed=3)
    assert read_jsonl(tmp_path / "again" / "valid.jsonl") == valid


def test_errors_a_user_can_act_on(tmp_path):
    with pytest.raises(HegelionError, match="no such file"):
        cv.convert(tmp_path / "missing.jsonl", tmp_path / "out")
    src = write_jsonl(tmp_path / "run.jsonl", sample_rows(1))
    with pytest.raises(HegelionError, match="unknown format"):
        cv.convert(src, tmp_path / "out", fmt="csv")
