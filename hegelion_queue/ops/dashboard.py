"""`hegelion-queue serve`: the fleet in a browser, `/metrics` for Prometheus and `/api/status`, read from Redis.

Handlers are thin: what a page shows comes from `status.py` and `store.py`, the functions `status`, `tail` and
`export` use, and every piece of teacher output is escaped by Jinja2's autoescape (a Content-Security-Policy
that allows only this server's own script is a second fence). Write actions (resume a paused run, retry its
dead letters) exist only when a token is configured, and need it as `Authorization: Bearer <token>`. Every request
must name this server in its Host header (loopback names, the bound address, HEGELION_SERVE_HOSTS): a page on
another site that rebinds its DNS name to this address gets 400, not the run's data.
"""

from __future__ import annotations

import hmac
import logging
import math
import stat
import time
from collections import Counter
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

import orjson
from jinja2 import Environment, PackageLoader
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import keys
from ..jobs import producer
from ..queue import status, store
from ..errors import HegelionError
from ..keys import RunKeys
from .metrics import exposition
from ..settings import Settings

logger = logging.getLogger("hegelion.dashboard")

SAMPLES_SHOWN = 10
LETTERS_SHOWN = 50
REFRESH_S = 5.0
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


# ---------------------------------------------------------------- what the templates draw (pure)


def _finite(xs: Sequence[float], ys: Sequence[Any], log: bool) -> list[tuple[float, float]]:
    return [(x, math.log10(y) if log else y) for x, y in zip(xs, ys)
            if isinstance(y, (int, float)) and not isinstance(y, bool) and math.isfinite(y) and (y > 0 or not log)]


def plot(xs: Sequence[float], lines: dict[str, Sequence[Any]], width: float = 300, height: float = 60,
         log: bool = False) -> dict[str, Any] | None:
    """SVG polyline points of one or more curves on shared axes, with the y range and each curve's last value.
    Missing values (None) and, on a log scale, non-positive ones are left out; None when nothing is left."""
    found = {name: pts for name, ys in lines.items() if (pts := _finite(xs, ys, log))}
    if not found:
        return None
    every = [p for pts in found.values() for p in pts]
    x0, x1 = min(p[0] for p in every), max(p[0] for p in every)
    y0, y1 = min(p[1] for p in every), max(p[1] for p in every)
    sx = width / (x1 - x0) if x1 > x0 else 0
    sy = (height - 4) / (y1 - y0) if y1 > y0 else 0
    value = (lambda v: 10 ** v) if log else (lambda v: v)
    return {
        "lines": [{"name": name, "last": value(pts[-1][1]),
                   "points": " ".join(f"{(x - x0) * sx:.1f},{height - 2 - (y - y0) * sy:.1f}" for x, y in pts)}
                  for name, pts in found.items()],
        "min": value(y0), "max": value(y1), "width": width, "height": height, "log": log,
    }


