"""export --format hf: the quality checks alone, then a run with known content exported by the real CLI, loaded
back with `datasets.load_dataset`, its card's figures checked against what was put in; bad input; and a real run
made by worker processes."""

from __future__ import annotations

import asyncio
import re

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hegelion_queue.queue import codec, store
from hegelion_queue import keys
from hegelion_queue.dataset import quality
from hegelion_queue.queue.connection import connect, load_job
from hegelion_queue.dialectic import Dialectic, build_sample
from hegelion_queue.settings import get_settings

from .conftest import ULTRA
from .test_generator_e2e import wait_finished, workers  # noqa: F401

LONG = ("The strongest position keeps the direct answer but names where it fails: when the costs are hidden, when "
        "the people affected were not asked, when the evidence is thin, and when a cheaper path reaches the same "
        "end. Weighing these conditions one by one gives an answer that is both useful and honest about its limits, "
        "which neither the thesis nor the antithesis managed alone.")
NEAR = LONG.replace("cheaper path", "simpler path")  # 2 of 64 words changed
OTHER = ("Both sides agree that the measurement matters more than the slogan, so the synthesis proposes a small trial "
         "with a clear stopping rule, published results and a named owner, before any wider rollout is considered.")
DISTINCT = ["Rainfall records from three valleys show that the dam moved the flood risk downstream rather than "
            "removing it, so the resolution pairs the dam with wetlands that absorb the surplus upstream.",
            "A tax that is simple to collect but easy to evade raises less than a complex one that is hard to evade; "
            "the synthesis keeps the simple base and adds third-party reporting where evasion concentrates.",
            "Memorising tables builds speed, understanding builds transfer: drills for the first ten minutes of a "
            "lesson and open problems for the rest give children both without doubling the time spent.",
            "Remote teams lose hallway knowledge yet gain focus time; written decision logs and one shared day a "
            "week recover most of the first while keeping nearly all of the second."]
FRENCH = "Pourquoi le ciel est-il bleu pendant la journée et rouge au coucher du soleil ? Expliquez simplement."


def rows_for(syntheses: list[str], answers: list[str], prompts: list[str]) -> list[dict]:
    return [{"prompt_id": str(i), "prompt": p, "synthesis": s, "final_answer": a}
            for i, (s, a, p) in enumerate(zip(syntheses, answers, prompts))]


def test_checker_finds_duplicates_near_duplicates_refusals_short_answers_and_languages():
    answer = "The sky looks blue because air scatters short wavelengths of sunlight more than long ones."
    syn = [LONG, LONG.upper(), NEAR, OTHER, DISTINCT[0]]
    answers = [answer, answer, "I'm sorry, but I can't help with that request.", "Yes.", answer]
    prompts = ["Why is the sky blue during the day and red at sunset? Explain it simply."] * 4 + [FRENCH]
    c = quality.Checker(min_section_chars=20)
    found = c.add(rows_for(syn, answers, prompts))
    assert [f and (f.reason, f.duplicate_of) for f in found] == [None, ("duplicate", "0"), ("near-duplicate", "0"),
                                                                  None, None]
    assert found[2].similarity >= quality.NEAR_DUPLICATE_THRESHOLD
    r = c.report
    assert (r.samples, r.duplicates, r.near_duplicates, r.refusals, r.short_answers) == (5, 1, 1, 1, 1)
    assert r.language_mismatches == 1 and r.prompt_languages["fr"] == 1  # French prompt, English answer
    again = quality.Checker(20)  # the same samples in another batch split: the same findings
    assert [f and f.reason for f in again.add(rows_for(syn[:2], answers, prompts)) + again.add(
        rows_for(syn[2:], answers[2:], prompts[2:]))] == [None, "duplicate", "near-duplicate", None, None]


def test_checker_findings_do_not_depend_on_how_the_samples_are_batched():
    """The LSH index keeps earlier batches' keys in sorted arrays and the current batch's in dicts: 600 syntheses
    with planted duplicates and near-duplicates, at random distances, give the same findings in one batch as in
    batches of 7 and of 64 (where most twins sit in an earlier batch)."""
    import random

    rng = random.Random(5)
    vocab = [f"w{i}" for i in range(3000)]
    syntheses: list[str] = []
    for i in range(600):
        kind = rng.random()
        if syntheses and kind < 0.15:
            syntheses.append(rng.choice(syntheses).upper())  # the same words: a duplicate
        elif syntheses and kind < 0.35:
            ws = rng.choice(syntheses).split()
            ws[rng.randrange(len(ws))] = rng.choice(vocab)  # one word of ~60 changed: a near-duplicate
            syntheses.append(" ".join(ws))
        else:
            syntheses.append(" ".join(rng.choice(vocab) for _ in range(60)))
    rows = rows_for(syntheses, ["An answer long enough to count."] * 600, ["A prompt."] * 600)

    def findings(size: int) -> list:
        c = quality.Checker(20)
        found = [f for at in range(0, len(rows), size) for f in c.add(rows[at : at + size])]
        return [f and (f.reason, f.duplicate_of, f.similarity) for f in found]

    whole = findings(len(rows))
    assert sum(1 for f in whole if f and f[0] == "duplicate") >= 50
    assert sum(1 for f in whole if f and f[0] == "near-duplicate") >= 80
    assert findings(7) == whole and findings(64) == whole


