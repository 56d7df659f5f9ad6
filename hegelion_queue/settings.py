"""Every setting in one place: environment (`HEGELION_*`), then `.env`, then these defaults."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_RUN = "hegelion_kimi_training_data"
DEFAULT_DATASET = "HuggingFaceH4/ultrafeedback_binarized"
DEFAULT_SPLIT = "train_prefs"
DEFAULT_MAX_PROMPT_CHARS = 8000  # longer prompts are skipped and counted
PROJECT_ROOT = Path(__file__).resolve().parent.parent
KIMI_BINS = (Path(".kimi-code") / "bin" / "kimi",  # `make kimi`: Kimi Code CLI
             Path(".kimi-venv") / "bin" / "kimi")  # `make kimi-legacy`: kimi-cli 1.51


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HEGELION_", env_file=".env", extra="ignore")

    # --- Redis and queues
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Redis URL: redis://[[USER]:PASS@]host:port/db, or rediss:// for TLS."
    )
    queue_name: str = Field("hegelion:queue", description="arq queue the generator workers listen on.")
    train_queue_name: str = Field("hegelion:train", description="arq queue the trainer worker listens on.")
    key_prefix: str = Field("hegelion", description="Prefix of every run key this project writes.")
    # Reaching Redis from other hosts (see hegelion_queue/queue/connection.py)
    redis_connect_timeout: float = Field(2.0, gt=0, description="Seconds to wait for a connection to Redis.")
    redis_socket_timeout: float = Field(
        10.0, ge=0, description="Seconds one Redis command may wait for its answer before it is retried (0: forever)."
    )
    redis_retry_seconds: float = Field(
        300.0, ge=0, description="Seconds in all a worker retries, with backoff, while Redis is unreachable (0: none)."
    )
    redis_ssl_ca_certs: str = Field("", description="CA bundle that signs the server's certificate (rediss://).")
    redis_ssl_certfile: str = Field("", description="Client certificate for TLS client authentication (rediss://).")
    redis_ssl_keyfile: str = Field("", description="Key of the client certificate (rediss://).")
    redis_ssl_check_hostname: bool = Field(
        True, description="Check that the server certificate names the host (rediss://)."
    )
    redis_sentinels: str = Field(
        "", description="Sentinels 'host:port,...': the master is found through them (the URL gives password, db)."
    )
    redis_sentinel_master: str = Field("mymaster", description="Master name the sentinels monitor.")

    # --- Runs and files
    run: str = Field(DEFAULT_RUN, description="Run name: output file, Redis keys and adapter folder.")
    data_dir: Path = Field(Path("artifacts/data"), description="Where each run's JSONL is written.")
    local_jsonl: bool = Field(True, description="Write the run's JSONL on this host (0: Redis only, use export).")

    # --- Workers
    max_jobs: int = Field(8, ge=1, description="Concurrent jobs per generator worker.")
    max_tries: int = Field(5, ge=1, description="Teacher attempts per prompt before it is dead-lettered.")
    poll_delay: float = Field(0.1, gt=0, description="Seconds between queue polls of an idle worker.")
    retry_base: float = Field(5.0, ge=0, description="First retry delay in seconds (doubles each attempt).")
    retry_cap: float = Field(300.0, ge=0, description="Longest retry delay in seconds.")
    breaker_threshold: int = Field(3, ge=1, description="Configuration errors in a row that pause the run.")
    breaker_recheck: float = Field(
        86400.0, gt=0, description="Seconds a paused run's queued jobs rest before looking again (resume makes them "
        "due at once): a paused run costs Redis nothing per second."
    )
    drain_seconds: int = Field(60, ge=0, description="On Ctrl-C/SIGTERM, seconds to let running jobs finish.")

    rate_limit: float = Field(0, ge=0, description="Teacher calls per minute for all workers on all hosts (0: no limit).")
    max_in_flight: int = Field(0, ge=0, description="Teacher calls at once for all workers on all hosts (0: no limit).")

    # --- Budget (per run: `enqueue` stores these with the run unless its --budget-… flags say otherwise)
    budget_tokens: Optional[int] = Field(
        None, gt=0, description="Teacher tokens a run may spend before it pauses with reason budget (unset: no limit)."
    )
    budget_calls: Optional[int] = Field(
        None, gt=0, description="Teacher calls a run may start before it pauses with reason budget (unset: no limit)."
    )
    budget_teacher_seconds: Optional[float] = Field(
        None, gt=0, description="Teacher seconds a run may spend before it pauses with reason budget (unset: no limit)."
    )

    # --- Answer cache and cost
    cache: bool = Field(
        True, description="Reuse an answer already committed for the same prompt by the same teacher configuration, in "
        "any run, instead of calling the teacher (0: neither reuse nor index answers)."
    )
    price_input_per_mtok: Optional[float] = Field(
        None, ge=0, description="Price of a million input tokens: status, estimate and the dataset card show cost."
    )
    price_output_per_mtok: Optional[float] = Field(
        None, ge=0, description="Price of a million output tokens (with HEGELION_PRICE_INPUT_PER_MTOK)."
    )

    # --- Teacher
    teacher: Literal["kimi", "acp", "command"] = Field(
        "kimi", description="Teacher preset: kimi (Kimi Code or kimi-cli), acp (any ACP agent) or command."
    )
    teacher_cmd: str = Field("", description="argv template for the command preset, e.g. 'llm -m gpt-4o'.")
    teacher_timeout: float = Field(600.0, gt=0, description="Seconds one teacher call may take (then retried).")
    job_timeout_margin: float = Field(
        30.0, gt=0, description="Seconds arq's job timeout exceeds the teacher's (time to kill and commit)."
    )
    teacher_output_cap: int = Field(4 * 1024 * 1024, ge=1024, description="Bytes of teacher output kept.")
    kimi_bin: str = Field(
        "", description="kimi executable (default: .kimi-code/bin/kimi from `make kimi`, else .kimi-venv/bin/kimi "
        "from `make kimi-legacy`, else kimi on PATH)."
    )
    kimi_config_file: str = Field("", description="kimi-cli 1.x only: passed as --config-file when set.")
    kimi_model: str = Field("", description="Passed to kimi as --model when set (print and wire modes).")
    kimi_mode: Literal["auto", "acp", "wire", "print"] = Field(
        "auto",
        description="auto: acp for Kimi Code (2.x), wire for kimi-cli (1.x), by `kimi --version`; acp: sessions in "
        "long-lived `kimi acp` processes; wire: one long-lived kimi-cli per job slot; print: one kimi per prompt.",
    )
    kimi_recycle: int = Field(500, ge=1, description="Prompts a long-lived kimi-cli (wire) answers before it is replaced.")
    acp_command: str = Field(
        "", description="argv of the ACP agent for HEGELION_TEACHER=acp, e.g. 'gemini --experimental-acp' (no shell)."
    )
    acp_processes: int = Field(1, ge=1, description="Long-lived ACP processes per worker (kimi acp, or the acp preset).")
    acp_sessions: int = Field(
        0, ge=0, description="Concurrent sessions per ACP process (0: enough for HEGELION_MAX_JOBS)."
    )
    acp_recycle: int = Field(2000, ge=1, description="Prompts an ACP process answers before it is replaced.")
    min_section_chars: int = Field(20, ge=1, description="Shortest THESIS/ANTITHESIS/SYNTHESIS accepted.")

    # --- Training
    auto_train: bool = Field(True, description="Enqueue one training job when a run finishes.")
    train_model: str = Field(
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", description="Model id or local directory to fine-tune."
    )
    adapters_dir: Path = Field(Path("artifacts/adapters"), description="Where adapters are written.")
    train_options: str = Field(
        "", description='JSON of training options for triggered jobs, e.g. {"iters": 200, "batch_size": 2}.'
    )
    train_timeout: float = Field(12 * 3600, gt=0, description="Seconds one training job may take.")
    openblas: bool = Field(
        True, description="Load Debian's OpenBLAS into training processes when present (3-4x faster CPU LoRA)."
    )
    mlx_backend: Literal["", "cpu", "cuda12", "cuda13", "metal"] = Field(
        "", description="MLX build `make setup` installs: cpu, cuda12, cuda13 or metal (unset: CUDA 12/13 by the "
        "driver when nvidia-smi lists a GPU, Metal on macOS, else cpu; `make mlx-backend` shows the choice)."
    )

    @model_validator(mode="after")
    def _kimi_from_make_kimi(self) -> "Settings":
        if not self.kimi_bin:
            installed = [root / b for root in (Path.cwd(), PROJECT_ROOT) for b in KIMI_BINS]
            self.kimi_bin = next((str(p) for p in installed if p.exists()), "kimi")
        return self

    def acp_slots(self) -> int:
        """Sessions each ACP process holds at once."""
        return self.acp_sessions or -(-self.max_jobs // self.acp_processes)

    # --- Dashboard (`hegelion-queue serve`)
    serve_host: str = Field("127.0.0.1", description="Address the dashboard binds to (0.0.0.0: every interface).")
    serve_port: int = Field(8377, ge=1, le=65535, description="Port of the dashboard and its /metrics.")
    serve_token: str = Field(
        "", description="Bearer token that enables the dashboard's write actions (resume, retry dead letters); "
        "unset: read-only. From the environment or .env only (or `serve --token-file`), never the command line."
    )
    serve_hosts: str = Field(
        "", description="More names the dashboard answers to, comma-separated (besides loopback and the bound "
        "address); a request with any other Host header gets 400."
    )

    def jsonl_path(self, run: str | None = None) -> Path:
        return self.data_dir / f"{run or self.run}.jsonl"

    def summary_path(self, run: str | None = None) -> Path:
        """The run's counts, tokens and cost next to its JSONL (`run` and `export` write it)."""
        return self.data_dir / f"{run or self.run}.summary.json"

    # A generator job's time budget, in one place: its wait for a rate-limit turn, then the teacher call, then
    # the margin to kill and commit. The job's own deadline falls inside arq's timeout, which arq treats as a
    # final failure (it deletes the job).
    def rate_wait(self) -> float:
        """Longest wait for a rate-limit turn before the job is deferred instead."""
        return self.teacher_timeout / 4 if self.rate_limit or self.max_in_flight else 0.0

    def job_deadline(self) -> float:
        return self.rate_wait() + self.teacher_timeout + self.job_timeout_margin / 2

    def job_timeout(self) -> float:
        return self.rate_wait() + self.teacher_timeout + self.job_timeout_margin


