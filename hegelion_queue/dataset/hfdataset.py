"""`export --format hf`: the run as a Hugging Face dataset folder — parquet shards written by the `datasets` library's
own writer, with typed columns, and a dataset card (README.md: YAML metadata, then a body written for people) whose
every figure is computed here — and `--push-to-hub` to upload it with `huggingface_hub`.

The folder is written under a temporary name next to OUT_DIR and renamed at the end: an export that fails leaves
nothing behind. Everything a user could have put a secret in (the teacher's argv, endpoint, dataset path, commands)
goes through redact.py on its way in, whatever the run recorded; no host name is written. Samples are read through
`store.iter_samples` a batch at a time, so memory stays flat; with benchmarks given (`--decontaminate`), each batch
is checked against them (decontaminate.py) and the matches written to contaminated.jsonl as they are found.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import orjson
from redis.asyncio import Redis

from ..queue import budget, status, store
from . import decontaminate, provenance, quality
from .. import redact
from ..errors import HegelionError
from ..keys import RunKeys
from ..settings import Settings

SPLIT = "train"
SHARD_BYTES = 256 * 1024 * 1024  # text per parquet shard (the Hub's own writer aims at 500 MB)
REMOVED = "removed.jsonl"
CONTAMINATED = "contaminated.jsonl"
SPAN_SHOWN = 200  # characters of a shared span in the card; contaminated.jsonl has all of it
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # user/name: a dataset on the Hub, not a local path
REMOVALS_SHOWN = 20  # removals listed in the card itself; all of them are in removed.jsonl
SIZE_CATEGORIES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M")]

# name: (type, meaning). One source for the features and the card's table of columns.
COLUMNS: dict[str, tuple[Any, str]] = {
    "prompt": ("string", "The prompt (the teacher got it after a fixed instruction line)."),
    "thesis": ("string", "THESIS: the strongest initial answer."),
    "antithesis": ("string", "ANTITHESIS: the strongest objections to it."),
    "synthesis": ("string", "SYNTHESIS: the resolution."),
    "final_answer": ("string", "The answer after the thought block."),
    "reasoning": ("string", "The teacher's own reasoning (think parts), when it reports any."),
    "prompt_id": ("string", "sha256 of the prompt (ultrafeedback's prompt_id)."),
    "source": ({"dataset": "string", "split": "string", "row": "int64"}, "Where the prompt came from."),
    "teacher": ({"preset": "string", "model": "string"}, "The teacher preset and model that answered."),
    "config_id": ("string", "The run configuration that made the sample (see Teacher and configuration)."),
    "attempts": ("int32", "Teacher calls this prompt took."),
    "tokens": ("int64", "Tokens the teacher reported for the call that made it (input, cached input, output)."),
}


def features() -> Any:
    from datasets import Features, Value

    def typed(t: Any) -> Any:
        return {k: Value(v) for k, v in t.items()} if isinstance(t, dict) else Value(t)

    return Features({name: typed(t) for name, (t, _) in COLUMNS.items()})


def row(sample: dict[str, Any]) -> dict[str, Any]:
    tr = sample["hegelion_trace"]
    src, teacher = tr.get("source") or {}, tr.get("teacher") or {}
    return {
        "prompt": sample["instruction"], "thesis": tr["thesis"], "antithesis": tr["antithesis"],
        "synthesis": tr["synthesis"], "final_answer": tr["final_answer"], "reasoning": tr.get("reasoning") or "",
        "prompt_id": tr["prompt_id"],
        "source": {"dataset": _masked(src.get("dataset")), "split": src.get("split"), "row": src.get("row")},
        "teacher": {"preset": teacher.get("preset"), "model": _masked(teacher.get("model"))},
        "config_id": tr.get("config_id") or "", "attempts": tr.get("attempts"),
        "tokens": budget.tokens_of(tr.get("usage")),
    }


def _masked(value: Any) -> Any:
    return redact.text(value) if isinstance(value, str) else value


# ---------------------------------------------------------------- checks before any work


def check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        what = "is a file" if not out_dir.is_dir() else "exists and is not empty"
        raise HegelionError(f"{out_dir} {what}: name a new or empty folder for the dataset")


def check_hub(repo: str) -> None:
    """Pushing needs the Hub: say so before any work when it cannot be reached or used."""
    from huggingface_hub import get_token
    from huggingface_hub.constants import is_offline_mode

    if "/" not in repo.strip("/"):
        raise HegelionError(f"--push-to-hub takes a repository id like user/name, not {repo!r}")
    if is_offline_mode():
        raise HegelionError("--push-to-hub needs the Hugging Face Hub, but HF_HUB_OFFLINE is set: unset it, or "
                            "export without --push-to-hub and upload the folder later")
    if not get_token():
        raise HegelionError("--push-to-hub needs a Hugging Face token: run `hf auth login` or set HF_TOKEN")


# ---------------------------------------------------------------- the export


@dataclass
class Export:
    """What the export wrote and counted: the card is rendered from this and nothing else."""

    run: str
    out_dir: Path
    rows: int = 0
    shards: list[str] = field(default_factory=list)
    text_bytes: int = 0
    parquet_bytes: int = 0
    removals: list[quality.Removal] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # stream ids of samples packed with a dictionary Redis lacks
    dropped: bool = False
    report: quality.Report | None = None
    contamination: decontaminate.Report | None = None  # with --decontaminate
    dropped_contaminated: bool = False
    per_config: Counter = field(default_factory=Counter)
    status: dict[str, Any] = field(default_factory=dict)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    commands: list[dict[str, Any]] = field(default_factory=list)
    command: str = ""
    source: dict[str, Any] = field(default_factory=dict)
    license: str | list[str] = "unknown"  # a list stays a list: the Hub reads one id per item
    license_from: str = ""
    repo: str = ""
    written_at: float = 0.0


class _Shards:
    """Parquet shards of about `shard_bytes` of text each, by `datasets.arrow_writer.ParquetWriter`."""

    def __init__(self, data_dir: Path, shard_bytes: int):
        self.dir, self.limit = data_dir, shard_bytes
        self.paths: list[Path] = []
        self.writer: Any = None
        self.size = 0

    def write(self, columns: dict[str, list[Any]], nbytes: int) -> None:
        from datasets.arrow_writer import ParquetWriter

        if self.writer is None:
            self.paths.append(self.dir / f".shard-{len(self.paths)}.parquet")
            self.writer = ParquetWriter(features=features(), path=str(self.paths[-1]))
        self.writer.write_batch(columns)
        self.size += nbytes
        if self.size >= self.limit:
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.finalize()
            self.writer, self.size = None, 0

    def name(self) -> list[str]:
        """Rename the shards to the Hub's layout (data/train-00000-of-00002.parquet); returns the new names."""
        self.close()
        if not self.paths:  # an empty dataset still has its (empty, typed) shard
            self.write({name: [] for name in COLUMNS}, 0)
            self.close()
        names = [f"{SPLIT}-{i:05d}-of-{len(self.paths):05d}.parquet" for i in range(len(self.paths))]
        for path, name in zip(self.paths, names):
            path.rename(self.dir / name)
        return names


