"""Sampling prompts: drop unusable and near-duplicate rows, draw a seeded permutation, read the chosen rows.

Memory does not grow with the dataset: a first pass over the rows, in batches, keeps per row only what sampling
needs (a 64-bit hash of the normalised text for first-occurrence dedup, and whether the row is usable); the seeded
permutation is drawn over the usable row indices; later passes read only the chosen rows, a bounded number at a
time, in sampling order.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import HegelionError
from ..settings import DEFAULT_MAX_PROMPT_CHARS
from .read import (Columns, Prompt, Reread, SampleStats, Texts, count_invalid, detect_column, has_surrogates,
                      normalized, open_source, prompt_id, read_txt, row_columns)

CHUNK = 100_000  # chosen prompts read per later pass (the producer's memory holds this many at most)


def _dedup_key(text: str) -> int:
    """64 bits of the near-duplicate key: 8 bytes a row, whatever the prompt's length."""
    return int.from_bytes(hashlib.blake2b(normalized(text).encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "little")


def _row_type(rows: int) -> type:
    return np.int32 if rows < 2**31 else np.int64


def _repeated_keys(keys: list[np.ndarray]) -> np.ndarray:
    """The sorted key values that occur more than once (one sorted copy: 8 bytes a row, briefly)."""
    if not keys:
        return np.zeros(0, np.uint64)
    ordered = np.concatenate(keys)
    ordered.sort()
    return np.unique(ordered[1:][ordered[1:] == ordered[:-1]])


def _first_occurrences(keys: np.ndarray, repeated: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Which of a batch's rows are the first of their key, the batches being visited in row order; `seen` marks the
    repeated keys met in earlier batches (and is updated)."""
    keep = np.ones(len(keys), dtype=bool)
    if not len(repeated) or not len(keys):
        return keep
    at = np.minimum(np.searchsorted(repeated, keys), len(repeated) - 1)
    dup = np.flatnonzero(repeated[at] == keys)
    slot = at[dup]
    first = np.zeros(len(dup), dtype=bool)
    first[np.unique(slot, return_index=True)[1]] = True  # the first row of each repeated key in this batch ...
    first &= ~seen[slot]  # ... unless an earlier batch had one
    seen[slot] = True
    keep[dup] = first
    return keep


class PromptSample:
    """A deterministic sample of a source's usable prompts, read in batches.

    The first pass (here) keeps per candidate its dedup key (8 bytes) and, in a batch with skipped rows, its row
    (4 bytes); rows are usable when not empty, too long or invalid, and the first of their near-duplicates.
    `batches()` then reads the chosen rows, CHUNK at a time, in sampling order: the same order as
    `Dataset.shuffle(seed)` of the usable rows, first `limit`."""

    def __init__(self, cols: Columns, column: str, limit: int | None, seed: int, max_chars: int, stats: SampleStats):
        self.cols, self.stats = cols, stats
        self.spec = Texts(cols, column)
        rows: list[np.ndarray | tuple[int, int]] = []  # a batch's candidate rows, or (first row, count) if all
        keys: list[np.ndarray] = []
        mismatched: list[np.ndarray] = []
        start = 0
        for batch in cols.batches(self.spec.names()):
            texts = self.spec.texts(batch)
            ids = self.spec.ids(batch)
            r, k, m = [], [], []
            for i, text in enumerate(texts):
                if not isinstance(text, str):
                    stats.skipped_invalid += 1
                    continue
                if not text.strip():
                    stats.skipped_empty += 1
                    continue
                if "\x00" in text or has_surrogates(text):
                    count_invalid(stats, f"row {start + i}: prompt holds a NUL byte or invalid UTF-8")
                    continue
                if len(text) > max_chars:
                    stats.skipped_too_long += 1
                    continue
                r.append(start + i)
                k.append(_dedup_key(text))
                if ids is not None:
                    m.append(ids[i] is not None and ids[i] != prompt_id(text))
            # a batch with every row a candidate (the common case) keeps no row numbers until its dups are known
            end = start + len(texts)
            rows.append((start, len(texts)) if len(r) == len(texts) else np.array(r, dtype=_row_type(end)))
            keys.append(np.array(k, dtype=np.uint64))
            mismatched.append(np.array(m, dtype=bool))
            start += len(texts)
        stats.rows = start
        candidates = sum(len(k) for k in keys)
        repeated = _repeated_keys(keys)
        seen = np.zeros(len(repeated), dtype=bool)
        for i, r in enumerate(rows):  # in row order, freeing each batch's keys once read
            keep = _first_occurrences(keys[i], repeated, seen)
            if isinstance(r, tuple):
                r = np.arange(r[0], r[0] + r[1], dtype=_row_type(r[0] + r[1]))
            rows[i], keys[i] = r[keep], None
            if self.spec.with_ids:
                stats.id_mismatches += int(mismatched[i][keep].sum())
        usable = np.concatenate(rows) if rows else np.zeros(0, np.int32)  # type: ignore[arg-type]
        del rows
        stats.usable = len(usable)
        stats.duplicates = candidates - len(usable)
        # Dataset.shuffle(seed) is default_rng(seed).permutation(n); shuffling an int32 arange in place draws the
        # same permutation in half the memory.
        order = np.arange(len(usable), dtype=_row_type(len(usable)))
        np.random.default_rng(seed).shuffle(order)
        self.chosen = usable[order[:limit] if limit is not None else order]  # rows, in sampling order
        stats.sampled = len(self.chosen)

    def __len__(self) -> int:
        return len(self.chosen)

    def batches(self, chunk: int = CHUNK) -> Iterator[list[Prompt]]:
        """The chosen prompts in sampling order, `chunk` at a time (one pass over the source per chunk)."""
        for lo in range(0, len(self.chosen), chunk):
            part = self.chosen[lo : lo + chunk]
            by_row = np.sort(part)
            texts: dict[int, str] = {}
            start = 0
            for batch in self.cols.batches(self.spec.names()):
                n = len(batch[self.spec.column])
                a, b = np.searchsorted(by_row, [start, start + n])
                if b > a:
                    rows = by_row[a:b]
                    texts.update(zip(rows.tolist(), self.spec.texts(batch, rows - start)))
                start += n
                if b == len(by_row):
                    break
            yield [Prompt(texts[row], prompt_id(texts[row]), row) for row in part.tolist()]


def open_sample(
    dataset: str,
    split: str,
    *,
    column: str | None = None,
    prompts_file: str | None = None,
    limit: int | None = None,
    seed: int = 42,
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS,
) -> PromptSample:
    """Open the source and draw the sample (the first pass); read the prompts with `.batches()`."""
    stats = SampleStats()
    if prompts_file:
        path = Path(prompts_file).expanduser()
        if not path.is_file():
            raise HegelionError(f"prompts file {prompts_file!r} does not exist")
        cols = row_columns(Reread(read_txt, path, stats))
    else:
        cols = open_source(dataset, split, stats)
    stats.column = detect_column(cols, column)
    return PromptSample(cols, stats.column, limit, seed, max_prompt_chars, stats)


def load_prompts(dataset: str, split: str, **kw: Any) -> tuple[list[Prompt], SampleStats]:
    """Every chosen prompt at once (small samples, tests); the producer reads `open_sample(...).batches()`."""
    sample = open_sample(dataset, split, **kw)
    return [p for batch in sample.batches() for p in batch], sample.stats
