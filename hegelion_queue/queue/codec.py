"""How records are kept small in Redis: zstd frames, with a dictionary of the run's own.

Queued prompts (job payloads), samples (the results stream) and dead letters are stored as zstd frames of their
JSON. A prompt of 400 characters or a sample of 5 KB shares little with itself and much with its neighbours, so
the producer trains a zstd dictionary on the run's sampled prompts, each framed as a job record and as a sample
skeleton, at the run's first enqueue. Every frame names the dictionary it was written with (its id), and a
dictionary is kept by that id (`keys.dictionary`), never by run: a purge and re-enqueue of the same run trains a new
one under a new id while jobs still in flight find theirs, and nothing ever replaces or deletes one. The run records
which one it packs with (`RunKeys.zdict_id`). A dictionary missing from Redis (a hand DEL, an evicting Redis) is
`DictionaryMissing`: the reader says which and how to restore it (`restore-dictionary`; the producer and `export`
keep a copy on disk), never a silent new one. A run too small to train on is written with plain zstd. A value that
starts with `{` is an old, uncompressed entry and is read as JSON.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Any, Iterable

import orjson
import zstandard

from .. import keys
from ..dialectic import SYSTEM_PROMPT
from ..errors import HegelionError
from ..keys import RunKeys

LEVEL = 3
DICT_SIZE = 100 * 1024
TRAIN_MIN = 1000  # fewer prompts than this: no dictionary (training needs a few hundred samples at least)
TRAIN_MAX = 10_000  # prompts the dictionary is trained on (more takes longer and gains little)
# fastcover's segment and d-mer sizes, fixed: its search over them took 0.3-0.5 s of a run's first enqueue and
# packed 1 M English prompts and 5 KB samples no smaller (about 1 % and 2 % larger) than these
TRAIN_K, TRAIN_D = 512, 6
MAGIC = b"\x28\xb5\x2f\xfd"  # a zstd frame's first bytes; JSON starts with `{`


def is_frame(data: bytes) -> bool:
    return data[:4] == MAGIC


def frame_dict_id(data: bytes) -> int:
    """The id of the dictionary a frame was packed with (0: none)."""
    return zstandard.get_frame_parameters(data).dict_id


class Codec:
    """Packs JSON values as zstd frames with one dictionary (or none); unpacks frames of that dictionary, plain
    zstd frames and uncompressed JSON."""

    def __init__(self, dictionary: bytes | None = None):
        self.dict = zstandard.ZstdCompressionDict(dictionary) if dictionary else None
        self.dict_id = self.dict.dict_id() if self.dict else 0
        self._pack = zstandard.ZstdCompressor(level=LEVEL, dict_data=self.dict, write_checksum=False)
        self._plain = zstandard.ZstdDecompressor()
        self._unpack = zstandard.ZstdDecompressor(dict_data=self.dict) if self.dict else self._plain

    def pack(self, value: Any) -> bytes:
        return self._pack.compress(orjson.dumps(value))

    def json(self, data: bytes) -> bytes:
        """The JSON text of a stored value."""
        if not is_frame(data):
            return data
        wanted = frame_dict_id(data)
        if wanted == 0:
            return self._plain.decompress(data)
        if wanted != self.dict_id:
            raise DictionaryMismatch(wanted)
        return self._unpack.decompress(data)

    def unpack(self, data: bytes) -> Any:
        return orjson.loads(self.json(data))


class DictionaryMismatch(HegelionError, ValueError):
    """A frame read with another dictionary's codec (a bug: readers pick the codec by the frame's id)."""

    def __init__(self, wanted: int):
        super().__init__(f"a stored value was written with zstd dictionary {wanted}, not this codec's")
        self.wanted = wanted


class DictionaryMissing(HegelionError):
    """A frame names a dictionary that Redis does not hold: nothing packed with it can be read until it is back."""

    def __init__(self, dict_id: int, key: str = ""):
        super().__init__(
            f"zstd dictionary {dict_id} is missing from Redis{f' ({key})' if key else ''}: what was packed with it "
            "cannot be read. Put it back with `hegelion-queue restore-dictionary FILE` (enqueue writes a copy next "
            "to the run's JSONL, export next to its output), and make Redis keep it: maxmemory-policy noeviction")
        self.dict_id = dict_id


def training_samples(run: str, dataset: str, split: str, prompts: Iterable[tuple[str, int]]) -> list[bytes]:
    """What the dictionary learns from: each prompt as a job record and as the skeleton of its sample. Each is
    copied to its own size: a bytes object from orjson keeps the allocation it was written into, ~7 KB for a
    500-byte record (20,000 of them held 134 MB)."""
    out = []
    for text, row in prompts:
        source = {"dataset": dataset, "split": split, "row": row}
        out.append(_exact(orjson.dumps({"run": run, "prompt": text, "source": source})))
        out.append(_exact(orjson.dumps({
            "instruction": text, "input": "", "system": SYSTEM_PROMPT,
            "output": "<thought>\n**THESIS**: \n**ANTITHESIS**: \n**SYNTHESIS**: \n</thought>\n",
            "hegelion_trace": {"thesis": "", "antithesis": "", "synthesis": "", "final_answer": "", "reasoning": "",
                               "prompt_id": "", "run": run, "source": source, "teacher": {}, "attempts": 1,
                               "duration_s": 0.0, "usage": {}, "host": "", "created_at": 0.0},
        })))
    return out


def _exact(data: bytes) -> bytes:
    return bytes(memoryview(data))


def train(samples: list[bytes], dict_id: int = 0) -> bytes | None:
    """A dictionary for these samples (with this id; 0: a random one), or None when there are too few to train on."""
    if len(samples) < 2 * TRAIN_MIN:
        return None
    try:
        return zstandard.train_dictionary(DICT_SIZE, samples, level=LEVEL, k=TRAIN_K, d=TRAIN_D,
                                          dict_id=dict_id).as_bytes()
    except zstandard.ZstdError:
        return None


PLAIN = Codec()  # zstd without a dictionary: what a run without one is packed with
_cache: dict[int, Codec] = {}  # dictionary id -> its codec (a dictionary under an id never changes)


class Readers:
    """Reads stored values packed with any of the dictionaries loaded (plain zstd and JSON too); a value packed with
    another raises DictionaryMissing."""

    def __init__(self, codecs: dict[int, Codec]):
        self.codecs = codecs

    def json(self, data: bytes) -> bytes:
        if not is_frame(data):
            return data
        wanted = frame_dict_id(data)
        codec = self.codecs.get(wanted) if wanted else PLAIN
        if codec is None:
            raise DictionaryMissing(wanted)
        return codec.json(data)

    def unpack(self, data: bytes) -> Any:
        return orjson.loads(self.json(data))


async def dictionary(redis: Any, rk: RunKeys, dict_id: int) -> Codec:
    """The codec of dictionary `dict_id` (0: plain zstd), read from Redis once per process."""
    if not dict_id:
        return PLAIN
    if (codec := _cache.get(dict_id)) is not None:
        return codec
    key = keys.dictionary(rk.prefix, dict_id)
    data = await redis.get(key)
    if data is None and (old := await redis.get(rk.zdict)) is not None and Codec(old).dict_id == dict_id:
        await redis.set(key, old, nx=True)  # a run packed before dictionaries were kept by id: keep it by id now
        data = old
    codec = Codec(data) if data is not None else None
    if codec is None or codec.dict_id != dict_id:
        raise DictionaryMissing(dict_id, key)
    _cache[dict_id] = codec
    return codec


async def readers(redis: Any, rk: RunKeys, values: Iterable[bytes]) -> Readers:
    """A reader for these stored values: every dictionary they name that Redis has, loaded (a value packed with one
    it lacks raises DictionaryMissing when read)."""
    codecs: dict[int, Codec] = {}
    for wanted in {frame_dict_id(v) for v in values if is_frame(v)} - {0}:
        with contextlib.suppress(DictionaryMissing):
            codecs[wanted] = await dictionary(redis, rk, wanted)
    return Readers(codecs)


async def run_dictionary_id(redis: Any, rk: RunKeys) -> int:
    """The id of the dictionary the run packs with (0: none)."""
    if (raw := await redis.get(rk.zdict_id)) is not None:
        return int(raw)
    if (old := await redis.get(rk.zdict)) is not None:  # packed before dictionaries were kept by id
        dict_id = Codec(old).dict_id
        await redis.set(keys.dictionary(rk.prefix, dict_id), old, nx=True)
        await redis.set(rk.zdict_id, dict_id, nx=True)
        return dict_id
    return 0


async def for_run(redis: Any, rk: RunKeys) -> Codec:
    """The codec the run packs new values with."""
    return await dictionary(redis, rk, await run_dictionary_id(redis, rk))


async def of_frame(redis: Any, rk: RunKeys, frame: bytes) -> Codec:
    """The codec that reads `frame` and packs what belongs with it (a job's sample: the job's dictionary)."""
    return await dictionary(redis, rk, frame_dict_id(frame))


def for_run_sync(client: Any, rk: RunKeys) -> Readers:
    """A reader of the run's values through a synchronous client (harnesses, tests): every dictionary in Redis."""
    found = {}
    for key in client.scan_iter(match=keys.dictionary(rk.prefix, "*"), count=1000):  # type: ignore[arg-type]
        codec = Codec(client.get(key))
        found[codec.dict_id] = codec
    if old := client.get(rk.zdict):
        codec = Codec(old)
        found.setdefault(codec.dict_id, codec)
    return Readers(found)


