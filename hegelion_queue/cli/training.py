"""Commands that train and judge adapters: convert, train, eval, ablate."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import Field, fields
from pathlib import Path
from typing import Any, Optional

import orjson
import typer

from .. import keys
from ..errors import HegelionError
from ..settings import get_settings
from ..training.args import TrainArgs

from .common import app, _fail, _run, _run_keys, _bar


def _field(args: type, name: str) -> Field:
    """The dataclass field behind an option (mlx-lm's way: the field carries its help)."""
    return next(f for f in fields(args) if f.name == name)


def _trainer_option(name: str) -> Any:
    """An option that overrides TrainArgs.<name>, with the dataclass's help and default: they cannot drift apart."""
    f = _field(TrainArgs, name)
    return typer.Option(None, help=f"{f.metadata['help'].rstrip('.')} (default {f.default:g}).")


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
    from ..training.convert import convert as run_convert, load_tokenizer

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
    iters: Optional[int] = _trainer_option("iters"),
    batch_size: Optional[int] = _trainer_option("batch_size"),
    learning_rate: Optional[float] = _trainer_option("learning_rate"),
    lr_schedule: Optional[str] = typer.Option(None, help="constant (the default: it measured best, see the README's "
                                              "ablation) or cosine: decay to 0 over the steps."),
    adapter_path: Optional[str] = typer.Option(None, help="Output directory (artifacts/adapters/<run>)."),
    target_s: Optional[float] = _trainer_option("target_s"),
    kp: Optional[float] = _trainer_option("kp"),
    ki: Optional[float] = _trainer_option("ki"),
    prior_sigma: Optional[float] = _trainer_option("prior_sigma"),
    scu_update_every: Optional[int] = _trainer_option("scu_update_every"),
    baseline: Optional[str] = typer.Option(None, help="plain: also train a λ = 0 twin (same data, seed, steps, "
                                           "learning rate) and report SCU against it."),
    eval_prompts: Optional[int] = _trainer_option("eval_prompts"),
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
        from ..training.train import run_training
        from ..jobs.training_job import train_args

        try:
            args = train_args(s, data.stem, overrides)
            with _training_bar(args.iters) as (on_progress, on_estimate):
                summary = run_training(data, args, on_progress, on_estimate)
        except HegelionError as e:
            _fail(str(e))
        typer.echo(_trained_line(summary))
        return
    rk = _run_keys(run)
    from ..jobs.training_job import enqueue_training, train_run

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
    """The trainer's measured duration (hegelion_queue/training/eta.py), as its lines on stderr (above a progress bar)."""
    from ..training.eta import lines

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
    from ..training.eval_summary import summary_line

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
    from ..training.eval_summary import summary_line
    from ..training.evaluate import EvalArgs, evaluate

    try:
        report = evaluate(EvalArgs(adapter_path=str(adapter_path), model=model, data=str(data) if data else None,
                                   max_prompts=max_prompts, max_tokens=max_tokens))
    except HegelionError as e:
        _fail(str(e))
    typer.echo(orjson.dumps(report).decode() if json else
               f"{summary_line(report)}; eval.json and eval_samples.jsonl in {adapter_path}")


def _ablate_help(name: str) -> str:
    from ..training.ablate import AblationArgs

    return _field(AblationArgs, name).metadata["help"]


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
    from ..training.ablate import AblationArgs, parse_list, run_ablation, table

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
