"""How records are kept small in Redis: zstd frames, with a dictionary of the run's own.

Queued prompts (job payloads), samples (the results stream) and dead letters are stored as zstd frames of their
JSON. A prompt of 400 characters or a sample of 5 KB shares little with itself and much with its neighbours, so
the producer trains a zstd dictionary on the run's sampled prompts, each framed as a job record and as a sample
skeleton, at the run's first enqueue, and stores it once (`RunKeys.zdict`); every frame names the dictionary it was
written with (its dictionary id), so a reader picks the right one. A run too small to train on (or enqueued before
this) is written with plain zstd. A value that starts with `{` is an old, uncompressed entry and is read as JSON.
"""

from __future__ import annotations

from typing import Any, Iterable

import orjson
import zstandard

from .dialectic import SYSTEM_PROMPT
from .errors import HegelionError
from .keys import RunKeys

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
    def __init__(self, wanted: int):
        super().__init__(f"a stored value was written with zstd dictionary {wanted}, which the run no longer has "
                         "(was the run purged and enqueued again while workers ran?)")
        self.wanted = wanted


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


def train(samples: list[bytes]) -> bytes | None:
    """A dictionary for these samples, or None when there are too few to train on."""
    if len(samples) < 2 * TRAIN_MIN:
        return None
    try:
        return zstandard.train_dictionary(DICT_SIZE, samples, level=LEVEL, k=TRAIN_K, d=TRAIN_D).as_bytes()
    except zstandard.ZstdError:
        return None


PLAIN = Codec()  # zstd without a dictionary: what a run without one is packed with
_cache: dict[str, Codec] = {}


async def for_run(redis: Any, rk: RunKeys, dict_id: int | None = None) -> Codec:
    """The run's codec, read from Redis once per process (again when a frame names another dictionary)."""
    codec = _cache.get(rk.zdict)
    if codec is None or (dict_id is not None and dict_id not in (0, codec.dict_id)):
        codec = _cache[rk.zdict] = Codec(await redis.get(rk.zdict))
    return codec


async def of_frame(redis: Any, rk: RunKeys, frame: bytes) -> Codec:
    """The codec that reads `frame` and packs what belongs with it (a job's sample: the job's dictionary)."""
    wanted = frame_dict_id(frame)
    return await for_run(redis, rk, wanted) if wanted else PLAIN


def for_run_sync(client: Any, rk: RunKeys) -> Codec:
    """The run's codec through a synchronous client (harnesses, the training thread)."""
    return Codec(client.get(rk.zdict))


async def ensure_dictionary(redis: Any, rk: RunKeys, samples: list[bytes]) -> Codec:
    """The run's codec: its dictionary if it has one, else one trained on `samples` (kept unless another producer
    stored one first: a run's dictionary never changes while the run exists)."""
    if not await redis.exists(rk.zdict):
        trained = train(samples)
        if trained is not None:
            await redis.set(rk.zdict, trained, nx=True)
    _cache.pop(rk.zdict, None)
    return await for_run(redis, rk)
