#!/usr/bin/env python3
"""Several hosts with no shared disk, on one machine: network namespaces on a private bridge.

    python tests/multihost.py [--prompts 300] [--cut-seconds 25] [--short] [--keep]

Builds five namespaces joined by veth pairs to a bridge in a sixth ("switch") one, each with its own
address in 10.231.0.0/24 and its own host name (a UTS namespace): `redis` (password, AOF), `gen-a` and
`gen-b` (two generator workers each, one data dir per host), `trainer` (exports the run, as the trainer job
does before it trains) and `ctl` (the test host: enqueues, watches). The root namespace's network is never
touched, and all traffic stays on these addresses.

Mid-run it cuts gen-a's link (detaches its port from the bridge: a black hole, like a pulled cable) for longer
than the teacher timeout, restores it, then restarts Redis once. It checks that the export on the trainer
host holds every prompt exactly once (or a dead letter with its reason), that each worker host's JSONL is
a duplicate-free copy of the run, that both hosts did work, that gen-a's in-flight jobs were re-run by
gen-b, and that gen-a rejoined without duplicating anything; it prints the recovery times and per-host
counts, and exits 1 on any violation (2: network namespaces are not permitted here). Every namespace,
link and process it made is removed, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import atexit
import concurrent.futures
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from hegelion_queue import keys
from hegelion_queue.queue import store

ROOT = Path(__file__).resolve().parent.parent
FAKE_KIMI = ROOT / "tests" / "fake_kimi.py"
SUBNET = "10.231.0"
ADDRESSES = {"redis": 1, "ctl": 2, "gen-a": 11, "gen-b": 12, "trainer": 20}
PASSWORD = "multihost-pw"
RUN = "multihost"
CLONE_NEWNET = 0x40000000
EXIT_SKIP = 2


class Skip(Exception):
    """Network namespaces are not permitted here."""


class Violation(AssertionError):
    pass


def log(msg: str) -> None:
    print(f"[multihost {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {p.returncode}: {p.stderr.strip()}")
    return p


# ---------------------------------------------------------------- the network


@dataclass
class Network:
    """Namespaces `<prefix><host>` plus `<prefix>sw` holding the bridge; one veth pair per host."""

    prefix: str
    made: list[str] = field(default_factory=list)

    def ns(self, host: str) -> str:
        return f"{self.prefix}{host}"

    @property
    def switch(self) -> str:
        return f"{self.prefix}sw"

    def ip(self, host: str) -> str:
        return f"{SUBNET}.{ADDRESSES[host]}"

    def port(self, host: str) -> str:  # the switch side of a host's veth
        return f"p-{host}"

    def build(self) -> None:
        if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("unshare"):
            raise Skip("needs root, iproute2 (`ip`) and util-linux (`unshare`)")
        probe = sh("ip", "netns", "add", self.switch, check=False)
        if probe.returncode != 0:
            raise Skip(f"`ip netns add` is not permitted here: {probe.stderr.strip()}")
        self.made.append(self.switch)
        sw = self.switch
        sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", sw, "link", "set", "br0", "up")
        sh("ip", "-n", sw, "link", "set", "lo", "up")
        for host in ADDRESSES:
            ns = self.ns(host)
            sh("ip", "netns", "add", ns)
            self.made.append(ns)
            sh("ip", "-n", sw, "link", "add", self.port(host), "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", sw, "link", "set", self.port(host), "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.ip(host)}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        for host in ADDRESSES:  # every host reaches redis over the bridge
            if host != "redis":
                sh("ip", "netns", "exec", self.ns(host), "ping", "-c", "1", "-W", "2", self.ip("redis"),
                   check=shutil.which("ping") is not None)

    def cut(self, host: str) -> None:
        """Detach the host's port from the bridge: its packets go nowhere, nothing answers (a pulled cable)."""
        sh("ip", "-n", self.switch, "link", "set", self.port(host), "nomaster")

    def restore(self, host: str) -> None:
        sh("ip", "-n", self.switch, "link", "set", self.port(host), "master", "br0")

    def remove(self) -> None:
        for ns in reversed(self.made):  # deleting a namespace deletes its end of each veth, so the pair
            sh("ip", "netns", "del", ns, check=False)
        self.made.clear()


