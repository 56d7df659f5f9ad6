"""Prompt sources: read a dataset, pick the prompt column, drop unusable rows, sample deterministically.

Local parquet and hub-layout directories are read with pyarrow (only the needed columns); `datasets` is
imported only for a Hub id or an unusual directory layout, so a local enqueue starts fast.
"""

from __future__ import annotations

import csv
import hashlib
import os
import socket
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import numpy as np
import orjson

from .errors import HegelionError

STRING_COLUMNS = ("prompt", "instruction", "question", "query", "input", "text")
MESSAGE_COLUMNS = ("messages", "conversation", "conversations", "chosen")
INSTRUCTION_EXTRAS = ("input", "context")  # appended to `instruction` when non-empty (Alpaca, Dolly)
USER_ROLES = ("user", "human")
LOCAL_SUFFIXES = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".txt": "txt"}
HUB_PROBE_TIMEOUT = 3.0


def prompt_id(text: str) -> str:
    """sha256 of the exact prompt: the value ultrafeedback_binarized ships as `prompt_id`."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


_ODD_SPACE = ("  ", "\n", "\t", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x1f", "\x85")


def normalized(text: str) -> str:
    """Key for near-duplicates: NFC and collapsed whitespace."""
    if text.isascii() and text[:1] != " " and text[-1:] != " " and not any(w in text for w in _ODD_SPACE):
        return text  # the common case, several times faster: ASCII is NFC and has nothing to collapse
    return " ".join(unicodedata.normalize("NFC", text).split())


@dataclass
class Prompt:
    text: str
    prompt_id: str
    row: int


@dataclass
class SampleStats:
    column: str = ""
    rows: int = 0
    usable: int = 0
    sampled: int = 0
    skipped_empty: int = 0
    skipped_too_long: int = 0
    skipped_invalid: int = 0
    duplicates: int = 0
    id_mismatches: int = 0
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Columns:
    """Column-major view of a source: names, a type tag per column, and a loader for one column."""

    def __init__(self, names: list[str], kinds: dict[str, str], load: Callable[[list[str]], dict[str, list]]):
        self.names = names
        self.kinds = kinds  # "string" | "messages" | "other"
        self._load = load

    def load(self, names: list[str]) -> dict[str, list]:
        return self._load(names)


# ---------------------------------------------------------------- reading sources


def _arrow_kind(t: Any) -> str:
    import pyarrow as pa

    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_struct(t.value_type):
        return "messages"
    return "other"


def _value_kind(v: Any) -> str:
    if isinstance(v, str):
        return "string"
    if isinstance(v, list) and v and isinstance(v[0], dict):
        return "messages"
    return "other"


def _parquet_columns(files: list[Path]) -> Columns:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(files[0])
    except Exception as e:
        raise HegelionError(f"{files[0]} is not a readable parquet file ({e})") from e

    def load(names: list[str]) -> dict[str, list]:
        try:  # ParquetFile.read, not read_table: that one imports pyarrow.dataset (~0.25 s)
            tables = [pq.ParquetFile(f).read(columns=names) for f in files]
        except Exception as e:
            raise HegelionError(f"cannot read {files[0].parent} as parquet ({e})") from e
        return {n: [v for t in tables for v in t.column(n).to_pylist()] for n in names}

    return Columns(list(schema.names), {n: _arrow_kind(schema.field(n).type) for n in schema.names}, load)


def _row_columns(rows: list[dict]) -> Columns:
    names: dict[str, None] = {}
    kinds: dict[str, str] = {}
    for r in rows:
        for k, v in r.items():
            names.setdefault(k)
            if k not in kinds and v is not None:
                kinds[k] = _value_kind(v)
    return Columns(list(names), kinds, lambda ns: {n: [r.get(n) for r in rows] for n in ns})


def _read_jsonl(path: Path, stats: SampleStats) -> list[dict]:
    rows = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)  # also rejects invalid UTF-8
            except orjson.JSONDecodeError as e:
                _invalid(stats, f"{path.name}:{lineno}: not valid JSON / UTF-8 ({e})")
                continue
            rows.append(obj if isinstance(obj, dict) else {"text": obj})
    return rows


def _read_json(path: Path) -> list[dict]:
    try:
        obj = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as e:
        raise HegelionError(f"{path} is not valid JSON ({e}); for one object per line name it .jsonl") from e
    if isinstance(obj, dict):  # {"data": [...]} or {"<split>": [...]}: take the one list inside
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise HegelionError(f"{path} holds an object; expected a list of records")
        obj = lists[0]
    if not isinstance(obj, list):
        raise HegelionError(f"{path} holds {type(obj).__name__}; expected a list of records")
    return [r if isinstance(r, dict) else {"text": r} for r in obj]


def _read_csv(path: Path, stats: SampleStats) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        for lineno, r in enumerate(csv.DictReader(f), 2):
            if any(isinstance(v, str) and _has_surrogates(v) for v in r.values()):
                _invalid(stats, f"{path.name}: record at line {lineno} is not valid UTF-8")
                continue
            rows.append(r)
    return rows


def _read_txt(path: Path, stats: SampleStats) -> list[str]:
    lines = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                _invalid(stats, f"{path.name}:{lineno}: not valid UTF-8")
                continue
            if line.strip():
                lines.append(line)
    return lines


def _has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _invalid(stats: SampleStats, message: str) -> None:
    stats.skipped_invalid += 1
    if len(stats.warnings) < 10:
        stats.warnings.append(message)


def _hub_dir_files(path: Path, split: str) -> list[Path]:
    for pattern in (f"data/{split}-*.parquet", f"data/{split}/*.parquet", f"{split}/*.parquet", f"{split}-*.parquet"):
        files = sorted(path.glob(pattern))
        if files:
            return files
    return []


def _hub_reachable() -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parts = urlsplit(endpoint)
    try:
        with socket.create_connection((parts.hostname, parts.port or 443), timeout=HUB_PROBE_TIMEOUT):
            return True
    except OSError:
        return False


def _datasets_columns(dataset: str, split: str, local: bool) -> Columns:
    """Load through `datasets` (Hub id or unusual local layout). Offline: one clear error, fast."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if not local and not offline and not _hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"  # use the local cache if there is one; no 23 s retry loop
        offline = True
    import datasets

    try:
        ds = datasets.load_dataset(dataset, split=split)
    except Exception as e:
        if local:
            raise HegelionError(f"cannot load {dataset!r} split {split!r} ({e.__class__.__name__}: {e})") from e
        why = "the Hugging Face Hub is unreachable" if offline else f"{e.__class__.__name__}: {e}"
        raise HegelionError(
            f"cannot load {dataset!r} split {split!r}: {why}; pass a local file or directory with --dataset "
            "(parquet, jsonl, json, csv or a hub-layout folder) or --prompts-file"
        ) from e
    table = ds.data.table if hasattr(ds.data, "table") else ds.data

    def load(names: list[str]) -> dict[str, list]:
        return {n: table.column(n).to_pylist() for n in names}

    return Columns(list(table.schema.names), {f.name: _arrow_kind(f.type) for f in table.schema}, load)


