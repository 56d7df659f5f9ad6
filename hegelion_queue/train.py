"""mlx-lm glue: LoRA fine-tuning with the SCU penalty, through `mlx_lm.tuner.train` (no training loop here).

mlx-lm hosts the behaviour we inject: `scu_loss` (masked cross-entropy on the assistant's tokens plus
λ·ParamBPT over the LoRA weights) and `ScuCallback` (measures S, steps the controller, writes λ back,
records metrics, checkpoints). The training step is `mx.compile`d with the model's state as an input, so
λ lives in that state as an `mx.array` (`model.scu.lam`): a Python float would be frozen into the graph.

Output in the adapter directory: adapters.safetensors + adapter_config.json (loadable by
`mlx_lm.load(model, adapter_path=...)` and `mlx_lm.generate --adapter-path`), metrics.jsonl, training.png,
summary.json, mlx_lm.log, scu_state.json (resume point) and NNNNNNN_adapters.safetensors checkpoints; then
`run_training` adds the plain twin (baseline-plain/) and the eval (eval.json, evaluate.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from hegelion_queue import backend, eta, evaluate, scu
from hegelion_queue.convert import ConvertStats, convert
from hegelion_queue.errors import HegelionError
from hegelion_queue.lm import (  # noqa: F401 (re-exported)
    ADAPTER_FILE, AssistantOnlyDataset, device_kind, is_quantized, load_model, loss_mask, to_float32,
)
from hegelion_queue.settings import Settings

logger = logging.getLogger("hegelion_queue.train")
STATE_FILE = "scu_state.json"  # step and controller state of the last checkpoint
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "training.png"
MLX_LOG_FILE = "mlx_lm.log"  # mlx-lm's own per-step table
BASELINE_DIR = "baseline-plain"  # the λ = 0 twin of train --baseline plain
LORA_LEAVES = ("lora_a", "lora_b")

Progress = Callable[[dict], None]
OnEstimate = Callable[[eta.Estimate], None]


def _default(name: str) -> Any:
    return Settings.model_fields[name].default


@dataclass
class TrainArgs:
    model: str = field(
        default=_default("train_model"), metadata={"help": "Model id or local directory (HEGELION_TRAIN_MODEL)."}
    )
    adapter_path: str = field(default="artifacts/adapters/run", metadata={"help": "Where the adapter and reports go."})
    iters: int = field(default=500, metadata={"help": "Training steps in total (a resumed run counts the saved ones)."})
    batch_size: int = field(default=4, metadata={"help": "Sequences per step."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Adam learning rate (the peak of the schedule)."})
    lr_schedule: str = field(default="constant", metadata={"help": "constant, or cosine: decay to 0 over iters."})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / rank."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    num_layers: int = field(default=16, metadata={"help": "Last blocks that get LoRA (-1: all)."})
    max_seq_length: int = field(default=2048, metadata={"help": "Longer sequences are truncated."})
    target_s: float = field(default=0.1, metadata={"help": "SCU target S* = ParamBPT / (DataBPT + ParamBPT)."})
    prior_sigma: float = field(default=0.2, metadata={"help": "σ of the N(0, σ²) prior behind ParamBPT."})
    scu_law: str = field(default="pi", metadata={"help": "pi (relative error, per-step PI) or reference."})
    kp: float = field(default=0.5, metadata={"help": "SCU proportional gain."})
    ki: float = field(default=0.05, metadata={"help": "SCU integral gain."})
    deadband: float = field(default=0.05, metadata={"help": "|error| within which λ is held (pi: relative)."})
    scu_ema: float = field(default=0.05, metadata={"help": "EMA weight of each new S measurement."})
    lambda_init: float = field(default=1.0, metadata={"help": "Initial λ (weight of the ParamBPT penalty)."})
    lambda_min: float = field(default=1e-4, metadata={"help": "Lower bound of λ."})
    lambda_max: float = field(default=10.0, metadata={"help": "Upper bound of λ."})
    scu_update_every: int = field(default=1, metadata={"help": "Steps between S measurements / λ updates."})
    steps_per_report: int = field(default=10, metadata={"help": "Steps between metrics rows."})
    steps_per_eval: int = field(default=200, metadata={"help": "Steps between validation losses."})
    val_batches: int = field(default=25, metadata={"help": "Validation batches per evaluation (-1: all)."})
    save_every: int = field(default=100, metadata={"help": "Steps between checkpoints (the resume points)."})
    cpu_float32: bool = field(default=True, metadata={"help": "On a CPU, compute in float32 when the model ships "
                                                             "in bf16/fp16: MLX's CPU bf16 matmul is ~40x slower "
                                                             "(make bench BENCH_ARGS=--real-size); memory doubles."})
    seed: int = field(default=0, metadata={"help": "Seed of LoRA init, batch order and the data split."})
    valid_fraction: float = field(default=0.05, metadata={"help": "Share of samples held out for validation."})
    think_tags: bool | None = field(
        default=None, metadata={"help": "<thought> -> <think> (default: on for DeepSeek-R1 models)."}
    )
    resume: bool = field(default=True, metadata={"help": "Continue from the adapter directory's last checkpoint."})
    early_stop: bool = field(default=False, metadata={"help": "Stop once λ has settled (see early_stop_window)."})
    early_stop_window: int = field(default=50, metadata={"help": "λ updates that must stay within early_stop_tol."})
    early_stop_tol: float = field(default=0.01, metadata={"help": "Relative λ change that counts as settled."})
    force_lambda: float | None = field(default=None, metadata={"help": "Fix λ and switch the controller off (tests)."})
    baseline: str | None = field(
        default=None, metadata={"help": "plain: also train a λ = 0 twin (same data, seed, steps) and compare."}
    )
    eval_prompts: int = field(default=50, metadata={"help": "Held-out prompts generated for the eval (0: no eval)."})
    eval_max_tokens: int | None = field(
        default=None, metadata={"help": "Longest eval generation (default: 1.25x the longest reference answer)."}
    )

    def lora_parameters(self) -> dict:
        return {"rank": self.lora_rank, "scale": self.lora_alpha / self.lora_rank, "dropout": self.lora_dropout}

    def controller(self) -> scu.ScuController:
        return scu.ScuController(
            target_s=self.target_s, kp=self.kp, ki=self.ki, deadband=self.deadband, lambda_init=self.lambda_init,
            lambda_min=self.lambda_min, lambda_max=self.lambda_max, ema_alpha=self.scu_ema, law=self.scu_law,
        )


def help_table() -> dict[str, str]:
    """Field -> help text, for the CLI and the README."""
    return {f.name: f.metadata.get("help", "") for f in fields(TrainArgs)}


def mlx_cache_dir() -> Path:
    """Where MLX's CPU backend keeps the g++-compiled kernels: `<temp dir>/mlx`, i.e. `$TMPDIR/mlx`.

    The first compile costs 10-50 s; keep TMPDIR the same across runs (and do not point it at a per-run
    scratch directory) so every run reuses the same cache.
    """
    return Path(tempfile.gettempdir()) / "mlx"


# --- data ---------------------------------------------------------------------------------------------


def _read_split(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if rows and "messages" not in rows[0]:
        raise HegelionError(
            f"{path} has no 'messages' records, so prompt tokens cannot be kept out of the loss: "
            "train on the generator JSONL or on `convert --format messages` output"
        )
    return rows


def prepare_data(data: str | Path, args: TrainArgs) -> tuple[Path, ConvertStats | None]:
    """A generator JSONL is converted (messages format) into `<adapter>/data`; a directory is used as is."""
    data = Path(data)
    if data.is_dir():
        return data, None
    if not data.is_file():
        raise HegelionError(f"no training data at {data}: pass the run's JSONL or a directory with train.jsonl")
    out = Path(args.adapter_path) / "data"
    stats = convert(data, out, fmt="messages", model_name=args.model, think_tags=args.think_tags,
                    valid_fraction=args.valid_fraction, seed=args.seed)
    return out, stats


def loss_tokens(dataset: Any, max_seq_length: int) -> int:
    """Tokens that carry loss in one pass over `dataset` (a CacheDataset of (tokens, offset)): SCU's N."""
    total = 0
    for i in range(len(dataset)):
        tokens, offset = dataset[i]
        total += max(0, min(len(tokens), max_seq_length) - max(offset, 1))
    return total


