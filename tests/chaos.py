"""Chaos harness: SIGKILL workers, lose Redis replies, pause and restart Redis mid-run, then prove nothing was
lost or duplicated.

    python -m tests.chaos                 # the long form (1,000 prompts, 4 workers, a kill every ~3 s)
    python -m tests.chaos --short         # the CI form (under two minutes)

It starts its own redis-server with AOF (appendfsync everysec), N worker processes and the fake teacher
(latency and transient failures), enqueues the prompts, kills a random worker every few seconds (and
restarts it), connects the workers through a proxy that loses a share of Redis' replies after Redis ran the
command (tests/lossy_link.py: every write is re-sent), pauses Redis once while teachers run (SIGSTOP for a
few seconds, longer than a job's deadline allows), restarts Redis once (SIGTERM, then again on the same
files), restarts any worker that exits (as a supervisor would), and waits for the run to finish. The workers
run with the shared limiter on and auto-training on (no trainer runs). Then it checks: every enqueued prompt
is done or dead-lettered with a reason; the JSONL has one line per done prompt, no duplicate, no truncated
line, and equals `export`; the run has exactly one training job; no teacher process is left; and it reports
the time from each kill to the commit of the jobs the killed worker was running. Exit status 1 on any
violation.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from hegelion_queue import keys
from hegelion_queue.queue import store
from hegelion_queue.queue.runner import WorkerGroup

from .lossy_link import LossyLink
from .redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
FAKE_KIMI = ROOT / "tests" / "fake_kimi.py"
FAKE_ACP = ROOT / "tests" / "fake_acp.py"
RUN = "chaos"
TOPICS = ["tides", "bridges", "taxes", "bees", "jazz", "glaciers", "chess", "vaccines", "rent", "satellites"]


@dataclass
class Kill:
    at: float
    pid: int
    jobs: list[str]
    recovered_at: float | None = None


@dataclass
class Report:
    prompts: int = 0
    kills: list[Kill] = field(default_factory=list)
    redis_restarts: int = 0
    redis_pauses: int = 0
    teacher_kills: int = 0
    lost_replies: int = 0
    training_jobs: int = 0
    worker_exits: int = 0
    done: int = 0
    dead: int = 0
    dead_reasons: dict[str, int] = field(default_factory=dict)
    lines: int = 0
    duplicates: int = 0
    lost: int = 0
    truncated: int = 0
    orphans: int = 0
    export_matches: bool = False
    seconds: float = 0.0
    violations: list[str] = field(default_factory=list)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=1000)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--max-jobs", type=int, default=8, help="concurrent jobs per worker")
    p.add_argument("--kill-interval", type=float, default=3.0, help="seconds between SIGKILLs (jittered)")
    p.add_argument("--failure-rate", type=float, default=0.1, help="share of teacher calls that exit 75")
    p.add_argument("--latency", type=float, default=0.2, help="seconds per teacher call")
    p.add_argument("--teacher-timeout", type=float, default=3.0)
    p.add_argument("--lost-replies", type=float, default=0.01, help="share of Redis replies the link loses")
    p.add_argument("--pause", type=float, default=5.0, help="seconds Redis is paused (SIGSTOP) once mid-run")
    p.add_argument("--mode", choices=["print", "wire", "acp"], default=None,
                   help="kimi mode (default: the project's, with the legacy fake kimi); acp: the fake Kimi Code "
                        "(tests/fake_acp.py), whose ACP processes are SIGKILLed too, every other kill")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=900, help="give up after this many seconds")
    p.add_argument("--short", action="store_true", help="the CI form: 200 prompts, 3 workers")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data, AOF)")
    args = p.parse_args(argv)
    if args.short:
        args.prompts, args.workers, args.timeout = min(args.prompts, 200), min(args.workers, 3), min(args.timeout, 110)
    return args


def hq(env: dict[str, str], *args: str) -> str:
    cmd = [sys.executable, "-m", "hegelion_queue.cli", *args]
    return subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=120).stdout


def alive(pid: int) -> bool:
    """A fake teacher with this pid still runs (the cmdline check guards against a reused pid)."""
    try:
        running = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        return running and (b"fake_kimi" in cmdline or b"fake_acp" in cmdline)
    except (FileNotFoundError, IndexError):
        return False


def acp_processes(tmp: Path) -> list[int]:
    """The fake Kimi Code processes that run now (from its log of starts)."""
    log = tmp / "fake_kimi.log"
    rows = [orjson.loads(line) for line in log.read_bytes().splitlines()] if log.exists() else []
    return [row["pid"] for row in rows if row["event"] == "start" and alive(row["pid"])]


def running_jobs(r, pid: int) -> list[str]:
    for key in r.scan_iter(match=f"hegelion:worker:*:{pid}:*"):
        value = r.get(key)
        if value:
            return orjson.loads(value)["running"]
    return []


def chaos(args: argparse.Namespace, tmp: Path) -> Report:
    rng = random.Random(args.seed)
    report = Report(prompts=args.prompts)
    server = RedisServer(tmp / "redis", aof=True)
    server.start()
    r = server.client()
    link = LossyLink(server.port, rate=args.lost_replies, seed=args.seed)
    link.start()
    env = {
        **os.environ,
        "HEGELION_REDIS_URL": server.url,
        "HEGELION_DATA_DIR": str(tmp / "data"),
        "HEGELION_KIMI_BIN": str(FAKE_KIMI),
        "HEGELION_MAX_JOBS": str(args.max_jobs),
        "HEGELION_MAX_TRIES": "10",
        "HEGELION_TEACHER_TIMEOUT": str(args.teacher_timeout),
        "HEGELION_JOB_TIMEOUT_MARGIN": "2",
        "HEGELION_RETRY_BASE": "0.2",
        "HEGELION_RETRY_CAP": "2",
        "HEGELION_POLL_DELAY": "0.05",
        "HEGELION_AUTO_TRAIN": "1",
        "HEGELION_MAX_IN_FLIGHT": "1000",  # the shared limiter runs (a slot per call) without limiting
        "HEGELION_REDIS_SOCKET_TIMEOUT": "1",
        "HEGELION_DRAIN_SECONDS": "2",
        "FAKE_KIMI_DELAY": str(args.latency),
        "FAKE_KIMI_FAIL_RATE": str(args.failure_rate),
        "FAKE_KIMI_LOG": str(tmp / "fake_kimi.log"),
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    if args.mode:
        env["HEGELION_KIMI_MODE"] = args.mode
    if args.mode == "acp":  # the fake Kimi Code: one ACP process per worker holds every session
        env.update(HEGELION_KIMI_BIN=str(FAKE_ACP), FAKE_ACP_DELAY=str(args.latency),
                   FAKE_ACP_FAIL_RATE=str(args.failure_rate), FAKE_ACP_LOG=str(tmp / "fake_kimi.log"),
                   KIMI_BASE_URL="http://127.0.0.1:9/v1", KIMI_API_KEY="chaos", KIMI_MODEL_NAME="chaos")
    prompts = tmp / "prompts.txt"
    prompts.write_text("".join(f"Chaos prompt {i}: weigh the case for and against {TOPICS[i % 10]} "
                               f"(variant {i}).\n" for i in range(args.prompts)))
    hq(env, "enqueue", "--prompts-file", str(prompts), "--run", RUN)
    logs = tmp / "logs"

    worker_env = {**env, "HEGELION_REDIS_URL": f"redis://127.0.0.1:{link.port}/0"}  # replies may be lost

    def start_worker(slot: int) -> WorkerGroup:
        g = WorkerGroup(1, env=worker_env, log_dir=logs / f"slot{slot}")
        g.start()
        return g

    slots = [start_worker(i) for i in range(args.workers)]
    t0 = time.monotonic()
    next_kill = t0 + args.kill_interval * rng.uniform(0.7, 1.3)
    restarted_redis = paused_redis = False
    redis_down = False
    finished = False
    try:
        while time.monotonic() - t0 < args.timeout:
            now = time.monotonic()
            try:
                finished = bool(r.exists(f"hegelion:run:{RUN}:finished"))
                done_ids = r.smembers(f"hegelion:run:{RUN}:done")
                progress = len(done_ids) + r.hlen(f"hegelion:run:{RUN}:dead")
                redis_down = False
            except Exception:
                redis_down = True
                progress, done_ids = 0, set()
            if finished:
                break
            for k in report.kills:  # recovery: every job the victim ran is committed again
                if k.recovered_at is None and not redis_down and all(
                        j.split(":", 1)[1].encode() in done_ids for j in k.jobs):
                    k.recovered_at = now
            if not paused_redis and args.pause and progress >= args.prompts * 0.2:
                server.proc.send_signal(signal.SIGSTOP)  # teachers run on; commits, slots, claims hang
                time.sleep(args.pause)
                server.proc.send_signal(signal.SIGCONT)
                paused_redis = True
                report.redis_pauses += 1
            if not restarted_redis and progress >= args.prompts * 0.4:
                server.stop("term")
                time.sleep(1.0)
                server.start()
                restarted_redis = True
                report.redis_restarts += 1
            teachers = acp_processes(tmp) if args.mode == "acp" and len(report.kills) % 2 else []
            if now >= next_kill and not redis_down and teachers:  # the ACP process, its sessions in flight
                os.kill(rng.choice(teachers), signal.SIGKILL)
                report.teacher_kills += 1
                report.kills.append(Kill(now, 0, []))
                next_kill = now + args.kill_interval * rng.uniform(0.7, 1.3)
            elif now >= next_kill and not redis_down:
                slot = rng.randrange(len(slots))
                victim = slots[slot].procs[0]
                jobs = running_jobs(r, victim.pid)
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                report.kills.append(Kill(now, victim.pid, jobs))
                slots[slot] = start_worker(slot)
                next_kill = now + args.kill_interval * rng.uniform(0.7, 1.3)
            for i, g in enumerate(slots):  # a supervisor: a worker that exited is started again
                if g.alive() == 0:
                    report.worker_exits += 1
                    slots[i] = start_worker(i)
            time.sleep(0.1)
    finally:
        for g in slots:
            g.stop(timeout=30)
        link.stop()
    report.lost_replies = link.dropped
    report.seconds = time.monotonic() - t0
    if not finished:
        report.violations.append(f"the run did not finish within {args.timeout:.0f}s")
    verify(report, r, env, tmp)
    server.stop()
    return report


def verify(report: Report, r, env: dict[str, str], tmp: Path) -> None:
    enqueued = store.enqueued_ids_sync(r, keys.RunKeys("hegelion", RUN))
    done = {m.decode() for m in r.smembers(f"hegelion:run:{RUN}:done")}
    dead = store.dead_letters_sync(r, keys.RunKeys("hegelion", RUN))
    report.done, report.dead = len(done), len(dead)
    for letter in dead.values():
        report.dead_reasons[letter.get("reason", "?")] = report.dead_reasons.get(letter.get("reason", "?"), 0) + 1
    if len(enqueued) != report.prompts:
        report.violations.append(f"{len(enqueued)} prompts enqueued, expected {report.prompts}")
    report.lost = len(enqueued - done - set(dead))
    if report.lost:
        report.violations.append(f"{report.lost} prompts neither done nor dead")
    if done & set(dead):
        report.violations.append(f"{len(done & set(dead))} prompts both done and dead")
    if any(not x.get("reason") for x in dead.values()):
        report.violations.append("a dead letter without a reason")
    report.training_jobs = r.zcard("hegelion:train")
    if done and (report.training_jobs != 1 or not r.exists(f"arq:job:train:{RUN}")):
        report.violations.append(f"{report.training_jobs} training jobs for the finished run, expected 1")
    path = tmp / "data" / f"{RUN}.jsonl"
    raw = path.read_bytes() if path.exists() else b""
    if raw and not raw.endswith(b"\n"):
        report.truncated += 1
    ids = []
    for line in raw.splitlines():
        try:
            ids.append(orjson.loads(line)["hegelion_trace"]["prompt_id"])
        except Exception:
            report.truncated += 1
    report.lines = len(ids)
    report.duplicates = len(ids) - len(set(ids))
    if report.truncated:
        report.violations.append(f"{report.truncated} truncated or unreadable JSONL lines")
    if report.duplicates:
        report.violations.append(f"{report.duplicates} duplicate JSONL lines")
    if set(ids) != done:
        report.violations.append(f"JSONL holds {len(set(ids))} prompts, the done-set {len(done)}")
    hq(env, "export", "--run", RUN, "--output", str(tmp / "export.jsonl"))
    report.export_matches = (tmp / "export.jsonl").read_bytes() == raw
    if not report.export_matches:
        report.violations.append("the JSONL differs from `export`")
    log = tmp / "fake_kimi.log"
    pids = {orjson.loads(line)["pid"] for line in log.read_bytes().splitlines()} if log.exists() else set()
    deadline = time.monotonic() + 3  # a killed group is reaped within moments
    while (orphans := sum(alive(p) for p in pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    report.orphans = orphans
    if report.orphans:
        report.violations.append(f"{report.orphans} teacher processes still running")
    for k in report.kills:
        if k.jobs and k.recovered_at is None and not all(j.split(":", 1)[1] in done | set(dead) for j in k.jobs):
            report.violations.append(f"jobs of worker {k.pid} never finished")


def render(report: Report) -> str:
    rec = sorted(k.recovered_at - k.at for k in report.kills if k.jobs and k.recovered_at is not None)
    in_flight = sum(len(k.jobs) for k in report.kills)
    lines = [
        f"prompts {report.prompts}: done {report.done}, dead {report.dead} {report.dead_reasons or ''}",
        f"kills {len(report.kills) - report.teacher_kills} of workers and {report.teacher_kills} of ACP processes "
        f"(jobs in flight at the worker kills: {in_flight}), redis restarts "
        f"{report.redis_restarts}, redis pauses {report.redis_pauses}, lost replies {report.lost_replies}, "
        f"worker exits restarted {report.worker_exits}, training jobs {report.training_jobs}",
        f"lost {report.lost}, duplicates {report.duplicates}, truncated {report.truncated}, JSONL lines "
        f"{report.lines}, export equal {report.export_matches}, orphan teachers {report.orphans}",
        "recovery (kill -> its jobs committed): "
        + (f"min {rec[0]:.1f}s, median {rec[len(rec) // 2]:.1f}s, max {rec[-1]:.1f}s" if rec else "n/a"),
        f"wall time {report.seconds:.1f}s",
    ]
    lines += [f"VIOLATION: {v}" for v in report.violations] or ["OK: nothing lost, nothing duplicated"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="hegelion-chaos-"))
    try:
        report = chaos(args, tmp)
        print(render(report))
        return 1 if report.violations else 0
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
