"""Decontamination: which samples share a run of 13 words with a benchmark (`export --format hf --decontaminate`).

- **Normalised words.** Texts are compared as the quality report compares them (`quality.words`: NFKC, lower case,
  words only), so case, punctuation and whitespace make no difference; a text of fewer than 13 words has no 13-gram.
- **A benchmark** is read through sources/read.py (`prompts` here), as the producer reads its sources (a local jsonl / parquet / csv / txt
  file or hub-layout folder, or a Hugging Face dataset name): per row, its question column (prompts.detect_column)
  followed by the ANSWER_COLUMNS it has, as one text. Each word gets an id (a dict over the benchmarks' words only),
  each 13-gram a 64-bit hash (numpy: ids -> splitmix64 -> a polynomial over the 13 words, wrapping uint64); the
  index is those hashes sorted and unique, each with a bitmask of the benchmarks that have it (8 bytes and a byte
  for up to 8 benchmarks), and a bitmap of 16 to 32 bits a 13-gram that rules most non-members out in one lookup.
- **A batch of samples** (FIELDS of each) is hashed the same way, CHECK_ROWS samples a numpy pass; a 13-gram holding
  a word no benchmark has cannot match and is not looked up; the rest go through the bitmap, and the few that pass
  are looked up with np.searchsorted. Only for a hit are the words recovered: consecutive hit 13-grams of one field
  and benchmark make one span (13 words or more).

Time is linear in the samples' and the benchmarks' words (a lookup is log of the index's size); memory is the index
and one batch. Pure apart from `load`, which reads the benchmarks.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from ..sources import read as prompts
from . import quality
from .. import redact
from ..errors import HegelionError

logger = logging.getLogger("hegelion_queue.decontaminate")

NGRAM = 13
FIELDS = ("prompt", "thesis", "antithesis", "synthesis", "final_answer")  # what is checked in every sample
ANSWER_COLUMNS = ("answer", "answers", "choices", "options", "solution")  # read after the question where present
QUESTION_FALLBACK = ("problem",)  # a question column prompts.detect_column does not know (MATH)
DEFAULT_SPLIT = "test"  # a hub-layout folder's or a Hub dataset's split unless SRC names one (SRC:SPLIT)
FILTER_BITS = 16  # bits of the lookup's bitmap per 13-gram of the index (rounded up to a power of two)
MAX_BENCHMARKS = 64  # one bit each in the index's bitmask
HINT = ("name a local jsonl, parquet, csv or txt file or a hub-layout folder instead (a Hub name needs the Hub, or "
        "the dataset in the local cache)")
CHECK_ROWS = 256  # samples hashed at a time: their words as Python strings are the check's largest temporary
_SPLIT = re.compile(r"[\w.-]+")
_ASCII_NON_WORD = str.maketrans({c: " " for c in map(chr, range(128)) if not (c.isalnum() or c == "_")})
_P = np.uint64(0x9E3779B97F4A7C15)  # odd: the polynomial's base


def words(text: str) -> list[str]:
    """The normalised words: quality.words (NFKC, lower case, `\\w+` runs), about twice as fast for ASCII text."""
    if text.isascii():
        return text.lower().translate(_ASCII_NON_WORD).split()
    return quality.words(text)


def mix(ids: np.ndarray) -> np.ndarray:
    """splitmix64 of each id: a word's 64-bit value, spread over every bit (uint64 arithmetic wraps)."""
    z = ids.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def ngram_hashes(values: np.ndarray) -> np.ndarray:
    """The 64-bit hash of every window of NGRAM consecutive values (len(values) - NGRAM + 1 of them, or none)."""
    m = len(values) - NGRAM + 1
    if m <= 0:
        return np.zeros(0, np.uint64)
    h = values[:m].copy()
    for k in range(1, NGRAM):
        h *= _P
        h += values[k : k + m]
    return h


@dataclass
class Windows:
    """The 13-grams of a batch of texts laid end to end: `at` are the starts (in the joined words) of the windows
    that lie inside one text and hold no unknown word, `hashes` their hashes, `text` the text each word is in."""

    at: np.ndarray
    hashes: np.ndarray
    text: np.ndarray
    starts: np.ndarray  # where each text's words begin