# --- model state and loss -----------------------------------------------------------------------------


def _nn():
    import mlx.core as mx
    import mlx.nn as nn

    return mx, nn


def attach_lambda(model: Any, lam: float) -> None:
    """Put λ into the model's state (`model.scu.lam`) next to a snapshot of the LoRA weights as initialised
    (`model.scu.init`), frozen so the optimizer and the adapter file skip both.

    ParamBPT measures the *update*: Σ(w − w₀)² with w₀ the initial LoRA weights. mlx-lm draws lora_a at
    random (Σw² ≈ rank/3 per matrix), so the reference's plain Σw² starts far above any S* on a dataset of
    a few hundred samples, drives λ to its bound and stops the adapter from learning; the deviation from
    the initialisation is zero before training and grows only with what the adapter learns.
    """
    mx, nn = _nn()

    class ScuState(nn.Module):
        def __init__(self, value: float, init: list):
            super().__init__()
            self.lam = mx.array(value, dtype=mx.float32)
            for i, w in enumerate(init):  # plain array attributes: mlx's update() skips frozen ones
                self[f"init{i}"] = w

    model.scu = ScuState(lam, [w for _, w in lora_params(model)])  # arrays are immutable: no copy needed
    model.scu.freeze()


def set_lambda(model: Any, lam: float) -> None:
    mx, _ = _nn()
    model.scu.lam = mx.array(lam, dtype=mx.float32)  # a new array in the same state tree: the next step reads it