def settings_table() -> str:
    """The README's configuration table, from the fields themselves (one source for docs and defaults)."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = "(unset)" if default in ("", None) else f"`{str(default).lower() if isinstance(default, bool) else default}`"
        rows.append(f"| `HEGELION_{name.upper()}` | {shown} | {field.description} |")
    return "\n".join(rows)


def env_example() -> str:
    """`.env.example`: every setting, commented out at its default, with its meaning."""
    lines = ["# hegelion-queue settings (copy to .env). Every line shows the default; generated by `make tables`.", ""]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = "" if default is None else (str(default).lower() if isinstance(default, bool) else default)
        lines += [f"# {field.description}", f"# HEGELION_{name.upper()}={shown}"]
    lines += ["", "# kimi-cli reads these itself (any OpenAI-compatible endpoint):",
              "# KIMI_BASE_URL=https://api.example.com/v1", "# KIMI_API_KEY=", "# KIMI_MODEL_NAME=",
              "# docker compose: the Redis password it sets and the workers use", "# REDIS_PASSWORD="]
    return "\n".join(lines) + "\n"


@lru_cache
def get_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as e:  # one line a user can act on, not pydantic's report
        from .errors import HegelionError

        err = e.errors()[0]
        name = f"HEGELION_{str(err['loc'][0]).upper()}" if err.get("loc") else "a setting"
        raise HegelionError(f"{name}={err.get('input')!r}: {err['msg']}") from None