def open_source(dataset: str, split: str, stats: SampleStats) -> Columns:
    path = Path(dataset).expanduser()
    if path.is_dir():
        files = _hub_dir_files(path, split)
        if files:
            return _parquet_columns(files)
        return _datasets_columns(str(path), split, local=True)
    if path.is_file():
        kind = LOCAL_SUFFIXES.get(path.suffix.lower())
        if kind == "parquet":
            return _parquet_columns([path])
        if kind == "jsonl":
            return _row_columns(_read_jsonl(path, stats))
        if kind == "json":
            return _row_columns(_read_json(path))
        if kind == "csv":
            return _row_columns(_read_csv(path, stats))
        if kind == "txt":
            return _row_columns([{"prompt": line} for line in _read_txt(path, stats)])
        raise HegelionError(f"{path}: unknown file type; use .parquet, .jsonl, .json, .csv or .txt")
    if dataset.startswith((".", "/", "~")) or path.suffix.lower() in LOCAL_SUFFIXES:
        raise HegelionError(f"dataset path {dataset!r} does not exist")
    return _datasets_columns(dataset, split, local=False)


# ---------------------------------------------------------------- picking the prompt column


def detect_column(cols: Columns, column: str | None = None) -> str:
    if column:
        if column not in cols.names:
            raise HegelionError(f"column {column!r} not found; the dataset has: {', '.join(cols.names)}")
        return column
    for name in STRING_COLUMNS:
        if cols.kinds.get(name) == "string":
            return name
    for name in MESSAGE_COLUMNS:
        if cols.kinds.get(name) == "messages":
            return name
    wrong = [n for n in STRING_COLUMNS + MESSAGE_COLUMNS if n in cols.names]
    if wrong:
        raise HegelionError(
            f"column {wrong[0]!r} holds values that are not text; choose another with --column "
            f"(the dataset has: {', '.join(cols.names)})"
        )
    raise HegelionError(
        f"no prompt column found; the dataset has: {', '.join(cols.names) or '(no columns)'}; choose one with --column"
    )