def get_lambda(model: Any) -> float:
    return float(model.scu.lam.item())


def lora_params(model: Any) -> list[tuple[str, Any]]:
    from mlx.utils import tree_flatten

    return [(k, v) for k, v in tree_flatten(model.trainable_parameters()) if k.rsplit(".", 1)[-1] in LORA_LEAVES]


def lora_sum_w2(model: Any) -> Any:
    """Σ(w − w₀)² over the LoRA weights (see attach_lambda), as an mx scalar (differentiable in the loss)."""
    mx, _ = _nn()
    total = mx.array(0.0, dtype=mx.float32)
    for i, (_, w) in enumerate(lora_params(model)):
        w0 = model.scu[f"init{i}"]
        total = total + ((w - w0).astype(mx.float32) ** 2).sum()
    return total


def make_scu_loss(tokens_per_epoch: int, sigma: float) -> Callable:
    """loss(model, batch, lengths) -> (value, ntoks) for mlx_lm.tuner.train.

    The gradient is that of CE + λ·ParamBPT, but the value returned is the CE alone (the penalty is added
    and its stop_gradient copy subtracted), so mlx-lm's reported train/val loss is DataBPT·ln 2 exactly.
    """
    mx, nn = _nn()
    scale = 1.0 / (2.0 * sigma * sigma * tokens_per_epoch * scu.LN2)  # ParamBPT = Σw² · scale

    def scu_loss(model, batch, lengths):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = model(inputs)
        mask = loss_mask(lengths, targets.shape[1])
        ntoks = mask.sum()
        ce = (nn.losses.cross_entropy(logits, targets) * mask).astype(mx.float32).sum() / ntoks
        penalty = model.scu.lam * lora_sum_w2(model) * scale
        return ce + (penalty - mx.stop_gradient(penalty)), ntoks

    return scu_loss


# --- the callback -------------------------------------------------------------------------------------


class EarlyStop(Exception):
    """Raised from the callback to leave mlx-lm's loop once λ has settled."""


@dataclass
class Checkpoint:
    step: int = 0
    lam: float = 1.0
    integral: float = 0.0
    s_hat: float | None = None
    armed: bool = True
    e_prev: float = 0.0


def read_checkpoint(adapter_dir: Path) -> Checkpoint | None:
    state, weights = adapter_dir / STATE_FILE, adapter_dir / ADAPTER_FILE
    if not (state.exists() and weights.exists()):
        return None
    return Checkpoint(**json.loads(state.read_text()))


def read_metrics(adapter_dir: str | Path, up_to_step: int | None = None) -> list[dict]:
    path = Path(adapter_dir) / METRICS_FILE
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if up_to_step is None or r["step"] <= up_to_step]