def windows(sizes: np.ndarray, flat: np.ndarray) -> Windows:
    """Windows of texts laid end to end: `sizes` words each, `flat` their ids (0: a word no benchmark has)."""
    text = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
    starts = np.cumsum(sizes) - sizes
    hashes = ngram_hashes(mix(flat))
    if not len(hashes):
        return Windows(np.zeros(0, np.int64), hashes, text, starts)
    unknown = np.concatenate([[0], np.cumsum(flat == 0)])
    inside = (text[: len(hashes)] == text[NGRAM - 1 :]) & (unknown[NGRAM:] == unknown[: len(hashes)])
    at = np.flatnonzero(inside)
    return Windows(at, hashes[at], text, starts)


class Vocabulary:
    """Word -> id (from 1), numbered in the order the benchmarks first show them; a sample's word that no benchmark
    has is 0, so the dict never grows past the benchmarks' own words."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def add(self, texts: list[list[str]]) -> np.ndarray:
        """The ids of every word of `texts`, one after the other; a new word gets the next id."""
        out: list[int] = []
        for ws in texts:
            got = list(map(self.ids.get, ws))
            if None in got:
                got = [x if x is not None else self.ids.setdefault(w, len(self.ids) + 1) for x, w in zip(got, ws)]
            out += got
        return np.array(out, dtype=np.int64)

    def known(self, texts: list[list[str]]) -> np.ndarray:
        """The ids of every word of `texts`, one after the other; 0 for a word the benchmarks do not have."""
        return np.fromiter(map(self.ids.get, itertools.chain.from_iterable(texts), itertools.repeat(0)),
                           dtype=np.int64, count=sum(map(len, texts)))


def _firsts(a: np.ndarray) -> np.ndarray:
    """True where a run of equal values of sorted `a` begins."""
    return np.concatenate([[True], a[1:] != a[:-1]])


def _unique(a: np.ndarray) -> np.ndarray:
    """Sorted and unique: np.unique's hash table is ~8x slower than a sort for 64-bit hashes."""
    a = np.sort(a)
    return a[_firsts(a)] if len(a) else a


def sizes(texts: list[list[str]]) -> np.ndarray:
    return np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))


@dataclass
class Match:
    """One span a sample shares with a benchmark: what the card and contaminated.jsonl list."""

    prompt_id: str
    benchmark: str
    field: str  # one of FIELDS
    span: str  # the shared words, normalised (13 or more)


@dataclass
class Benchmark:
    name: str
    texts: int = 0
    short: int = 0  # texts of fewer than NGRAM words: they cannot match
    ngrams: int = 0  # distinct 13-grams
    columns: list[str] = field(default_factory=list)


