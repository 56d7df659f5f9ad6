"""Commands that run processes on this host: serve, settings, redis, workers, run, demo."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Optional

import orjson
import typer

from .. import keys
from ..errors import HegelionError
from ..settings import DEFAULT_DATASET, DEFAULT_MAX_PROMPT_CHARS, DEFAULT_SPLIT, Settings, get_settings

from .common import (ColumnOpt, DatasetOpt, PromptsFileOpt, RunOpt, SeedOpt, SplitOpt, _bar, _fail, _run,
                     _write_summary, app)
from .runs import _check_eviction, _enqueue_line, do_enqueue, do_estimate
from .training import _print_estimate, _trained_line


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
    from ..ops.dashboard import read_token_file, serve as run_server

    if demo:
        from ..ops.demo import KEYS

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
    from ..settings import settings_table

    typer.echo(settings_table())


@app.command("redis")
def redis_cmd() -> None:
    """Make sure Redis answers at HEGELION_REDIS_URL; start a local redis-server with AOF if not."""
    from .. import redact
    from ..queue.runner import ensure_redis

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
    from ..queue.runner import WorkerGroup, stop_on_sigterm

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
    dataset: str = DatasetOpt,
    split: str = SplitOpt,
    column: Optional[str] = ColumnOpt,
    prompts_file: Optional[Path] = PromptsFileOpt,
    limit: Optional[int] = typer.Option(500, min=1, help="How many usable prompts to sample."),
    seed: int = SeedOpt,
    workers: int = typer.Option(2, "-n", "--workers", min=1, help="Worker processes to start."),
    run: Optional[str] = RunOpt,
    preflight: bool = typer.Option(True, help="Ask the teacher one tiny question first, to fail fast."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Call the teacher for every prompt (no answer reused)."),
) -> None:
    """The whole job: Redis, the teacher's preflight, the estimate, enqueue, N workers until every prompt is done or
    dead, the JSONL, then the adapter and its eval (when the train extra is installed)."""
    from ..queue.runner import LOG_DIR, WorkerGroup, ensure_redis, stop_on_sigterm

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
    source = (dataset, split, column, prompts_file, limit, seed, DEFAULT_MAX_PROMPT_CHARS, run)
    for line in do_estimate(*source, cache=not no_cache).lines():
        typer.echo(f"estimate: {line}", err=True)
    summary = do_enqueue(*source, cache=not no_cache)
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
    from ..queue.runner import LOG_DIR

    t0 = time.monotonic()
    try:
        _run(lambda redis: _watch(redis, keys.RunKeys(s.key_prefix, run), group))
    finally:
        group.stop(timeout=s.drain_seconds + 30)
    from ..queue.status import collect
    from ..queue.jsonl import flush

    rk = keys.RunKeys(s.key_prefix, run)
    path = s.jsonl_path(run)

    async def finish(redis):
        if s.local_jsonl:
            await flush(redis, rk, path)
        status = await collect(redis, s, rk)
        _write_summary(status, s.summary_path(run))
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
    from ..ops import demo as d
    from ..jobs.producer import purge_run
    from ..queue.runner import ensure_redis

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
    from ..training.eta import Estimate

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
    from ..queue.runner import wait_for_run

    with _bar() as bar:
        task = bar.add_task(rk.run, total=None)

        def show(done: int, dead: int, total: int) -> None:
            bar.update(task, completed=done + dead, total=total, description=f"{rk.run} (dead {dead})")

        await wait_for_run(redis, rk, show, group.alive)


def _preflight(s: Settings) -> None:
    """One tiny teacher call: a missing binary or an unset model stops here, in seconds."""
    import tempfile

    from ..teacher.presets import ConfigError, Teacher, TeacherError

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
