"""Decontamination: the normaliser, the 13-gram hashes, the matcher and the report alone; benchmarks read from files
as the producer reads its sources; then a run with planted benchmark text exported by the real CLI."""

from __future__ import annotations

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hegelion_queue.dataset import decontaminate as dc
from hegelion_queue.dataset import quality
from hegelion_queue.errors import HegelionError
from hegelion_queue.sources.read import prompt_id

from .test_hfdataset import LONG, commit_known_run, figure, hub_folder

EGGS = ("Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her "
        "friends every day with four. How many eggs does she sell at the farmers' market daily?")
# the same words in other case, punctuation, whitespace and width (NFKC folds the full-width digits)
EGGS_FOLDED = ("JANET’S DUCKS lay １６ eggs per day -- she eats three for breakfast every morning,\n  and bakes "
               "muffins for her friends every day with four!!! How many eggs does she sell at the FARMERS' market "
               "daily")
TRIANGLE = ("In a right triangle the square of the hypotenuse equals the sum of the squares of the other two sides, so "
            "what is the hypotenuse when the legs are 3 and 4?")
TRIANGLE_13 = "in a right triangle the square of the hypotenuse equals the sum of"
RIVER = "Which river flows through the most countries on its way from the Black Forest to the Black Sea?"
RIVER_12 = "flows through the most countries on its way from the Black Forest"  # 12 of its words


def index(**benchmarks: list[str]) -> dc.Index:
    return dc.Index.build([(dc.Benchmark(name), [texts]) for name, texts in benchmarks.items()])


def sample(pid: str, **fields: str) -> dict:
    return {"prompt_id": pid, **{f: fields.get(f, "Nothing in common here.") for f in dc.FIELDS}}


def test_words_fold_case_punctuation_whitespace_and_width():
    assert dc.words(EGGS) == dc.words(EGGS_FOLDED)
    assert dc.words("Ｆｉｎｅ —\tthe ﬁnal\u00a0WORD, isn't it?") == ["fine", "the", "final", "word", "isn", "t", "it"]
    every_ascii = "".join(map(chr, range(128))) + " Don't_stop me-now, 3.14!"
    assert dc.words(every_ascii) == quality.words(every_ascii)  # the fast ASCII path: the quality checks' words


def test_a_13_gram_hash_depends_on_its_words_and_their_order_only():
    values = dc.mix(np.arange(1, 31))
    h = dc.ngram_hashes(values)
    assert len(h) == 30 - 13 + 1 and len(set(h.tolist())) == len(h)
    assert dc.ngram_hashes(values[5:18])[0] == h[5]  # the same 13 words anywhere: the same hash
    swapped = values[:13].copy()
    swapped[[3, 4]] = swapped[[4, 3]]
    assert dc.ngram_hashes(swapped)[0] != h[0]
    assert len(dc.ngram_hashes(values[:12])) == 0


def test_matcher_finds_13_words_shared_and_nothing_shorter_or_across_texts():
    ix = index(gsm=[EGGS, TRIANGLE], geo=[RIVER, TRIANGLE])
    rows = [
        sample("folded", prompt=EGGS_FOLDED),
        sample("span", final_answer=f"Recall that {TRIANGLE_13.upper()} everything else we know."),
        sample("twelve", synthesis=f"The Danube, which {RIVER_12}, is the answer."),
        sample("split", thesis="We know that in a right triangle the",  # 13 words over two fields
               antithesis="square of the hypotenuse equals the sum of"),
        sample("across", prompt="does she sell at the farmers' market daily in a right triangle the"),  # over 2 texts
    ]
    found = ix.check(rows)
    assert [(m.prompt_id, m.benchmark, m.field, m.span) for m in found] == [
        ("folded", "gsm", "prompt", " ".join(dc.words(EGGS))),
        ("span", "gsm", "final_answer", TRIANGLE_13),
        ("span", "geo", "final_answer", TRIANGLE_13),  # the same question in two benchmarks: one match each
    ]
    ws = dc.words(TRIANGLE)[:25]
    assert ix.check([sample("x", prompt=" ".join(ws))])  # 25 words in a row match ...
    ws[12] = "banana"
    assert ix.check([sample("x", prompt=" ".join(ws))]) == []  # ... not with the middle one changed: 12 + 12
    both = ix.check([sample("y", synthesis=f"{RIVER} Also: {EGGS}")])
    assert [(m.benchmark, m.span) for m in both] == [("geo", " ".join(dc.words(RIVER))),
                                                      ("gsm", " ".join(dc.words(EGGS)))]  # two spans, text order
    many = [sample(str(i)) for i in range(dc.CHECK_ROWS + 5)]  # checked CHECK_ROWS at a time
    many[-1]["final_answer"] = EGGS
    assert [m.prompt_id for m in ix.check(many)] == [str(dc.CHECK_ROWS + 4)]


