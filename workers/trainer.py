"""Trainer worker: `arq workers.trainer.WorkerSettings` (needs the train extra: mlx-lm)."""

import socket

from arq import func

from hegelion_queue import keys
from hegelion_queue.queue.connection import dump_job, install_worker, load_job, redis_settings
from hegelion_queue.queue.heartbeat import Heartbeat
from hegelion_queue.settings import get_settings
from hegelion_queue.jobs.training_job import train_run

_s = get_settings()
install_worker()  # its pool reaches Redis with all our settings, Sentinel too (see connection.create_pool)


async def startup(ctx):
    ctx.update(settings=_s, host=socket.gethostname())
    ctx["heartbeat"] = Heartbeat(ctx["redis"], _s.key_prefix, "trainer", _s.train_queue_name)
    ctx["heartbeat"].start()


async def shutdown(ctx):
    await ctx["heartbeat"].stop()


class WorkerSettings:
    functions = [func(train_run, name=keys.TRAIN_FUNCTION, timeout=_s.train_timeout, max_tries=3)]
    queue_name = _s.train_queue_name
    redis_settings = redis_settings(_s)
    max_jobs = 1  # one training at a time per host: it uses every core
    job_timeout = _s.train_timeout
    keep_result = 7 * 86400
    poll_delay = 1.0
    job_serializer = dump_job
    job_deserializer = load_job
    health_check_interval = 30
    on_startup = startup
    on_shutdown = shutdown