class ScuCallback:
    """mlx-lm TrainingCallback: S measurement, λ control, metrics rows, checkpoints, progress hook.

    mlx-lm only calls back at report steps, so fit() has it report every step (its table goes to mlx_lm.log) and
    this class decides what each call does: S and λ every `scu_update_every` steps, a metrics row every
    `steps_per_report`, a checkpoint every `save_every`. Steps are global: a resumed run continues the numbering
    (`step_offset`).
    """

    def __init__(self, model: Any, args: TrainArgs, tokens_per_epoch: int, controller: scu.ScuController | None,
                 *, step_offset: int = 0, rows: list[dict] | None = None, on_progress: Progress | None = None,
                 clock: eta.StepClock | None = None, on_estimate: OnEstimate | None = None):
        self.model, self.args, self.n = model, args, tokens_per_epoch
        self.controller, self.step_offset, self.on_progress = controller, step_offset, on_progress
        self.clock, self.on_estimate = clock, on_estimate
        self.estimate: eta.Estimate | None = None
        self.dir = Path(args.adapter_path)
        self.rows: list[dict] = rows or []
        self.lambdas: list[float] = []  # after each update of this segment: the early-stop signal
        self.val_loss: float | None = None  # the last validation loss
        self._new_val_loss: float | None = None  # one measured since the last row (a row carries it once)
        self._new_val_step: int | None = None  # the steps trained when it was measured
        self.step = 0  # the last step reported
        self._ce_window: list[float] = []  # train CE of the steps since the last row: the row's loss
        self.started = time.monotonic()

    def on_val_loss_report(self, info: dict) -> None:
        self.val_loss = self._new_val_loss = info["val_loss"]
        if self.clock is not None:
            self.clock.validated(info["val_time"])
        self._new_val_step = info["iteration"] + self.step_offset  # mlx-lm validates before the step it reports

    def on_train_loss_report(self, info: dict) -> None:
        step = self.step = info["iteration"] + self.step_offset
        a = self.args
        if self.clock is not None and (estimate := self.clock.stepped(step)):
            self._estimated(estimate)
        ce = info["train_loss"]  # this step's batch (mlx-lm reports every step)
        self._ce_window.append(ce)
        w2 = float(lora_sum_w2(self.model).item())
        d_bpt, p_bpt = scu.data_bpt(ce), scu.param_bpt(w2, a.prior_sigma, self.n)
        s = scu.s_ratio(d_bpt, p_bpt)
        updated = self.controller is not None and step % a.scu_update_every == 0
        if updated:
            gain = info["learning_rate"] / a.learning_rate if a.learning_rate else 1.0
            set_lambda(self.model, self.controller.update(s, gain))
            self.lambdas.append(get_lambda(self.model))
        last = step >= a.iters
        if step % a.steps_per_report == 0 or last:
            mean_ce = sum(self._ce_window) / len(self._ce_window)  # the row's steps: less noise than one batch
            row_bpt = scu.data_bpt(mean_ce)
            row = {
                "step": step, "loss": mean_ce, "val_loss": self._new_val_loss, "val_step": self._new_val_step,
                "data_bpt": row_bpt, "param_bpt": p_bpt,
                "S": scu.s_ratio(row_bpt, p_bpt), "lambda": get_lambda(self.model), "sum_w2": w2,
                "learning_rate": info["learning_rate"],
                "s_hat": self.controller.s_hat if self.controller else None,
                "armed": self.controller.armed if self.controller else None,
                "tokens_per_s": info["tokens_per_second"], "trained_tokens": info["trained_tokens"],
                "elapsed_s": round(time.monotonic() - self.started, 3),
            }
            self.rows.append(row)
            self._ce_window.clear()
            self._new_val_loss = self._new_val_step = None
            with open(self.dir / METRICS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            if self.on_progress is not None:
                try:
                    self.on_progress({**row, "iters": a.iters})
                except Exception:  # a progress writer (Redis) hiccup must not cost the training run
                    logger.exception("on_progress failed at step %d; training continues", step)
        if step % a.save_every == 0 and not last:
            self.save(step)
        if a.early_stop and updated and scu.settled(self.lambdas, a.early_stop_window, a.early_stop_tol):
            logger.info("λ settled at %.4g after step %d: stopping early", get_lambda(self.model), step)
            raise EarlyStop(step)

    def _estimated(self, estimate: eta.Estimate) -> None:
        """The measured duration: logged, kept for the summary, handed to on_estimate (train, make run print it)."""
        self.estimate = estimate
        for line in eta.lines(estimate):
            logger.info("%s: %s", self.dir, line)
        if self.on_estimate is not None:
            try:
                self.on_estimate(estimate)
            except Exception:  # a display or Redis hiccup must not cost the training run
                logger.exception("on_estimate failed; training continues")

    def save(self, step: int) -> None:
        """adapters.safetensors + a numbered copy, then the state file: the state names a saved step."""
        save_adapter(self.model, self.dir / ADAPTER_FILE)
        save_adapter(self.model, self.dir / f"{step:07d}_adapters.safetensors")
        c = self.controller
        state = Checkpoint(step, get_lambda(self.model), c.integral if c else 0.0, c.s_hat if c else None,
                           c.armed if c else True, c.e_prev if c else 0.0)
        tmp = self.dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(state)))
        tmp.replace(self.dir / STATE_FILE)


