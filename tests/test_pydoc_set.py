"""The ablation's bundled data (hegelion_queue/training/pydoc_set.py): samples cut from CPython's own pydoc_data.topics."""

from __future__ import annotations

import json
import re

from hegelion_queue.training.convert import ConvertStats, read_samples
from hegelion_queue.training.pydoc_set import build, samples, sections


def test_every_sample_is_real_reference_text_in_the_pipelines_format(tmp_path):
    from pydoc_data.topics import topics

    rows = samples(topics)
    assert len(rows) > 300 and len({r["instruction"] for r in rows}) == len(rows)  # one prompt id each
    flat = {k: " ".join(v.split()) for k, v in topics.items()}
    for r in rows:
        trace = r["hegelion_trace"]
        for part in ("thesis", "antithesis", "synthesis"):
            text = trace[part]
            assert 60 <= len(text) <= 160 or text.endswith("…"), text
            # each sentence (or clause before a colon: a run may keep the "For example:" that introduced omitted
            # code) is from its own topic, not made up
            for piece in re.split(r"(?<=[.!?:])\s+", text.rstrip("…")):
                assert " ".join(piece.split()[:3]) in flat[trace["topic"]], (part, text)
        assert trace["thesis"].startswith(trace["final_answer"])
        assert not r["instruction"].startswith("/")  # never a kimi slash command
    tables = [r for r in rows if "+---" in r["output"] or "|===" in r["output"]]  # the reference's unindented tables
    assert len(tables) < 0.05 * len(rows)  # a known wart the README names: a few samples carry table fragments
    out = tmp_path / "pydoc.jsonl"
    assert build(out) == len(rows)
    stats = ConvertStats()
    assert len(list(read_samples(out, stats))) == len(rows) and stats.skipped == 0  # the converter takes them all
    again = tmp_path / "again.jsonl"
    build(again)
    assert again.read_bytes() == out.read_bytes()  # deterministic
    assert len({json.loads(line)["hegelion_trace"]["topic"] for line in out.read_text().splitlines()}) > 60


def test_sections_keep_prose_and_leave_code_and_grammar_out():
    text = ("The \"for\" statement\n*******************\n\nThe \"for\" statement is used to iterate over the elements "
            "of a sequence\n(such as a string, tuple or list) or other iterable object:\n\n   for_stmt ::= \"for\" "
            "target_list \"in\" starred_list \":\" suite\n\nFor example:\n\n   for i in range(10):\n       print(i)\n\n"
            "Names in the target list are not deleted when the loop is finished, but if the sequence is empty.\n")
    ((title, paragraphs),) = sections(text)
    assert title == 'The "for" statement'
    assert paragraphs == ['The "for" statement is used to iterate over the elements of a sequence (such as a string, '
                          'tuple or list) or other iterable object:',
                          "Names in the target list are not deleted when the loop is finished, but if the sequence "
                          "is empty."]
