"""Prompt sources: read a dataset a batch at a time and pick its prompt column; a prompt's id.

Local parquet and hub-layout directories are read with pyarrow (only the needed columns); `datasets` is
imported only for a Hub id or an unusual directory layout, so a local enqueue starts fast. `sampling` draws the
prompts from what this reads.
"""

from __future__ import annotations

import csv
import hashlib
import os
import socket
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import urlsplit

import numpy as np
import orjson

from ..errors import HegelionError

STRING_COLUMNS = ("prompt", "instruction", "question", "query", "input", "text")
MESSAGE_COLUMNS = ("messages", "conversation", "conversations", "chosen")
INSTRUCTION_EXTRAS = ("input", "context")  # appended to `instruction` when non-empty (Alpaca, Dolly)
USER_ROLES = ("user", "human")
LOCAL_SUFFIXES = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".txt": "txt"}
HUB_PROBE_TIMEOUT = 3.0
BATCH_ROWS = 8_192  # rows read at a time: ~4 MB of 420-character prompts as Python strings


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
    """Column-major view of a source: names, a type tag per column, and its rows in batches, in order, as often
    as asked (a large source is read again rather than held in memory)."""

    def __init__(self, names: list[str], kinds: dict[str, str], batches: Callable[[list[str]], Iterator[dict]]):
        self.names = names
        self.kinds = kinds  # "string" | "messages" | "other"
        self._batches = batches

    def batches(self, names: list[str]) -> Iterator[dict[str, Any]]:
        """{name: values} per batch of rows; values are a list or a pyarrow array (see `column_values`)."""
        return self._batches(names)


def column_values(column: Any, idx: np.ndarray | None = None) -> list:
    """A batch's column as Python values, all of them or only the rows at `idx`."""
    if isinstance(column, list):
        return column if idx is None else [column[i] for i in idx]
    return (column if idx is None else column.take(idx)).to_pylist()


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
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:  # jemalloc hands freed pages back; pyarrow's default mimalloc keeps ~40 MB more while reading many batches
        pa.set_memory_pool(pa.jemalloc_memory_pool())
    except NotImplementedError:  # a pyarrow built without it
        pass

    try:
        schema = pq.read_schema(files[0])
    except Exception as e:
        raise HegelionError(f"{files[0]} is not a readable parquet file ({e})") from e

    def batches(names: list[str]) -> Iterator[dict[str, Any]]:
        # BATCH_ROWS rows at a time, through a handle per row group: ParquetFile.iter_batches over a whole file keeps
        # buffers of the row groups it has read (171 MB after 1 M rows of 420 characters), and pyarrow.dataset costs
        # ~0.25 s to import. Memory then follows the batch, not the file nor its row groups.
        try:
            for f in files:
                for g in range(pq.ParquetFile(f).metadata.num_row_groups):
                    handle = pq.ParquetFile(f, buffer_size=1 << 20, pre_buffer=False)  # pages, not whole chunks
                    for b in handle.iter_batches(BATCH_ROWS, row_groups=[g], columns=names, use_threads=False):
                        yield {n: b.column(n) for n in names}
        except Exception as e:
            raise HegelionError(f"cannot read {files[0].parent} as parquet ({e})") from e

    return Columns(list(schema.names), {n: _arrow_kind(schema.field(n).type) for n in schema.names}, batches)


def row_columns(rows: Iterable[dict]) -> Columns:
    """Columns of row dicts; `rows` is iterated once for the names and kinds, then once per pass."""
    names: dict[str, None] = {}
    kinds: dict[str, str] = {}
    for r in rows:
        for k, v in r.items():
            names.setdefault(k)
            if k not in kinds and v is not None:
                kinds[k] = _value_kind(v)

    def batches(ns: list[str]) -> Iterator[dict[str, Any]]:
        batch: list[dict] = []
        for r in rows:
            batch.append(r)
            if len(batch) == BATCH_ROWS:
                yield {n: [x.get(n) for x in batch] for n in ns}
                batch = []
        if batch:
            yield {n: [x.get(n) for x in batch] for n in ns}

    return Columns(list(names), kinds, batches)


class Reread:
    """The rows of a text file, read from disk again at each iteration (a large jsonl is never held whole);
    only the first reading counts and reports the lines it cannot read."""

    def __init__(self, read: Callable[[Path, SampleStats | None], Iterator[dict]], path: Path, stats: SampleStats):
        self._read, self._path, self._stats = read, path, stats

    def __iter__(self) -> Iterator[dict]:
        stats, self._stats = self._stats, None
        return self._read(self._path, stats)


