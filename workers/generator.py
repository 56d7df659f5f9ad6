"""Generator worker: `arq workers.generator.WorkerSettings` (scale by starting more of them)."""

from arq import func

from hegelion_queue import keys
from hegelion_queue.queue import pickup
from hegelion_queue.queue.connection import dump_job, job_loader, redis_settings
from hegelion_queue.jobs.generate import generate, reject_payload, shutdown, startup
from hegelion_queue.settings import get_settings

_s = get_settings()
pickup.install()  # batched claims + wake-on-finish (see hegelion_queue/queue/pickup.py)
JOB_TIMEOUT = _s.job_timeout()  # rate-limit wait + teacher timeout + margin: arq's timeout is a final failure
ARQ_MAX_TRIES = 1_000_000  # our attempt counter dead-letters first; arq's limit would drop jobs silently


class WorkerSettings:
    functions = [
        func(generate, name=keys.GENERATE_FUNCTION, timeout=JOB_TIMEOUT, max_tries=ARQ_MAX_TRIES),
        func(reject_payload, name=keys.REJECT_FUNCTION, max_tries=ARQ_MAX_TRIES),
    ]
    queue_name = _s.queue_name
    redis_settings = redis_settings(_s)
    max_jobs = _s.max_jobs
    job_timeout = JOB_TIMEOUT
    keep_result = 0  # the run's done-set and stream are the results
    poll_delay = _s.poll_delay
    job_completion_wait = _s.drain_seconds
    job_serializer = dump_job
    job_deserializer = job_loader(keys.GENERATE_FUNCTION, keys.REJECT_FUNCTION)
    health_check_interval = 10
    on_startup = startup
    on_shutdown = shutdown
