"""export: the run's JSONL (sft), the trainer's text form (scu), preference pairs (dpo) or a Hugging Face dataset (hf)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import HegelionError
from ..settings import get_settings

from .common import app, RunOpt, _fail, _run, _run_keys, _write_summary


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
    from ..queue.status import collect
    from ..queue.jsonl import export as export_run

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
        _write_summary(await collect(redis, s, rk), s.summary_path(rk.run))
        n = written.lines
        if format != "sft":
            from ..training.convert import load_tokenizer
            from ..dataset.exports import transform

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
    from ..dataset import decontaminate
    from ..dataset import hfdataset
    from ..dataset.provenance import command_line

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
