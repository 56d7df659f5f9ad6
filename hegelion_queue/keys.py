"""Every Redis key name this project reads or writes, and nowhere else.

Run keys live under `<prefix>:run:<run>:`; arq's own keys keep arq's prefixes (`arq:job:<id>`, …).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix, retry_key_prefix

GENERATE_FUNCTION = "generate"  # arq function name of a generator job
REJECT_FUNCTION = "reject_payload"  # arq function that dead-letters an unreadable job payload
TRAIN_FUNCTION = "train"


def job_id(run: str, prompt_id: str) -> str:
    return f"{run}:{prompt_id}"


def split_job_id(jid: str) -> tuple[str, str]:
    """(run, prompt id) of a generator job id (run names hold no ':')."""
    run, _, prompt_id = jid.partition(":")
    return run, prompt_id


def job_run(jid: str) -> str:
    return split_job_id(jid)[0]


def train_job_id(run: str) -> str:
    return f"train:{run}"


def arq_job(jid: str) -> str:
    return job_key_prefix + jid


def arq_result(jid: str) -> str:
    return result_key_prefix + jid


def arq_retry(jid: str) -> str:
    return retry_key_prefix + jid


def arq_in_progress(jid: str) -> str:
    return in_progress_key_prefix + jid


def runs_index(prefix: str) -> str:
    """Set of run names, so `runs` can list them without SCAN."""
    return f"{prefix}:runs"


def worker_heartbeat(prefix: str, host: str, pid: int, instance: str) -> str:
    """String (JSON) with a short TTL: one per live worker process."""
    return f"{prefix}:worker:{host}:{pid}:{instance}"


def dictionary(prefix: str, dict_id: int) -> str:
    """String: a zstd dictionary, by the id every frame packed with it names. Kept by id, not by run, so no run's purge
    or re-enqueue can replace one that frames still use."""
    return f"{prefix}:zdict:{dict_id}"


def answer_cache(prefix: str, teacher_id: str) -> str:
    """Hash: a prompt's 32-byte sha256 digest -> `<run>:<stream id>` of the newest sample committed for it by a teacher
    with this configuration id (provenance.teacher_id): a run reuses the answer instead of paying for it again."""
    return f"{prefix}:cache:{teacher_id}"


def worker_index(prefix: str) -> str:
    """Zset heartbeat key -> its expiry (ms): `status` finds live workers without scanning the keyspace."""
    return f"{prefix}:workers"


@dataclass(frozen=True)
class LimitKeys:
    """The shared rate limit of every worker on every host (provider quotas are per account)."""

    prefix: str

    @property
    def cell(self) -> str:  # GCRA: theoretical arrival time of the next request, ms
        return f"{self.prefix}:limit:tat"

    @property
    def in_flight(self) -> str:  # zset: slot -> expiry ms (a dead worker's slot expires)
        return f"{self.prefix}:limit:in_flight"

    @property
    def backoff(self) -> str:  # exists while the provider said 429: every worker waits
        return f"{self.prefix}:limit:backoff"

    @property
    def strikes(self) -> str:  # 429s in a row: the backoff doubles
        return f"{self.prefix}:limit:strikes"


RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # no ':' or glob characters: key patterns stay exact
PROMPT_ID = re.compile(r"[0-9a-f]{64}\Z")  # a prompt's sha256, hex: what job ids and cache entries are made of


@dataclass(frozen=True)
class RunKeys:
    prefix: str
    run: str

    def __post_init__(self) -> None:
        if not RUN_NAME.match(self.run):
            from .errors import HegelionError

            raise HegelionError(f"run name {self.run!r} may use only letters, digits, '.', '_' and '-'")

    def _k(self, what: str) -> str:
        return f"{self.prefix}:run:{self.run}:{what}"

    @property
    def pattern(self) -> str:
        """Glob matching this run's keys only (purge)."""
        return f"{self.prefix}:run:{self.run}:*"

    @property
    def meta(self) -> str:  # hash: dataset, split, seed, limit, output, config_id, enqueue_complete, …
        return self._k("meta")

    @property
    def enqueued(self) -> str:  # set of prompt ids ever enqueued, as 32-byte digests (store.enqueued_ids)
        return self._k("enqueued")

    @property
    def done(self) -> str:  # set of committed prompt ids: the dedup key
        return self._k("done")

    @property
    def results(self) -> str:  # stream of committed samples: the source of truth
        return self._k("results")

    @property
    def dead(self) -> str:  # hash prompt id -> dead letter JSON
        return self._k("dead")

    @property
    def dead_reasons(self) -> str:  # hash prompt id -> its dead letter's reason: counted without reading letters
        return self._k("dead_reasons")

    @property
    def dead_counts(self) -> str:  # hash reason -> dead letters with it: `status` reads it instead of every letter
        return self._k("dead_counts")

    @property
    def zdict(self) -> str:  # string: runs packed before dictionaries were kept by id hold the dictionary itself here
        return self._k("zdict")

    @property
    def zdict_id(self) -> str:  # string: the id of the dictionary the run packs with (its bytes: keys.dictionary)
        return self._k("zdict_id")

    @property
    def attempts(self) -> str:  # hash prompt id -> teacher calls made
        return self._k("attempts")

    @property
    def attempt_tokens(self) -> str:  # hash prompt id -> token of its last counted attempt (re-sends count once)
        return self._k("attempt_tokens")

    @property
    def spent(self) -> str:  # hash prompt id -> token of the attempt whose tokens and seconds were counted (once)
        return self._k("spent")

    @property
    def stats(self) -> str:  # hash of counters: retries, teacher_calls, teacher_seconds, usage_<kind>, …
        return self._k("stats")

    @property
    def budget(self) -> str:  # hash: tokens / calls / teacher_seconds -> the run's limit (absent: no limit)
        return self._k("budget")

    @property
    def configs(self) -> str:  # hash: configuration id (16 hex) -> {config, recorded_at} JSON, every one the run had
        return self._k("configs")

    @property
    def commands(self) -> str:  # list of JSON {at, host, command}: the commands that made the run (the card)
        return self._k("commands")

    @property
    def timeline(self) -> str:  # hash: unix minute -> samples committed in it (samples/min, ETA)
        return self._k("timeline")

    @property
    def breaker(self) -> str:  # hash: reason, since (exists = run paused)
        return self._k("breaker")

    @property
    def config_errors(self) -> str:  # set of prompt ids that hit a configuration error in a row (since a commit)
        return self._k("config_errors")

    @property
    def finished(self) -> str:  # set once when done + dead == enqueued
        return self._k("finished")

    @property
    def train(self) -> str:  # hash: training progress (state, step, loss, S, lambda, …; summary and eval JSON)
        return self._k("train")

    @property
    def train_metrics(self) -> str:  # list of JSON metric rows (step, loss, val_loss, S, lambda, …): the curves
        return self._k("train:metrics")