async def export_hf(redis: Redis, settings: Settings, rk: RunKeys, out_dir: Path, *, drop_near_duplicates: bool = False,
                    command: str = "", license: str | list[str] | None = None, repo: str = "",
                    shard_bytes: int = SHARD_BYTES, benchmarks: decontaminate.Index | None = None,
                    drop_contaminated: bool = False) -> Export:
    """Write the run as a dataset folder at `out_dir` (new or empty); returns what it wrote and counted. With
    `benchmarks`, every sample is checked against them; `drop_contaminated` leaves out the samples that match."""
    check_out_dir(out_dir)
    st = await status.collect(redis, settings, rk)
    if not st["enqueued"] and not st["results_stream"]:
        raise HegelionError(f"run {rk.run} has no prompts in Redis: see `hegelion-queue runs`")
    meta = {k.decode(): v.decode() for k, v in (await redis.hgetall(rk.meta)).items()}
    ex = Export(run=rk.run, out_dir=out_dir, status=st, configs=redact.data(await provenance.configs(redis, rk)),
                commands=[{"at": c.get("at"), "command": redact.command(str(c.get("command", "")))}
                          for c in await provenance.commands(redis, rk)],
                command=redact.command(command), dropped=drop_near_duplicates, repo=repo,
                source={"dataset": redact.text(meta.get("dataset", "")), "split": meta.get("split", "")},
                dropped_contaminated=drop_contaminated and benchmarks is not None)
    if benchmarks is not None:
        ex.contamination = decontaminate.Report(benchmarks.benchmarks, shown_max=REMOVALS_SHOWN)
    ex.license, ex.license_from = (license, "--license") if license else source_license(ex.source["dataset"])
    current = ex.configs.get(meta.get("config_id", ""), {}).get("config", {})
    checker = quality.Checker(current.get("parser", {}).get("min_section_chars", settings.min_section_chars))

    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "data").mkdir(parents=True)
    try:
        shards = _Shards(tmp / "data", shard_bytes)
        listing = open(tmp / CONTAMINATED, "wb") if benchmarks is not None else contextlib.nullcontext()
        with listing as listed:
            async for batch in store.iter_samples(redis, rk, unreadable=ex.unreadable):
                rows = [row(sample) for _, sample in batch]
                found = checker.add(rows)
                ex.removals += [f for f in found if f is not None]
                matched = _decontaminate(benchmarks, ex.contamination, rows, listed) if listed else set()
                if drop_near_duplicates:
                    rows = [r for r, f in zip(rows, found) if f is None]
                if ex.dropped_contaminated and matched:
                    kept = [r for r in rows if r["prompt_id"] not in matched]
                    ex.contamination.removed += len(rows) - len(kept)
                    rows = kept
                nbytes = sum(len(r[k]) for r in rows for k in ("prompt", "thesis", "antithesis", "synthesis",
                                                                   "final_answer", "reasoning"))
                ex.rows += len(rows)
                ex.text_bytes += nbytes
                ex.per_config.update(r["config_id"] for r in rows)
                if rows:
                    shards.write({name: [r[name] for r in rows] for name in COLUMNS}, nbytes)
        ex.shards = shards.name()
        ex.parquet_bytes = sum((tmp / "data" / name).stat().st_size for name in ex.shards)
        ex.report = checker.report
        ex.written_at = time.time()
        if drop_near_duplicates:
            with open(tmp / REMOVED, "wb") as f:
                f.writelines(orjson.dumps(r.__dict__) + b"\n" for r in ex.removals)
        (tmp / "README.md").write_text(card(ex), encoding="utf-8")
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked above)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ex


