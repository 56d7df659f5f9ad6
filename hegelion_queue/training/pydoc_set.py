"""A bundled dataset with real variety for the ablation: dialectic samples cut from CPython's own reference text.

`pydoc_data.topics` ships with every CPython (it is what `help("for")` prints): about 80 topics of the language
reference, ~460 KB of English technical prose. Each section of a topic (a heading and its paragraphs) gives one
sample per three consecutive prose paragraphs: THESIS, ANTITHESIS and SYNTHESIS are those paragraphs (each cut at
a sentence end to at most MAX_CHARS), the final answer is the first sentence of the first. The prompt asks about
the section's title. These are not reasoned dialectics: what the set brings is real, varied text in the project's
sample format, where the demo's teacher writes near-templates. Known warts (kept: the README's ablation was measured
on exactly this output): the reference's few unindented ASCII tables pass for prose, and a run may keep a sentence
such as "For example:" whose code block was left out.

    python -m hegelion_queue.training.pydoc_set OUT.jsonl      # deterministic for one Python version

The committed copy (tests/fixtures/pydoc_dialectic.jsonl) was built with CPython 3.11.7; other versions' reference
text differs a little, so rebuild only to study that.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections import Counter
from pathlib import Path

from hegelion_queue.dialectic import Dialectic, build_sample, parse

MAX_CHARS = 160
MIN_CHARS = 60
_UNDERLINE = re.compile(r"^([*=\-~^\"+#])\1{2,}$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"*(“])")
QUESTIONS = (
    "Explain {title} in Python.",
    "What should a Python programmer know about {title}?",
    "Describe how {title} work in Python, and where the rules have exceptions.",
    "How does Python's reference manual define {title}?",
)


def sections(text: str) -> list[tuple[str, list[str]]]:
    """(title, prose paragraphs) of one topic: code, grammar and tables (indented blocks) and paragraphs under
    MIN_CHARS are left out."""
    lines = text.splitlines()
    found: list[tuple[str, list[str]]] = []
    title, paragraphs, block = "", [], []

    def end_block() -> None:
        text = " ".join(line.strip() for line in block)
        if block and not block[0].startswith(" ") and len(text) >= MIN_CHARS:  # not "For example:" before code
            paragraphs.append(text)
        block.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if line.strip() and _UNDERLINE.match(nxt) and len(nxt) >= len(line.strip()) - 2:
            end_block()
            if paragraphs:
                found.append((title, paragraphs))
            title, paragraphs = line.strip(), []
            i += 2
            continue
        if line.strip():
            block.append(line)
        else:
            end_block()
        i += 1
    end_block()
    if paragraphs:
        found.append((title, paragraphs))
    return found


def chunks(paragraphs: list[str], limit: int = MAX_CHARS) -> list[str]:
    """The section's prose as consecutive runs of whole sentences of at most `limit` characters (a longer sentence
    is a run of its own, cut at `limit`); runs under MIN_CHARS are left out."""
    out, current = [], ""
    for paragraph in paragraphs:
        for sentence in _SENTENCE_END.split(paragraph):
            sentence = sentence if len(sentence) <= limit else sentence[: limit - 1].rstrip() + "…"
            if current and len(current) + 1 + len(sentence) > limit:
                out.append(current)
                current = ""
            current = f"{current} {sentence}".strip()
        if len(current) >= limit // 2:  # a paragraph end is a good place to stop a run
            out.append(current)
            current = ""
    if current:
        out.append(current)
    return [run for run in out if len(run) >= MIN_CHARS]


def first_sentence(text: str) -> str:
    return _SENTENCE_END.split(text, maxsplit=1)[0]


def samples(topics: dict[str, str]) -> list[dict]:
    """Every sample, in topic and section order; each passes the pipeline's own dialectic check."""
    found = [(key, title or key, chunks(paragraphs)) for key in sorted(topics)
             for title, paragraphs in sections(topics[key])]
    titles = Counter(title for _, title, _ in found)
    out = []
    for key, title, runs in found:
        groups = [runs[i : i + 3] for i in range(0, len(runs) - 2, 3)]
        name = title.replace('"', "")
        name = name[0].lower() + name[1:] if name[1:2].islower() else name
        if titles[title] > 1:
            name += f" (the {key} topic)"
        question = QUESTIONS[int(hashlib.sha256(f"{key}/{title}".encode()).hexdigest(), 16) % len(QUESTIONS)]
        for part, (a, b, c) in enumerate(groups, 1):
            prompt = question.format(title=name) + (f" (part {part} of {len(groups)})" if len(groups) > 1 else "")
            d = Dialectic(a, b, c, first_sentence(a))
            parse(build_sample(prompt, d, {})["output"])
            out.append(build_sample(prompt, d, {
                "teacher": "pydoc_data.topics", "topic": key, "section": title,
                "prompt_id": hashlib.sha256(prompt.encode("utf-8")).hexdigest(),
                "python": ".".join(map(str, sys.version_info[:3])),
            }))
    return out


def build(out: str | Path) -> int:
    from pydoc_data.topics import topics

    rows = samples(topics)
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return len(rows)


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "pydoc_dialectic.jsonl"
    print(f"{build(target)} samples -> {target}")
