"""The dashboard (`hegelion-queue serve`): /metrics against redis-cli during a live run, /api/status against
`status --json`, the token on write actions, and a real headless Chromium on / and a run page."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hegelion_queue.ops.dashboard import curves, eval_table, plot

from .conftest import ROOT
from .redis_server import free_port
from .test_generator_e2e import wait_finished, workers  # noqa: F401  (fixture)
from .test_operations import cli

HOSTILE = ("<script>document.body.dataset.pwned='script'</script>"
           "<img src=x onerror=\"document.body.dataset.pwned='img'\">")


# ---------------------------------------------------------------- pure parts


def test_plot_puts_every_curve_on_shared_axes_and_skips_missing_values():
    chart = plot([0, 10, 20, 30], {"loss": [4.0, 2.0, 1.0, 0.5], "val_loss": [None, 3.0, None, 1.0]}, 300, 60)
    loss, val = chart["lines"]
    assert (chart["min"], chart["max"]) == (0.5, 4.0) and val["last"] == 1.0
    assert loss["points"].split()[0] == "0.0,2.0" and loss["points"].split()[-1] == "300.0,58.0"
    assert val["points"].split() == ["100.0,18.0", "300.0,50.0"]  # same x and y scale as loss
    assert plot([0, 1], {"x": [None, float("nan")]}) is None
    log = plot([0, 1, 2], {"lambda": [0.01, 0, 1.0]}, log=True)
    assert len(log["lines"][0]["points"].split()) == 2 and log["min"] == pytest.approx(0.01)


def test_curves_and_eval_table_show_what_is_there():
    rows = [{"step": 1, "loss": 3.0, "S": 0.02, "lambda": 1.0}, {"step": 2, "loss": 2.0, "S": 0.01}]
    assert [c["title"] for c in curves(rows)] == ["loss", "S", "λ"]
    assert curves([{"step": 1, "loss": None}]) == []
    ev = {"held_out": 20, "base": {"ce_nats": 6.0, "format_rate": 0.0}, "adapter": {"ce_nats": 0.9, "extra": 1},
          "ce_ratio": 0.15, "baselines": {"plain": {"ce_nats": 0.8, "adapter_path": "x", "versus": {"ce_ratio": 1.1}}}}
    table = eval_table(ev)  # eval.json's shape (hegelion_queue/training/evaluate.py)
    assert table["columns"] == ["base", "adapter", "plain twin"]
    assert table["rows"] == [("ce_nats", [6.0, 0.9, 0.8]), ("format_rate", [0.0, None, None]),
                             ("extra", [None, 1, None])]
    assert table["scalars"] == {"held_out": 20, "ce_ratio": 0.15}
    assert eval_table({"held_out": 3, "baselines": None})["columns"] == [] and eval_table(None) is None


# ---------------------------------------------------------------- a real server


class Server:
    def __init__(self, env_dir: Path, *args: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.log = env_dir / f"serve-{self.port}.log"
        self.proc = subprocess.Popen([str(ROOT / ".venv" / "bin" / "hegelion-queue"), "serve", "--port", str(self.port),
                                      *args], stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"),
                                     env={**os.environ, **(env or {})})
        self.host = args[args.index("--host") + 1] if "--host" in args else "127.0.0.1"
        self.url = f"http://{self.host}:{self.port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.get("/metrics")
                return
            except (urllib.error.URLError, ConnectionError):
                assert self.proc.poll() is None, self.log.read_text()
                time.sleep(0.1)
        raise AssertionError(f"the dashboard did not answer: {self.log.read_text()}")

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return r.read()

    def post(self, path: str, token: str | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, method="POST",
                                     headers={"Authorization": f"Bearer {token}"} if token is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Every sample of one scrape, keyed by (name, sorted labels)."""
        text = self.get("/metrics").decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def serve(env, tmp_path):
    started: list[Server] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Server:
        started.append(Server(tmp_path, *args, env=env))
        return started[-1]

    yield start
    for s in started:
        s.stop()


