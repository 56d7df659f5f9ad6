"""`make bench`: every figure is a ratio of two things measured in the same run, on the same private Redis (the
dashboard's are absolute times and sizes, as its targets are).

    python -m bench.run            # the full benchmark (about 10 minutes), writes artifacts/bench/results.json
    python -m bench.run --smoke    # tiny sizes, to keep the harness working (CI); no targets are judged
    python -m bench.run --real-size  # LoRA cost of make run's default model here (bench/real_size.py), ~10 min

Each figure is measured `--reps` times (min / median / max). See the README's "Performance" section.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import orjson

from bench.figure import HQ, Figure
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "artifacts" / "bench"


def _vm_hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)
    except OSError:  # exited meanwhile
        return 0


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path):
        self.args, self.tmp = args, tmp
        self.redis = RedisServer(tmp / "redis")
        self.redis.start()
        self.teacher = self._build_teacher()
        self.answer = tmp / "answer.txt"
        self.answer.write_text(subprocess.run([str(self.teacher), "0"], input=b"", capture_output=True).stdout.decode())

    def _build_teacher(self) -> Path:
        out = self.tmp / "fake_teacher"
        src = ROOT / "bench" / "fake_teacher.c"
        for flags in (["-static"], []):
            if subprocess.run(["gcc", "-O2", *flags, "-o", str(out), str(src)], capture_output=True).returncode == 0:
                return out
        raise SystemExit("bench needs gcc to build bench/fake_teacher.c")

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "HEGELION_REDIS_URL": self.redis.url, "HEGELION_DATA_DIR": str(self.tmp / "data"),
                "HEGELION_AUTO_TRAIN": "0", "HEGELION_TEACHER": "command", "HEGELION_POLL_DELAY": "0.05",
                "HEGELION_DRAIN_SECONDS": "1", "HF_HUB_OFFLINE": "1",
                "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}

    def flush(self) -> None:
        self.redis.client().flushall()
        shutil.rmtree(self.tmp / "data", ignore_errors=True)

    # ------------------------------------------------------------ 1. enqueue

    def parquet(self, rows: int) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self.tmp / f"prompts-{rows}.parquet"
        if not path.exists():
            rng = random.Random(rows)
            words = ("the of and to in is that for it as with was on be by this are at from or an which have not "
                     "explain compare argue why how should would could describe evaluate").split()
            # lengths like ultrafeedback's prompts: mostly a few hundred characters, a long tail to 8,000
            texts = [" ".join(rng.choice(words) for _ in range(min(1500, int(rng.lognormvariate(4.3, 0.9)) + 5)))
                     + f" (#{i})" for i in range(rows)]
            pq.write_table(pa.table({"prompt": texts}), path)
        return path

    def run_timed(self, cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
        """Wall seconds and peak RSS (KiB) of a whole process. The peak is the child's own high-water mark (VmHWM),
        read until it exits: wait4's ru_maxrss would report at least this bench's own RSS, which Linux carries
        into a child spawned from it."""
        t0 = time.perf_counter()
        with tempfile.TemporaryFile() as err:  # a file, not a pipe: a chatty child cannot block on it
            p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
            peak = 0
            while p.poll() is None:
                peak = max(peak, _vm_hwm_kib(p.pid))
                time.sleep(0.01)
            wall = time.perf_counter() - t0
            if p.returncode != 0:
                err.seek(0)
                raise RuntimeError(f"{' '.join(cmd)} failed: {err.read().decode()[-2000:]}")
        return wall, peak

    def fig_enqueue(self) -> list[Figure]:
        n = self.args.enqueue_n
        data = self.parquet(n)
        ratio = Figure("enqueue: hegelion-queue enqueue vs arq enqueue_job one by one (prompts/s)", "x", ">= 40")
        rss = Figure("enqueue: producer peak RSS, 60,000-row parquet", "MB", "< 500")
        env = self.env()
        for _ in range(self.args.reps):
            self.flush()
            ours, _ = self.run_timed([*HQ, "enqueue", "--dataset", str(data), "--limit", str(n), "--run", "b"], env)
            self.flush()
            base, _ = self.run_timed([sys.executable, "-m", "bench.arq_enqueue", str(data), str(n)], env)
            ratio.values.append(base / ours)
            ratio.detail.append({"ours_s": ours, "arq_s": base, "ours_per_s": n / ours, "arq_per_s": n / base})
        big = self.parquet(self.args.rss_n)
        for _ in range(self.args.reps):
            self.flush()
            _, kib = self.run_timed([*HQ, "enqueue", "--dataset", str(big), "--run", "rss"], env)
            rss.values.append(kib / 1024)
        ratio.met = statistics.median(ratio.values) >= 40
        rss.met = max(rss.values) < 500
        return [ratio, rss]

    # ------------------------------------------------------------ generator runs

    def generate(self, n: int, workers: int, max_jobs: int, teacher_cmd: str, settings_path: str = "",
                 **teacher: str) -> dict:
        """Enqueue n prompts, start workers, wait for the last commit: wall seconds from the workers' start.
        `teacher`: settings of another teacher than the command preset."""
        from hegelion_queue.queue.runner import WorkerGroup

        self.flush()
        env = self.env(HEGELION_TEACHER_CMD=teacher_cmd, HEGELION_MAX_JOBS=str(max_jobs), **teacher)
        prompts = self.tmp / f"p{n}.txt"
        prompts.write_text("".join(f"Benchmark prompt {i}: is it worth it?\n" for i in range(n)))
        subprocess.run([*HQ, "enqueue", "--prompts-file", str(prompts), "--run", "g"], env=env, check=True,
                       capture_output=True)
        r = self.redis.client()
        group = WorkerGroup(workers, settings_path or "workers.generator.WorkerSettings", env=env,
                            log_dir=self.tmp / "logs")
        t0_wall = time.time()
        group.start()
        try:
            while r.scard("hegelion:run:g:done") + r.hlen("hegelion:run:g:dead") < n:
                if group.alive() == 0:
                    raise RuntimeError(f"workers exited; see {self.tmp / 'logs'}")
                time.sleep(0.05)
        finally:
            group.stop(timeout=30)
        last_ms = int(r.xrevrange("hegelion:run:g:results", count=1)[0][0].split(b"-")[0])
        return {"wall_s": last_ms / 1000 - t0_wall, "dead": r.hlen("hegelion:run:g:dead")}

    def fig_pipeline(self) -> Figure:
        n, lat, w, j = self.args.pipeline_n, self.args.latency, 2, 32
        f = Figure(f"pipeline efficiency: {n} prompts, {lat:g} s teacher, {w} workers x {j} jobs (ideal/wall)",
                   "", ">= 0.95")
        for _ in range(self.args.reps):
            res = self.generate(n, w, j, f"{self.teacher} {lat}")
            ideal = n * lat / (w * j)
            f.values.append(ideal / res["wall_s"])
            f.detail.append({**res, "ideal_s": ideal})
        f.met = statistics.median(f.values) >= 0.95
        return f

    def raw_arq(self, n: int, workers: int, max_jobs: int) -> float:
        """Stock arq, each job spawning `true`: jobs/s from the workers' start to the last job's end."""
        from hegelion_queue.queue.runner import WorkerGroup

        self.flush()
        env = self.env(BENCH_MAX_JOBS=str(max_jobs))
        subprocess.run([sys.executable, "-m", "bench.raw_arq", "enqueue", str(n)], env=env, check=True)
        r = self.redis.client()
        group = WorkerGroup(workers, "bench.raw_arq.WorkerSettings", env=env, log_dir=self.tmp / "logs-raw")
        t0 = time.time()
        group.start()
        try:
            while int(r.get("bench:raw:done") or 0) < n:
                if group.alive() == 0:
                    raise RuntimeError("raw arq workers exited")
                time.sleep(0.05)
        finally:
            group.stop(timeout=30)
        return n / (float(r.get("bench:raw:last")) - t0)

    def fig_overhead(self) -> Figure:
        n, w, j = self.args.overhead_n, 2, 32
        f = Figure(f"per-job overhead: {n} jobs, instant teacher (cat) vs raw arq jobs spawning `true` (jobs/s)",
                   "x", ">= 0.65")
        for _ in range(self.args.reps):
            ours = n / self.generate(n, w, j, f"cat {self.answer}")["wall_s"]
            raw = self.raw_arq(n, w, j)
            f.values.append(ours / raw)
            f.detail.append({"ours_jobs_per_s": ours, "raw_jobs_per_s": raw})
        f.met = statistics.median(f.values) >= 0.65
        return f

    def fig_old_way(self) -> Figure:
        lat, seq_n, q_n = self.args.latency / 2, self.args.old_seq_n, self.args.old_queue_n
        f = Figure(f"against the old way: sequential spawn-wait-append vs the queue with 16 in flight "
                   f"({lat:g} s teacher, samples/min)", "x", ">= 14")
        for _ in range(self.args.reps):
            out = self.tmp / "old.jsonl"
            t0 = time.perf_counter()
            with open(out, "w") as fh:
                for i in range(seq_n):  # what the old generator did
                    p = subprocess.run([str(self.teacher), str(lat)], input=f"prompt {i}".encode(), capture_output=True)
                    fh.write(orjson.dumps({"i": i, "output": p.stdout.decode()}).decode() + "\n")
                    fh.flush()
            seq_rate = seq_n / (time.perf_counter() - t0)
            q_rate = q_n / self.generate(q_n, 1, 16, f"{self.teacher} {lat}")["wall_s"]
            f.values.append(q_rate / seq_rate)
            f.detail.append({"sequential_per_min": seq_rate * 60, "queue_per_min": q_rate * 60})
        f.met = statistics.median(f.values) >= 14
        return f

    def fig_memory(self) -> Figure:
        from hegelion_queue.queue.runner import WorkerGroup

        first, second = self.args.mem_first, self.args.mem_second
        f = Figure(f"memory: worker RSS growth from {first} to {second} instant jobs", "MB", "< 10")
        for _ in range(self.args.reps):
            self.flush()
            env = self.env(HEGELION_TEACHER_CMD=f"cat {self.answer}", HEGELION_MAX_JOBS="32")
            prompts = self.tmp / "mem.txt"
            prompts.write_text("".join(f"Memory prompt {i}\n" for i in range(second)))
            subprocess.run([*HQ, "enqueue", "--prompts-file", str(prompts), "--run", "g"], env=env, check=True,
                           capture_output=True)
            r = self.redis.client()
            group = WorkerGroup(1, env=env, log_dir=self.tmp / "logs-mem")
            group.start()
            rss = {}
            try:
                for mark in (first, second):
                    while r.scard("hegelion:run:g:done") < mark:
                        time.sleep(0.02)
                    rss[mark] = vm_rss_mb(group.procs[0].pid)
            finally:
                group.stop(timeout=30)
            f.values.append(rss[second] - rss[first])
            f.detail.append({"rss_mb": rss})
        f.met = max(f.values) < 10
        return f

    # ------------------------------------------------------------ 5. trainer

    def fig_trainer(self) -> list[Figure]:
        try:
            from bench.train_step import blas_ratio, eval_seconds_per_prompt, step_ratio
            from hegelion_queue.training.blas import openblas_path
        except ImportError as e:
            return [Figure(f"trainer: SCU step vs plain LoRA step (skipped: {e})", "x", "<= 1.05")]
        f = Figure("trainer: median SCU training step / plain mlx-lm LoRA step, tiny model, paired", "x", "<= 1.05")
        blas = Figure("trainer: tokens/s with OpenBLAS preloaded / the wheel's BLAS", "x", "report (> 1: use it)")
        for _ in range(self.args.reps):
            ratio, detail = step_ratio(self.tmp / "tiny", steps=self.args.train_steps)
            f.values.append(ratio)
            f.detail.append(detail)
            ratio, detail = blas_ratio(self.tmp / "tiny", openblas_path(), steps=self.args.train_steps)
            if ratio is None:
                blas.name += f" ({detail['openblas']})"
                break
            blas.values.append(ratio)
            blas.detail.append(detail)
        f.met = statistics.median(f.values) <= 1.05
        ev = Figure(f"trainer: eval time per held-out prompt, tiny model, base + adapter ({self.args.eval_prompts} "
                    "prompts: load, held-out CE, greedy generation)", "s", "report")
        seconds, detail = eval_seconds_per_prompt(self.tmp / "tiny", self.args.train_steps, self.args.eval_prompts)
        ev.values.append(seconds)
        ev.detail.append(detail)
        return [f, blas, ev]


    # ------------------------------------------------------------ 6. the dashboard

    def fig_dashboard(self) -> list[Figure]:
        from bench.fleet import populate
        from tests.redis_server import free_port

        runs, workers, n = self.args.dash_runs, self.args.dash_workers, self.args.dash_requests
        scrape = Figure(f"dashboard: /metrics scrape, {runs} runs, {workers} workers' heartbeats (per request)", "ms",
                        "< 50")
        page = Figure(f"dashboard: / render, {runs} runs, {workers} workers' heartbeats (per request)", "ms", "< 200")
        rss = Figure("dashboard: server peak RSS after the requests", "MB", "< 120")
        self.flush()
        populate(self.redis.client(), runs, workers)
        port = free_port()
        server = subprocess.Popen([*HQ, "serve", "--port", str(port)], env=self.env(), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_http(base + "/metrics", server)
            for path, fig in (("/metrics", scrape), ("/", page)):
                for i in range(n + 3):  # three warm-ups: templates compiled, scripts loaded
                    t0 = time.perf_counter()
                    body = http_get(base + path)
                    if i >= 3:
                        fig.values.append((time.perf_counter() - t0) * 1000)
                fig.detail.append({"bytes": len(body)})
            rss.values.append(vm_rss_mb(server.pid, "VmHWM"))
        finally:
            server.terminate()
            server.wait(10)
        scrape.met = statistics.median(scrape.values) < 50
        page.met = statistics.median(page.values) < 200
        rss.met = max(rss.values) < 120
        return [scrape, page, rss]

    # ------------------------------------------------------------ 7. the dataset as a product

    def fig_hf_export(self) -> list[Figure]:
        n = self.args.hf_n
        wall = Figure(f"export --format hf: {n:,} samples of ~5 KB, parquet + card + quality report (wall)", "s", "< 30")
        rss = Figure(f"export --format hf: peak RSS, {n:,} samples", "MB", "< 500")
        self.flush()
        env = self.env()
        subprocess.run([sys.executable, "-m", "bench.hf_export", "hf", str(n)], env=env, check=True)
        for rep in range(self.args.reps):
            out = self.tmp / f"hf-{rep}"
            seconds, kib = self.run_timed([*HQ, "export", "--format", "hf", str(out), "--run", "hf"], env)
            wall.values.append(seconds)
            rss.values.append(kib / 1024)
            size = sum(p.stat().st_size for p in (out / "data").iterdir())
            wall.detail.append({"parquet_bytes": size, "shards": len(list((out / "data").iterdir())),
                                "samples_per_s": n / seconds})
            shutil.rmtree(out)
        wall.met = statistics.median(wall.values) < 30
        rss.met = max(rss.values) < 500
        return [wall, rss]

    # ------------------------------------------------------------ 8. the real kimi-cli

    def fig_kimi(self) -> list[Figure]:
        from bench.kimi_cost import kimi_bin, marginal, measure

        n = self.args.kimi_n
        wire = Figure(f"kimi CPU per sample: wire / print mode, real kimi-cli, instant local server (marginal over "
                      f"{n} print / {10 * n} wire prompts; start-up excluded)", "x", "<= 0.05")
        agent = Figure(f"kimi --print wall per call: project's bare agent / kimi's default agent ({n} prompts)",
                       "x", "report")
        why = ("skipped in --smoke: minutes of real kimi start-ups, noisy at smoke sizes" if self.args.smoke else
               "skipped: kimi-cli not installed: make kimi-legacy" if kimi_bin() is None else None)
        if why:
            wire.name += f" ({why})"
            agent.name += f" ({why})"
            return [wire, agent]
        for _ in range(self.args.reps):
            w, p = marginal("wire", 10 * n), marginal("print", n)  # a wire prompt costs ~1% of a print one
            wire.values.append(w["cpu_s_per_prompt"] / p["cpu_s_per_prompt"])
            wire.detail.append({"wire": w, "print": p})
            bare, default = measure("bare-agent", n), measure("default-agent", n)
            agent.values.append(bare["wall_s_per_prompt"] / default["wall_s_per_prompt"])
            agent.detail.append({"bare_agent": bare, "default_agent": default})
        wire.met = statistics.median(wire.values) <= 0.05
        return [wire, agent]


def http_get(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            http_get(url)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer") from None
            time.sleep(0.1)


def vm_rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("arq", "redis", "hiredis", "orjson", "pyarrow", "datasets", "mlx", "mlx-lm"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    out["redis-server"] = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
    return out


def table(figures: list[Figure]) -> str:
    rows = ["| figure | min | median | max | target | met |", "| --- | --- | --- | --- | --- | --- |"]
    for f in figures:
        s = f.summary()
        fmt = (lambda v: f"{v:.3g}{f.unit}") if s else (lambda v: "")
        met = "n/a" if f.met is None else ("yes" if f.met else "**no**")
        rows.append(f"| {f.name} | {fmt(s.get('min'))} | {fmt(s.get('median'))} | {fmt(s.get('max'))} | "
                    f"{f.target} | {met} |")
    return "\n".join(rows)


SIZES = {  # full, smoke
    "enqueue_n": (50_000, 2_000), "rss_n": (60_000, 3_000), "pipeline_n": (2_560, 64), "latency": (1.0, 0.2),
    "overhead_n": (2_000, 100), "old_seq_n": (12, 3), "old_queue_n": (320, 32), "mem_first": (1_000, 50),
    "mem_second": (10_000, 200), "train_steps": (30, 6), "eval_prompts": (20, 4), "kimi_n": (10, 2), "reps": (3, 1),
    "dash_runs": (100, 10), "dash_workers": (50, 5), "dash_requests": (30, 5), "hf_n": (100_000, 300),
    "acp_slots": (64, 8), "wire_slots": (8, 2), "cpu_n": (40, 4), "acp_pipeline_n": (1280, 64),
    "decon_n": (100_000, 300), "decon_questions": (50_000, 500),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repetition, targets not judged")
    p.add_argument("--only", nargs="*", default=None,
                   help="figures to run: enqueue pipeline overhead old_way memory trainer dashboard hf_export "
                        "decontaminate kimi teachers")
    for k, (full, _) in SIZES.items():
        p.add_argument(f"--{k.replace('_', '-')}", type=type(full), default=None)
    p.add_argument("--real-size", action="store_true", help="only the real-size training figures: LoRA on a model "
                   "with DeepSeek-R1-Distill-Qwen-1.5B's architecture (bench/real_size.py; ~10 min, ~15 GB RAM)")
    p.add_argument("--real-steps", type=int, default=5, help="timed steps of --real-size after the compiling first "
                   "(5: the trainer's own ETA, measured over steps 2-5, is reported too)")
    from bench import decontaminate, scale, teachers

    scale.sizes(p.add_argument)
    args = p.parse_args(argv)
    for k, (full, smoke) in SIZES.items():
        if getattr(args, k) is None:
            setattr(args, k, smoke if args.smoke else full)
    tmp = Path(tempfile.mkdtemp(prefix="hegelion-bench-"))
    bench = Bench(args, tmp)
    runs: dict[str, Callable[[], list[Figure] | Figure | None]] = {
        "enqueue": bench.fig_enqueue, "pipeline": bench.fig_pipeline, "overhead": bench.fig_overhead,
        "old_way": bench.fig_old_way, "memory": bench.fig_memory, "trainer": bench.fig_trainer,
        "dashboard": bench.fig_dashboard, "hf_export": bench.fig_hf_export,
        "decontaminate": lambda: decontaminate.figures(bench), "kimi": bench.fig_kimi,
        "teachers": lambda: teachers.figures(bench),
    }
    if args.scale:  # only the scale figures (see bench/scale.py)
        runs = {"scale": lambda: scale.figures(bench)}
    if args.real_size:  # only the real-size training figures (see bench/real_size.py)
        from bench import real_size

        runs = {"real_size": lambda: real_size.figures(bench)}
    figures: list[Figure] = []
    try:
        for name, fn in runs.items():
            if args.only is not None and name not in args.only:
                continue
            t0 = time.monotonic()
            got = fn()
            for fig in got if isinstance(got, list) else [got] if got else []:
                if args.smoke:
                    fig.met = None
                figures.append(fig)
            print(f"[{name}: {time.monotonic() - t0:.0f}s]", file=sys.stderr)
    finally:
        bench.redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "versions": versions()},
        "smoke": args.smoke, "sizes": {k: getattr(args, k) for k in SIZES},
        "figures": [{**asdict(f), **f.summary()} for f in figures],
    }
    OUT.mkdir(parents=True, exist_ok=True)
    name = ("real_size.json" if args.real_size else "scale.json" if args.scale else "smoke.json" if args.smoke
            else "results.json")
    (OUT / name).write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    print(table(figures))
    print(f"\nwritten to {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