async def ensure_dictionary(redis: Any, rk: RunKeys, samples: list[bytes]) -> Codec:
    """The run's codec: its dictionary if it has one (DictionaryMissing when Redis lost it: never a replacement that
    would make everything packed before unreadable), else one trained on `samples` under a fresh id."""
    if dict_id := await run_dictionary_id(redis, rk):
        return await dictionary(redis, rk, dict_id)
    for _ in range(8):  # an id another run's dictionary has (1 in 2^31): draw again
        trained = train(samples, random.randrange(1, 2**31))
        if trained is None:
            return PLAIN
        dict_id = Codec(trained).dict_id
        if await redis.set(keys.dictionary(rk.prefix, dict_id), trained, nx=True):
            break
    else:
        raise HegelionError("could not store a zstd dictionary under a free id")
    await redis.set(rk.zdict_id, dict_id, nx=True)  # another producer may have won: use the run's
    return await for_run(redis, rk)


async def stored_dictionaries(redis: Any, rk: RunKeys) -> dict[int, bytes]:
    """The dictionaries the run packs with (today its one, if any): what `export` writes next to its output."""
    dict_id = await run_dictionary_id(redis, rk)
    data = await redis.get(keys.dictionary(rk.prefix, dict_id)) if dict_id else None
    return {dict_id: data} if data else {}


def write_dictionaries(found: dict[int, bytes], base: Path) -> list[Path]:
    """Each dictionary as `<base>.zdict-<id>` (what `restore-dictionary` reads)."""
    out = []
    for dict_id, data in found.items():
        path = base.with_name(f"{base.name}.zdict-{dict_id}")
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        out.append(path)
    return out


async def restore(redis: Any, prefix: str, data: bytes) -> int:
    """Put a dictionary back under its own id (never over another); its id."""
    try:
        dict_id = Codec(data).dict_id
    except zstandard.ZstdError as e:
        raise HegelionError(f"not a zstd dictionary ({e})") from None
    if not dict_id:
        raise HegelionError("not a zstd dictionary (it names no id)")
    key = keys.dictionary(prefix, dict_id)
    if not await redis.set(key, data, nx=True) and await redis.get(key) != data:
        raise HegelionError(f"{key} holds another dictionary with the same id; not replaced")
    _cache.pop(dict_id, None)
    return dict_id