def _read_jsonl(path: Path, stats: SampleStats | None) -> Iterator[dict]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)  # also rejects invalid UTF-8
            except orjson.JSONDecodeError as e:
                count_invalid(stats, f"{path.name}:{lineno}: not valid JSON / UTF-8 ({e})")
                continue
            yield obj if isinstance(obj, dict) else {"text": obj}


def _read_json(path: Path) -> list[dict]:
    """One JSON document cannot be read in pieces without another parser: it is held whole (use jsonl or parquet
    for a large dataset)."""
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


def _read_csv(path: Path, stats: SampleStats | None) -> Iterator[dict]:
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        for lineno, r in enumerate(csv.DictReader(f), 2):
            if any(isinstance(v, str) and has_surrogates(v) for v in r.values()):
                count_invalid(stats, f"{path.name}: record at line {lineno} is not valid UTF-8")
                continue
            yield r


def read_txt(path: Path, stats: SampleStats | None) -> Iterator[dict]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                count_invalid(stats, f"{path.name}:{lineno}: not valid UTF-8")
                continue
            if line.strip():
                yield {"prompt": line}


def has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def count_invalid(stats: SampleStats | None, message: str) -> None:
    if stats is None:  # a later pass over the same file: counted already
        return
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


SOURCE_HINT = ("pass a local file or directory with --dataset (parquet, jsonl, json, csv or a hub-layout folder) or "
               "--prompts-file")


def _datasets_columns(dataset: str, split: str, local: bool, hint: str = SOURCE_HINT) -> Columns:
    """Load through `datasets` (Hub id or unusual local layout). Offline: one clear error, fast; `hint` says what
    to pass instead."""
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
        raise HegelionError(f"cannot load {dataset!r} split {split!r}: {why}; {hint}") from e
    table = ds.data.table if hasattr(ds.data, "table") else ds.data

    def batches(names: list[str]) -> Iterator[dict[str, Any]]:
        for b in table.select(names).to_batches(max_chunksize=BATCH_ROWS):
            yield {n: b.column(n) for n in names}

    return Columns(list(table.schema.names), {f.name: _arrow_kind(f.type) for f in table.schema}, batches)


def open_source(dataset: str, split: str, stats: SampleStats, hint: str = SOURCE_HINT) -> Columns:
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
        if kind == "json":
            return row_columns(_read_json(path))
        if kind in ("jsonl", "csv", "txt"):
            return row_columns(Reread({"jsonl": _read_jsonl, "csv": _read_csv, "txt": read_txt}[kind], path, stats))
        raise HegelionError(f"{path}: unknown file type; use .parquet, .jsonl, .json, .csv or .txt")
    if dataset.startswith((".", "/", "~")) or path.suffix.lower() in LOCAL_SUFFIXES:
        raise HegelionError(f"dataset path {dataset!r} does not exist")
    return _datasets_columns(dataset, split, local=False, hint=hint)


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


class Texts:
    """How a batch's rows become prompt texts (None where a row has none): the chosen column, with a non-empty
    `input`/`context` appended to `instruction`, or the first user turn of a message list."""

    def __init__(self, cols: Columns, column: str):
        self.cols, self.column = cols, column
        self.extras = [c for c in INSTRUCTION_EXTRAS if column == "instruction" and c in cols.names]
        self.with_ids = column == "prompt" and "prompt_id" in cols.names
        self.messages: bool | None = True if cols.kinds.get(column) == "messages" else None

    def names(self) -> list[str]:
        return [self.column, *self.extras] + (["prompt_id"] if self.with_ids else [])

    def texts(self, batch: dict[str, Any], idx: np.ndarray | None = None) -> list[Any]:
        values = column_values(batch[self.column], idx)
        if self.messages is None:  # decided once, on the dataset's first rows
            self.messages = any(isinstance(v, list) for v in values[:50])
        if self.messages:
            return [first_user_turn(v) for v in values]
        wrong = next((v for v in values if v is not None and not isinstance(v, str)), None)
        if wrong is not None:
            raise HegelionError(
                f"column {self.column!r} holds {type(wrong).__name__} values, not text; choose another with --column "
                f"(the dataset has: {', '.join(self.cols.names)})"
            )
        for extra in self.extras:
            values = [f"{t}\n\n{x}" if isinstance(t, str) and isinstance(x, str) and x.strip() else t
                      for t, x in zip(values, column_values(batch[extra], idx))]
        return values

    def ids(self, batch: dict[str, Any]) -> list[Any] | None:
        return column_values(batch["prompt_id"]) if self.with_ids else None