def test_report_counts_samples_once_and_lists_the_first_matches():
    r = dc.Report([dc.Benchmark("gsm"), dc.Benchmark("geo")], shown_max=3)
    m = [dc.Match("a", "gsm", "prompt", "x"), dc.Match("a", "gsm", "synthesis", "y"),
         dc.Match("a", "geo", "prompt", "x")]
    assert r.add(10, m) == {"a"}
    assert r.add(5, [dc.Match("b", "geo", "final_answer", "z")]) == {"b"}
    assert (r.samples, r.contaminated, r.matches) == (15, 2, 4)
    assert r.by_benchmark == {"gsm": 1, "geo": 2} and r.by_field == {"prompt": 1, "synthesis": 1, "final_answer": 1}
    assert r.shown == m  # the first shown_max


def test_a_benchmark_without_13_words_anywhere_is_an_error():
    with pytest.raises(HegelionError, match="none of its 2 texts has 13 words or more"):
        index(tiny=["What is two plus two?", RIVER_12])


def test_benchmarks_are_read_like_prompt_sources_question_with_answer_and_choices(tmp_path):
    mcq = tmp_path / "mcq.jsonl"
    choice = "the water cycle moves heat from the oceans to the poles through evaporation and rain"
    mcq.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in [
        {"question": "Why?", "choices": ["no", choice], "answer": 1, "subject": "x"},
        {"question": RIVER, "choices": ["Danube", "Volga"], "answer": 0, "subject": "y"}]))
    csv = tmp_path / "qa.csv"
    csv.write_text(f'question,answer\n"{RIVER}","The Danube, ten countries."\n')
    txt = tmp_path / "lines.txt"
    txt.write_text(f"{EGGS}\n\n{TRIANGLE}\n")
    folder = tmp_path / "bench"
    (folder / "data").mkdir(parents=True)
    pq.write_table(pa.table({"problem": [TRIANGLE], "solution": ["Five, by the rule."]}),
                   folder / "data" / "validation-00000-of-00001.parquet")
    ix = dc.load([str(mcq), str(csv), str(txt), f"{folder}:validation"])
    assert [(b.columns, b.texts, b.short) for b in ix.benchmarks] == [
        (["question", "answer", "choices"], 2, 0),  # an answer's index is no text: only the choices are read
        (["question", "answer"], 1, 0), (["prompt"], 2, 0), (["problem", "solution"], 1, 0)]
    found = ix.check([sample("c", synthesis=f"Because {choice}."), sample("t", prompt=TRIANGLE)])
    assert [(m.prompt_id, m.benchmark) for m in found] == [("c", str(mcq)), ("t", str(txt)),
                                                           ("t", f"{folder}:validation")]


