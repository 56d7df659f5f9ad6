"""The dialectical format: the teacher's instructions, parsing its answer, and the training sample. Pure."""

from __future__ import annotations

import re
from dataclasses import dataclass

SYSTEM_PROMPT = "You are a dialectical reasoning engine."

TEACHER_PROMPT = """You are a dialectical reasoning engine. For every question you receive, reason in three stages
before you answer, and write that reasoning inside <thought>...</thought>:

<thought>
**THESIS**: the strongest initial answer or position, with its reasons.
**ANTITHESIS**: the strongest objections, counter-examples or alternative views to the thesis.
**SYNTHESIS**: a resolution that keeps what survives from both and corrects what does not.
</thought>

After </thought>, write the final answer to the user's question: complete, direct and self-contained.
Do not use tools, do not search the web, do not run commands and do not ask follow-up questions."""

# Every prompt is sent after this line, so it can never start with `/` (a kimi slash command).
PROMPT_FRAME = "Answer the following request with the THESIS / ANTITHESIS / SYNTHESIS method. Do not use any tools.\n\n"

SECTIONS = ("thesis", "antithesis", "synthesis")
# A label: optional markdown heading/bold, the word, optional bold, then ':' or '-' or a newline. Each run of
# blanks belongs to one possessive quantifier: adjacent `[ \t]*` backtracked quadratically on long blank runs.
_LABEL = re.compile(
    r"^[ \t>]*+(?:#{1,6}[ \t]*+)?(?:(?:\*\*|__)[ \t]*+)?(THESIS|ANTITHESIS|SYNTHESIS)"
    r"[ \t]*+(?:(?:\*\*|__)[ \t]*+)?(?:(?::|-|–|—)[ \t]*+)?(?:(?:\*\*|__)[ \t]*+)?",
    re.IGNORECASE | re.MULTILINE,
)
_THOUGHT_TAGS = [(re.compile(f"<{t}>", re.IGNORECASE), re.compile(f"</{t}>", re.IGNORECASE))
                 for t in ("thought", "think")]
_FINAL_LABEL = re.compile(r"^[ \t#*_]*final answer[ \t*_]*:?[ \t*_]*", re.IGNORECASE | re.MULTILINE)
_ERROR_HINTS = re.compile(
    r"^(error|an error occurred|i'?m sorry, (but )?i can(no|')t|llm not set|rate limit|unauthorized|"
    r"internal server error|request failed)",
    re.IGNORECASE,
)


class DialecticError(ValueError):
    """The teacher's answer is not a usable dialectical sample (retried, then dead-lettered)."""


@dataclass
class Dialectic:
    """One parsed answer: the three sections and the final answer, each stripped."""

    thesis: str
    antithesis: str
    synthesis: str
    final_answer: str


def frame(prompt: str) -> str:
    """The user message every teacher gets: a one-line reminder of the method, then the prompt."""
    return PROMPT_FRAME + prompt


def _sections(block: str) -> dict[str, str]:
    found: dict[str, str] = {}
    marks = list(_LABEL.finditer(block))
    for m, nxt in zip(marks, marks[1:] + [None]):
        name = m.group(1).lower()
        text = block[m.end() : nxt.start() if nxt else len(block)].strip()
        if name not in found or not found[name]:
            found[name] = text
    return found


def _thought(text: str) -> tuple[int, int, int] | None:
    """(block start, block end, match end) of what `re.search(r"<(thought|think)>(.*?)</\\1>", text, re.I | re.S)`
    finds, in linear time: that pattern scans to the end of the text again from every opening tag without a
    closing one (seconds for 140 KB of `<think>`, hours at the output cap). Only the first opening tag of each
    kind can match: a later one has no closing tag after it if the first has none."""
    found = None
    for opening, closing in _THOUGHT_TAGS:
        o = opening.search(text)
        c = closing.search(text, o.end()) if o else None
        if o and c and (found is None or o.start() < found[0]):
            found = (o.start(), o.end(), c.start(), c.end())
    return found[1:] if found else None


def parse(answer: str, min_section_chars: int = 20) -> Dialectic:
    """Split a teacher answer into the three sections and the final answer, or raise DialecticError."""
    text = answer.strip()
    if not text:
        raise DialecticError("empty answer")
    if _ERROR_HINTS.match(text):
        raise DialecticError(f"answer looks like an error message: {text[:120]!r}")
    m = _thought(text)
    if m:
        block, final = text[m[0] : m[1]], text[m[2] :].strip()
    else:  # no tags: the sections, then the final answer after a label or the synthesis' last paragraph
        block, final = text, ""
    sections = _sections(block)
    missing = [s.upper() for s in SECTIONS if not sections.get(s)]
    if missing:
        raise DialecticError(f"missing section(s): {', '.join(missing)}")
    if not m:  # untagged: the final answer follows a "Final answer:" label inside the last section
        final_m = _FINAL_LABEL.search(sections["synthesis"])
        if final_m:
            final = sections["synthesis"][final_m.end() :].strip()
            sections["synthesis"] = sections["synthesis"][: final_m.start()].strip()
    else:
        final = _FINAL_LABEL.sub("", final, count=1).strip()
    short = [s.upper() for s in SECTIONS if len(sections[s]) < min_section_chars]
    if short:
        raise DialecticError(f"section(s) under {min_section_chars} characters: {', '.join(short)}")
    if not final:
        raise DialecticError("no final answer after the thought block")
    return Dialectic(sections["thesis"], sections["antithesis"], sections["synthesis"], final)


def render_output(d: Dialectic) -> str:
    """The sample's `output`: the sections under their headings, then the final answer (the SCU guide's format)."""
    return (
        f"<thought>\n**THESIS**: {d.thesis}\n**ANTITHESIS**: {d.antithesis}\n"
        f"**SYNTHESIS**: {d.synthesis}\n</thought>\n{d.final_answer}"
    )


def build_sample(prompt: str, d: Dialectic, trace: dict) -> dict:
    """The training sample (`instruction`, `input`, `output`, as the SCU guide names them) with the dialectic and provenance in `hegelion_trace`."""
    return {
        "instruction": prompt,
        "input": "",
        "output": render_output(d),
        "system": SYSTEM_PROMPT,
        "hegelion_trace": {
            "thesis": d.thesis,
            "antithesis": d.antithesis,
            "synthesis": d.synthesis,
            "final_answer": d.final_answer,
            **trace,
        },
    }


def validate_sample(sample: dict, min_section_chars: int = 20) -> Dialectic:
    """Check a stored sample (converter input) still parses; raises DialecticError or KeyError."""
    for field in ("instruction", "output"):
        if not isinstance(sample.get(field), str) or not sample[field].strip():
            raise DialecticError(f"missing field {field!r}")
    return parse(sample["output"], min_section_chars)
