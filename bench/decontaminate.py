"""The decontamination rows of `make bench`: `export --format hf --decontaminate` of the `export --format hf` figure's
run (N samples of ~5 KB, bench/hf_export.py) against a synthetic benchmark of Q multiple-choice questions, and the
plain export of the same run just before it, for comparison.

The benchmark is a parquet file like MMLU's (`question`, four `choices`, an `answer` index): questions of 15-60 words
drawn from the samples' own vocabulary and 20,000 other words, so every 13-gram of a sample is looked up (none is
skipped for holding an unknown word). PLANTED of its questions embed a sentence of the samples' sentence pool, so
about 2 % of the samples share 13 words or more with it and the spans are recovered as they would be for real.

    python -m bench.decontaminate OUT.parquet Q     # write the benchmark alone
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import orjson

from bench.figure import HQ, Figure
from bench.hf_export import WORDS, sentences

RUN = "hf"  # the hf_export figure's run, reused when it holds N samples
PLANTED = 3


def write_benchmark(path: Path, questions: int, seed: int = 1) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    vocab = list(WORDS) + [f"{rng.choice(WORDS)}{i}" for i in range(20_000)]
    pool = [s for s in sentences(random.Random(0), 4000) if len(s.split()) >= 13]  # hf_export.populate's pool
    texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(15, 60))).capitalize() + "?"
             for _ in range(questions)]
    for i, s in enumerate(pool[:PLANTED]):
        texts[i * questions // PLANTED] = f"Consider this: {s} Which of the following follows?"
    choices = [[" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 6))) for _ in range(4)] for _ in texts]
    pq.write_table(pa.table({"question": texts, "choices": choices,
                             "answer": [rng.randrange(4) for _ in texts]}), path)
    return path


def figures(bench) -> list:
    """The decontamination rows."""
    n, q = bench.args.decon_n, bench.args.decon_questions
    wall = Figure(f"decontaminate: {n:,} samples against a {q:,}-question benchmark, export --format hf "
                  "--decontaminate, whole process (wall; detail: the plain export just before)", "s", "< 60")
    rss = Figure(f"decontaminate: peak RSS, {n:,} samples against a {q:,}-question benchmark (detail: the plain "
                 "export's)", "MB", "< 500")
    env = bench.env()
    if bench.redis.client().xlen(f"hegelion:run:{RUN}:results") != n:
        bench.flush()
        subprocess.run([sys.executable, "-m", "bench.hf_export", RUN, str(n)], env=env, check=True)
    data = write_benchmark(bench.tmp / f"benchmark-{q}.parquet", q)
    for rep in range(bench.args.reps):
        plain, checked = bench.tmp / f"plain-{rep}", bench.tmp / f"decon-{rep}"
        plain_s, plain_kib = bench.run_timed([*HQ, "export", "--format", "hf", str(plain), "--run", RUN], env)
        seconds, kib = bench.run_timed([*HQ, "export", "--format", "hf", str(checked), "--run", RUN,
                                        "--decontaminate", str(data)], env)
        listed = (checked / "contaminated.jsonl").read_bytes().splitlines()
        wall.values.append(seconds)
        rss.values.append(kib / 1024)
        rss.detail.append({"plain_export_mb": plain_kib / 1024})
        wall.detail.append({"plain_export_s": plain_s, "added_s": seconds - plain_s, "spans": len(listed),
                            "samples_matched": len({orjson.loads(line)["prompt_id"] for line in listed})})
        shutil.rmtree(plain)
        shutil.rmtree(checked)
    wall.met = max(wall.values) < 60
    rss.met = max(rss.values) < 500
    return [wall, rss]


if __name__ == "__main__":
    write_benchmark(Path(sys.argv[1]), int(sys.argv[2]))