def save_adapter(model: Any, path: Path) -> None:
    import mlx.core as mx

    tmp = path.with_name(path.stem + ".tmp.safetensors")
    mx.save_safetensors(str(tmp), dict(lora_params(model)))
    tmp.replace(path)


# --- reports ------------------------------------------------------------------------------------------


def plot(rows: list[dict], path: Path, args: TrainArgs, evaluation: dict | None = None) -> None:
    """Loss (and the held-out eval), S against its target band, λ; one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (ax_loss, ax_s, ax_lam) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    ax_loss.plot(steps, [r["loss"] for r in rows], label="train CE (nats)")
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if val:
        ax_loss.plot(*zip(*val), "o-", label="valid CE (nats)")
    if evaluation:
        base, tuned = evaluation["base"], evaluation["adapter"]
        ax_loss.axhline(base["ce_nats"], color="grey", ls=":", label=f"base model, held out: {base['ce_nats']:.2f}")
        ax_loss.axhline(tuned["ce_nats"], color="k", ls="--", label=f"adapter, held out: {tuned['ce_nats']:.3f}")
        n = evaluation["prompts"]
        text = f"dialectic format on {n} held-out prompts: base {base['format_ok']}/{n}, adapter {tuned['format_ok']}/{n}"
        for name, other in evaluation.get("baselines", {}).items():
            text += f"\n{name} LoRA twin: held-out CE {other['ce_nats']:.3f}, format {other['format_ok']}/{n}"
        ax_loss.set_title(text, fontsize=9)
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(fontsize=8)
    ax_s.plot(steps, [r["S"] for r in rows], alpha=0.5, label="S")
    smoothed = [(r["step"], r["s_hat"]) for r in rows if r.get("s_hat") is not None]
    if smoothed:
        ax_s.plot(*zip(*smoothed), label="S, smoothed (what the controller sees)")
    ax_s.axhline(args.target_s, color="k", lw=0.8, label="S*")
    lo, hi = target_band(args)
    ax_s.axhspan(lo, hi, color="green", alpha=0.2, label="deadband")
    if min(r["S"] for r in rows) > 0:
        ax_s.set_yscale("log")
    ax_s.set_ylabel("S")
    ax_s.legend(fontsize=8)
    lams = [r["lambda"] for r in rows]
    ax_lam.plot(steps, lams)
    if min(lams) > 0:  # a forced λ of 0 cannot go on a log axis
        ax_lam.set_yscale("log")
    ax_lam.set_ylabel("λ")
    ax_lam.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def target_band(args: TrainArgs) -> tuple[float, float]:
    """The S values within the controller's deadband around S*."""
    if args.scu_law == "pi":  # relative: |ln(S/S*)| <= deadband
        return args.target_s * math.exp(-args.deadband), args.target_s * math.exp(args.deadband)
    return args.target_s - args.deadband, args.target_s + args.deadband


# --- entry points -------------------------------------------------------------------------------------


def learning_rate(args: TrainArgs, step0: int = 0) -> Any:
    """The peak rate, or a cosine decay to 0 over `iters` that a resumed run continues at step `step0`."""
    import mlx.optimizers as optim

    if args.lr_schedule == "constant":
        return args.learning_rate
    if args.lr_schedule != "cosine":
        raise HegelionError(f"lr_schedule must be constant or cosine, not {args.lr_schedule!r}")
    decay = optim.cosine_decay(args.learning_rate, max(args.iters, 1))
    return lambda step: decay(step + step0)


def _mlx_version() -> str:
    import mlx.core as mx

    return mx.__version__


