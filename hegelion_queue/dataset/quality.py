"""What the dataset card says about its samples' quality. Pure: no Redis, no files.

- **Duplicate and near-duplicate syntheses.** A synthesis is a duplicate when its normalised text (NFKC, lower
  case, words only) equals an earlier kept one's, a near-duplicate when the estimated Jaccard similarity of its
  word 3-gram set to an earlier kept one's is at least NEAR_DUPLICATE_THRESHOLD (0.8). The estimate is MinHash with
  64 permutations (numpy, a batch of samples at a time), candidates found by LSH (16 bands of 4 rows), each checked
  on its whole signature (the estimate's standard error at 0.8 is 0.05). The first occurrence wins: removals (`export --drop-near-duplicates`) always name a
  sample that stays.
- **Refusals.** A final answer whose first 300 characters hold one of REFUSALS.
- **Short answers.** A final answer shorter than the parser's section minimum (HEGELION_MIN_SECTION_CHARS).
- **Language.** CLD2 (pycld2) on the first 500 characters of the prompt and of the final answer; a sample counts
  as a mismatch when both are identified and differ, undetermined when either is not.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pycld2

NEAR_DUPLICATE_THRESHOLD = 0.8
SHINGLE_WORDS = 3
NUM_PERM = 64
BANDS, ROWS = 16, 4  # BANDS * ROWS == NUM_PERM; a pair at similarity s is a candidate with 1 - (1 - s^4)^16
SIGNATURE_CHUNK = 64  # shingle sets hashed in one numpy pass
LANGUAGE_CHARS = 500
REFUSAL_CHARS = 300
REFUSALS = ("i can't help", "i cannot help", "i can't assist", "i cannot assist", "i can't provide", "i cannot provide",
            "i can't comply", "i cannot comply", "i won't be able to", "i am unable to", "i'm unable to",
            "i am not able to", "i'm not able to", "i must decline", "as an ai language model", "i'm sorry, but i can")

_WORD = re.compile(r"\w+")
_rng = np.random.default_rng(20240611)  # fixed: the same text gets the same signature in every export
_A = _rng.integers(0, 2**32, NUM_PERM, dtype=np.uint64).astype(np.uint32) | np.uint32(1)  # odd: a bijection
_B = _rng.integers(0, 2**32, NUM_PERM, dtype=np.uint64).astype(np.uint32)


def words(text: str) -> list[str]:
    return _WORD.findall((text if text.isascii() else unicodedata.normalize("NFKC", text)).lower())


class Shingler:
    """Word 3-gram hashes of a batch of texts, in one numpy pass. Words are numbered in the order first seen (a dict
    is several times faster than hashing each word, and the numbers are the same in every export of the same
    samples). A text of fewer than three words is padded to one 3-gram."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def _ids(self, ws: list[str]) -> list[int]:
        v = self.vocab
        got = list(map(v.get, ws))
        if None in got:
            got = [x if x is not None else v.setdefault(w, len(v) + 1) for x, w in zip(got, ws)]
        return got + [0] * (SHINGLE_WORDS - len(got)) if len(got) < SHINGLE_WORDS else got

    def __call__(self, texts: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
        """(every text's 3-gram hashes one after the other, how many each text has)."""
        ids = [self._ids(ws) for ws in texts]
        sizes = np.array([len(x) for x in ids])
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint32, count=int(sizes.sum()))
        # uint32 arithmetic wraps: a hash of each (w0, w1, w2) window, then only the windows inside one text
        h = _fmix32(flat[:-2] * np.uint32(0x9E3779B1) + _fmix32(flat[1:-1] * np.uint32(0x85EBCA77) + flat[2:]))
        keep = np.ones(len(h), dtype=bool)
        ends = np.cumsum(sizes)[:-1]
        keep[ends - 1], keep[ends - 2] = False, False
        return h[keep], sizes - (SHINGLE_WORDS - 1)


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's finaliser: spreads the input bits before the affine permutations."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def signatures(hashes: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """MinHash signatures (len(counts) x NUM_PERM) of the texts whose shingle hashes Shingler returned; each
    permutation is h -> a*h + b mod 2^32 (uint32 arithmetic wraps), a odd. A repeated shingle changes no minimum."""
    out = np.empty((len(counts), NUM_PERM), dtype=np.uint32)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    for at in range(0, len(counts), SIGNATURE_CHUNK):  # chunks keep the temporaries in cache: 5x faster than one pass
        stop = min(at + SIGNATURE_CHUNK, len(counts))
        permuted = hashes[bounds[at] : bounds[stop], None] * _A
        permuted += _B
        out[at:stop] = np.minimum.reduceat(permuted, bounds[at:stop] - bounds[at], axis=0)
    return out


def band_keys(sigs: np.ndarray) -> np.ndarray:
    """One 64-bit key per LSH band (n x BANDS) from its ROWS signature values; a key collision only makes a
    candidate, which the whole signature then confirms or not."""
    rows = sigs.reshape(len(sigs), BANDS, ROWS).astype(np.uint64)
    key = np.zeros(rows.shape[:2], dtype=np.uint64)
    for r in range(ROWS):  # uint64 arithmetic wraps
        key = key * np.uint64(0x100000001B3) + rows[:, :, r]
    return key


def language(text: str) -> str | None:
    """The CLD2 language code of a text's start, or None when it cannot tell."""
    try:
        reliable, _, details = pycld2.detect(text[:LANGUAGE_CHARS])
    except pycld2.error:  # bytes CLD2 will not read (e.g. some control characters)
        return None
    code = details[0][1]
    return code if reliable and code != "un" else None


