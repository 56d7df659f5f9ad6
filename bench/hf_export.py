"""A run of `n` committed samples of realistic size (about 5 KB: prompt, thesis, antithesis, synthesis, answer,
reasoning) for the `export --format hf` figure, written through store.commit as workers write them.

    python -m bench.hf_export RUN N
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import sys

from hegelion_queue import keys
from hegelion_queue.queue import store
from hegelion_queue.queue.connection import connect
from hegelion_queue.dialectic import Dialectic, build_sample
from hegelion_queue.settings import get_settings

WORDS = ("the of and to in is that for it as with was on be by this are at from or an which have not people "
         "time year way day thing man world life hand part child eye woman place work week case point government "
         "company number group problem fact be have do say get make go know take see come think look want give use "
         "find tell ask seem feel try leave call good new first last long great little own other old right big high "
         "different small large next early young important few public bad same able cost risk evidence answer trade "
         "policy market water energy school health city river price tax law trust data model result study").split()


def sentences(rng: random.Random, n: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 24))).capitalize() + "." for _ in range(n)]


async def populate(run: str, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    pool = sentences(rng, 4000)

    def text(k: int) -> str:
        return " ".join(rng.sample(pool, k))

    redis = await connect(get_settings())
    rk = keys.RunKeys(get_settings().key_prefix, run)
    await redis.sadd(keys.runs_index(rk.prefix), run)
    try:
        for start in range(0, n, 500):
            calls = []
            for i in range(start, min(n, start + 500)):
                prompt = f"Question {i}: " + text(4)
                pid = hashlib.sha256(prompt.encode()).hexdigest()
                d = Dialectic(text(6), text(6), text(6), text(8))
                trace = {"reasoning": text(6), "prompt_id": pid, "run": run,
                         "source": {"dataset": "bench", "split": "train", "row": i},
                         "teacher": {"preset": "command", "model": "bench"}, "config_id": "", "attempts": 1,
                         "usage": {"input": 900, "output": 700}}
                calls.append(store.commit(redis, rk, pid, build_sample(prompt, d, trace), 1.0, trace["usage"]))
            await asyncio.gather(*calls)
    finally:
        await redis.aclose()


if __name__ == "__main__":
    asyncio.run(populate(sys.argv[1], int(sys.argv[2])))
