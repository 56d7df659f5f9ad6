"""Prometheus exposition of the whole fleet: one collector over a `status.fleet` snapshot that the scrape reads
from Redis, so every number is fleet-wide whichever host serves it (no per-process state, nothing to merge)."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

# name: (type, labels, meaning). One source for the exposition and docs/operating.md's list (`make tables`).
METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "hegelion_up": ("gauge", (), "1 when this scrape could read Redis, else 0 (and nothing else is exported)."),
    "hegelion_prompts_enqueued": ("counter", ("run",), "Prompts ever enqueued for the run."),
    "hegelion_samples_done": ("counter", ("run",), "Samples committed (each prompt at most once)."),
    "hegelion_dead_letters": ("counter", ("run", "reason"),
                              "Dead letters by reason (retry-failed removes letters: Prometheus sees a reset)."),
    "hegelion_retries": ("counter", ("run",), "Teacher calls that failed and were retried."),
    "hegelion_teacher_seconds": ("counter", ("run",), "Teacher wall time of every call that ended."),
    "hegelion_teacher_tokens": ("counter", ("run", "kind"), "Tokens the teacher reported, by kind (input, output, …)."),
    "hegelion_run_tokens": ("counter", ("run", "direction"), "Teacher tokens of every call that ended, input or output."),
    "hegelion_run_cost": ("counter", ("run",), "What the run's teacher calls cost at HEGELION_PRICE_*_PER_MTOK "
                          "(absent without prices)."),
    "hegelion_answers_reused": ("counter", ("run",), "Samples copied from the answer cache instead of a teacher call."),
    "hegelion_run_pending": ("gauge", ("run",), "Prompts neither done nor dead yet."),
    "hegelion_run_in_flight": ("gauge", ("run",), "The run's jobs running now, from the workers' heartbeats."),
    "hegelion_run_finished": ("gauge", ("run",), "1 once every enqueued prompt is done or dead."),
    "hegelion_samples_per_minute": ("gauge", ("run",), "Samples committed per minute, last 5 minutes."),
    "hegelion_eta_seconds": ("gauge", ("run",), "Time left at the current rate (absent while nothing is pending)."),
    "hegelion_budget_limit": ("gauge", ("run", "kind"), "The run's budget: tokens, calls or teacher_seconds it may "
                              "spend (absent: no limit)."),
    "hegelion_budget_spent": ("gauge", ("run", "kind"), "What the run spent of each budget kind (tokens, calls, "
                              "teacher_seconds), limited or not."),
    "hegelion_breaker_open": ("gauge", ("run",), "1 while the run is paused by its circuit breaker."),
    "hegelion_queue_jobs": ("gauge", ("queue", "state"), "Jobs in an arq queue: due now or deferred (retries)."),
    "hegelion_workers": ("gauge", ("host", "kind"), "Live worker processes (heartbeat younger than 15 s)."),
    "hegelion_worker_jobs_in_flight": ("gauge", ("host",), "Jobs the host's workers are running now."),
    "hegelion_train_running": ("gauge", ("run",), "1 while the run's adapter is training."),
    "hegelion_train_step": ("gauge", ("run",), "Training step reached."),
    "hegelion_train_iters": ("gauge", ("run",), "Training steps planned."),
    "hegelion_train_loss": ("gauge", ("run",), "Training loss at the last reported step."),
    "hegelion_train_s": ("gauge", ("run",), "SCU S = ParamBPT / (DataBPT + ParamBPT) at the last reported step."),
    "hegelion_train_lambda": ("gauge", ("run",), "SCU regularisation strength λ at the last reported step."),
    "hegelion_train_tokens_per_second": ("gauge", ("run",), "Training throughput."),
}
TRAIN_FIELDS = {"hegelion_train_step": "step", "hegelion_train_iters": "iters", "hegelion_train_loss": "loss",
                "hegelion_train_s": "S", "hegelion_train_lambda": "lambda",
                "hegelion_train_tokens_per_second": "tokens_per_s"}


def _family(name: str) -> Metric:
    kind, labels, meaning = METRICS[name]
    cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
    return cls(name, meaning, labels=list(labels))


def _float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class FleetCollector:
    """Yields every metric of METRICS from one fleet snapshot (None: Redis could not be read)."""

    def __init__(self, fleet: dict[str, Any] | None):
        self.fleet = fleet

    def collect(self) -> Iterator[Metric]:
        m = {name: _family(name) for name in METRICS}
        m["hegelion_up"].add_metric([], 0 if self.fleet is None else 1)
        if self.fleet is None:
            yield m["hegelion_up"]
            return
        for r in self.fleet["runs"]:
            run = [r["run"]]
            m["hegelion_prompts_enqueued"].add_metric(run, r["enqueued"])
            m["hegelion_samples_done"].add_metric(run, r["done"])
            for reason, n in sorted(r["dead_by_reason"].items()):
                m["hegelion_dead_letters"].add_metric([r["run"], reason], n)
            m["hegelion_retries"].add_metric(run, r["retries"])
            m["hegelion_teacher_seconds"].add_metric(run, r["teacher_seconds"])
            for kind, n in sorted(r["usage"].items()):
                m["hegelion_teacher_tokens"].add_metric([r["run"], kind], n)
            for direction, n in r["tokens"].items():
                m["hegelion_run_tokens"].add_metric([r["run"], direction], n)
            if r["cost"] is not None:
                m["hegelion_run_cost"].add_metric(run, r["cost"])
            m["hegelion_answers_reused"].add_metric(run, r["cached"])
            m["hegelion_run_pending"].add_metric(run, r["pending"])
            m["hegelion_run_in_flight"].add_metric(run, r["in_progress"])
            m["hegelion_run_finished"].add_metric(run, int(r["finished"]))
            m["hegelion_samples_per_minute"].add_metric(run, r["samples_per_min_5m"])
            if r["eta_s"] is not None:
                m["hegelion_eta_seconds"].add_metric(run, r["eta_s"])
            m["hegelion_breaker_open"].add_metric(run, int(bool(r["paused"])))
            for kind, b in r["budget"].items():
                m["hegelion_budget_spent"].add_metric([r["run"], kind], b["spent"])
                if b["limit"] is not None:
                    m["hegelion_budget_limit"].add_metric([r["run"], kind], b["limit"])
            train = r["training"] or {}
            if train:
                m["hegelion_train_running"].add_metric(run, int(train.get("state") == "running"))
            for name, field in TRAIN_FIELDS.items():
                if (v := _float(train.get(field))) is not None:
                    m[name].add_metric(run, v)
        for q in self.fleet["queues"]:
            m["hegelion_queue_jobs"].add_metric([q["name"], "due"], q["due"])
            m["hegelion_queue_jobs"].add_metric([q["name"], "deferred"], q["deferred"])
        workers = Counter((w["host"], w["kind"]) for w in self.fleet["workers"])
        for (host, kind), n in sorted(workers.items()):
            m["hegelion_workers"].add_metric([host, kind], n)
        running: Counter[str] = Counter()
        for w in self.fleet["workers"]:
            running[w["host"]] += len(w["running"])
        for host, n in sorted(running.items()):
            m["hegelion_worker_jobs_in_flight"].add_metric([host], n)
        yield from m.values()


def exposition(fleet: dict[str, Any] | None) -> bytes:
    """The Prometheus text format of one snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(fleet))
    return generate_latest(registry)


def metrics_table() -> str:
    """The README's list of metrics (counters carry Prometheus' `_total` suffix)."""
    rows = ["| metric | type | labels | meaning |", "| --- | --- | --- | --- |"]
    for name, (kind, labels, meaning) in METRICS.items():
        shown = f"{name}_total" if kind == "counter" else name
        rows.append(f"| `{shown}` | {kind} | {', '.join(labels) or '—'} | {meaning} |")
    return "\n".join(rows)