def prompts_file(tmp_path: Path, lines: list[str]) -> str:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def redis_cli_dead_by_reason(redis_server, run: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for reason in cli(redis_server, "HVALS", f"hegelion:run:{run}:dead_reasons").splitlines():
        out[reason] = out.get(reason, 0) + 1
    return out


@pytest.mark.e2e
def test_e2e_metrics_equal_redis_cli_during_and_after_a_live_run(
        hq, workers, serve, redis_server, env, tmp_path):  # noqa: F811
    lines = [f"Is plan {i} worth it? Give arguments for and against." for i in range(24)]
    lines += ["Unanswerable one [[fake:invalid]]", "Unanswerable two [[fake:invalid]]"]
    hq("enqueue", "--prompts-file", prompts_file(tmp_path, lines), "--run", "live")
    r = redis_server.client()
    r.hset("hegelion:run:trained:train", mapping={"state": "running", "step": 120, "iters": 300, "loss": 0.75,
                                                   "S": 0.0123, "lambda": 2.5, "tokens_per_s": 812.5})
    r.sadd("hegelion:runs", "trained")
    r.hset("hegelion:run:trained:breaker", mapping={"reason": "LLM not set", "since": time.time(), "errors": 3})
    server = serve(env={"HEGELION_SERVE_TOKEN": "s3cret"})
    workers(2, FAKE_KIMI_DELAY="0.4", HEGELION_MAX_JOBS="2", HEGELION_MAX_TRIES="2")

    # mid-run: the scrape sees jobs in flight and a partial count, from whichever host serves it
    deadline = time.monotonic() + 30
    while True:
        m = server.metrics()
        flying = m.get(("hegelion_run_in_flight", (("run", "live"),)), 0)
        done = m[("hegelion_samples_done_total", (("run", "live"),))]
        if flying >= 1 and 0 < done < 24:
            break
        assert time.monotonic() < deadline, f"never saw the run mid-way: {flying} in flight, {done} done"
        time.sleep(0.1)
    assert m[("hegelion_workers", (("host", os.uname().nodename), ("kind", "generator")))] == 2
    assert m[("hegelion_run_finished", (("run", "live"),))] == 0

    wait_finished(r, "live", timeout=60)
    time.sleep(1.5)  # heartbeats publish within a second
    m = server.metrics()
    run = (("run", "live"),)
    assert m[("hegelion_up", ())] == 1
    assert m[("hegelion_samples_done_total", run)] == int(cli(redis_server, "SCARD", "hegelion:run:live:done")) == 24
    assert m[("hegelion_prompts_enqueued_total", run)] == int(cli(redis_server, "SCARD", "hegelion:run:live:enqueued"))
    dead = {k[1][0][1]: v for k, v in m.items() if k[0] == "hegelion_dead_letters_total" and k[1][1] == ("run", "live")}
    assert dead == redis_cli_dead_by_reason(redis_server, "live") == {"invalid_answer": 2}
    stats = "hegelion:run:live:stats"
    assert m[("hegelion_retries_total", run)] == int(cli(redis_server, "HGET", stats, "retries")) == 2
    assert m[("hegelion_teacher_seconds_total", run)] == pytest.approx(
        float(cli(redis_server, "HGET", stats, "teacher_seconds")), abs=0.05)
    assert m[("hegelion_teacher_tokens_total", (("kind", "output"), ("run", "live")))] == float(
        cli(redis_server, "HGET", stats, "usage_output")) > 0
    depth = {k[1][1][1]: v for k, v in m.items()
             if k[0] == "hegelion_queue_jobs" and k[1][0] == ("queue", "hegelion:queue")}
    assert depth["due"] + depth["deferred"] == int(cli(redis_server, "ZCARD", "hegelion:queue"))
    beats = cli(redis_server, "--scan", "--pattern", "hegelion:worker:*").splitlines()
    assert sum(v for k, v in m.items() if k[0] == "hegelion_workers") == len(beats) == 2
    assert m[("hegelion_run_in_flight", run)] == 0 and m[("hegelion_run_finished", run)] == 1
    trained = (("run", "trained"),)
    breaker = int(cli(redis_server, "EXISTS", "hegelion:run:trained:breaker"))
    assert m[("hegelion_breaker_open", trained)] == breaker == 1
    assert m[("hegelion_breaker_open", run)] == 0
    for name, field in (("hegelion_train_step", "step"), ("hegelion_train_s", "S"), ("hegelion_train_lambda", "lambda"),
                        ("hegelion_train_loss", "loss")):
        assert m[(name, trained)] == float(cli(redis_server, "HGET", "hegelion:run:trained:train", field))

    # /api/status is `status --json` (rates and ETA may move on a minute boundary between the two calls)
    volatile = ("per_minute", "samples_per_min_5m", "samples_per_min_60m", "eta_s")
    api = orjson.loads(server.get("/api/status?run=live"))
    st = orjson.loads(hq("status", "--run", "live", "--json").stdout)
    assert {k: v for k, v in api.items() if k not in volatile} == {k: v for k, v in st.items() if k not in volatile}
    assert set(api) == set(st) and len(api["per_minute"]) == 60

    # the write actions, with the token only
    assert server.post("/runs/live/retry-failed")[0] == 401
    assert server.post("/runs/live/retry-failed", "wrong")[0] == 401
    assert r.hlen("hegelion:run:live:dead") == 2
    code, body = server.post("/runs/trained/resume", "s3cret")
    assert code == 200 and orjson.loads(body)["action"] == "resume" and not r.exists("hegelion:run:trained:breaker")
    assert server.metrics()[("hegelion_breaker_open", trained)] == 0
    code, body = server.post("/runs/live/retry-failed", "s3cret")
    assert code == 200 and orjson.loads(body)["enqueued"] == 2
    deadline = time.monotonic() + 30  # the workers take them again: two more invalid answers, dead again
    while r.hlen("hegelion:run:live:dead") < 2 or r.zcard("hegelion:queue"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert int(r.hget("hegelion:run:live:stats", "retries")) == 4


@pytest.mark.e2e
def test_e2e_serve_binds_loopback_and_is_read_only_without_a_token(hq, serve, redis_server, env):
    server = serve()
    assert f"Uvicorn running on http://127.0.0.1:{server.port}" in server.log.read_text()
    code, body = server.post("/runs/anything/resume", "guess")
    assert code == 403 and b"read-only" in body
    assert server.post("/runs/anything/retry-failed")[0] == 403
    page = server.get("/").decode()
    assert "No runs yet" in page and "data-action" not in page
    with pytest.raises(urllib.error.HTTPError) as e:
        server.get("/runs/bad%20name")
    assert e.value.code == 400 and b"run name" in e.value.read()
    headers = urllib.request.urlopen(server.url + "/").headers
    assert "script-src 'self'" in headers["Content-Security-Policy"]


def status_for_host(server: Server, host: str | None, method: str = "GET", path: str = "/") -> int:
    """The status of a request to the server with this Host header (None: no Host header at all)."""
    import http.client

    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True)
        if host is not None:
            conn.putheader("Host", host)
        conn.endheaders()
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.mark.e2e
def test_e2e_serve_answers_only_requests_addressed_to_it(serve, env):
    """DNS rebinding: a page on evil.example that points its name at this address sends Host: evil.example."""
    server = serve("--host", "127.0.0.2", env={"HEGELION_SERVE_HOSTS": "dash.internal, Metrics.Example:9000",
                                                "HEGELION_SERVE_TOKEN": "s3cret"})
    p = server.port
    for host in ("127.0.0.2", f"127.0.0.2:{p}", "localhost", f"localhost:{p}", f"LOCALHOST:{p}", "127.0.0.1",
                 f"127.0.0.1:{p}", "[::1]", f"[::1]:{p}", "dash.internal", "dash.internal:8080", "metrics.example"):
        assert status_for_host(server, host) == 200, host
    for host in ("evil.example", f"evil.example:{p}", f"127.0.0.2.evil.example:{p}", "localhost.evil.example",
                 "dash.internal.evil.example", "[::2]", "", None):
        for method, path in (("GET", "/"), ("GET", "/api/status"), ("GET", "/metrics"), ("GET", "/runs/x"),
                             ("GET", "/static/dashboard.js"), ("POST", "/runs/x/resume")):
            assert status_for_host(server, host, method, path) == 400, (host, method, path)


@pytest.mark.e2e
def test_e2e_the_token_comes_from_the_environment_or_a_private_file_never_the_command_line(hq, serve, env,
                                                                                              tmp_path):
    helped = hq("serve", "--help").stdout
    assert "--token-file" in helped and "HEGELION_SERVE_TOKEN" in helped and "/proc" in helped
    assert "--token " not in helped.replace("--token-file", "")
    on_argv = hq("serve", "--token", "s3cret", check=False)
    assert on_argv.returncode == 2 and "No such option" in on_argv.stderr

    token = tmp_path / "token"
    token.write_text("f1le-t0ken\n")
    token.chmod(0o644)
    shared = hq("serve", "--token-file", str(token), check=False)
    assert shared.returncode == 1 and shared.stderr.count("\n") == 1 and f"chmod 600 {token}" in shared.stderr
    token.chmod(0o600)
    server = serve("--token-file", str(token))
    assert server.post("/runs/t/retry-failed", "s3cret")[0] == 401
    assert server.post("/runs/t/retry-failed", "f1le-t0ken")[0] == 200
    from_env = serve(env={"HEGELION_SERVE_TOKEN": "env-t0ken"})
    assert from_env.post("/runs/t/retry-failed", "env-t0ken")[0] == 200


# ---------------------------------------------------------------- a real browser


def chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("Chromium is not installed (apt-get install chromium chromium-driver; CI's .ci/run does it): "
                    f"chromium={browser}, chromedriver={driver}")
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("selenium is not installed: pip install -e '.[dev]'")
    return browser, driver


@pytest.fixture
def browser(tmp_path):
    binary, driver_path = chromium()
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1300,1000"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.mark.e2e
@pytest.mark.browser
def test_e2e_browser_shows_the_fleet_live_and_runs_no_injected_script(
        hq, workers, serve, browser, redis_server, env, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    lines = [f"Should city {i} build more bike lanes?" for i in range(9)]  # 10 samples: the page shows them all
    lines += [f"{HOSTILE} Is this shown as text?", f"{HOSTILE} and a dead one [[fake:invalid]]"]
    hq("enqueue", "--prompts-file", prompts_file(tmp_path, lines), "--run", "web")
    server = serve()
    workers(1, FAKE_KIMI_DELAY="0.5", HEGELION_MAX_JOBS="1", HEGELION_MAX_TRIES="1")
    r = redis_server.client()
    wait = WebDriverWait(browser, 30, poll_frequency=0.1)

    browser.get(server.url + "/?refresh=1")

    def row() -> dict:
        """The run's row, read in one script: the page swaps its fragment every second, so an element found
        by one WebDriver call may be gone by the next."""
        return browser.execute_script("""
            const tr = document.querySelector('tr.run[data-run="web"]');
            const p = tr.querySelector('progress');
            return {done: Number(tr.querySelector('.done').textContent), max: p.getAttribute('max'),
                    value: p.getAttribute('value'), text: tr.textContent,
                    reasons: tr.querySelector('.reasons').textContent.replace(/\\s+/g, ' '),
                    workers: document.querySelectorAll('#workers tr.worker').length};""")

    first = row()
    assert first["done"] < 11, "the run finished before the page loaded: the live check would prove nothing"
    assert first["max"] == "11"
    # the page refreshes itself: a later count, with no reload (the first page load's marker survives)
    browser.execute_script("window.loadedOnce = true")
    wait.until(lambda d: row()["done"] > first["done"])
    assert browser.execute_script("return window.loadedOnce") is True
    assert row()["workers"] >= 1, "no live worker shown"
    wait_finished(r, "web", timeout=60)
    wait.until(lambda d: "finished" in row()["text"])
    last = row()
    assert last["value"] == "11" and "invalid_answer 1" in last["reasons"], last
    browser.save_screenshot(str(tmp_path / "dashboard.png"))

    browser.get(server.url + "/runs/web")
    samples = browser.find_elements(By.CSS_SELECTOR, "#samples article.sample")
    assert len(samples) == 10
    assert all(s.find_element(By.CSS_SELECTOR, ".synthesis").text.startswith("A good answer") for s in samples)
    hostile = [s for s in samples if "Is this shown as text?" in s.find_element(By.CSS_SELECTOR, ".prompt").text]
    assert hostile, "the hostile prompt's sample is not among the newest"
    assert HOSTILE in hostile[0].find_element(By.CSS_SELECTOR, ".prompt").text  # shown as text, tags and all
    letter = browser.find_element(By.CSS_SELECTOR, "#dead article.letter")
    assert letter.find_element(By.CSS_SELECTOR, ".reason").text == "invalid_answer"
    assert HOSTILE in letter.find_element(By.CSS_SELECTOR, ".prompt").text
    letter.find_element(By.TAG_NAME, "summary").click()
    assert "short answer without any structure" in letter.find_element(By.CSS_SELECTOR, "pre.raw").text
    assert browser.find_elements(By.CSS_SELECTOR, "main script, main img") == []
    time.sleep(0.5)  # an onerror handler would have fired by now
    assert browser.execute_script("return document.body.dataset.pwned") is None
    for url in ("/", "/runs/web"):
        browser.get(server.url + url)
        assert browser.execute_script("return document.body.dataset.pwned") is None