def hub_folder(tmp_path, prompts: list[str]):
    """A local dataset in the Hub's layout, with a card that names its license."""
    d = tmp_path / "source"
    (d / "data").mkdir(parents=True)
    pq.write_table(pa.table({"prompt": prompts}), d / "data" / "train-00000-of-00001.parquet")
    (d / "README.md").write_text("---\nlicense: mit\n---\n# prompts\n")
    return d


def commit_known_run(run: str, answers: list[tuple[str, str]], dead: int) -> None:
    """Commit a sample for the first len(answers) enqueued prompts (synthesis, final answer) as a worker would, and
    dead-letter the next `dead` ones."""

    async def go():
        redis = await connect(get_settings())
        rk = keys.RunKeys("hegelion", run)
        try:
            cid = (await redis.hget(rk.meta, "config_id")).decode()
            jobs = []
            for j in await redis.zrange("hegelion:queue", 0, -1):  # the producer's packed job payloads
                packed = load_job(await redis.get(f"arq:job:{j.decode()}"))["a"][0]["packed"]
                record = (await codec.of_frame(redis, rk, packed)).unpack(packed)
                jobs.append({"prompt_id": j.decode().partition(":")[2], **record})
            jobs.sort(key=lambda rec: rec["source"]["row"])
            for rec, (synthesis, final) in zip(jobs, answers):
                d = Dialectic("A thesis that is long enough to pass.", "An antithesis that is long enough too.",
                              synthesis, final)
                trace = {"reasoning": "", "prompt_id": rec["prompt_id"], "run": run, "source": rec["source"],
                         "teacher": {"preset": "kimi", "model": "kimi-default"}, "config_id": cid, "attempts": 1,
                         "usage": {"input_other": 60, "output": 40}}
                assert await store.begin_attempt(redis, rk, rec["prompt_id"], "t") == 1
                await store.commit(redis, rk, rec["prompt_id"], build_sample(rec["prompt"], d, trace), 2.0,
                                   trace["usage"])
            for rec in jobs[len(answers) : len(answers) + dead]:
                await store.dead_letter(redis, rk, rec["prompt_id"], {"reason": "teacher", "record": rec,
                                                                       "attempts": 5, "error": "exit 75"})
        finally:
            await redis.aclose()

    asyncio.run(go())


def figure(card: str, label: str) -> str:
    m = re.search(rf"^\| {re.escape(label)}[^|]* \| \**([^|*]+?)\** \|", card, re.M)
    assert m, f"no row {label!r} in the card"
    return m.group(1)


def test_export_hf_loads_with_datasets_and_its_card_states_what_the_export_counted(hq, redis_server, tmp_path):
    answer = "The sky looks blue because air scatters short wavelengths of sunlight more than long ones."
    prompts = [f"Question {i}: why is the sky blue during the day and red at sunset? Explain it." for i in range(7)]
    source = hub_folder(tmp_path, prompts + [FRENCH])
    hq("enqueue", "--dataset", str(source), "--split", "train", "--run", "card", "--seed", "0",
       "--budget-tokens", "5000")
    commit_known_run("card", [(LONG, answer), (LONG.upper(), answer), (NEAR, answer), (OTHER, answer),
                              (DISTINCT[0], "I cannot help with that, sorry."), (DISTINCT[1], "Yes."),
                              (DISTINCT[2], answer)], dead=1)

    out = tmp_path / "ds"
    said = hq("export", "--format", "hf", str(out), "--run", "card").stdout
    assert "wrote 7 rows in 1 parquet shards" in said
    from datasets import load_dataset

    ds = load_dataset(str(out), split="train", cache_dir=str(tmp_path / "cache"))  # no other test's cached copy
    assert ds.num_rows == 7 and set(ds.column_names) == {
        "prompt", "thesis", "antithesis", "synthesis", "final_answer", "reasoning", "prompt_id", "source", "teacher",
        "config_id", "attempts", "tokens"}
    f = ds.features
    assert (f["attempts"].dtype, f["tokens"].dtype, f["source"]["row"].dtype, f["prompt"].dtype) == (
        "int32", "int64", "int64", "string")
    assert set(ds["tokens"]) == {100} and ds[0]["teacher"] == {"preset": "kimi", "model": "kimi-default"}

    text = (out / "README.md").read_text()
    from huggingface_hub import DatasetCard

    meta = DatasetCard.load(out / "README.md").data.to_dict()
    assert meta["license"] == "mit" and meta["size_categories"] == ["n<1K"] and meta["task_categories"] == [
        "text-generation"]
    assert meta["dataset_info"]["splits"][0]["num_examples"] == 7 and meta["configs"][0]["config_name"] == "default"
    st = orjson.loads(hq("status", "--run", "card", "--json").stdout)
    assert figure(text, "rows in this dataset") == "7" == str(ds.num_rows)
    assert figure(text, "samples the run committed") == str(st["done"]) == "7"
    assert figure(text, "dead letters (no sample)") == "1" and "| teacher | 1 |" in text
    assert figure(text, "duplicate syntheses") == "1" and figure(text, "near-duplicate syntheses") == "1"
    assert figure(text, "refusals in the final answer") == "1"
    assert figure(text, "final answers shorter than 20 characters") == "1"
    assert figure(text, "answer language differs from the prompt's") == "0"  # the French prompt got no sample
    assert "| tokens | 5,000 | 700 | 4,300 |" in text and "| calls | none | 7 | — |" in text
    cid = ds[0]["config_id"]
    assert f"### Configuration `{cid}`: 7 rows" in text and "| teacher.version | `kimi, version 1.51.0 (fake)` |" in text
    assert "hegelion-queue enqueue --dataset" in text and "--budget-tokens 5000" in text
    assert f"hegelion-queue export --format hf {out} --run card" in text
    assert "`mit`, as " in text and "{{" not in text

    dropped = tmp_path / "dedup"
    said = hq("export", "--format", "hf", str(dropped), "--run", "card", "--drop-near-duplicates").stdout
    assert "2 near-duplicates removed" in said
    removed = [orjson.loads(x) for x in (dropped / "removed.jsonl").read_bytes().splitlines()]
    assert sorted(r["reason"] for r in removed) == ["duplicate", "near-duplicate"]
    kept = load_dataset(str(dropped), split="train", cache_dir=str(tmp_path / "cache"))
    assert kept.num_rows == 5 and not {r["prompt_id"] for r in removed} & set(kept["prompt_id"])
    assert figure((dropped / "README.md").read_text(), "rows removed as duplicate or near-duplicate") == "2"


