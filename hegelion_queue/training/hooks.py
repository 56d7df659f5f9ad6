"""What the trainer injects into `mlx_lm.tuner.train`: λ in the model's state, the SCU loss (masked cross-entropy
plus λ·ParamBPT over the LoRA weights) and `ScuCallback` (measures S, steps the controller, writes λ back, records
metrics, checkpoints). The training step is `mx.compile`d with the model's state as an input, so λ lives in that
state as an `mx.array` (`model.scu.lam`): a Python float would be frozen into the graph."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hegelion_queue.training import eta, scu
from hegelion_queue.training.convert import read_jsonl
from hegelion_queue.training.lm import ADAPTER_FILE, loss_mask
from hegelion_queue.training.args import LORA_LEAVES, METRICS_FILE, STATE_FILE, OnEstimate, Progress, TrainArgs

logger = logging.getLogger("hegelion_queue.train")

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
    """The step and the controller's state, saved with the adapter: what a resumed run carries on from."""

    step: int = 0
    lam: float = 1.0
    integral: float = 0.0
    s_hat: float | None = None
    armed: bool = True
    e_prev: float = 0.0

    @classmethod
    def of(cls, step: int, lam: float, controller: Any) -> Checkpoint:
        """The state at `step` (no controller: λ is fixed, the rest stays at its defaults)."""
        if controller is None:
            return cls(step, lam)
        return cls(step, lam, controller.integral, controller.s_hat, controller.armed, controller.e_prev)

    def restore(self, controller: Any) -> None:
        controller.lam, controller.integral, controller.s_hat = self.lam, self.integral, self.s_hat
        controller.armed, controller.e_prev = self.armed, self.e_prev


def read_checkpoint(adapter_dir: Path) -> Checkpoint | None:
    state, weights = adapter_dir / STATE_FILE, adapter_dir / ADAPTER_FILE
    if not (state.exists() and weights.exists()):
        return None
    return Checkpoint(**json.loads(state.read_text()))


def read_metrics(adapter_dir: str | Path, up_to_step: int | None = None) -> list[dict]:
    path = Path(adapter_dir) / METRICS_FILE
    rows = read_jsonl(path) if path.exists() else []
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
        state = Checkpoint.of(step, get_lambda(self.model), self.controller)
        tmp = self.dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(state)))
        tmp.replace(self.dir / STATE_FILE)


def save_adapter(model: Any, path: Path) -> None:
    import mlx.core as mx

    tmp = path.with_name(path.stem + ".tmp.safetensors")
    mx.save_safetensors(str(tmp), dict(lora_params(model)))
    tmp.replace(path)
