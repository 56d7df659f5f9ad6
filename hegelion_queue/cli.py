"""`hegelion-queue`: enqueue prompts, run workers, watch and export runs, train adapters."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional

import orjson
import typer

from . import keys
from .errors import HegelionError
from .settings import DEFAULT_DATASET, DEFAULT_SPLIT, Settings, get_settings

app = typer.Typer(
    help="Turn a prompt dataset into dialectical (THESIS / ANTITHESIS / SYNTHESIS) training data with a "
    "queue of teacher-model workers, then train a LoRA adapter on it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

RunOpt = typer.Option(None, "--run", help="Run name (default: HEGELION_RUN, hegelion_kimi_training_data).")


def BudgetOpt(kind: str) -> Any:
    from .budget import FLAGS

    what = kind.replace("_", " ")
    return typer.Option(None, FLAGS[kind], metavar="N", help=f"The run's limit of {what} (stored with the run; "
                        f"default: HEGELION_BUDGET_{kind.upper()}).")


def _limits(tokens: Optional[str], calls: Optional[str], seconds: Optional[str]) -> dict[str, Any]:
    """Budget flags checked before anything is read or written: a bad one is one line."""
    from .budget import parse_limits

    try:
        return parse_limits({"tokens": tokens, "calls": calls, "teacher_seconds": seconds})
    except HegelionError as e:
        _fail(str(e))


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _run(coro_fn: Callable[..., Any], *args: Any) -> Any:
    """Run a coroutine function with a fresh Redis pool; a HegelionError becomes one line on stderr."""

    async def main() -> Any:
        from .connection import connect

        redis = await connect(get_settings())
        try:
            return await coro_fn(redis, *args)
        finally:
            await redis.aclose()

    try:
        return asyncio.run(main())
    except HegelionError as e:
        _fail(str(e))


def _run_keys(run: Optional[str]) -> keys.RunKeys:
    s = get_settings()
    return keys.RunKeys(s.key_prefix, run or s.run)


def _bar():
    """A rich progress bar on stderr: description, bar, done/total, time left."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True))


def _progress(total: int):
    """The enqueue bar, or None for small jobs."""
    return _bar() if total >= 5000 else None