@pytest.mark.parametrize("args,says", [
    (["--format", "parquet", "OUT"], "unknown export format 'parquet'"),
    (["--format", "hf", "FULL"], "exists and is not empty"),
    (["--format", "hf", "OUT", "--push-to-hub", "me/data"], "HF_HUB_OFFLINE is set"),
    (["--format", "hf"], "--format hf writes a folder"),
    (["--format", "sft", "--drop-near-duplicates"], "go with --format hf"),
])
def test_export_bad_input_is_one_line_and_writes_nothing(hq, redis_server, tmp_path, args, says):
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "2", "--run", "bad")
    (tmp_path / "FULL").mkdir()
    (tmp_path / "FULL" / "keep.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())
    p = hq("export", "--run", "bad", *[str(tmp_path / a) if a in ("OUT", "FULL") else a for a in args], check=False)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and says in p.stderr, p.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "FULL" / "keep.txt").read_text() == "mine"


@pytest.mark.e2e
def test_e2e_a_run_made_by_workers_exports_as_a_dataset(hq, workers, redis_server, env, tmp_path):  # noqa: F811
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "12", "--run", "made")
    workers(2, HEGELION_MAX_JOBS="4")
    wait_finished(redis_server.client(), "made")
    hq("export", "--format", "hf", str(tmp_path / "made"), "--run", "made")
    from datasets import load_dataset

    ds = load_dataset(str(tmp_path / "made"), split="train", cache_dir=str(tmp_path / "cache"))
    cid = redis_server.client().hget("hegelion:run:made:meta", "config_id").decode()
    assert ds.num_rows == 12 and set(ds["config_id"]) == {cid} and set(ds["tokens"]) == {200}
    assert len(set(ds["prompt_id"])) == 12 and all(t.startswith("The first position") for t in ds["thesis"])
    card = (tmp_path / "made" / "README.md").read_text()
    assert figure(card, "duplicate syntheses") == "11"  # the fake teacher writes one synthesis for every prompt


def test_a_list_of_licenses_is_a_yaml_list_in_the_card(hq, redis_server, tmp_path):
    """The Hub reads `license` as one id or a list of ids: "apache-2.0, mit" in one string is no license it knows."""
    source = hub_folder(tmp_path, [f"Question {i}: should the town keep its old library open?" for i in range(2)])
    (source / "README.md").write_text("---\nlicense:\n- apache-2.0\n- mit\n---\n# prompts\n")
    hq("enqueue", "--dataset", str(source), "--split", "train", "--run", "lic")
    commit_known_run("lic", [(LONG, "Keep it open and share the building with the school.")], dead=0)
    from huggingface_hub import DatasetCard

    hq("export", "--format", "hf", str(tmp_path / "read"), "--run", "lic")
    card = (tmp_path / "read" / "README.md").read_text()
    assert DatasetCard.load(tmp_path / "read" / "README.md").data.license == ["apache-2.0", "mit"]
    assert "license:\n- apache-2.0\n- mit\n" in card and "`apache-2.0`, `mit`, as " in card
    hq("export", "--format", "hf", str(tmp_path / "given"), "--run", "lic", "--license", "cc-by-4.0, mit")
    assert DatasetCard.load(tmp_path / "given" / "README.md").data.license == ["cc-by-4.0", "mit"]
    hq("export", "--format", "hf", str(tmp_path / "one"), "--run", "lic", "--license", "mit")
    assert DatasetCard.load(tmp_path / "one" / "README.md").data.license == "mit"