def _resume_point(adapter_dir: Path, config: dict) -> Checkpoint | None:
    """The last checkpoint, if it was made by a run with the same model and LoRA shape; else start over."""
    ckpt = read_checkpoint(adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    if ckpt is None or not config_file.exists():
        return None
    old = json.loads(config_file.read_text())
    same = {k: old.get(k) for k in ("model", "num_layers", "lora_parameters")} == {
        k: config[k] for k in ("model", "num_layers", "lora_parameters")
    }
    if not same:
        raise HegelionError(
            f"{adapter_dir} holds a checkpoint of a different model or LoRA shape: choose another adapter path, "
            "or delete it to start over"
        )
    return ckpt


@dataclass
class TrainResult:
    summary: dict
    model: Any
    tokenizer: Any


def fit(data: str | Path, args: TrainArgs, on_progress: Progress | None = None, *,
        on_estimate: OnEstimate | None = None, trainings: int = 1) -> TrainResult:
    """Convert (if needed), load, add LoRA, resume, train with SCU, write the reports. `on_estimate` gets the
    measured duration after the first steps (counting `trainings` trainings of this length: 2 with the twin)."""
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm.tuner.datasets import CacheDataset
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import save_config

    started = time.monotonic()
    adapter_dir = Path(args.adapter_path)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    data_dir, cstats = prepare_data(data, args)
    train_rows, valid_rows = _read_split(data_dir / "train.jsonl"), _read_split(data_dir / "valid.jsonl")
    model, tokenizer = load_model(args.model)
    device = device_kind()
    if device == "cpu" and args.cpu_float32 and (cast := to_float32(model)):
        logger.info("%s ships in %s: computing in float32 on the CPU", args.model, cast)
    logger.info("training %s on %s (MLX %s)", args.model, device, _mlx_version())
    if warning := backend.quantized_on_cuda_warning(device, is_quantized(model)):
        logger.warning("%s", warning)

    train_set = CacheDataset(AssistantOnlyDataset(train_rows, tokenizer))
    valid_set = CacheDataset(AssistantOnlyDataset(valid_rows, tokenizer))
    if len(train_set) < args.batch_size:
        raise HegelionError(f"{len(train_set)} training samples is fewer than batch_size {args.batch_size}")
    if 0 < len(valid_set) < args.batch_size:  # mlx-lm refuses a split smaller than one batch
        logger.warning("%d validation samples < batch_size %d: training without validation", len(valid_set),
                       args.batch_size)
    n_tokens = loss_tokens(train_set, args.max_seq_length)

    mx.random.seed(args.seed)
    model.freeze()
    num_layers = min(args.num_layers, len(model.layers)) if args.num_layers > 0 else -1
    linear_to_lora_layers(model, num_layers, args.lora_parameters())
    attach_lambda(model, args.lambda_init)  # snapshots w₀ before a resume loads trained weights

    config = {
        "model": args.model, "fine_tune_type": "lora", "num_layers": num_layers,
        "lora_parameters": args.lora_parameters(), "scu": asdict(args),
    }
    ckpt = _resume_point(adapter_dir, config) if args.resume else None
    controller = None if args.force_lambda is not None else args.controller()
    lam = args.force_lambda if args.force_lambda is not None else args.lambda_init
    if ckpt:
        model.load_weights(str(adapter_dir / ADAPTER_FILE), strict=False)
        if controller is not None:
            controller.lam, controller.integral, controller.s_hat = ckpt.lam, ckpt.integral, ckpt.s_hat
            controller.armed, controller.e_prev = ckpt.armed, ckpt.e_prev
            lam = ckpt.lam
        logger.info("resuming %s from step %d (λ %.4g)", adapter_dir, ckpt.step, lam)
    step0 = ckpt.step if ckpt else 0
    if not ckpt:
        (adapter_dir / STATE_FILE).unlink(missing_ok=True)  # a fresh run must not later resume an older one
    rows = read_metrics(adapter_dir, step0) if ckpt else []
    with open(adapter_dir / METRICS_FILE, "w", encoding="utf-8") as f:  # drop rows of the lost segment
        f.writelines(json.dumps(r) + "\n" for r in rows)
    set_lambda(model, lam)

    save_config(config, adapter_dir / "adapter_config.json")

    validates = len(valid_set) >= args.batch_size
    clock = eta.StepClock(step0, args.iters, args.steps_per_eval, validates, trainings, device)
    callback = ScuCallback(model, args, n_tokens, controller, step_offset=step0, rows=rows, on_progress=on_progress,
                           clock=clock, on_estimate=on_estimate)
    remaining = args.iters - step0
    early = False
    if remaining > 0:
        np.random.seed(args.seed + step0)  # mlx-lm's batch order; a resumed run does not replay the same batches
        targs = TrainingArgs(  # mlx-lm calls back at every step; ScuCallback decides what each call does
            batch_size=args.batch_size, iters=remaining, val_batches=args.val_batches, steps_per_report=1,
            steps_per_eval=args.steps_per_eval, steps_per_save=remaining + 1,  # ScuCallback checkpoints
            max_seq_length=args.max_seq_length, adapter_file=str(adapter_dir / ADAPTER_FILE),
        )
        optimizer = optim.Adam(learning_rate=learning_rate(args, step0))
        # mlx-lm prints a table row per report (here: per step): it goes to a log file, progress to on_progress
        with open(adapter_dir / MLX_LOG_FILE, "a", encoding="utf-8") as log, contextlib.redirect_stdout(log):
            try:
                train(model, optimizer, train_set, valid_set if validates else None,
                      args=targs, loss=make_scu_loss(n_tokens, args.prior_sigma), training_callback=callback)
            except EarlyStop:
                early = True
    final_step = callback.step or step0
    callback.save(final_step)  # also after an early stop (mlx-lm's own final save was skipped then)

    rows = callback.rows
    if rows:
        plot(rows, adapter_dir / PLOT_FILE, args)
    last = rows[-1] if rows else {}
    s_hat = controller.s_hat if controller is not None else None
    summary = {
        "model": args.model, "adapter_path": str(adapter_dir), "data": str(data_dir),
        "steps": final_step, "iters": args.iters, "resumed_from": step0, "early_stopped": early,
        "train_samples": len(train_set), "valid_samples": len(valid_set), "tokens_per_epoch": n_tokens,
        "final_loss": last.get("loss"), "final_val_loss": callback.val_loss,
        "final_S": s_hat if s_hat is not None else last.get("S"), "final_lambda": get_lambda(model),
        "target_s": args.target_s, "learning_rate": args.learning_rate, "lr_schedule": args.lr_schedule,
        "seconds": round(time.monotonic() - started, 3), "device": device,
        "estimate": callback.estimate.as_dict() if callback.estimate else None,
        "convert": cstats.as_dict() if cstats else None,
        "files": sorted({p.name for p in adapter_dir.iterdir() if p.is_file()} | {SUMMARY_FILE}),
    }
    (adapter_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    logger.info("trained %s: %d steps, loss %s, S %s, λ %.4g", adapter_dir, final_step, summary["final_loss"],
                summary["final_S"], summary["final_lambda"])
    return TrainResult(summary, model, tokenizer)


def run_training(data_dir_or_file: str | Path, args: TrainArgs, on_progress: Progress | None = None,
                 on_estimate: OnEstimate | None = None) -> dict:
    """Train an SCU-regularised LoRA adapter on a generator JSONL (or a converted directory), then (with
    `baseline="plain"`) its λ = 0 twin on the same split, seed, steps and learning rate, then evaluate; the summary.
    `on_estimate` gets the measured duration of both trainings after the first steps of the first.
    """
    summary = fit(data_dir_or_file, args, on_progress, on_estimate=on_estimate,
                  trainings=2 if args.baseline else 1).summary
    adapter_dir = Path(args.adapter_path)
    baselines = {}
    if args.baseline:
        if args.baseline != "plain":
            raise HegelionError(f"baseline must be plain, not {args.baseline!r}")
        twin = replace(args, adapter_path=str(adapter_dir / BASELINE_DIR), force_lambda=0.0, baseline=None,
                       eval_prompts=0)
        logger.info("training the plain LoRA twin in %s", twin.adapter_path)
        twin_summary = fit(summary["data"], twin, on_progress and (lambda row: on_progress({**row, "twin": True}))).summary
        baselines["plain"] = twin.adapter_path
        summary["baseline"] = {"plain": {k: twin_summary[k] for k in ("adapter_path", "final_loss", "final_S")}}
    if args.eval_prompts > 0:
        eval_args = evaluate.EvalArgs(adapter_path=str(adapter_dir), model=args.model, max_prompts=args.eval_prompts,
                                      max_tokens=args.eval_max_tokens, max_seq_length=args.max_seq_length)
        report = evaluate.evaluate(eval_args, baselines=baselines)
        summary["eval"] = report
        plot(read_metrics(adapter_dir), adapter_dir / PLOT_FILE, args, report)
        summary["files"] = sorted({p.name for p in adapter_dir.iterdir() if p.is_file()})
        (adapter_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary
