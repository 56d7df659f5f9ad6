"""Every Redis key name this project reads or writes, and nowhere else.

Run keys live under `<prefix>:run:<run>:`; arq's own keys keep arq's prefixes (`arq:job:<id>`, …).
"""

from __future__ import annotations

from dataclasses import dataclass

from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix, retry_key_prefix

GENERATE_FUNCTION = "generate"  # arq function name of a generator job
REJECT_FUNCTION = "reject_payload"  # arq function that dead-letters an unreadable job payload
TRAIN_FUNCTION = "train"


def job_id(run: str, prompt_id: str) -> str:
    return f"{run}:{prompt_id}"


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


@dataclass(frozen=True)
class RunKeys:
    prefix: str
    run: str

    def _k(self, what: str) -> str:
        return f"{self.prefix}:run:{self.run}:{what}"

    @property
    def pattern(self) -> str:
        """Glob matching this run's keys only (purge)."""
        return f"{self.prefix}:run:{self.run}:*"

    @property
    def meta(self) -> str:  # hash: dataset, split, seed, limit, output, enqueue_complete, finished_at, …
        return self._k("meta")

    @property
    def enqueued(self) -> str:  # set of prompt ids ever enqueued
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
    def attempts(self) -> str:  # hash prompt id -> teacher calls made
        return self._k("attempts")

    @property
    def stats(self) -> str:  # hash of counters: retries, teacher_calls, tokens, …
        return self._k("stats")

    @property
    def timeline(self) -> str:  # hash: unix minute -> samples committed in it (samples/min, ETA)
        return self._k("timeline")

    @property
    def breaker(self) -> str:  # hash: reason, since (exists = run paused)
        return self._k("breaker")

    @property
    def config_errors(self) -> str:  # counter of configuration errors in a row
        return self._k("config_errors")

    @property
    def finished(self) -> str:  # set once when done + dead == enqueued
        return self._k("finished")

    @property
    def train(self) -> str:  # hash: training progress
        return self._k("train")
