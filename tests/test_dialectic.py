"""Parsing the teacher's answer: labels in every style, and what is rejected."""

import pytest

from hegelion_queue.dialectic import DialecticError, build_sample, frame, parse, render_output, validate_sample

T, A, S = "x" * 30 + " thesis", "y" * 30 + " antithesis", "z" * 30 + " synthesis"


@pytest.mark.parametrize(
    "answer",
    [
        f"<thought>\n**THESIS**: {T}\n**ANTITHESIS**: {A}\n**SYNTHESIS**: {S}\n</thought>\nThe answer.",
        f"<thought>\n## Thesis\n{T}\n## Antithesis\n{A}\n## Synthesis\n{S}\n</thought>\n\nThe answer.",
        f"<thought>thesis: {T}\nantithesis - {A}\nsynthesis: {S}</thought>\n**Final answer:** The answer.",
        f"<think>\n__THESIS__ {T}\n__ANTITHESIS__ {A}\n__SYNTHESIS__ {S}\n</think>\nThe answer.",
        f"THESIS: {T}\nANTITHESIS: {A}\nSYNTHESIS: {S}\n\nFinal answer: The answer.",
    ],
)
def test_parses_every_label_style(answer):
    d = parse(answer)
    assert (d.thesis, d.antithesis, d.synthesis, d.final_answer) == (T, A, S, "The answer.")


@pytest.mark.parametrize(
    "answer, why",
    [
        ("", "empty"),
        (f"<thought>**THESIS**: {T}\n**SYNTHESIS**: {S}</thought>\nok", "ANTITHESIS"),
        (f"<thought>**THESIS**: {T}\n**ANTITHESIS**: short\n**SYNTHESIS**: {S}</thought>\nok", "under 20"),
        (f"<thought>**THESIS**: {T}\n**ANTITHESIS**: {A}\n**SYNTHESIS**: {S}</thought>\n  ", "no final answer"),
        ("LLM not set", "error message"),
        ("Error code: 429 - rate limit exceeded", "error message"),
    ],
)
def test_rejects_unusable_answers(answer, why):
    with pytest.raises(DialecticError, match=why):
        parse(answer)


def test_sample_round_trips_through_validation():
    d = parse(f"<thought>**THESIS**: {T}\n**ANTITHESIS**: {A}\n**SYNTHESIS**: {S}</thought>\nFinal.")
    sample = build_sample("Why?", d, {"prompt_id": "p"})
    assert sample["output"] == render_output(d)
    assert sample["output"].startswith("<thought>\n**THESIS**: ")
    assert sample["system"] == "You are a dialectical reasoning engine." and sample["input"] == ""
    assert validate_sample(sample) == d
    assert sample["hegelion_trace"]["final_answer"] == "Final." and sample["hegelion_trace"]["prompt_id"] == "p"


@pytest.mark.parametrize("prompt", ["/clear", "/yolo do it", "/init something", "  /x"])
def test_framed_prompt_never_starts_with_a_slash(prompt):
    framed = frame(prompt)
    assert not framed.lstrip().startswith("/")
    assert framed.endswith(prompt)