@pytest.mark.parametrize("src,says", [
    ("./no-such.jsonl", "--decontaminate ./no-such.jsonl: dataset path './no-such.jsonl' does not exist"),
    ("someone/benchmark", "--decontaminate someone/benchmark: cannot load 'someone/benchmark' split 'test': the "
                          "Hugging Face Hub is unreachable; name a local jsonl"),
    ("someone/benchmark:validation", "split 'validation'"),
    ("NOCOLUMN", "no question column"),
])
def test_a_bad_benchmark_is_one_clear_error(tmp_path, src, says):
    (tmp_path / "numbers.jsonl").write_text('{"id": 1, "score": 2}\n')
    src = str(tmp_path / "numbers.jsonl") if src == "NOCOLUMN" else src
    with pytest.raises(HegelionError) as e:
        dc.load([src])
    assert says in str(e.value) and "\n" not in str(e.value)


def test_export_cli_reports_planted_benchmark_text_and_drops_it(hq, redis_server, tmp_path):
    bench = tmp_path / "gsm.jsonl"
    bench.write_bytes(b"".join(orjson.dumps({"question": q, "answer": "#### 8"}) + b"\n"
                               for q in (EGGS, TRIANGLE, RIVER)))
    prompts = [EGGS_FOLDED, "Should a town keep its old library open when few people borrow books?",
               "Is it better to repair an old bicycle or buy a new one?", "Why do cats purr?"]
    hq("enqueue", "--dataset", str(hub_folder(tmp_path, prompts)), "--split", "train", "--run", "dc", "--seed", "0")
    answer = "Keep the direct answer, but say where it fails and what it costs."
    commit_known_run("dc", [(LONG, answer), (LONG.replace("strongest", "best"), f"Recall that {TRIANGLE_13} all.")
                            , (f"The Danube, which {RIVER_12}, is the answer.", answer), (LONG[:200], answer)], dead=0)
    pid = [prompt_id(p) for p in prompts]

    out = tmp_path / "checked"
    said = hq("export", "--format", "hf", str(out), "--run", "dc", "--decontaminate", str(bench)).stdout
    assert "2 samples share 13 words with a benchmark (2 spans in contaminated.jsonl)" in said
    listed = [orjson.loads(x) for x in (out / "contaminated.jsonl").read_bytes().splitlines()]
    assert listed == [
        {"prompt_id": pid[0], "benchmark": str(bench), "field": "prompt", "span": " ".join(dc.words(EGGS))},
        {"prompt_id": pid[1], "benchmark": str(bench), "field": "final_answer", "span": TRIANGLE_13}]
    card = (out / "README.md").read_text()
    assert figure(card, "samples sharing 13 words with a benchmark") == "2"
    assert "(kept: 2 would go with `--drop-contaminated`)" in card
    assert "(2 spans; samples by field: prompt 1, final_answer 1)" in card
    for m in listed:
        assert f"| `{m['prompt_id']}` | `{bench}` | {m['field']} | {m['span']} |" in card
    assert f"| `{bench}` | question, answer | 3 | " in card
    assert len(pq.read_table(out / "data").column("prompt_id")) == 4

    dropped = tmp_path / "clean"
    said = hq("export", "--format", "hf", str(dropped), "--run", "dc", "--decontaminate", str(bench),
              "--drop-contaminated").stdout
    assert "wrote 2 rows" in said and "2 removed" in said
    assert sorted(pq.read_table(dropped / "data").column("prompt_id").to_pylist()) == sorted(pid[2:])
    assert figure((dropped / "README.md").read_text(), "rows removed as contaminated") == "2"

    for args, says in ((["--decontaminate", str(tmp_path / "gone.jsonl")], "gone.jsonl' does not exist"),
                       (["--drop-contaminated"], "--drop-contaminated needs --decontaminate")):
        p = hq("export", "--format", "hf", str(tmp_path / "never"), "--run", "dc", *args, check=False)
        assert p.returncode == 1 and p.stderr.count("\n") == 1 and says in p.stderr, p.stderr
        assert not (tmp_path / "never").exists()