class Index:
    """The benchmarks' 13-gram hashes, sorted and unique, with a bitmask of the benchmarks that have each."""

    def __init__(self) -> None:
        self.vocab = Vocabulary()
        self.benchmarks: list[Benchmark] = []
        self.hashes = np.zeros(0, np.uint64)
        self.owners = np.zeros(0, np.uint64)
        self.bits = 16
        self.bitmap = np.zeros(1 << (self.bits - 3), np.uint8)

    @classmethod
    def build(cls, sources: Iterable[tuple[Benchmark, Iterable[list[str]]]]) -> Index:
        """From (benchmark, its texts in batches) pairs; a benchmark with no 13-gram at all is an error (it could
        never match, and saying nothing would read as clean)."""
        index, parts, masks = cls(), [], []
        for b, (bench, batches) in enumerate(sources):
            if b == MAX_BENCHMARKS:
                raise HegelionError(f"at most {MAX_BENCHMARKS} benchmarks at once")
            found = []
            for texts in batches:
                ws = [words(t) for t in texts]
                bench.texts += len(ws)
                bench.short += sum(len(w) < NGRAM for w in ws)
                found.append(_unique(windows(sizes(ws), index.vocab.add(ws)).hashes))
            mine = _unique(np.concatenate(found)) if found else np.zeros(0, np.uint64)
            if not len(mine):
                raise HegelionError(f"--decontaminate {bench.name}: none of its {bench.texts} texts has {NGRAM} words "
                                    f"or more ({', '.join(bench.columns) or 'no columns'}), so nothing could match")
            bench.ngrams = len(mine)
            index.benchmarks.append(bench)
            parts.append(mine)
            masks.append(np.full(len(mine), 1 << b, np.uint64))
            logger.info("benchmark %s: %d texts, %d 13-grams", bench.name, bench.texts, bench.ngrams)
        owner = next(t for t in (np.uint8, np.uint16, np.uint32, np.uint64) if len(parts) <= np.iinfo(t).bits)
        if len(parts) == 1:
            index.hashes, index.owners = parts[0], np.ones(len(parts[0]), owner)
        elif parts:
            hashes, owners = np.concatenate(parts), np.concatenate(masks)
            order = np.argsort(hashes, kind="stable")
            hashes, owners = hashes[order], owners[order]
            first = np.flatnonzero(_firsts(hashes))
            index.hashes, index.owners = hashes[first], np.bitwise_or.reduceat(owners, first).astype(owner)
        index.bits = max(16, int(np.ceil(np.log2(max(1, len(index.hashes)) * FILTER_BITS))))
        index.bitmap = np.zeros(1 << (index.bits - 3), np.uint8)
        slot = index.hashes >> np.uint64(64 - index.bits)
        np.bitwise_or.at(index.bitmap, slot >> np.uint64(3), np.left_shift(1, slot & np.uint64(7)).astype(np.uint8))
        return index

    def _filter(self, hashes: np.ndarray) -> np.ndarray:
        """False where a hash is surely not in the index: one bit per slot of the hash's top bits, a lookup in a
        bitmap of FILTER_BITS bits a 13-gram (~1/FILTER_BITS false positives) instead of a binary search's ~20
        misses of the cache; the few that pass are searched."""
        slot = hashes >> np.uint64(64 - self.bits)
        return (self.bitmap[slot >> np.uint64(3)] >> (slot & np.uint64(7)).astype(np.uint8)) & np.uint8(1) == 1

    def check(self, rows: list[dict[str, Any]]) -> list[Match]:
        """Every span each row's FIELDS share with a benchmark, in row and field order."""
        return [m for at in range(0, len(rows), CHECK_ROWS) for m in self._check(rows[at : at + CHECK_ROWS])]

    def _check(self, rows: list[dict[str, Any]]) -> list[Match]:
        texts = [(i, name, words(row[name] or "")) for i, row in enumerate(rows) for name in FIELDS]
        ws = [t[2] for t in texts]
        w = windows(sizes(ws), self.vocab.known(ws))
        if not len(self.hashes) or not len(w.at):
            return []
        maybe = np.flatnonzero(self._filter(w.hashes))
        at = np.minimum(np.searchsorted(self.hashes, w.hashes[maybe]), len(self.hashes) - 1)
        hit = self.hashes[at] == w.hashes[maybe]
        if not hit.any():
            return []
        starts, owners = w.at[maybe[hit]], self.owners[at[hit]]
        found: list[tuple[int, int, int, int]] = []  # (text, start word, benchmark, end word)
        for b in range(len(self.benchmarks)):
            mine = starts[(owners >> owners.dtype.type(b)) & 1 == 1]
            if not len(mine):
                continue
            # consecutive window starts are one span: windows of two texts are at least NGRAM apart
            breaks = np.flatnonzero(np.diff(mine) != 1)
            for lo, hi in zip(np.concatenate([[0], breaks + 1]).tolist(), np.append(breaks, len(mine) - 1).tolist()):
                t = int(w.text[mine[lo]])
                first = int(mine[lo] - w.starts[t])
                found.append((t, first, b, int(mine[hi] - w.starts[t]) + NGRAM))
        found.sort()
        return [Match(rows[texts[t][0]]["prompt_id"], self.benchmarks[b].name, texts[t][1],
                      " ".join(texts[t][2][lo:hi])) for t, lo, b, hi in found]