def first_user_turn(messages: Any) -> str | None:
    if not isinstance(messages, list):
        return None
    for m in messages:
        if not isinstance(m, dict):
            continue
        role = m.get("role", m.get("from"))
        text = m.get("content", m.get("value"))
        if isinstance(role, str) and role.lower() in USER_ROLES and isinstance(text, str):
            return text
    return None


def column_texts(cols: Columns, column: str) -> tuple[list[Any], list[Any] | None]:
    """The prompt text of every row (None where a row has none) and the dataset's own prompt ids if any."""
    extras = [c for c in INSTRUCTION_EXTRAS if column == "instruction" and c in cols.names]
    with_ids = column == "prompt" and "prompt_id" in cols.names
    data = cols.load([column, *extras] + (["prompt_id"] if with_ids else []))
    values = data[column]
    if cols.kinds.get(column) == "messages" or any(isinstance(v, list) for v in values[:50]):
        texts: list[Any] = [first_user_turn(v) for v in values]
    else:
        wrong = next((v for v in values if v is not None and not isinstance(v, str)), None)
        if wrong is not None:
            raise HegelionError(
                f"column {column!r} holds {type(wrong).__name__} values, not text; choose another with --column "
                f"(the dataset has: {', '.join(cols.names)})"
            )
        texts = list(values)
        for extra in extras:
            texts = [
                f"{t}\n\n{x}" if isinstance(t, str) and isinstance(x, str) and x.strip() else t
                for t, x in zip(texts, data[extra])
            ]
    return texts, (data["prompt_id"] if with_ids else None)


# ---------------------------------------------------------------- filtering and sampling


def usable_prompts(texts: list[Any], ids: list[Any] | None, max_chars: int, stats: SampleStats) -> list[Prompt]:
    """Rows in order, minus empty, too long, invalid and near-duplicate ones (first occurrence wins)."""
    seen: set[str] = set()
    out = []
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            stats.skipped_invalid += 1
            continue
        if not text.strip():
            stats.skipped_empty += 1
            continue
        if "\x00" in text or _has_surrogates(text):
            _invalid(stats, f"row {row}: prompt holds a NUL byte or invalid UTF-8")
            continue
        if len(text) > max_chars:
            stats.skipped_too_long += 1
            continue
        key = normalized(text)
        if key in seen:
            stats.duplicates += 1
            continue
        seen.add(key)
        pid = prompt_id(text)
        if ids is not None and ids[row] is not None and ids[row] != pid:
            stats.id_mismatches += 1
        out.append(Prompt(text, pid, row))
    return out


def sample(prompts: list[Prompt], limit: int | None, seed: int) -> list[Prompt]:
    """Deterministic for a seed: the same order as `Dataset.shuffle(seed)` of the usable rows."""
    order = np.random.default_rng(seed).permutation(len(prompts))
    if limit is not None:
        order = order[:limit]
    return [prompts[i] for i in order]


def load_prompts(
    dataset: str,
    split: str,
    *,
    column: str | None = None,
    prompts_file: str | None = None,
    limit: int | None = None,
    seed: int = 42,
    max_prompt_chars: int = 8000,
) -> tuple[list[Prompt], SampleStats]:
    stats = SampleStats()
    if prompts_file:
        path = Path(prompts_file).expanduser()
        if not path.is_file():
            raise HegelionError(f"prompts file {prompts_file!r} does not exist")
        cols = _row_columns([{"prompt": line} for line in _read_txt(path, stats)])
    else:
        cols = open_source(dataset, split, stats)
    stats.column = detect_column(cols, column)
    texts, ids = column_texts(cols, stats.column)
    stats.rows = len(texts)
    prompts = usable_prompts(texts, ids, max_prompt_chars, stats)
    stats.usable = len(prompts)
    chosen = sample(prompts, limit, seed)
    stats.sampled = len(chosen)
    return chosen, stats
