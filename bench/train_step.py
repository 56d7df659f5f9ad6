"""Trainer figures: median step time of the SCU step (its loss and its per-step callback: S measured, λ updated)
vs mlx-lm's plain LoRA step, same tiny model, batch and sequence length, runs alternating (plain, SCU, plain, SCU,
…) so machine noise hits both alike; and the eval's time per held-out prompt."""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

from hegelion_queue.training import blas

blas.use_openblas()  # before mlx is imported (HEGELION_OPENBLAS=0: the wheel's BLAS, the baseline)

import mlx.core as mx  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx_lm import load  # noqa: E402
from mlx_lm.tuner.datasets import CacheDataset  # noqa: E402
from mlx_lm.tuner.trainer import TrainingArgs, default_loss, train  # noqa: E402
from mlx_lm.tuner.utils import linear_to_lora_layers  # noqa: E402

from hegelion_queue.training import train as tr  # noqa: E402
from hegelion_queue.training.convert import sample_messages  # noqa: E402
from tests.make_tiny_model import build_tiny_model, sample_rows  # noqa: E402

ROUNDS = 3
SKIP = 3  # first steps compile


class StepTimer:
    """Times each step, including what `inner` (the SCU callback) does at it."""

    def __init__(self, inner=None):
        self.inner = inner
        self.times: list[float] = []
        self.tokens_per_s: list[float] = []
        self.last = time.perf_counter()

    def on_train_loss_report(self, info):
        if self.inner is not None:
            self.inner.on_train_loss_report(info)
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.tokens_per_s.append(info["tokens_per_second"])
        self.last = now

    def on_val_loss_report(self, info):
        pass


def one_run(model_dir: Path, scu: bool, steps: int) -> list[float]:
    return _train(model_dir, scu, steps).times[SKIP:]


def _train(model_dir: Path, scu: bool, steps: int) -> StepTimer:
    model, tokenizer = load(str(model_dir))
    model.freeze()
    linear_to_lora_layers(model, -1, {"rank": 8, "scale": 2.0, "dropout": 0.0})
    data = CacheDataset(tr.AssistantOnlyDataset([{"messages": sample_messages(s)} for s in sample_rows(32)],
                                                tokenizer))
    inner = None
    if scu:
        tr.attach_lambda(model, 1.0)
        tokens = tr.loss_tokens(data, 256)
        targs = tr.TrainArgs(model=str(model_dir), adapter_path=tempfile.mkdtemp(prefix="bench-scu-"), iters=steps,
                             save_every=10**9)
        loss = tr.make_scu_loss(tokens, targs.prior_sigma)
        inner = tr.ScuCallback(model, targs, tokens, targs.controller())
    else:
        loss = default_loss
    timer = StepTimer(inner)
    args = TrainingArgs(batch_size=4, iters=steps, steps_per_report=1, steps_per_eval=10**9, steps_per_save=10**9,
                        max_seq_length=256, adapter_file="/dev/null")
    with contextlib.redirect_stdout(io.StringIO()):
        train(model, optim.Adam(learning_rate=1e-3), data, None, args=args, loss=loss, training_callback=timer)
    mx.clear_cache()
    return timer


def step_ratio(workdir: Path, steps: int = 30) -> tuple[float, dict]:
    model_dir = workdir / "qwen2"
    if not model_dir.exists():
        build_tiny_model(model_dir)
    plain, scu = [], []
    for _ in range(ROUNDS):
        plain += one_run(model_dir, False, steps)
        scu += one_run(model_dir, True, steps)
    p, s = statistics.median(plain), statistics.median(scu)
    return s / p, {"plain_step_ms": p * 1000, "scu_step_ms": s * 1000, "steps": len(plain)}


def blas_ratio(workdir: Path, library: str | None, steps: int = 30) -> tuple[float | None, dict]:
    """tokens/s of the SCU step with OpenBLAS loaded (hegelion_queue.training.blas) / without, fresh processes, alternating."""
    import os
    import subprocess
    import sys

    if not library:
        return None, {"openblas": "not installed (apt-get install libopenblas0-pthread)"}
    model_dir = workdir / "qwen2"
    if not model_dir.exists():
        build_tiny_model(model_dir)
    runs: dict[str, list[float]] = {"plain": [], "openblas": []}
    for _ in range(2):
        for name, extra in (("plain", {"HEGELION_OPENBLAS": "0"}), ("openblas", {"HEGELION_OPENBLAS": "1"})):
            out = subprocess.run([sys.executable, "-m", "bench.train_step", str(model_dir), str(steps)],
                                 env={**os.environ, **extra}, capture_output=True, text=True, check=True).stdout
            runs[name].append(float(out.split()[-1]))
    p, o = statistics.median(runs["plain"]), statistics.median(runs["openblas"])
    return o / p, {"tokens_per_s_plain": p, "tokens_per_s_openblas": o, "library": library}


def eval_seconds_per_prompt(workdir: Path, steps: int, prompts: int) -> tuple[float, dict]:
    """Train `steps` steps on the fake teacher's samples, then time the eval: load, held-out CE and greedy
    generations of base and adapter, per held-out prompt."""
    from hegelion_queue.training.evaluate import EvalArgs, evaluate
    from tests.make_tiny_model import fake_teacher_rows

    model_dir = workdir / "qwen2"
    if not model_dir.exists():
        build_tiny_model(model_dir)
    data = workdir / "eval_run.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in fake_teacher_rows(max(40, 3 * prompts))))
    adapter = workdir / "eval_adapter"
    args = tr.TrainArgs(model=str(model_dir), adapter_path=str(adapter), iters=steps, learning_rate=1e-3,
                        valid_fraction=0.34, eval_prompts=0, resume=False)
    tr.fit(data, args)
    t0 = time.perf_counter()
    report = evaluate(EvalArgs(adapter_path=str(adapter), max_prompts=prompts))
    seconds = time.perf_counter() - t0
    return seconds / report["prompts"], {"seconds": seconds, "prompts": report["prompts"],
                                         "max_tokens": report["max_tokens"], "held_out": report["held_out"]}


if __name__ == "__main__":  # one run in this process: prints the median tokens/s
    import sys

    t = _train(Path(sys.argv[1]), True, int(sys.argv[2]))
    print(statistics.median(t.tokens_per_s[SKIP:]))
