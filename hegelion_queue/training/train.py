"""mlx-lm glue: LoRA fine-tuning with the SCU penalty, through `mlx_lm.tuner.train` (no training loop here).

mlx-lm hosts the behaviour we inject (`train_hooks`: the SCU loss and `ScuCallback`); the options are
`train_args.TrainArgs`, the plot `train_plot`. This module prepares the data and runs the training.

Output in the adapter directory: adapters.safetensors + adapter_config.json (loadable by
`mlx_lm.load(model, adapter_path=...)` and `mlx_lm.generate --adapter-path`), metrics.jsonl, training.png,
summary.json, mlx_lm.log, scu_state.json (resume point) and NNNNNNN_adapters.safetensors checkpoints; then
`run_training` adds the plain twin (baseline-plain/) and the eval (eval.json, evaluate.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from hegelion_queue.training import backend, eta, evaluate
from hegelion_queue.training.convert import ConvertStats, convert, read_jsonl
from hegelion_queue.errors import HegelionError
from hegelion_queue.training.lm import (  # noqa: F401 (re-exported)
    ADAPTER_FILE, AssistantOnlyDataset, device_kind, is_quantized, load_model, loss_mask, to_float32,
)
from hegelion_queue.training.args import (  # noqa: F401 (re-exported: train.TrainArgs, …)
    BASELINE_DIR, METRICS_FILE, MLX_LOG_FILE, PLOT_FILE, STATE_FILE, SUMMARY_FILE, OnEstimate, Progress, TrainArgs,
)
from hegelion_queue.training.hooks import (  # noqa: F401 (re-exported)
    Checkpoint, EarlyStop, ScuCallback, attach_lambda, get_lambda, lora_params, lora_sum_w2, make_scu_loss,
    read_checkpoint, read_metrics, save_adapter, set_lambda,
)
from hegelion_queue.training.plot import plot, target_band  # noqa: F401 (re-exported)

logger = logging.getLogger("hegelion_queue.train")


# --- data ---------------------------------------------------------------------------------------------


def _read_split(path: Path) -> list[dict]:
    rows = read_jsonl(path) if path.exists() else []
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


# --- entry points -------------------------------------------------------------------------------------


def learning_rate(args: TrainArgs, step0: int = 0) -> Any:
    """The peak rate, or a cosine decay to 0 over `iters` that a resumed run continues at step `step0`."""
    import mlx.optimizers as optim

    if args.lr_schedule == "constant":
        return args.learning_rate
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
            ckpt.restore(controller)
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
    }
    _save_summary(adapter_dir, summary)
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
    _save_summary(adapter_dir, summary)  # with the twin and the eval
    return summary


def _save_summary(adapter_dir: Path, summary: dict) -> None:
    """summary.json, listing the adapter folder's files (itself included)."""
    summary["files"] = sorted({p.name for p in adapter_dir.iterdir() if p.is_file()} | {SUMMARY_FILE})
    (adapter_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
