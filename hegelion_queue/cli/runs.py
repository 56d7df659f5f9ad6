"""Commands on a run's prompts and state: enqueue, estimate, status, tail, runs, retry-failed, resume, purge, restore-dictionary."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional

import orjson
import typer

from .. import keys
from ..errors import HegelionError
from ..settings import get_settings

from .common import (BudgetOpt, ColumnOpt, DatasetOpt, LimitOpt, MaxPromptCharsOpt, PromptsFileOpt, RunOpt, SeedOpt,
                     SplitOpt, _fail, _limits, _progress, _run, _run_keys, app)


@app.command()
def enqueue(
    dataset: str = DatasetOpt,
    split: str = SplitOpt,
    column: Optional[str] = ColumnOpt,
    prompts_file: Optional[Path] = PromptsFileOpt,
    limit: Optional[int] = LimitOpt,
    seed: int = SeedOpt,
    max_prompt_chars: int = MaxPromptCharsOpt,
    run: Optional[str] = RunOpt,
    json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the summary line."),
    budget_tokens: Optional[str] = BudgetOpt("tokens"),
    budget_calls: Optional[str] = BudgetOpt("calls"),
    budget_teacher_seconds: Optional[str] = BudgetOpt("teacher_seconds"),
    allow_config_change: bool = typer.Option(False, "--allow-config-change", help="Enqueue into a run that was made "
                                             "with another configuration (both are recorded)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Call the teacher for every prompt, even one whose answer "
                                  "the same teacher configuration gave before (the answer cache; HEGELION_CACHE=0)."),
) -> None:
    """Sample prompts and enqueue one job per prompt. Running it again adds nothing already queued or done; a prompt
    the same teacher configuration answered before, in any run, is reused without a call (unless --no-cache)."""
    limits = _limits(budget_tokens, budget_calls, budget_teacher_seconds)
    summary = do_enqueue(dataset, split, column, prompts_file, limit, seed, max_prompt_chars, run, limits,
                         allow_config_change, cache=not no_cache)
    if json:
        typer.echo(orjson.dumps(summary).decode())
    else:
        typer.echo(_enqueue_line(summary))


def _source(dataset, split, column, prompts_file, limit, seed, max_prompt_chars, run):
    """What enqueue and estimate read: the settings, the run, the sample, its metadata and the configuration."""
    from ..dataset import provenance
    from .. import redact
    from ..sources.sample import open_sample

    s = get_settings()
    run = run or s.run
    try:
        sample = open_sample(dataset, split, column=column, prompts_file=str(prompts_file or "") or None,
                             limit=limit, seed=seed, max_prompt_chars=max_prompt_chars)
    except HegelionError as e:
        _fail(str(e))
    for w in sample.stats.warnings:
        typer.echo(f"warning: {w}", err=True)
    # stored with the run, in every job and sample, and published with the dataset: credentials in a URL masked
    meta = {"dataset": redact.text(str(prompts_file) if prompts_file else dataset), "split": "" if prompts_file
            else split, "column": sample.stats.column, "seed": seed, "limit": limit, "output": str(s.jsonl_path(run))}
    sampling = {k: meta[k] for k in ("dataset", "split", "column", "seed")} | {"max_prompt_chars": max_prompt_chars}
    return s, run, sample, meta, provenance.configuration(s, sampling)


def do_enqueue(dataset, split, column, prompts_file, limit, seed, max_prompt_chars, run, limits=None,
               allow_config_change=False, cache=True) -> dict[str, Any]:
    from ..queue import budget
    from ..dataset import provenance
    from ..jobs.producer import enqueue_prompts

    s, run, sample, meta, config = _source(dataset, split, column, prompts_file, limit, seed, max_prompt_chars, run)
    how = {"config": config, "allow_config_change": allow_config_change, "cache": cache,
           "limits": budget.with_settings(limits or {}, s), "command": provenance.command_line()}

    async def go(redis):
        bar = _progress(len(sample))
        if bar is None:
            return await enqueue_prompts(redis, s, run, sample.batches(), meta, **how)
        with bar:
            task = bar.add_task("enqueue", total=len(sample))
            return await enqueue_prompts(redis, s, run, sample.batches(), meta, lambda n: bar.advance(task, n), **how)

    summary = _run(go)
    st = sample.stats.as_dict()
    st.pop("warnings")
    return {**asdict(summary), **st, "output": meta["output"]}


def do_estimate(dataset, split, column, prompts_file, limit, seed, max_prompt_chars, run, cache=True):
    from ..ops.estimate import estimate as estimate_run

    s, run, sample, _, config = _source(dataset, split, column, prompts_file, limit, seed, max_prompt_chars, run)
    return _run(lambda redis: estimate_run(redis, s, run, sample.batches(), config, cache))


@app.command()
def estimate(
    dataset: str = DatasetOpt,
    split: str = SplitOpt,
    column: Optional[str] = ColumnOpt,
    prompts_file: Optional[Path] = PromptsFileOpt,
    limit: Optional[int] = LimitOpt,
    seed: int = SeedOpt,
    max_prompt_chars: int = MaxPromptCharsOpt,
    run: Optional[str] = RunOpt,
    no_cache: bool = typer.Option(False, "--no-cache", help="As a run enqueued with --no-cache would: no answer reused."),
    json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """What enqueueing these prompts would cost, enqueueing nothing: the prompts `enqueue` would sample, the answers the
    cache already holds for this teacher, the teacher calls left, expected input/output tokens (measured on earlier
    runs with the same teacher, else stated defaults), cost at HEGELION_PRICE_INPUT/OUTPUT_PER_MTOK, and wall time at
    the fleet's rate of the last hour."""
    from ..ops.estimate import as_dict

    e = do_estimate(dataset, split, column, prompts_file, limit, seed, max_prompt_chars, run, not no_cache)
    typer.echo(orjson.dumps(as_dict(e)).decode() if json else "\n".join(e.lines()))