def is_refusal(answer: str) -> bool:
    head = answer[:REFUSAL_CHARS].lower().replace("\u2019", "'")
    return any(phrase in head for phrase in REFUSALS)


@dataclass
class Removal:
    prompt_id: str
    reason: str  # duplicate | near-duplicate
    duplicate_of: str
    similarity: float


@dataclass
class Report:
    """Every figure of the card's quality section."""

    samples: int = 0
    duplicates: int = 0
    near_duplicates: int = 0
    refusals: int = 0
    short_answers: int = 0
    language_mismatches: int = 0
    language_undetermined: int = 0
    prompt_languages: Counter = field(default_factory=Counter)
    answer_languages: Counter = field(default_factory=Counter)
    min_section_chars: int = 0
    threshold: float = NEAR_DUPLICATE_THRESHOLD


class Checker:
    """Feed it the samples in order, a batch at a time; it counts and finds each synthesis' earlier twin.

    The LSH index maps each band key to the first kept sample that had it: for the kept samples of earlier batches
    as sorted numpy arrays per band (12 bytes a key; 16 dicts took ~110), for the current batch's in small dicts."""

    def __init__(self, min_section_chars: int):
        self.report = Report(min_section_chars=min_section_chars)
        self.shingles = Shingler()
        self.exact: dict[bytes, str] = {}  # digest of the normalised synthesis -> prompt id of the kept sample
        self.band_keys = [np.zeros(0, np.uint64) for _ in range(BANDS)]  # sorted, unique: earlier batches' kept
        self.band_kept = [np.zeros(0, np.int32) for _ in range(BANDS)]  # the kept sample each key points to
        self.kept_ids: list[str] = []
        self.kept_sigs = np.zeros((0, NUM_PERM), np.uint32)  # earlier batches' kept samples
        self.batch_bands: list[dict[int, int]] = []  # this batch's kept samples
        self.batch_sigs: list[np.ndarray] = []

    def add(self, rows: list[dict[str, Any]]) -> list[Removal | None]:
        """Rows with prompt_id, prompt, synthesis and final_answer; for each, its duplicate finding or None."""
        r = self.report
        ws = [words(row["synthesis"]) for row in rows]
        sigs = signatures(*self.shingles(ws))
        keys = band_keys(sigs)
        earlier = self._earlier(keys).tolist()
        self.batch_bands, self.batch_sigs = [{} for _ in range(BANDS)], []
        found: list[Removal | None] = []
        for row, w, sig, k, e in zip(rows, ws, sigs, keys.tolist(), earlier):
            r.samples += 1
            answer = row["final_answer"]
            r.refusals += is_refusal(answer)
            r.short_answers += len(answer.strip()) < r.min_section_chars
            self._language(row["prompt"], answer)
            normal = hashlib.blake2b(" ".join(w).encode(), digest_size=16).digest()
            found.append(self._twin(row["prompt_id"], normal, sig, k, e))
        self._merge(keys[[i for i, f in enumerate(found) if f is None]])
        return found

    def _language(self, prompt: str, answer: str) -> None:
        r = self.report
        asked, said = language(prompt), language(answer)
        r.prompt_languages[asked or "undetermined"] += 1
        r.answer_languages[said or "undetermined"] += 1
        if asked is None or said is None:
            r.language_undetermined += 1
        elif asked != said:
            r.language_mismatches += 1

    def _earlier(self, keys: np.ndarray) -> np.ndarray:
        """Per row and band, the earlier batches' kept sample with that band key, or -1."""
        out = np.full(keys.shape, -1, dtype=np.int64)
        for b, (known, kept) in enumerate(zip(self.band_keys, self.band_kept)):
            if len(known):
                at = np.minimum(np.searchsorted(known, keys[:, b]), len(known) - 1)
                hit = known[at] == keys[:, b]
                out[hit, b] = kept[at[hit]]
        return out

    def _twin(self, pid: str, normal: bytes, sig: np.ndarray, keys: list[int], earlier: list[int]
              ) -> Removal | None:
        if (first := self.exact.get(normal)) is not None:
            self.report.duplicates += 1
            return Removal(pid, "duplicate", first, 1.0)
        best, best_sim = None, 0.0
        for b, key in enumerate(keys):
            j = earlier[b] if earlier[b] >= 0 else self.batch_bands[b].get(key)
            if j is not None and j != best:
                sim = float((self._sig(j) == sig).mean())
                if sim > best_sim:
                    best, best_sim = j, sim
        if best is not None and best_sim >= self.report.threshold:
            self.report.near_duplicates += 1
            return Removal(pid, "near-duplicate", self.kept_ids[best], round(best_sim, 3))
        self.exact[normal] = pid
        index = len(self.kept_ids)
        self.kept_ids.append(pid)
        self.batch_sigs.append(sig)
        for b, key in enumerate(keys):
            self.batch_bands[b].setdefault(key, index)
        return None

    def _sig(self, j: int) -> np.ndarray:
        return self.kept_sigs[j] if j < len(self.kept_sigs) else self.batch_sigs[j - len(self.kept_sigs)]

    def _merge(self, keys: np.ndarray) -> None:
        """Fold the batch's kept samples (their band keys, in kept order) into the sorted arrays; a key already
        there keeps its earlier sample, as does the first of equal keys within the batch."""
        first = len(self.kept_sigs)
        kept = np.arange(first, first + len(keys), dtype=np.int32)
        for b in range(BANDS):
            order = np.argsort(keys[:, b], kind="stable")
            k, j = keys[order, b], kept[order]
            new = np.ones(len(k), dtype=bool)
            new[1:] = k[1:] != k[:-1]
            known = self.band_keys[b]
            at = np.searchsorted(known, k)
            if len(known):
                new &= known[np.minimum(at, len(known) - 1)] != k
            self.band_keys[b] = np.insert(known, at[new], k[new])
            self.band_kept[b] = np.insert(self.band_kept[b], at[new], j[new])
        if self.batch_sigs:
            self.kept_sigs = np.concatenate([self.kept_sigs, np.array(self.batch_sigs)])
        self.batch_bands, self.batch_sigs = [], []