def stale_namespaces() -> list[str]:
    """Namespaces of harness runs whose process is gone (a SIGKILLed run cannot clean up after itself)."""
    out = sh("ip", "netns", "list", check=False).stdout.split()
    stale = []
    for name in out:
        if name.startswith("hqmh") and "-" in name:
            pid = name[4:].split("-", 1)[0]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                stale.append(name)
    return stale


# ---------------------------------------------------------------- processes on the hosts


class Host:
    """Runs processes in one namespace, under its own host name (a UTS namespace per process)."""

    def __init__(self, net: Network, name: str, base: Path):
        self.net, self.name = net, name
        self.dir = base / name
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        (self.dir / "tmp").mkdir(exist_ok=True)

    def argv(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.net.ns(self.name), "unshare", "--uts",
                "sh", "-c", 'hostname "$0" && exec "$@"', self.name, *cmd]

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(self.dir / "tmp"), **extra}

    def spawn(self, label: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        out = open(self.dir / "logs" / f"{label}.log", "ab")
        try:
            return subprocess.Popen(self.argv(*cmd), cwd=self.dir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        finally:
            out.close()

    def run(self, cmd: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*cmd), cwd=self.dir, env=env, capture_output=True, text=True,
                              timeout=timeout)


def stop(p: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    if p.poll() is not None:
        return
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        return
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(10)


@dataclass
class Worker:
    host: Host
    index: int
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    restarts: int = 0
    exits: list[int] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"worker-{self.index}"

    def start(self) -> None:
        cmd = [sys.executable, "-m", "arq", "workers.generator.WorkerSettings"]
        self.proc = self.host.spawn(self.label, cmd, self.env)

    def supervise(self) -> None:
        """A worker that exited on its own is started again, as a container's restart policy would."""
        if self.proc is not None and self.proc.poll() is not None:
            self.exits.append(self.proc.returncode)
            self.restarts += 1
            log(f"{self.host.name} {self.label} exited with {self.proc.returncode}; restarting it")
            self.start()


class Redis:
    def __init__(self, host: Host):
        self.host, self.proc = host, None
        self.data = host.dir / "data"
        self.data.mkdir(exist_ok=True)

    def start(self) -> None:
        cmd = ["redis-server", "--bind", self.host.net.ip("redis"), "--port", "6379", "--requirepass", PASSWORD,
               "--dir", str(self.data), "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
               "--protected-mode", "no", "--logfile", str(self.host.dir / "logs" / "redis.log")]
        self.proc = self.host.spawn("redis-stdout", cmd, self.host.env())

    def stop(self) -> None:
        if self.proc:
            stop(self.proc)


class Observer:
    """A Redis client whose sockets live in the ctl namespace: one thread that setns()'d into it."""

    def __init__(self, net: Network, url: str):
        self.pool = concurrent.futures.ThreadPoolExecutor(1, initializer=self._enter, initargs=(net.ns("ctl"),))
        self.url = url
        self.client = None

    @staticmethod
    def _enter(ns: str) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns({ns})")
        finally:
            os.close(fd)

    def __call__(self, fn, timeout: float = 30):
        def go():
            import redis

            if self.client is None:
                self.client = redis.Redis.from_url(self.url, socket_connect_timeout=2, socket_timeout=5)
            for attempt in range(50):  # Redis restarting: wait for it (bounded)
                try:
                    return fn(self.client)
                except (redis.ConnectionError, redis.TimeoutError):
                    if attempt == 49:
                        raise
                    time.sleep(0.2)

        return self.pool.submit(go).result(timeout)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------- the scenario


@dataclass
class Options:
    prompts: int = 200
    cut_seconds: float = 25.0
    teacher_delay: float = 1.0
    max_jobs: int = 2
    cut_after: float = 0.2  # fraction of prompts done when gen-a's link is cut
    keep: bool = False
    timeout: float = 300.0


def prompts_file(path: Path, n: int) -> Path:
    topics = ["tides", "bridges", "taxes", "vaccines", "chess", "bread", "rivers", "voting", "bees", "glass"]
    path.write_text("".join(f"Question {i}: what is the strongest case for and against {topics[i % 10]} policy "
                            f"number {i}, and how would you reconcile them?\n" for i in range(n)))
    return path


def worker_env(host: Host, redis_url: str, opts: Options) -> dict[str, str]:
    return host.env(
        HEGELION_REDIS_URL=redis_url,
        HEGELION_DATA_DIR=str(host.dir / "data"),
        HEGELION_KIMI_BIN=str(FAKE_KIMI),
        HEGELION_TEACHER_TIMEOUT="4",
        HEGELION_JOB_TIMEOUT_MARGIN="2",  # a cut-off worker's jobs come back after 4 + 2 + 10 s
        HEGELION_POLL_DELAY="0.05",
        HEGELION_MAX_JOBS=str(opts.max_jobs),
        HEGELION_RETRY_BASE="0.2",
        HEGELION_RETRY_CAP="1",
        HEGELION_MAX_TRIES="8",
        HEGELION_AUTO_TRAIN="0",
        HEGELION_DRAIN_SECONDS="5",
        HEGELION_REDIS_SOCKET_TIMEOUT="2",
        HEGELION_REDIS_RETRY_SECONDS="120",
        FAKE_KIMI_DELAY=str(opts.teacher_delay),
    )


def cli_env(host: Host, redis_url: str) -> dict[str, str]:
    return host.env(HEGELION_REDIS_URL=redis_url, HEGELION_DATA_DIR=str(host.dir / "data"), HEGELION_AUTO_TRAIN="0",
                    HF_HUB_OFFLINE="1")


def cli(host: Host, env: dict[str, str], *args: str, timeout: float = 60) -> str:
    p = host.run([sys.executable, "-m", "hegelion_queue.cli", *args], env, timeout=timeout)
    if p.returncode != 0:
        raise Violation(f"`hegelion-queue {' '.join(args)}` on {host.name} exited {p.returncode}: {p.stderr.strip()}")
    return p.stdout


def jsonl_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def scenario(net: Network, base: Path, opts: Options) -> dict:
    hosts = {name: Host(net, name, base) for name in ADDRESSES}
    url = f"redis://:{PASSWORD}@{net.ip('redis')}:6379/0"
    k = f"hegelion:run:{RUN}"
    run_keys = keys.RunKeys("hegelion", RUN)
    report: dict = {"violations": []}
    violations: list[str] = report["violations"]

    def check(ok: bool, what: str) -> None:
        if not ok:
            violations.append(what)
            log(f"VIOLATION: {what}")

    redis = Redis(hosts["redis"])
    workers = [Worker(hosts[h], i, worker_env(hosts[h], url, opts)) for h in ("gen-a", "gen-b") for i in (1, 2)]
    obs = Observer(net, url)
    procs_to_stop = []
    try:
        redis.start()
        obs(lambda r: r.ping())
        t0 = time.monotonic()
        for w in workers:
            w.start()
        ctl_env = cli_env(hosts["ctl"], url)
        out = cli(hosts["ctl"], ctl_env, "enqueue", "--prompts-file",
                  str(prompts_file(hosts["ctl"].dir / "prompts.txt", opts.prompts)), "--run", RUN, "--json")
        enqueued = json.loads(out)["enqueued"]
        check(enqueued == opts.prompts, f"enqueued {enqueued} of {opts.prompts}")
        deadline = t0 + opts.timeout

        def supervise() -> None:
            for w in workers:
                w.supervise()
            if time.monotonic() > deadline:
                def go(r):
                    queued = sum(1 for j in r.zrange("hegelion:queue", 0, -1) if j.startswith(f"{RUN}:".encode()))
                    return r.scard(f"{k}:enqueued"), r.scard(f"{k}:done"), r.hlen(f"{k}:dead"), queued

                total, n_done, n_dead, queued = obs(go)
                raise Violation(f"the run did not finish in {opts.timeout:.0f}s: {n_done} done + {n_dead} dead of "
                                f"{total}, {queued} still queued, {total - n_done - n_dead - queued} lost (a job that "
                                "outlived arq's job timeout while Redis was unreachable is dropped by arq)")

        def wait(cond, what: str, poll: float = 0.1):
            while True:
                supervise()
                value = cond()
                if value:
                    return value
                if redis.proc.poll() is not None:
                    raise Violation(f"redis-server exited ({redis.proc.returncode}) while waiting for {what}")
                time.sleep(poll)

        def live_hosts() -> Counter:
            def go(r):
                ks = list(r.scan_iter("hegelion:worker:*", count=1000))
                return [json.loads(v) for v in r.mget(ks) if v] if ks else []

            return Counter(w["host"] for w in obs(go) if w["kind"] == "generator")

        def done() -> int:
            return obs(lambda r: r.scard(f"{k}:done"))

        # 1. both hosts join; `status` on the trainer host lists them per host
        wait(lambda: live_hosts() == Counter({"gen-a": 2, "gen-b": 2}), "four workers on two hosts")
        status = json.loads(cli(hosts["trainer"], cli_env(hosts["trainer"], url), "status", "--run", RUN, "--json"))
        status_hosts = Counter(w["host"] for w in status["workers"] if w["kind"] == "generator")
        check(status_hosts == Counter({"gen-a": 2, "gen-b": 2}), f"status on trainer lists {dict(status_hosts)}")
        report["status_hosts"] = dict(status_hosts)

        # 2. cut gen-a while it runs jobs; note which of its jobs are in flight
        cut_at = max(1, int(opts.prompts * opts.cut_after))
        wait(lambda: done() >= cut_at, f"{cut_at} samples")

        def gen_a_running():  # prompt ids in gen-a's heartbeats (a second old at most) and not done yet
            def go(r):
                ks = list(r.scan_iter("hegelion:worker:gen-a:*", count=1000))
                jobs = sorted({j for v in (r.mget(ks) if ks else []) if v for j in json.loads(v)["running"]})
                pids = [j.split(":", 1)[1] for j in jobs]
                return {p for p, d in zip(pids, r.smismember(f"{k}:done", pids) if pids else []) if not d}

            return obs(go)

        wait(lambda: len(gen_a_running()) >= 2, "gen-a running jobs")
        net.cut("gen-a")
        t_cut = time.monotonic()
        wall_cut = time.time()
        done_at_cut = obs(lambda r: {m.decode() for m in r.smembers(f"{k}:done")})
        in_flight = gen_a_running() - done_at_cut
        log(f"cut gen-a's link at {len(done_at_cut)} done; {len(in_flight)} of its jobs in flight")
        check(bool(in_flight), "gen-a had no job in flight at the cut: the test would prove nothing")

        taken_over = None

        def watch_takeover() -> None:
            nonlocal taken_over
            if taken_over is None and in_flight and all(obs(lambda r: r.smismember(f"{k}:done", sorted(in_flight)))):
                taken_over = time.monotonic() - t_cut
                log(f"gen-a's {len(in_flight)} in-flight jobs committed {taken_over:.1f}s after the cut")

        while time.monotonic() - t_cut < opts.cut_seconds:
            supervise()
            watch_takeover()
            time.sleep(0.2)
        cut_gap = opts.cut_seconds
        if opts.cut_seconds > 16:  # the heartbeat's TTL is 15 s
            check(live_hosts().get("gen-a", 0) == 0, "gen-a still has live heartbeats after the cut")
        done_before_restore = done()
        net.restore("gen-a")
        t_restore = time.monotonic()
        wall_restore = time.time()
        log(f"restored gen-a's link after {cut_gap:.0f}s; {done_before_restore} done")

        # 3. gen-a rejoins: heartbeats again, then a commit of its own
        def gen_a_committed_since(wall: float) -> bool:
            def go(r):
                for sample in store.newest_sync(r, run_keys, 50):
                    trace = sample["hegelion_trace"]
                    if trace["host"] == "gen-a" and trace["created_at"] > wall:
                        return True
                return False

            return obs(go)

        wait(lambda: live_hosts().get("gen-a", 0) == 2 or watch_takeover(), "gen-a's heartbeats after the restore")
        rejoin_s = time.monotonic() - t_restore
        wait(lambda: gen_a_committed_since(wall_restore) or done() + obs(lambda r: r.hlen(f"{k}:dead"))
             >= opts.prompts, "gen-a's first commit after the restore")
        recovery_s = time.monotonic() - t_restore
        log(f"gen-a rejoined {rejoin_s:.1f}s after the restore; first commit after {recovery_s:.1f}s")

        # 4. restart Redis once (SIGTERM: AOF flushed; the same dir on start)
        before = done()
        restart_note = None
        if before < opts.prompts:
            redis.stop()
            t_down = time.monotonic()
            wall_down = time.time()
            redis.start()
            obs(lambda r: r.ping())
            after = done()
            check(after >= before, f"Redis lost commits over its restart: {before} -> {after}")

            def committed_since(wall: float) -> bool:
                return obs(lambda r: any(s["hegelion_trace"]["created_at"] > wall
                                         for s in store.newest_sync(r, run_keys, 5)))

            wait(lambda: committed_since(wall_down) or done() >= opts.prompts, "a commit after the Redis restart")
            restart_note = time.monotonic() - t_down
            log(f"restarted Redis at {before} done; commits resumed {restart_note:.1f}s after it went down")
        else:
            check(False, "the run finished before Redis could be restarted: use more prompts")

        # 5. the run finishes
        wait(lambda: watch_takeover() or obs(lambda r: r.exists(f"{k}:finished")), "the run to finish", poll=0.3)
        watch_takeover()
        run_s = time.monotonic() - t0
        for w in workers:
            procs_to_stop.append(w)
            stop(w.proc)  # SIGTERM: drain, then a last flush of each host's JSONL
        stop_codes = [w.proc.returncode for w in workers]

        # 6. the trainer host exports; every file is checked
        trainer = hosts["trainer"]
        export_path = trainer.dir / "export" / f"{RUN}.jsonl"
        cli(trainer, cli_env(trainer, url), "export", "--run", RUN, "--output", str(export_path))
        raw = export_path.read_bytes().splitlines()
        rows = [json.loads(line) for line in raw]
        ids = [row["hegelion_trace"]["prompt_id"] for row in rows]
        dead = obs(lambda r: store.dead_letters_sync(r, run_keys))
        check(len(raw) == len(set(raw)), f"export has {len(raw) - len(set(raw))} duplicate lines")
        check(len(ids) == len(set(ids)), f"export has {len(ids) - len(set(ids))} duplicate prompt ids")
        check(len(set(ids)) + len(dead) == opts.prompts,
              f"export {len(set(ids))} samples + {len(dead)} dead letters != {opts.prompts} prompts")
        check(not set(ids) & set(dead), "a prompt is both committed and dead-lettered")
        check(all(letter.get("reason") for letter in dead.values()), "a dead letter without a reason")
        stream_ids = [row["hegelion_trace"]["stream_id"] for row in rows]
        check(stream_ids == sorted(stream_ids, key=lambda s: tuple(map(int, s.split("-")))), "export is not in order")

        by_host = Counter(row["hegelion_trace"]["host"] for row in rows)
        check(by_host.get("gen-a", 0) > 0 and by_host.get("gen-b", 0) > 0, f"not both hosts did work: {dict(by_host)}")
        host_of = {row["hegelion_trace"]["prompt_id"]: row["hegelion_trace"]["host"] for row in rows}
        rerun_by = Counter(host_of.get(pid, "dead") for pid in in_flight)
        check(set(rerun_by) <= {"gen-b"}, f"gen-a's in-flight jobs ended up {dict(rerun_by)}, want all on gen-b")
        after_restore = sum(1 for row in rows if row["hegelion_trace"]["host"] == "gen-a"
                            and row["hegelion_trace"]["created_at"] > wall_restore)
        during_cut = sum(1 for row in rows if row["hegelion_trace"]["host"] == "gen-a"
                         and wall_cut + 1 < row["hegelion_trace"]["created_at"] < wall_restore)
        check(after_restore > 0, "gen-a committed nothing after its link came back")
        check(during_cut == 0, f"gen-a committed {during_cut} samples while cut off")

        local = {}
        for name in ("gen-a", "gen-b"):
            path = hosts[name].dir / "data" / f"{RUN}.jsonl"
            lines = path.read_bytes().splitlines() if path.exists() else []
            pids = [json.loads(line)["hegelion_trace"]["prompt_id"] for line in lines]
            local[name] = len(lines)
            check(len(pids) == len(set(pids)), f"{name}'s local JSONL has {len(pids) - len(set(pids))} duplicates")
            check(lines == raw[: len(lines)], f"{name}'s local JSONL is not a copy of the run")
            check(len(lines) == len(raw), f"{name}'s local JSONL has {len(lines)} of {len(raw)} lines after its flush")
        for other in ("ctl", "trainer"):  # export wrote where it was told; nothing else appeared
            check(not (hosts[other].dir / "data" / f"{RUN}.jsonl").exists(), f"{other} has a JSONL it should not")

        restarts = {f"{w.host.name}/{w.label}": w.restarts for w in workers if w.restarts}
        report.update(
            prompts=opts.prompts, samples=len(ids), dead=len(dead),
            dead_reasons=dict(Counter(d["reason"] for d in dead.values())),
            per_host=dict(by_host), local_jsonl_lines=local, in_flight_at_cut=len(in_flight),
            rerun_by=dict(rerun_by), takeover_s=taken_over, cut_s=cut_gap, rejoin_s=round(rejoin_s, 2),
            recovery_s=round(recovery_s, 2), gen_a_after_restore=after_restore,
            redis_restart_resume_s=round(restart_note, 2) if restart_note else None,
            worker_restarts=restarts, worker_exit_codes=stop_codes, run_s=round(run_s, 1),
        )
        return report
    finally:
        for w in workers:
            if w.proc:
                stop(w.proc, timeout=10)
        redis.stop()
        obs.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, help="prompts to enqueue (300; --short: 150)")
    ap.add_argument("--cut-seconds", type=float,
                    help="how long gen-a's link is cut (25; --short: 20); more than the teacher timeout (4 s) "
                         "+ margin (2 s) + 10 s lets gen-b re-run gen-a's in-flight jobs while it is away")
    ap.add_argument("--teacher-delay", type=float, default=1.0, help="seconds each fake teacher call takes")
    ap.add_argument("--short", action="store_true", help="the CI form: 150 prompts, a 20 s cut")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, JSONL) even when all passed")
    ap.add_argument("--timeout", type=float, default=300.0, help="give up on the run after this many seconds")
    ap.add_argument("--json", action="store_true", help="print the report as one JSON line at the end")
    a = ap.parse_args(argv)
    opts = Options(prompts=a.prompts or (150 if a.short else 300), teacher_delay=a.teacher_delay, keep=a.keep,
                   cut_seconds=a.cut_seconds or (20.0 if a.short else 25.0), cut_after=0.1 if a.short else 0.2,
                   timeout=a.timeout)

    for name in stale_namespaces():
        sh("ip", "netns", "del", name, check=False)
    net = Network(prefix=f"hqmh{os.getpid()}-")
    base = Path(tempfile.mkdtemp(prefix="hq-multihost-"))
    atexit.register(net.remove)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ok, report = False, None
    try:
        net.build()
        log(f"namespaces {', '.join(net.made)} on {SUBNET}.0/24; work dir {base}")
        report = scenario(net, base, opts)
        ok = not report["violations"]
    except Skip as e:
        print(f"SKIP: {e}", flush=True)
        return EXIT_SKIP
    except Violation as e:
        report = {"violations": [str(e)]}
        log(f"VIOLATION: {e}")
    finally:
        net.remove()
        if ok and not opts.keep and not (report or {}).get("worker_restarts"):
            shutil.rmtree(base, ignore_errors=True)
        else:
            log(f"logs and files kept in {base}")

    if "per_host" in report:
        log(f"per-host samples: {report['per_host']}; local JSONL lines: {report['local_jsonl_lines']}; "
            f"dead letters: {report['dead']} {report['dead_reasons']}")
        log(f"gen-a's {report['in_flight_at_cut']} in-flight jobs re-ran on {report['rerun_by']} "
            f"(committed {report['takeover_s'] and round(report['takeover_s'], 1)}s after the cut); link cut "
            f"{report['cut_s']:.0f}s")
        log(f"recovery: gen-a back {report['rejoin_s']}s after the restore, first commit after {report['recovery_s']}s "
            f"({report['gen_a_after_restore']} samples after it); commits resumed {report['redis_restart_resume_s']}s "
            f"after Redis went down; worker restarts {report['worker_restarts'] or 'none'}; run {report['run_s']}s")
    if a.json:
        print(json.dumps(report), flush=True)
    if report["violations"]:
        log(f"FAILED: {len(report['violations'])} violation(s)")
        return 1
    log("PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