@app.command()
def enqueue(
    dataset: str = typer.Option(DEFAULT_DATASET, help="Hub id, hub-layout directory, or parquet/jsonl/json/csv file."),
    split: str = typer.Option(DEFAULT_SPLIT, help="Split to read."),
    column: Optional[str] = typer.Option(None, help="Prompt column (default: detected)."),
    prompts_file: Optional[Path] = typer.Option(None, help="Text file, one prompt per line (instead of --dataset)."),
    limit: Optional[int] = typer.Option(None, min=1, help="How many usable prompts to sample (default: all)."),
    seed: int = typer.Option(42, help="Sampling seed (same order as Dataset.shuffle(seed))."),
    max_prompt_chars: int = typer.Option(8000, min=1, help="Skip (and count) prompts longer than this."),
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
    from . import provenance, redact
    from .sampling import open_sample

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
    from . import budget, provenance
    from .producer import enqueue_prompts

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
    from .estimate import estimate as estimate_run

    s, run, sample, _, config = _source(dataset, split, column, prompts_file, limit, seed, max_prompt_chars, run)
    return _run(lambda redis: estimate_run(redis, s, run, sample.batches(), config, cache))


@app.command()
def estimate(
    dataset: str = typer.Option(DEFAULT_DATASET, help="Hub id, hub-layout directory, or parquet/jsonl/json/csv file."),
    split: str = typer.Option(DEFAULT_SPLIT, help="Split to read."),
    column: Optional[str] = typer.Option(None, help="Prompt column (default: detected)."),
    prompts_file: Optional[Path] = typer.Option(None, help="Text file, one prompt per line (instead of --dataset)."),
    limit: Optional[int] = typer.Option(None, min=1, help="How many usable prompts to sample (default: all)."),
    seed: int = typer.Option(42, help="Sampling seed (same order as Dataset.shuffle(seed))."),
    max_prompt_chars: int = typer.Option(8000, min=1, help="Skip (and count) prompts longer than this."),
    run: Optional[str] = RunOpt,
    no_cache: bool = typer.Option(False, "--no-cache", help="As a run enqueued with --no-cache would: no answer reused."),
    json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """What enqueueing these prompts would cost, enqueueing nothing: the prompts `enqueue` would sample, the answers the
    cache already holds for this teacher, the teacher calls left, expected input/output tokens (measured on earlier
    runs with the same teacher, else stated defaults), cost at HEGELION_PRICE_INPUT/OUTPUT_PER_MTOK, and wall time at
    the fleet's rate of the last hour."""
    from .estimate import as_dict

    e = do_estimate(dataset, split, column, prompts_file, limit, seed, max_prompt_chars, run, not no_cache)
    typer.echo(orjson.dumps(as_dict(e)).decode() if json else "\n".join(e.lines()))


def _enqueue_line(d: dict[str, Any]) -> str:
    skipped = [f"{d[k]} {k.replace('skipped_', '').replace('_', ' ')}" for k in
               ("skipped_empty", "skipped_too_long", "skipped_invalid", "duplicates") if d[k]]
    return (f"run {d['run']}: sampled {d['sampled']} of {d['usable']} usable prompts ({d['rows']} rows, column "
            f"{d['column']!r}); enqueued {d['enqueued']}, already done {d['already_done']}, already queued "
            f"{d['already_queued']}, dead-lettered {d['already_dead']}"
            + (f"; skipped {', '.join(skipped)}" if skipped else "") + f" in {d['seconds']:.2f}s")


@app.command()
def export(
    out_dir: Optional[Path] = typer.Argument(None, metavar="[OUT_DIR]", help="hf: the dataset folder to write "
                                             "(new or empty); other formats: like --output."),
    run: Optional[str] = RunOpt,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Where to write (default: the run's JSONL)."),
    format: str = typer.Option("sft", "--format", help="sft: the samples; scu: {'text': …} as the converter "
                               "renders it; dpo: prompt/chosen/rejected pairs; hf: a Hugging Face dataset folder "
                               "(parquet shards and a dataset card)."),
    rejected: str = typer.Option("thesis", help="dpo: what is rejected: thesis, antithesis or both."),
    model: Optional[str] = typer.Option(None, help="scu: render with this model's chat template."),
    drop_near_duplicates: bool = typer.Option(False, "--drop-near-duplicates", help="hf: leave out samples whose "
                                              "synthesis duplicates an earlier one's (each listed in removed.jsonl)."),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", metavar="REPO", help="hf: then upload the "
                                              "folder as the dataset repository REPO (user/name)."),
    private: bool = typer.Option(False, "--private", help="hf: --push-to-hub creates a private repository."),
    license: Optional[str] = typer.Option(None, "--license", help="hf: the card's license, several separated by "
                                          "commas (default: the input dataset's, read from its card)."),
    decontaminate: Optional[list[str]] = typer.Option(
        None, "--decontaminate", metavar="SRC", help="hf: check every sample's prompt, thesis, antithesis, synthesis "
        "and final answer for 13 words in a row (lower case, NFKC, punctuation and whitespace ignored) shared with "
        "this benchmark; the card and contaminated.jsonl list each match; repeat for several. SRC: a local .jsonl, "
        ".parquet, .csv or .txt (a question a line) file, or a hub-layout folder or Hugging Face dataset name with "
        "an optional :SPLIT (default test; a name needs the Hub or its local cache). Read: the question column "
        "(prompt, instruction, question, query, input, text, a message list's first user turn, or problem), with "
        "answer, answers, choices, options and solution where present."),
    drop_contaminated: bool = typer.Option(False, "--drop-contaminated", help="hf: leave out the samples "
                                           "--decontaminate matched (each listed in contaminated.jsonl)."),
) -> None:
    """Rebuild the run's complete, ordered, duplicate-free JSONL from Redis (works on any host), and its
    summary.json (counts, tokens and teacher time, totals and per sample); or, with --format hf, a Hugging Face
    dataset folder with its card."""
    from .status import collect
    from .jsonl import export as export_run

    if format not in ("sft", "scu", "dpo", "hf") or rejected not in ("thesis", "antithesis", "both"):
        _fail(f"unknown export format {format!r}: --format is sft, scu, dpo or hf; --rejected is thesis, "
              "antithesis or both")
    if format == "hf":
        return _export_hf(out_dir or output, run, drop_near_duplicates, push_to_hub, private, license,
                          decontaminate or [], drop_contaminated)
    if drop_near_duplicates or push_to_hub or private or license or decontaminate or drop_contaminated:
        _fail("--drop-near-duplicates, --decontaminate, --drop-contaminated, --push-to-hub, --private and --license "
              "go with --format hf")
    s = get_settings()
    rk = _run_keys(run)
    default = s.jsonl_path(rk.run)
    output = output or out_dir
    path = output or (default if format == "sft" else default.with_name(f"{rk.run}.{format}.jsonl"))

    async def go(redis):
        sft = path if format == "sft" else path.with_name(f".{path.name}.sft")
        written = await export_run(redis, rk, sft)
        _write_summary(await collect(redis, s, rk), default.with_name(f"{rk.run}.summary.json"))
        n = written.lines
        if format != "sft":
            from .convert import load_tokenizer
            from .exports import transform

            tok = load_tokenizer(model) if model and format == "scu" else None
            n = transform(sft, path, format, rejected=rejected, tokenizer=tok, model_name=model or "")
            sft.unlink()
        return n, written.warning()

    n, warning = _run(go)
    typer.echo(f"wrote {n} {format} lines to {path}")
    if warning:
        typer.echo(f"warning: {warning}", err=True)


def _export_hf(out_dir: Optional[Path], run: Optional[str], drop: bool, repo: Optional[str], private: bool,
               license: Optional[str], benchmarks: list[str], drop_contaminated: bool) -> None:
    """export --format hf: every check before any work (the benchmarks are read then), then the folder, then the
    upload."""
    from . import decontaminate, hfdataset
    from .provenance import command_line

    if out_dir is None:
        _fail("--format hf writes a folder: hegelion-queue export --format hf OUT_DIR")
    if drop_contaminated and not benchmarks:
        _fail("--drop-contaminated needs --decontaminate SRC: the benchmarks to check the samples against")
    try:
        hfdataset.check_out_dir(out_dir)
        if repo:
            hfdataset.check_hub(repo)
        index = decontaminate.load(list(dict.fromkeys(benchmarks))) if benchmarks else None
    except HegelionError as e:
        _fail(str(e))
    s = get_settings()
    rk = _run_keys(run)
    licenses = [x.strip() for x in license.split(",") if x.strip()] if license and "," in license else license
    ex = _run(lambda redis: hfdataset.export_hf(redis, s, rk, out_dir, drop_near_duplicates=drop, command=command_line(),
                                                license=licenses, repo=repo or "", benchmarks=index,
                                                drop_contaminated=drop_contaminated))
    removed = f", {len(ex.removals)} near-duplicates removed (removed.jsonl)" if drop else ""
    if ex.contamination:
        c = ex.contamination
        removed += (f", {c.contaminated} samples share 13 words with a benchmark ({c.matches} spans in "
                    f"{hfdataset.CONTAMINATED}{f'; {c.removed} removed' if drop_contaminated else ''})")
    typer.echo(f"wrote {ex.rows} rows in {len(ex.shards)} parquet shards and the dataset card to {out_dir}{removed}")
    if ex.unreadable:
        _fail(f"{len(ex.unreadable)} samples could not be read (a zstd dictionary is missing from Redis, e.g. stream id "
              f"{ex.unreadable[0]}): restore it with `hegelion-queue restore-dictionary FILE`, then export again")
    if repo:
        try:
            url = hfdataset.push(out_dir, repo, private)
        except HegelionError as e:
            _fail(str(e))
        typer.echo(f"uploaded to {url}")


def _write_summary(status: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(status, option=orjson.OPT_INDENT_2))


@app.command("retry-failed")
def retry_failed_cmd(run: Optional[str] = RunOpt) -> None:
    """Re-enqueue the run's dead-lettered prompts with a fresh attempt count."""
    from .producer import retry_failed

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
    from .codec import restore

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
    from .producer import resume as resume_run

    limits = _limits(budget_tokens, budget_calls, budget_teacher_seconds)
    rk = _run_keys(run)
    summary = _run(_recorded(rk, lambda redis: resume_run(redis, get_settings(), rk.run, limits)))
    typer.echo(f"run {rk.run}: resumed; re-enqueued {summary.enqueued} prompts that hit the configuration error")


def _recorded(rk: keys.RunKeys, act: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`act`, then this command joins the run's list of the commands that made it (the dataset card's)."""
    from .provenance import command_line, record_command

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
    from .status import collect, render

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
    from .connection import check_eviction

    if warning := await check_eviction(redis, refuse):
        typer.echo(f"WARNING: {warning}", err=True)


@app.command()
def tail(
    run: Optional[str] = RunOpt,
    n: int = typer.Option(3, "-n", min=1, help="How many of the newest samples."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing samples as they are committed."),
) -> None:
    """The newest samples (prompt head, synthesis head, attempts, duration), read from Redis."""
    from .store import follow as follow_run, newest

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
        names = sorted(m.decode() for m in await redis.smembers(keys.runs_index(s.key_prefix)))
        out = []
        for name in names:
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

    from .producer import purge_run

    n_keys, n_jobs = _run(lambda redis: purge_run(redis, s, rk.run, force))
    typer.echo(f"run {run}: deleted {n_keys} keys and {n_jobs} queued jobs")


@app.command()
def convert(
    input: Path = typer.Argument(..., help="Generator JSONL (e.g. artifacts/data/<run>.jsonl)."),
    output: Path = typer.Argument(..., help="OUT.jsonl: every sample in one file (the old convert_for_scu.py form); "
                                  "a directory: mlx-lm's train.jsonl / valid.jsonl layout."),
    format: str = typer.Option("text", "--format", help="text: {'text': …} rendered with the chat template; "
                               "messages: {'messages': […]} for mlx-lm's chat loader."),
    model: Optional[str] = typer.Option(None, help="Render with this model's tokenizer chat template "
                                        "(default: ChatML)."),
    think_tags: Optional[bool] = typer.Option(None, "--think-tags/--no-think-tags",
                                              help="<thought> -> <think> (default: on for DeepSeek-R1 models)."),
    valid_fraction: float = typer.Option(0.05, min=0, max=0.5, help="Share held out for validation (directory)."),
    seed: int = typer.Option(42, help="Seed of the train/valid split (samples are split in prompt-id order)."),
    single_file: Optional[Path] = typer.Option(None, help="With a directory OUTPUT: also write every sample here."),
) -> None:
    """Convert generator samples to the SCU training format: one file when OUTPUT ends in .jsonl, else a
    directory with train.jsonl and valid.jsonl. Lines that are not valid samples are skipped and counted."""
    from .convert import convert as run_convert, load_tokenizer

    one_file = output.suffix == ".jsonl"
    if one_file and output.is_dir():
        _fail(f"{output} is a directory: name a file, or a directory without the .jsonl suffix")
    if not one_file and output.is_file():
        _fail(f"{output} is a file: name it OUT.jsonl for one file, or give a directory for train/valid")
    try:
        tok = load_tokenizer(model) if model and format == "text" else None
        st = run_convert(input, None if one_file else output, fmt=format, tokenizer=tok, model_name=model or "",
                         think_tags=think_tags, valid_fraction=valid_fraction, seed=seed,
                         single_file=output if one_file else single_file)
    except HegelionError as e:
        _fail(str(e))
    where = f"{output} (one file)" if one_file else f"{output}/ ({st.train} train, {st.valid} valid)"
    typer.echo(f"{st.written} samples -> {where}; skipped {st.skipped} (bad JSON {st.skipped_bad_json}, missing "
               f"fields {st.skipped_missing_fields}, failed the dialectic check {st.skipped_invalid_dialectic})")


@app.command()
def train(
    run: Optional[str] = typer.Option(None, "--run", help="Train on this run (exported from Redis)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Train on this generator JSONL (with --now)."),
    now: bool = typer.Option(False, "--now", help="Train in the foreground instead of enqueueing a job."),
    force: bool = typer.Option(False, "--force", help="Train again even if the run was trained."),
    model: Optional[str] = typer.Option(None, help="Model id or local directory (HEGELION_TRAIN_MODEL)."),
    iters: Optional[int] = typer.Option(None, help="Training steps (500)."),
    batch_size: Optional[int] = typer.Option(None, help="Sequences per step (4)."),
    learning_rate: Optional[float] = typer.Option(None, help="Peak Adam learning rate (1e-4)."),
    lr_schedule: Optional[str] = typer.Option(None, help="constant (the default: it measured best, see the README's "
                                              "ablation) or cosine: decay to 0 over the steps."),
    adapter_path: Optional[str] = typer.Option(None, help="Output directory (artifacts/adapters/<run>)."),
    target_s: Optional[float] = typer.Option(None, help="SCU target S* (0.1)."),
    kp: Optional[float] = typer.Option(None, help="SCU proportional gain (0.5)."),
    ki: Optional[float] = typer.Option(None, help="SCU integral gain (0.05)."),
    prior_sigma: Optional[float] = typer.Option(None, help="σ of the ParamBPT prior (0.2)."),
    scu_update_every: Optional[int] = typer.Option(None, help="Steps between λ updates (1)."),
    baseline: Optional[str] = typer.Option(None, help="plain: also train a λ = 0 twin (same data, seed, steps, "
                                           "learning rate) and report SCU against it."),
    eval_prompts: Optional[int] = typer.Option(None, help="Held-out prompts generated by the eval (50; 0: none)."),
) -> None:
    """Train an SCU-regularised LoRA adapter with mlx-lm, then evaluate it on the held-out split against the base
    model (held-out cross-entropy, dialectic format adherence: eval.json): enqueue a job for a trainer worker
    (--run R), or train now in the foreground (--now, with --run R or --data FILE; no Redis needed for --data)."""
    overrides = {"model": model, "iters": iters, "batch_size": batch_size, "learning_rate": learning_rate,
                 "lr_schedule": lr_schedule,
                 "adapter_path": adapter_path, "target_s": target_s, "kp": kp, "ki": ki,
                 "prior_sigma": prior_sigma, "scu_update_every": scu_update_every, "baseline": baseline,
                 "eval_prompts": eval_prompts}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if baseline not in (None, "plain"):
        _fail("--baseline takes plain (a λ = 0 twin)")
    if lr_schedule not in (None, "constant", "cosine"):
        _fail("--lr-schedule takes constant or cosine")
    s = get_settings()
    if data is not None:
        if not now:
            _fail("--data trains in the foreground: add --now (or enqueue a Redis run with --run)")
        from .train import run_training
        from .training_job import train_args

        try:
            args = train_args(s, data.stem, overrides)
            with _training_bar(args.iters) as (on_progress, on_estimate):
                summary = run_training(data, args, on_progress, on_estimate)
        except HegelionError as e:
            _fail(str(e))
        typer.echo(_trained_line(summary))
        return
    rk = _run_keys(run)
    from .training_job import enqueue_training, train_run

    if now:
        ctx = {"settings": s, "on_estimate": _print_estimate}
        summary = _run(lambda redis: train_run({**ctx, "redis": redis}, rk.run, {**overrides, "force": force}))
        typer.echo(_trained_line(summary) if "adapter_path" in summary else orjson.dumps(summary).decode())
        return

    async def go(redis):
        if force:
            await redis.delete(keys.arq_result(keys.train_job_id(rk.run)))
            overrides["force"] = True
        return await enqueue_training(redis, s, rk.run, overrides)

    if _run(go):
        typer.echo(f"training job for run {rk.run} enqueued on {s.train_queue_name}; start a trainer: make trainer")
    else:
        typer.echo(f"run {rk.run}: a training job is already queued, running or done (use --force to train again)")


def _print_estimate(estimate, console=None) -> None:
    """The trainer's measured duration (hegelion_queue/eta.py), as its lines on stderr (above a progress bar)."""
    from .eta import lines

    for line in lines(estimate):
        if console is None:
            typer.echo(line, err=True)
        else:  # whole lines, and "[…]" is text, not rich markup
            console.print(line, soft_wrap=True, markup=False, highlight=False)


@contextmanager
def _training_bar(iters: int):
    """on_progress and on_estimate hooks for train.run_training: a progress bar (steps, loss, S, λ, time left) and the
    measured duration printed above it."""
    with _bar() as bar:
        task = bar.add_task("training", total=iters)

        def show(row: dict) -> None:
            what = "plain twin" if row.get("twin") else "training"
            bar.update(task, completed=row["step"], description=f"{what} (loss {row['loss']:.3f}, S {row['S']:.3g}, "
                                                                 f"λ {row['lambda']:.3g})")

        yield show, lambda estimate: _print_estimate(estimate, bar.console)


def _trained_line(summary: dict) -> str:
    from .eval_summary import summary_line

    line = (f"adapter in {summary['adapter_path']}: {summary['steps']} steps, loss {summary['final_loss']:.3f}, "
            f"S {summary['final_S']:.3g} (S* {summary['target_s']:g}), λ {summary['final_lambda']:.4g}")
    if summary.get("eval"):
        line += f"\neval: {summary_line(summary['eval'])} (eval.json, eval_samples.jsonl, training.png)"
    return line


@app.command("eval")
def eval_cmd(
    adapter_path: Path = typer.Option(..., "--adapter-path", help="Adapter folder (ours or stock mlx_lm.lora's)."),
    model: Optional[str] = typer.Option(None, help="Base model (default: the one adapter_config.json names)."),
    data: Optional[Path] = typer.Option(None, help="Held-out data: a generator JSONL (every sample is scored) or a "
                                        "directory with valid.jsonl (default: the split the trainer held out)."),
    max_prompts: int = typer.Option(50, min=1, help="Held-out prompts to generate answers for."),
    max_tokens: Optional[int] = typer.Option(None, min=1, help="Longest generation (default: 1.25x the longest "
                                             "reference answer)."),
    json: bool = typer.Option(False, "--json", help="Print eval.json instead of the summary line."),
) -> None:
    """Did the adapter learn? Held-out cross-entropy of the assistant's tokens (nats, bits/token) and the share of
    greedy answers to held-out prompts that parse as a complete THESIS / ANTITHESIS / SYNTHESIS + final answer,
    base model against adapter. Writes eval.json and eval_samples.jsonl into the adapter folder."""
    from .eval_summary import summary_line
    from .evaluate import EvalArgs, evaluate

    try:
        report = evaluate(EvalArgs(adapter_path=str(adapter_path), model=model, data=str(data) if data else None,
                                   max_prompts=max_prompts, max_tokens=max_tokens))
    except HegelionError as e:
        _fail(str(e))
    typer.echo(orjson.dumps(report).decode() if json else
               f"{summary_line(report)}; eval.json and eval_samples.jsonl in {adapter_path}")


def _ablate_help(name: str) -> str:
    from dataclasses import fields

    from .ablate import AblationArgs

    return next(f.metadata["help"] for f in fields(AblationArgs) if f.name == name)


@app.command()
def ablate(
    data: Path = typer.Option(..., "--data", help=_ablate_help("data")),
    model: Optional[str] = typer.Option(None, help="Base model: Hub id or local directory (HEGELION_TRAIN_MODEL)."),
    out: Path = typer.Option(..., "--out", help=_ablate_help("out")),
    arms: str = typer.Option("plain,scu,fixed:0.1,fixed:1,fixed:10", help="Comma-separated: " + _ablate_help("arms")),
    seeds: int = typer.Option(3, min=1, help=_ablate_help("seeds")),
    iters: int = typer.Option(200, min=1, help=_ablate_help("iters")),
    train_sizes: str = typer.Option("all", help="Comma-separated, e.g. 64,all: " + _ablate_help("train_sizes")),
    schedules: str = typer.Option("constant", help="Comma-separated: " + _ablate_help("schedules")),
    learning_rate: float = typer.Option(1e-3, help=_ablate_help("learning_rate")),
    batch_size: int = typer.Option(4, min=1, help=_ablate_help("batch_size")),
    max_seq_length: int = typer.Option(512, min=8, help=_ablate_help("max_seq_length")),
    valid_fraction: float = typer.Option(0.1, min=0.01, max=0.5, help=_ablate_help("valid_fraction")),
    split_seed: int = typer.Option(0, help=_ablate_help("split_seed")),
    eval_every: int = typer.Option(0, min=0, help=_ablate_help("eval_every")),
    eval_prompts: int = typer.Option(20, min=0, help=_ablate_help("eval_prompts")),
    options: str = typer.Option("{}", help=_ablate_help("options") + ' E.g. {"lora_rank": 8, "target_s": 0.05}.'),
) -> None:
    """Does SCU beat plain LoRA or a fixed λ by more than seed noise? Trains every arm × seed × train size × schedule
    with the trainer on one held-out split, scores each (held-out CE, generalisation gap, format adherence) and writes
    OUT/ablation.json (means, sd, 95 % intervals over seeds; each arm against plain, paired by seed) and
    OUT/ablation.png (held-out CE against step). Run it again with the same options to resume after a crash."""
    from .ablate import AblationArgs, parse_list, run_ablation, table

    try:
        extra = orjson.loads(options)
    except orjson.JSONDecodeError as e:
        _fail(f"--options is not JSON ({e})")
    if not isinstance(extra, dict):
        _fail("--options must be a JSON object of training options")
    args = AblationArgs(data=str(data), model=model or get_settings().train_model, out=str(out),
                        arms=parse_list(arms), seeds=seeds, iters=iters, train_sizes=parse_list(train_sizes),
                        schedules=parse_list(schedules), learning_rate=learning_rate, batch_size=batch_size,
                        max_seq_length=max_seq_length, valid_fraction=valid_fraction, split_seed=split_seed,
                        eval_every=eval_every, eval_prompts=eval_prompts, options=extra)
    from contextlib import ExitStack

    shown: dict[str, Any] = {}
    stack = ExitStack()

    def progress(done: int, total: int, what: str) -> None:  # the bar starts with the first run: errors stay one line
        if not shown:
            shown["bar"] = stack.enter_context(_bar())
            shown["task"] = shown["bar"].add_task(what, total=total)
        shown["bar"].update(shown["task"], completed=done, total=total, description=what)

    try:
        with stack:
            report = run_ablation(args, progress)
    except HegelionError as e:
        _fail(str(e))
    typer.echo(table(report))
    typer.echo(f"{out}/ablation.json, {out}/ablation.png ({report['seconds'] / 60:.1f} min)")


@app.command()
def serve(
    host: Optional[str] = typer.Option(None, help="Address to bind (HEGELION_SERVE_HOST, 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="Port (HEGELION_SERVE_PORT, 8377)."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", metavar="PATH", help="A file (mode 600) holding "
                                              "the bearer token that enables resume and retry-failed from the "
                                              "dashboard; else HEGELION_SERVE_TOKEN; neither: read-only. The token "
                                              "is never an argument: the command line shows in ps and /proc."),
    demo: bool = typer.Option(False, "--demo", help="Show `make demo`'s runs (its own key prefix and queues)."),
) -> None:
    """The dashboard: every run live in a browser (/), one run's samples, dead letters and training (/runs/R),
    Prometheus metrics (/metrics) and status JSON (/api/status). Reads Redis only: run it on any host. It answers
    only requests addressed to loopback, the bound address or a name in HEGELION_SERVE_HOSTS (others get 400)."""
    from .dashboard import read_token_file, serve as run_server

    if demo:
        from .demo import KEYS

        os.environ.update(KEYS)
        get_settings.cache_clear()
    s = get_settings()
    try:
        token = read_token_file(token_file) if token_file else s.serve_token
    except HegelionError as e:
        _fail(str(e))
    _run(lambda redis: redis.ping())  # an unreachable Redis is one line here, not a traceback from the server
    run_server(s, host or s.serve_host, port or s.serve_port, token)


@app.command("settings")
def settings_cmd() -> None:
    """Print every setting (environment variable, default, meaning) as a Markdown table."""
    from .settings import settings_table

    typer.echo(settings_table())


@app.command("redis")
def redis_cmd() -> None:
    """Make sure Redis answers at HEGELION_REDIS_URL; start a local redis-server with AOF if not."""
    from . import redact
    from .runner import ensure_redis

    s = get_settings()
    try:
        how = ensure_redis(s)
    except HegelionError as e:
        _fail(str(e))
    typer.echo(f"Redis at {redact.text(s.redis_url)}: {how}")


@app.command()
def workers(n: int = typer.Option(2, "-n", "--workers", min=1, help="Worker processes to start.")) -> None:
    """Start N generator workers in the foreground, each log line prefixed with its worker number; Ctrl-C
    drains running jobs and stops them (SIGTERM too)."""
    from .runner import WorkerGroup, stop_on_sigterm

    group = WorkerGroup(n, out=sys.stdout)
    stop_on_sigterm()
    group.start()
    try:
        while group.alive():
            time.sleep(0.5)
    except KeyboardInterrupt:
        typer.echo("stopping: running jobs drain first (HEGELION_DRAIN_SECONDS)", err=True)
    finally:
        group.stop(timeout=get_settings().drain_seconds + 30)


@app.command("run")
def run_cmd(
    dataset: str = typer.Option(DEFAULT_DATASET, help="Hub id, hub-layout directory, or parquet/jsonl/json/csv file."),
    split: str = typer.Option(DEFAULT_SPLIT, help="Split to read."),
    column: Optional[str] = typer.Option(None, help="Prompt column (default: detected)."),
    prompts_file: Optional[Path] = typer.Option(None, help="Text file, one prompt per line."),
    limit: Optional[int] = typer.Option(500, min=1, help="How many usable prompts to sample."),
    seed: int = typer.Option(42, help="Sampling seed."),
    workers: int = typer.Option(2, "-n", "--workers", min=1, help="Worker processes to start."),
    run: Optional[str] = RunOpt,
    preflight: bool = typer.Option(True, help="Ask the teacher one tiny question first, to fail fast."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Call the teacher for every prompt (no answer reused)."),
) -> None:
    """The whole job: Redis, the teacher's preflight, the estimate, enqueue, N workers until every prompt is done or
    dead, the JSONL, then the adapter and its eval (when the train extra is installed)."""
    from .runner import LOG_DIR, WorkerGroup, ensure_redis, stop_on_sigterm

    s = get_settings()
    run = run or s.run
    try:
        how = ensure_redis(s)
        typer.echo(f"redis: {how}", err=True)
        _run(_check_eviction)
        if preflight:
            _preflight(s)
    except HegelionError as e:
        _fail(str(e))
    for line in do_estimate(dataset, split, column, prompts_file, limit, seed, 8000, run, not no_cache).lines():
        typer.echo(f"estimate: {line}", err=True)
    summary = do_enqueue(dataset, split, column, prompts_file, limit, seed, 8000, run, cache=not no_cache)
    typer.echo(_enqueue_line(summary), err=True)
    group = WorkerGroup(workers, log_dir=LOG_DIR)
    trainer = None
    if _trains(s):
        trainer = WorkerGroup(1, "workers.trainer.WorkerSettings", log_dir=LOG_DIR / "trainer")
    stop_on_sigterm()  # docker stop, systemd, a CI timeout: the workers are stopped below, not orphaned
    try:
        group.start()
        if trainer:
            trainer.start()
        _generate_then_train(s, run, group, trainer)
    finally:
        group.stop(timeout=s.drain_seconds + 30)
        if trainer:
            trainer.stop(timeout=30)


def _generate_then_train(s: Settings, run: str, group, trainer) -> None:
    from .runner import LOG_DIR

    t0 = time.monotonic()
    try:
        _run(lambda redis: _watch(redis, keys.RunKeys(s.key_prefix, run), group))
    finally:
        group.stop(timeout=s.drain_seconds + 30)
    from .status import collect
    from .jsonl import flush

    rk = keys.RunKeys(s.key_prefix, run)
    path = s.jsonl_path(run)

    async def finish(redis):
        if s.local_jsonl:
            await flush(redis, rk, path)
        status = await collect(redis, s, rk)
        _write_summary(status, path.with_name(f"{run}.summary.json"))
        return status

    st = _run(finish)
    minutes = max((time.monotonic() - t0) / 60, 1e-9)
    typer.echo(f"{path}: {st['done']} done, {st['dead']} dead, {st['retries']} retries, "
               f"{st['done'] / minutes:.1f} samples/min (logs in {LOG_DIR}/)")
    if trainer is None:
        typer.echo("training skipped (HEGELION_AUTO_TRAIN=0 or the train extra is not installed)", err=True)
        return
    if not st["done"]:  # a finished run with no sample gets no training job
        _fail(f"run {run}: no prompt was committed, nothing to train; see `hegelion-queue status --run {run}`")
    state = _run(lambda redis: _wait_training(redis, rk, trainer))
    if state.get("state") != "done":
        _fail(f"training failed: {state.get('error', 'see artifacts/logs/trainer/')}")
    typer.echo(_trained_line(orjson.loads(state["summary"])))


@app.command()
def demo(
    prompts: int = typer.Option(390, min=8, max=390, help="How many of the 390 bundled demo prompts to use."),
    iters: int = typer.Option(400, min=1, help="Training steps of the tiny model."),
    workers: int = typer.Option(2, "-n", "--workers", min=1, help="Generator worker processes."),
    baseline: Optional[str] = typer.Option(None, help="plain: also train a λ = 0 twin and compare (~1.5 min more)."),
) -> None:
    """The whole pipeline offline in about two minutes on 2 cores: the bundled prompts, the test teacher
    (tests/fake_kimi.py, not a model), a tiny Qwen2 built here; generation, the JSONL, SCU training, the eval and
    the plot; then where each artifact is and what it shows. Its Redis keys and queues are apart from real runs."""
    from . import demo as d
    from .producer import purge_run
    from .runner import ensure_redis

    t0 = time.monotonic()
    if baseline not in (None, "plain"):
        _fail("--baseline takes plain (a λ = 0 twin)")
    try:
        s = d.prepare(iters, baseline)
        ensure_redis(s)
    except HegelionError as e:
        _fail(str(e))
    _run(lambda redis: purge_run(redis, s, d.RUN, force=True))  # every demo starts from scratch
    typer.echo(f"watch it live: `hegelion-queue serve --demo` in another terminal, then http://{s.serve_host}:"
               f"{s.serve_port}/", err=True)
    run_cmd(dataset=DEFAULT_DATASET, split=DEFAULT_SPLIT, column=None, prompts_file=d.PROMPTS, limit=prompts, seed=42,
            workers=workers, run=d.RUN, preflight=True, no_cache=False)
    typer.echo(d.report(s, time.monotonic() - t0))


def _trains(s: Settings) -> bool:
    import importlib.util

    return s.auto_train and importlib.util.find_spec("mlx_lm") is not None


async def _wait_training(redis, rk, trainer) -> dict:
    """Until the run's training job is done or failed, with a progress bar of its steps."""
    from .eta import Estimate

    told = False
    with _bar() as bar:
        task = bar.add_task(f"training {rk.run}", total=None)
        while True:
            state = {k.decode(): v.decode() for k, v in (await redis.hgetall(rk.train)).items()}
            if state.get("estimate") and not told:  # the trainer's measured duration, once
                fields = orjson.loads(state["estimate"])
                fields.pop("remaining_s", None)
                _print_estimate(Estimate(**fields), bar.console)
                told = True
            if state.get("step"):
                bar.update(task, completed=int(state["step"]), total=int(state["iters"]),
                           description=f"training {rk.run} (loss {float(state.get('loss', 'nan')):.3f}, "
                                       f"λ {float(state.get('lambda', 'nan')):.3g})")
            if state.get("state") in ("done", "failed"):
                return state
            if trainer.alive() == 0:
                return {"state": "failed", "error": "the trainer worker exited; see artifacts/logs/trainer/"}
            await asyncio.sleep(1)


async def _watch(redis, rk, group) -> None:
    from .runner import wait_for_run

    with _bar() as bar:
        task = bar.add_task(rk.run, total=None)

        def show(done: int, dead: int, total: int) -> None:
            bar.update(task, completed=done + dead, total=total, description=f"{rk.run} (dead {dead})")

        await wait_for_run(redis, rk, show, group.alive)


def _preflight(s: Settings) -> None:
    """One tiny teacher call: a missing binary or an unset model stops here, in seconds."""
    import tempfile

    from .teacher import ConfigError, Teacher, TeacherError

    async def ask_once(teacher: Teacher) -> None:
        try:
            await teacher.ask("Reply with one short sentence: are you ready?")
        finally:
            await teacher.close()

    with tempfile.TemporaryDirectory(prefix="hegelion-preflight-") as home:
        try:
            asyncio.run(ask_once(Teacher(s, Path(home))))
        except ConfigError as e:
            raise HegelionError(f"the teacher is not usable: {e}{_teacher_fix(s, str(e))}") from e
        except TeacherError as e:
            typer.echo(f"warning: teacher preflight: {e} (continuing; jobs retry)", err=True)


def _teacher_fix(s: Settings, error: str) -> str:
    """The one next step for a teacher that cannot answer (a missing binary already names `make kimi`)."""
    if s.teacher != "kimi" or "not found" in error:
        return ""
    return (f". Give kimi a model: `{s.kimi_bin} login` (your Kimi account), or any OpenAI-compatible endpoint with "
            "KIMI_BASE_URL, KIMI_API_KEY and KIMI_MODEL_NAME; for another CLI set HEGELION_TEACHER=command and "
            "HEGELION_TEACHER_CMD, for another ACP agent HEGELION_TEACHER=acp and HEGELION_ACP_COMMAND")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except HegelionError as e:  # settings errors raised outside _run
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
