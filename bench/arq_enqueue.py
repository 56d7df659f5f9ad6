"""Baseline for the enqueue figure: the same prompts through arq's own `enqueue_job`, one call per prompt.

    python -m bench.arq_enqueue FILE.parquet N     (Redis from HEGELION_REDIS_URL)
"""

import asyncio
import hashlib
import os
import sys

import orjson
import pyarrow.parquet as pq
from arq.connections import RedisSettings, create_pool


async def main(path: str, n: int) -> None:
    texts = pq.ParquetFile(path).read(columns=["prompt"]).column("prompt").to_pylist()[:n]
    redis = await create_pool(RedisSettings.from_dsn(os.environ["HEGELION_REDIS_URL"]), job_serializer=orjson.dumps,
                              job_deserializer=orjson.loads, default_queue_name="hegelion:queue")
    for row, text in enumerate(texts):
        pid = hashlib.sha256(text.encode()).hexdigest()
        record = {"prompt_id": pid, "run": "base", "prompt": text, "source": {"dataset": path, "split": "", "row": row}}
        await redis.enqueue_job("generate", record, _job_id=f"base:{pid}")
    await redis.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