def _enqueue_line(d: dict[str, Any]) -> str:
    skipped = [f"{d[k]} {k.replace('skipped_', '').replace('_', ' ')}" for k in
               ("skipped_empty", "skipped_too_long", "skipped_invalid", "duplicates") if d[k]]
    return (f"run {d['run']}: sampled {d['sampled']} of {d['usable']} usable prompts ({d['rows']} rows, column "
            f"{d['column']!r}); enqueued {d['enqueued']}, already done {d['already_done']}, already queued "
            f"{d['already_queued']}, dead-lettered {d['already_dead']}"
            + (f"; skipped {', '.join(skipped)}" if skipped else "") + f" in {d['seconds']:.2f}s")


@app.command("retry-failed")
def retry_failed_cmd(run: Optional[str] = RunOpt) -> None:
    """Re-enqueue the run's dead-lettered prompts with a fresh attempt count."""
    from ..jobs.producer import retry_failed

    rk = _run_keys(run)
    summary = _run(_recorded(rk, lambda redis: retry_failed(redis, get_settings(), rk.run)))
    typer.echo(f"run {rk.run}: re-enqueued {summary.enqueued} dead-lettered prompts")
    if summary.dictionaries_missing:
        _fail(f"some letters wait for zstd dictionary {', '.join(map(str, summary.dictionaries_missing))}, still "
              "missing from Redis: restore it with `hegelion-queue restore-dictionary FILE`, then retry-failed again")


@app.command("restore-dictionary")
def restore_dictionary(
    files: list[Path] = typer.Argument(..., help="Dictionary files: what enqueue writes next to the run's JSONL and "
                                       "export next to its output (<name>.zdict-<id>)."),
) -> None:
    """Put zstd dictionaries back into Redis (a hand DEL, an evicting Redis): each under its own id, never over
    another. Then `hegelion-queue retry-failed --run R` revives the prompts that waited for it and resumes the run."""
    from ..queue.codec import restore

    s = get_settings()

    async def go(redis):
        return [await restore(redis, s.key_prefix, path.read_bytes()) for path in files]

    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        _fail(f"no such file: {', '.join(missing)}")
    for path, dict_id in zip(files, _run(go)):
        typer.echo(f"dictionary {dict_id} restored from {path}")


@app.command()
def resume(
    run: Optional[str] = RunOpt,
    budget_tokens: Optional[str] = BudgetOpt("tokens"),
    budget_calls: Optional[str] = BudgetOpt("calls"),
    budget_teacher_seconds: Optional[str] = BudgetOpt("teacher_seconds"),
) -> None:
    """Close the run's circuit breaker and re-enqueue the prompts that failed on the configuration error; a run
    paused by its budget needs the limit it reached raised (--budget-tokens N, …)."""
    from ..jobs.producer import resume as resume_run

    limits = _limits(budget_tokens, budget_calls, budget_teacher_seconds)
    rk = _run_keys(run)
    summary = _run(_recorded(rk, lambda redis: resume_run(redis, get_settings(), rk.run, limits)))
    typer.echo(f"run {rk.run}: resumed; re-enqueued {summary.enqueued} prompts that hit the configuration error")


def _recorded(rk: keys.RunKeys, act: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`act`, then this command joins the run's list of the commands that made it (the dataset card's)."""
    from ..dataset.provenance import command_line, record_command

    async def go(redis):
        result = await act(redis)
        await record_command(redis, rk, command_line())
        return result

    return go


@app.command()
def status(
    run: Optional[str] = RunOpt,
    json: bool = typer.Option(False, "--json", help="One JSON object, for scripts."),
    watch: bool = typer.Option(False, "--watch", "-w", help="Refresh in place until Ctrl-C."),
    interval: float = typer.Option(2.0, help="Seconds between refreshes with --watch."),
) -> None:
    """Where a run stands: queued (due / deferred), in progress, done, dead by reason, retries, workers alive
    per host, samples/min, ETA, pause state and training progress. Reads Redis only: works on any host."""
    from ..queue.status import collect, render

    s = get_settings()
    rk = _run_keys(run)

    async def once(redis):
        await _check_eviction(redis, refuse=False)
        return await collect(redis, s, rk)

    if not watch:
        data = _run(once)
        typer.echo(orjson.dumps(data).decode() if json else render(data))
        return

    async def loop(redis):
        from rich.live import Live
        from rich.text import Text

        await _check_eviction(redis, refuse=False)
        with Live(Text("…"), refresh_per_second=4, screen=False) as live:
            while True:
                live.update(Text(render(await collect(redis, s, rk))))
                await asyncio.sleep(interval)

    try:
        _run(loop)
    except KeyboardInterrupt:
        pass


async def _check_eviction(redis, refuse: bool = True) -> None:
    """A Redis that may evict keys loses data: `run` refuses it (HegelionError), `status` shows it loudly."""
    from ..queue.connection import check_eviction

    if warning := await check_eviction(redis, refuse):
        typer.echo(f"WARNING: {warning}", err=True)


@app.command()
def tail(
    run: Optional[str] = RunOpt,
    n: int = typer.Option(3, "-n", min=1, help="How many of the newest samples."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing samples as they are committed."),
) -> None:
    """The newest samples (prompt head, synthesis head, attempts, duration), read from Redis."""
    from ..queue.store import follow as follow_run, newest

    rk = _run_keys(run)

    def show(entry_id: str, t: dict) -> None:
        tr = t["hegelion_trace"]
        typer.echo(f"{entry_id}  attempts {tr.get('attempts')}  {tr.get('duration_s')}s\n"
                   f"  prompt:    {_head(t['instruction'])}\n  synthesis: {_head(tr.get('synthesis', ''))}")

    async def go(redis):
        entries = await newest(redis, rk, n)
        for eid, t in entries:
            show(eid, t)
        last = entries[-1][0] if entries else "$"
        while follow:
            for eid, t in await follow_run(redis, rk, last):
                show(eid, t)
                last = eid

    try:
        _run(go)
    except KeyboardInterrupt:
        pass


def _head(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


@app.command()
def runs(json: bool = typer.Option(False, "--json", help="One JSON object per run.")) -> None:
    """List the runs in Redis with their counts."""
    s = get_settings()

    async def go(redis):
        from ..queue.status import run_names

        out = []
        for name in await run_names(redis, s.key_prefix):
            rk = keys.RunKeys(s.key_prefix, name)
            async with redis.pipeline(transaction=False) as p:
                p.scard(rk.enqueued).scard(rk.done).hlen(rk.dead).exists(rk.finished).exists(rk.breaker)
                total, done, dead, finished, paused = await p.execute()
            out.append({"run": name, "enqueued": total, "done": done, "dead": dead,
                        "finished": bool(finished), "paused": bool(paused)})
        return out

    for r in _run(go):
        if json:
            typer.echo(orjson.dumps(r).decode())
        else:
            state = "finished" if r["finished"] else ("paused" if r["paused"] else "running")
            typer.echo(f"{r['run']}: {r['done']} done, {r['dead']} dead of {r['enqueued']} ({state})")


@app.command()
def purge(
    run: str = typer.Option(..., "--run", help="The run whose keys to delete."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask."),
    force: bool = typer.Option(False, "--force", help="Purge even while workers run some of its jobs (they commit "
                               "into whatever run has the name then)."),
) -> None:
    """Delete one run's keys and its queued jobs. Never touches another run's or other applications' keys. Refused
    while a worker runs one of the run's jobs (says which), unless --force."""
    s = get_settings()
    rk = keys.RunKeys(s.key_prefix, run)
    if not yes:
        typer.confirm(f"Delete every Redis key of run {run!r} (samples, dead letters, queued jobs)?", abort=True)

    from ..jobs.producer import purge_run

    n_keys, n_jobs = _run(lambda redis: purge_run(redis, s, rk.run, force))
    typer.echo(f"run {run}: deleted {n_keys} keys and {n_jobs} queued jobs")
