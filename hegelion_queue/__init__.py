"""hegelion-queue: prompt dataset -> dialectical training data (arq + Redis) -> LoRA adapter (mlx-lm + SCU).

The package follows the data path, in layers. A module imports only from its own layer and the layers below it
(tests/test_layers.py checks every import, and that no two modules import each other):

1. core (these modules): `settings` (every setting), `errors`, `keys` (every Redis key name), `dialectic` (the
   format: instructions, parsing, the sample), `redact` (masking secrets) — pure, imported by everything;
2. `training` — LoRA with mlx-lm under the Shannon Control Unit, the eval, the ablation (no Redis);
3. `sources` — reading a dataset and sampling its prompts;
4. `teacher` — the teacher processes: Kimi Code over ACP, kimi-cli's wire, any CLI;
5. `queue` — Redis: connections, packed storage, the exactly-once scripts, budgets, limits, pickup, status;
6. `dataset` — what is made of the samples: provenance, quality, contamination, exports, the Hugging Face folder;
7. `jobs` — the orchestrators: the producer, the generator job, the training job;
8. `ops` — the dashboard, Prometheus metrics, the estimate, the demo;
9. `cli` — the `hegelion-queue` command.

`workers/` holds arq's `WorkerSettings` only; `bench/` and `tests/` sit above everything.
"""

__version__ = "0.1.0"

LAYERS = [
    ("core", ["hegelion_queue.settings", "hegelion_queue.errors", "hegelion_queue.keys", "hegelion_queue.dialectic",
              "hegelion_queue.redact", "hegelion_queue"]),
    ("training", ["hegelion_queue.training"]),
    ("sources", ["hegelion_queue.sources"]),
    ("teacher", ["hegelion_queue.teacher"]),
    ("queue", ["hegelion_queue.queue"]),
    ("dataset", ["hegelion_queue.dataset"]),
    ("jobs", ["hegelion_queue.jobs"]),
    ("ops", ["hegelion_queue.ops"]),
    ("cli", ["hegelion_queue.cli"]),
]