def curves(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The training curves by step (loss with val_loss, S, λ on a log scale) from the run's metric rows."""
    steps = [r["step"] if isinstance(r.get("step"), (int, float)) else i for i, r in enumerate(rows)]
    charts = [(title, plot(steps, {f: [r.get(f) for r in rows] for f in fields}, log=log))
              for title, fields, log in (("loss", ("loss", "val_loss"), False), ("S", ("S",), False),
                                         ("λ", ("lambda",), True))]
    return [{"title": title, **chart} for title, chart in charts if chart]


def eval_table(ev: dict[str, Any] | None) -> dict[str, Any] | None:
    """The eval object as a table: one column per model measured (base, adapter, baselines), one row per
    measure any of them has, and the scalar figures (held_out, ce_ratio, …). Missing keys are not shown."""
    if not isinstance(ev, dict):
        return None
    twins = ("baseline", "baselines")  # name -> figures of a twin adapter (train --baseline plain)
    columns = [(k, v) for k, v in ev.items() if isinstance(v, dict) and k not in twins]
    for key in twins:
        if isinstance(ev.get(key), dict):
            columns += [(f"{k} twin", v) for k, v in ev[key].items() if isinstance(v, dict)]
    measures: list[str] = []
    for _, v in columns:
        measures += [k for k in v if k not in measures and not isinstance(v[k], (dict, list, str))]
    scalars = {k: v for k, v in ev.items() if isinstance(v, (int, float, str, bool))}
    return {"columns": [c for c, _ in columns], "scalars": scalars,
            "rows": [(m, [v.get(m) for _, v in columns]) for m in measures]}


def fmt(v: Any) -> str:
    """A number as people read it; anything else as text."""
    if isinstance(v, bool) or v is None:
        return {True: "yes", False: "no", None: "—"}[v]
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    return str(v)


def per_run(job_ids: list[str]) -> list[tuple[str, int]]:
    """A worker's running job ids (`<run>:<prompt id>`) as (run, how many)."""
    return sorted(Counter(keys.job_run(j) for j in job_ids).items())


def by_host(workers: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    hosts: dict[str, list[dict[str, Any]]] = {}
    for w in workers:
        hosts.setdefault(w["host"], []).append(w)
    return sorted(hosts.items())


# ---------------------------------------------------------------- the app


LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
WILDCARDS = frozenset({"", "0.0.0.0", "::"})


def host_name(header: str) -> str:
    """The name in a Host header, without its port: `[::1]:8377` -> `::1`, `Example.org:80` -> `example.org`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def allowed_hosts(bound: str, extra: str = "") -> frozenset[str]:
    """The names a request may address this server by: loopback, the bound address unless it is a wildcard, and
    the comma-separated `extra` (HEGELION_SERVE_HOSTS)."""
    names = {host_name(n) for n in extra.split(",") if n.strip()}
    return LOOPBACK_NAMES | names | ({bound.strip("[]").lower()} - WILDCARDS)


def create_app(settings: Settings, token: str = "", hosts: frozenset[str] = LOOPBACK_NAMES) -> Starlette:
    env = Environment(loader=PackageLoader("hegelion_queue", "templates"), autoescape=True, trim_blocks=True,
                      lstrip_blocks=True)
    env.filters.update(fmt=fmt, duration=status.duration, per_run=per_run,
                       clock=lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)))
    env.globals.update(plot=plot, by_host=by_host, writable=bool(token))

    def page(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        refresh = min(3600.0, max(1.0, _float(request.query_params.get("refresh"), REFRESH_S)))
        html = env.get_template(template).render(now=time.time(), refresh=refresh, **context)
        return HTMLResponse(html, status_code=status_code)

    def run_keys(request: Request) -> RunKeys:
        return RunKeys(settings.key_prefix, request.path_params.get("run") or request.query_params.get("run")
                       or settings.run)

    async def index(request: Request) -> Response:
        fleet = await status.fleet(request.app.state.redis, settings)
        partial = request.query_params.get("partial") == "1"
        return page(request, "_fleet.html" if partial else "index.html", fleet=fleet)

    async def run_page(request: Request) -> Response:
        redis, rk = request.app.state.redis, run_keys(request)
        st = await status.collect(redis, settings, rk)
        if request.query_params.get("partial") == "1":
            return page(request, "_run_summary.html", r=st)
        train = await status.training(redis, rk)
        return page(request, "run.html", r=st, samples=list(reversed(await store.newest(redis, rk, SAMPLES_SHOWN))),
                    letters=await store.dead_letters(redis, rk, LETTERS_SHOWN), train=train,
                    curves=curves(train["metrics"]), evaluation=eval_table(train["eval"]))

    async def metrics(request: Request) -> Response:
        try:
            fleet = await status.fleet(request.app.state.redis, settings)
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            logger.warning("scrape: Redis unreachable: %s", e)
            fleet = None
        return Response(exposition(fleet), media_type=CONTENT_TYPE_LATEST)

    async def api_status(request: Request) -> Response:
        data = await status.collect(request.app.state.redis, settings, run_keys(request))
        return Response(orjson.dumps(data), media_type="application/json")

    def refused(request: Request) -> Response | None:
        if not token:
            return PlainTextResponse("read-only: start `hegelion-queue serve` with HEGELION_SERVE_TOKEN or "
                                     "--token-file to allow write actions", status_code=403)
        sent = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(sent, f"Bearer {token}".encode()):
            return PlainTextResponse("a valid bearer token is required", status_code=401,
                                     headers={"WWW-Authenticate": "Bearer"})
        return None

    def write_action(name: str, act: Callable[[Any, Settings, str], Awaitable[Any]]):
        async def handler(request: Request) -> Response:
            if (no := refused(request)) is not None:
                return no
            rk = run_keys(request)
            summary = await act(request.app.state.redis, settings, rk.run)
            logger.info("run %s: %s from the dashboard, %d prompts re-enqueued", rk.run, name, summary.enqueued)
            return JSONResponse({"run": rk.run, "action": name, "enqueued": summary.enqueued})

        return handler

    async def bad_request(request: Request, exc: Exception) -> Response:
        return page(request, "error.html", 400, message=str(exc))

    async def unavailable(request: Request, exc: Exception) -> Response:
        return page(request, "error.html", 503, message=f"Redis is unreachable: {exc}")

    @asynccontextmanager
    async def lifespan(app: Starlette):
        from ..queue.connection import connect

        app.state.redis = await connect(settings)
        try:
            yield
        finally:
            await app.state.redis.aclose()

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/runs/{run}", run_page),
            Route("/runs/{run}/resume", write_action("resume", producer.resume), methods=["POST"]),
            Route("/runs/{run}/retry-failed", write_action("retry-failed", producer.retry_failed), methods=["POST"]),
            Route("/metrics", metrics),
            Route("/api/status", api_status),
            Mount("/static", StaticFiles(packages=[("hegelion_queue", "static")]), name="static"),
        ],
        exception_handlers={HegelionError: bad_request, RedisConnectionError: unavailable,
                            RedisTimeoutError: unavailable},
        lifespan=lifespan,
        middleware=[Middleware(SecurityHeaders), Middleware(HostCheck, hosts=hosts)],
    )
    return app


class HostCheck:
    """ASGI middleware: 400 for a request whose Host header names another server (DNS rebinding)."""

    def __init__(self, app: Any, hosts: frozenset[str]):
        self.app, self.hosts = app, hosts

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            header = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if host_name(header) not in self.hosts:
                logger.warning("refused a request for host %r (allowed: %s; more with HEGELION_SERVE_HOSTS)",
                               header[:100], ", ".join(sorted(self.hosts)))
                response = PlainTextResponse("unknown Host header: add the name to HEGELION_SERVE_HOSTS",
                                             status_code=400)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class SecurityHeaders:
    """ASGI middleware: SECURITY_HEADERS on every response, static files and errors included."""

    raw = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.raw]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _float(v: Any, default: float) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


def serve(settings: Settings, host: str, port: int, token: str = "") -> None:
    import uvicorn

    app = create_app(settings, token, allowed_hosts(host, settings.serve_hosts))
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)


def read_token_file(path: Path) -> str:
    """The write-action token from a file only its owner can read (like an SSH key), so that it never shows in
    `ps` or /proc as a command-line argument would."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8").strip() if stat.S_ISREG(mode) else ""
    except OSError as e:
        raise HegelionError(f"--token-file {path}: {e.strerror}") from e
    if not stat.S_ISREG(mode):
        raise HegelionError(f"--token-file {path} is not a file")
    if mode & 0o077:
        raise HegelionError(f"--token-file {path} can be read by others (mode {stat.S_IMODE(mode):o}): "
                            f"chmod 600 {path}")
    if not text or "\n" in text:
        raise HegelionError(f"--token-file {path} must hold the token on one line")
    return text
