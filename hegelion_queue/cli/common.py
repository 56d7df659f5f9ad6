"""What every command shares: the app, its options, running a coroutine against Redis, one-line errors, progress bars."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import orjson
import typer

from .. import keys
from ..errors import HegelionError
from ..settings import DEFAULT_DATASET, DEFAULT_MAX_PROMPT_CHARS, DEFAULT_SPLIT, get_settings



app = typer.Typer(
    help="Turn a prompt dataset into dialectical (THESIS / ANTITHESIS / SYNTHESIS) training data with a "
    "queue of teacher-model workers, then train a LoRA adapter on it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

RunOpt = typer.Option(None, "--run", help="Run name (default: HEGELION_RUN, hegelion_kimi_training_data).")
# Where prompts come from: the same options for enqueue, estimate and run (run samples 500 by default)
DatasetOpt = typer.Option(DEFAULT_DATASET, help="Hub id, hub-layout directory, or parquet/jsonl/json/csv file.")
SplitOpt = typer.Option(DEFAULT_SPLIT, help="Split to read.")
ColumnOpt = typer.Option(None, help="Prompt column (default: detected).")
PromptsFileOpt = typer.Option(None, help="Text file, one prompt per line (instead of --dataset).")
SeedOpt = typer.Option(42, help="Sampling seed (same order as Dataset.shuffle(seed)).")
LimitOpt = typer.Option(None, min=1, help="How many usable prompts to sample (default: all).")
MaxPromptCharsOpt = typer.Option(DEFAULT_MAX_PROMPT_CHARS, min=1, help="Skip (and count) prompts longer than this.")

def BudgetOpt(kind: str) -> Any:
    from ..queue.budget import FLAGS

    what = kind.replace("_", " ")
    return typer.Option(None, FLAGS[kind], metavar="N", help=f"The run's limit of {what} (stored with the run; "
                        f"default: HEGELION_BUDGET_{kind.upper()}).")


def _limits(tokens: Optional[str], calls: Optional[str], seconds: Optional[str]) -> dict[str, Any]:
    """Budget flags checked before anything is read or written: a bad one is one line."""
    from ..queue.budget import parse_limits

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
        from ..queue.connection import connect

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


def _write_summary(status: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(status, option=orjson.OPT_INDENT_2))


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except HegelionError as e:  # settings errors raised outside _run
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)

