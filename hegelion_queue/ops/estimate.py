"""`hegelion-queue estimate`: what a run would cost, before anything is enqueued.

It samples exactly what `enqueue` would (the same source options, the same sampler), enqueues nothing, and counts:
prompts, answers the answer cache already holds for this teacher configuration, prompts the run has done already,
hence teacher calls; input and output tokens from what earlier runs with the same teacher measured (tokens per prompt
character in, tokens per call out, calls per sample), else from stated defaults; cost at the settings' prices; and
wall time at the rate the fleet committed samples in the last hour.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable

from redis.asyncio import Redis

from ..queue import cost, status
from .. import keys
from ..dataset import provenance
from ..dialectic import PROMPT_FRAME, TEACHER_PROMPT
from ..sources.read import Prompt
from ..settings import Settings

BATCH = 2000
# Without an earlier run of the same teacher: ~4 characters a token (English), the instructions sent with every
# call, and an answer of ~700 tokens (a dialectic and a final answer of a few paragraphs each).
DEFAULT_CHARS_PER_TOKEN = 4.0
DEFAULT_OUTPUT_TOKENS = 700
INSTRUCTION_CHARS = len(TEACHER_PROMPT) + len(PROMPT_FRAME)


@dataclass
class Rates:
    """Per-unit figures an estimate multiplies by, and where they come from."""

    input_per_char: float
    input_per_call: float  # the instructions, on top of the prompt
    output_per_call: float
    calls_per_sample: float
    basis: str


@dataclass
class Estimate:
    run: str
    teacher_id: str
    prompts: int
    prompt_chars: int
    already_done: int
    cache_hits: int
    teacher_calls: int
    input_tokens: int
    output_tokens: int
    cost: float | None
    minutes: float | None
    basis: str

    def lines(self) -> list[str]:
        money = f"cost {self.cost:,.2f}" if self.cost is not None else \
            "cost: set HEGELION_PRICE_INPUT_PER_MTOK and HEGELION_PRICE_OUTPUT_PER_MTOK"
        wall = f"about {self.minutes:,.0f} min at the fleet's rate of the last hour" if self.minutes is not None else \
            "wall time unknown (no sample committed in the last hour)"
        return [
            f"run {self.run}: {self.prompts:,} prompts ({self.prompt_chars:,} characters); {self.cache_hits:,} answers "
            f"already in the cache, {self.already_done:,} done in the run: {self.teacher_calls:,} teacher calls",
            f"expected: {self.input_tokens:,} input / {self.output_tokens:,} output tokens, {money}; {wall}",
            f"({self.basis})",
        ]


async def rates(redis: Redis, settings: Settings, teacher: str) -> Rates:
    """What earlier runs with this teacher configuration spent, per prompt character and per call."""
    names = await status.run_names(redis, settings.key_prefix)
    same = []
    for name in names:
        rk = keys.RunKeys(settings.key_prefix, name)
        if (await redis.hget(rk.meta, "teacher_id")) == teacher.encode():
            same.append(rk)
    usage: dict[str, float] = {}
    chars = calls = samples = 0
    for rk in same:
        stats = {k.decode(): float(v) for k, v in (await redis.hgetall(rk.stats)).items()}
        for k, v in cost.usage(stats).items():
            usage[k] = usage.get(k, 0) + v
        chars += int(stats.get("prompt_chars", 0))
        calls += int(stats.get("teacher_calls", 0))
        samples += max(0, int(await redis.scard(rk.done)) - int(stats.get("cached", 0)))
    counts = cost.tokens(usage)
    if chars and calls and samples and counts["input"]:
        return Rates(counts["input"] / chars, 0.0, counts["output"] / calls, calls / samples,
                     f"measured on {len(same)} earlier run(s) with teacher configuration {teacher}: "
                     f"{counts['input'] / chars:.2f} input tokens per prompt character, "
                     f"{counts['output'] / calls:,.0f} output tokens per call, {calls / samples:.2f} calls per sample")
    return Rates(1 / DEFAULT_CHARS_PER_TOKEN, INSTRUCTION_CHARS / DEFAULT_CHARS_PER_TOKEN, DEFAULT_OUTPUT_TOKENS, 1.0,
                 f"no earlier run of teacher configuration {teacher} to measure: defaults of "
                 f"{DEFAULT_CHARS_PER_TOKEN:g} characters a token plus the instructions in, {DEFAULT_OUTPUT_TOKENS} "
                 "tokens out per call, one call per sample")


async def fleet_rate(redis: Redis, settings: Settings) -> float:
    """Samples a minute the fleet committed over the last hour (every run)."""
    runs = (await status.fleet(redis, settings))["runs"]
    return sum(r["samples_per_min_60m"] for r in runs)


async def estimate(redis: Redis, settings: Settings, run: str, batches: Iterable[list[Prompt]],
                   config: dict[str, Any], use_cache: bool = True) -> Estimate:
    teacher = provenance.teacher_id(config)
    rk = keys.RunKeys(settings.key_prefix, run)
    cache_key = keys.answer_cache(settings.key_prefix, teacher)
    n = chars = done = hits = new_chars = 0
    for batch in batches:
        for i in range(0, len(batch), BATCH):
            part = batch[i:i + BATCH]
            ids = [p.prompt_id for p in part]
            is_done = await redis.smismember(rk.done, ids)
            cached = await redis.hmget(cache_key, [bytes.fromhex(x) for x in ids]) if use_cache and settings.cache \
                else [None] * len(part)
            for p, d, c in zip(part, is_done, cached):
                n += 1
                chars += len(p.text)
                if d:
                    done += 1
                elif c is not None:
                    hits += 1
                else:
                    new_chars += len(p.text)
    r = await rates(redis, settings, teacher)
    fresh = n - done - hits
    calls = math.ceil(fresh * r.calls_per_sample)
    counts = {"input": round(new_chars * r.calls_per_sample * r.input_per_char + calls * r.input_per_call),
              "output": round(calls * r.output_per_call)}
    rate = await fleet_rate(redis, settings)
    return Estimate(run, teacher, n, chars, done, hits, calls, counts["input"], counts["output"],
                    cost.money(counts, settings), fresh / rate if rate else None, r.basis)


def as_dict(e: Estimate) -> dict[str, Any]:
    return asdict(e)