@dataclass
class Report:
    """What the card says about contamination, counted over every sample before any removal; the matches
    themselves go to contaminated.jsonl as they are found, the card shows the first `shown_max`."""

    benchmarks: list[Benchmark]
    samples: int = 0
    contaminated: int = 0  # samples with at least one match
    matches: int = 0
    removed: int = 0  # rows --drop-contaminated left out (a near-duplicate already removed is not counted twice)
    by_benchmark: Counter = field(default_factory=Counter)  # samples matched per benchmark
    by_field: Counter = field(default_factory=Counter)  # samples matched per field
    shown: list[Match] = field(default_factory=list)
    shown_max: int = 20

    def add(self, samples: int, matches: list[Match]) -> set[str]:
        """Count a batch of `samples` and its matches; returns the prompt ids matched."""
        self.samples += samples
        self.matches += len(matches)
        self.shown += matches[: self.shown_max - len(self.shown)]
        for key, counter in (("benchmark", self.by_benchmark), ("field", self.by_field)):
            counter.update(k for _, k in dict.fromkeys((m.prompt_id, getattr(m, key)) for m in matches))
        ids = {m.prompt_id for m in matches}
        self.contaminated += len(ids)
        return ids


# ---------------------------------------------------------------- reading benchmarks


def parse_source(src: str) -> tuple[str, str]:
    """(dataset, split): SRC is a local path, or a Hub name with an optional `:SPLIT`."""
    name, colon, split = src.rpartition(":")
    if colon and name and _SPLIT.fullmatch(split) and not Path(src).expanduser().exists():
        return name, split
    return src, DEFAULT_SPLIT


def _columns(cols: prompts.Columns, src: str) -> tuple[str | None, list[str]]:
    """The question column (as the producer picks a prompt column) and the answer columns present."""
    extra = [c for c in ANSWER_COLUMNS if c in cols.names]
    try:
        return prompts.detect_column(cols), extra
    except HegelionError:
        question = next((c for c in QUESTION_FALLBACK if cols.kinds.get(c) == "string"), None)
        if question or extra:
            return question, extra
    raise HegelionError(f"--decontaminate {src}: no question column (one of "
                        f"{', '.join(prompts.STRING_COLUMNS + QUESTION_FALLBACK)} or a message list); it has: "
                        f"{', '.join(cols.names) or '(no columns)'}")


def _strings(value: Any) -> list[str]:
    """An answer cell's text: a string, or the strings of a list (choices); numbers (an answer's index) are none."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, str)]
    return []


def open_benchmark(src: str) -> tuple[Benchmark, Iterator[list[str]]]:
    """Open a benchmark (errors now, one line each) and its texts in batches (read when iterated)."""
    dataset, split = parse_source(src)
    try:
        cols = prompts.open_source(dataset, split, prompts.SampleStats(), hint=HINT)
        question, extra = _columns(cols, src)
    except HegelionError as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HegelionError(message if message.startswith("--decontaminate") else
                            f"--decontaminate {src}: {message}") from e
    spec = prompts.Texts(cols, question) if question else None
    names = list(dict.fromkeys((spec.names() if spec else []) + extra))
    bench = Benchmark(redact.text(src), columns=([question] if question else []) + extra)

    def batches() -> Iterator[list[str]]:
        for batch in cols.batches(names):
            try:
                qs = spec.texts(batch) if spec else [None] * len(batch[names[0]])
            except HegelionError as e:
                raise HegelionError(f"--decontaminate {src}: {e}") from e
            answers = [prompts.column_values(batch[c]) for c in extra]
            yield [" ".join(_strings(q) + [s for a in row for s in _strings(a)]) for q, *row in zip(qs, *answers)]

    return bench, batches()


def load(srcs: list[str]) -> Index:
    """Read every benchmark and build the index; every SRC is opened (and a bad one reported) before any is read."""
    if len(srcs) > MAX_BENCHMARKS:
        raise HegelionError(f"at most {MAX_BENCHMARKS} --decontaminate benchmarks at once, not {len(srcs)}")
    return Index.build([open_benchmark(src) for src in srcs])