def _decontaminate(index: decontaminate.Index, report: decontaminate.Report, rows: list[dict[str, Any]],
                   listed: Any) -> set[str]:
    """Check a batch against the benchmarks (every sample, before any removal), list its matches; the ids matched."""
    matches = index.check(rows)
    listed.writelines(orjson.dumps(m.__dict__) + b"\n" for m in matches)
    return report.add(len(rows), matches)


def push(out_dir: Path, repo: str, private: bool) -> str:
    """Upload the folder as a dataset repository; returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo, repo_type="dataset", folder_path=str(out_dir),
                          commit_message="hegelion-queue export --format hf")
    except Exception as e:  # network, permissions, a name taken: one line, the folder stays
        raise HegelionError(f"upload to {repo} failed ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
                            f"the dataset is in {out_dir}") from e
    return str(url)


# ---------------------------------------------------------------- the card


def source_license(dataset: str) -> tuple[str | list[str], str]:
    """(license, where it was read) from the input dataset's own card: a local folder's README.md, or the Hub
    card in the local cache (no network); ("unknown", "") when neither says."""
    from huggingface_hub import DatasetCard, try_to_load_from_cache

    candidates = []
    if dataset and Path(dataset).is_dir():
        candidates.append(Path(dataset) / "README.md")
    elif dataset and "/" in dataset and not Path(dataset).exists():
        try:
            cached = try_to_load_from_cache(dataset, "README.md", repo_type="dataset")
        except ValueError:  # not a Hub id either (a file since moved, a path masked by redact)
            cached = None
        if isinstance(cached, str):
            candidates.append(Path(cached))
    for path in candidates:
        try:
            found = DatasetCard.load(path).data.to_dict().get("license")
        except Exception:  # no card, no YAML, unreadable: the license stays unknown and the card says so
            continue
        if found:
            return ([str(x) for x in found] if isinstance(found, list) else str(found)), str(path)
    return "unknown", ""


def size_category(n: int) -> str:
    return next((name for limit, name in SIZE_CATEGORIES if n < limit), "n>100M")


def _share(n: int, total: int) -> str:
    return f"{100 * n / total:.1f} %" if total else "—"


def _languages(report: quality.Report) -> list[str]:
    """Answer languages that make up at least 1 % of the samples (the card's `language` metadata)."""
    return [code for code, n in report.answer_languages.most_common()
            if code != "undetermined" and n >= 0.01 * max(report.samples, 1)]


def metadata(ex: Export) -> str:
    """The card's YAML: license and source of the input, size category, task, languages, and the `datasets`
    metadata (features, split sizes, which files are the data) written by the library's own helpers."""
    from datasets import DatasetInfo, SplitDict, SplitInfo
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCardData

    source = ex.source["dataset"]
    data = DatasetCardData(
        license=ex.license, language=_languages(ex.report) or None, task_categories=["text-generation"],
        size_categories=[size_category(ex.rows)], pretty_name=f"{ex.run} (dialectical reasoning)",
        source_datasets=[source] if HUB_ID.fullmatch(source) and not Path(source).exists() else ["original"],
        tags=["synthetic", "dialectic", "reasoning", "hegelion-queue"],
    )
    splits = SplitDict()
    splits.add(SplitInfo(name=SPLIT, num_bytes=ex.text_bytes, num_examples=ex.rows))
    info = DatasetInfo(features=features(), splits=splits, download_size=ex.parquet_bytes, dataset_size=ex.text_bytes)
    DatasetInfosDict({"default": info}).to_dataset_card_data(data)
    MetadataConfigs({"default": {"data_files": [{"split": SPLIT, "path": f"data/{SPLIT}-*"}]}}).to_dataset_card_data(data)
    return data.to_yaml()


def card(ex: Export) -> str:
    """README.md: the YAML metadata, then the body (templates/dataset_card.md) filled with computed figures."""
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(loader=PackageLoader("hegelion_queue", "templates"), autoescape=False, trim_blocks=True,
                      lstrip_blocks=True, undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters.update(n=lambda v: f"{v:,}" if isinstance(v, int) else budget.fmt(v) if isinstance(v, float) else v,
                       share=lambda n: _share(n, ex.report.samples),
                       clock=lambda t: time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)),
                       flat=provenance.flat, cell=lambda v: str(v).replace("|", "\\|"),
                       clip=lambda v: v if len(v) <= SPAN_SHOWN else v[:SPAN_SHOWN].rsplit(" ", 1)[0] + " …")
    st = ex.status
    body = env.get_template("dataset_card.md").render(
        ex=ex, st=st, q=ex.report, columns=COLUMNS, budget=st["budget"], where=ex.repo or redact.text(str(ex.out_dir)),
        removals_shown=ex.removals[:REMOVALS_SHOWN], removed_file=REMOVED, cont=ex.contamination,
        contaminated_file=CONTAMINATED,
        unknown_config=ex.per_config.get("", 0), languages=_language_rows(ex.report),
    )
    return f"---\n{metadata(ex)}\n---\n\n{body}"


def _language_rows(report: quality.Report) -> list[tuple[str, int, int]]:
    codes: Iterable[str] = sorted(set(report.prompt_languages) | set(report.answer_languages),
                                  key=lambda c: -(report.prompt_languages[c] + report.answer_languages[c]))
    return [(c, report.prompt_languages[c], report.answer_languages[c]) for c in codes]
