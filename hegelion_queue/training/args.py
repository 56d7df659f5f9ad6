"""The trainer's options (`TrainArgs`: one dataclass whose fields carry their help, as mlx-lm's tuner does) and
the names of the files it writes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from hegelion_queue.training import eta, scu
from hegelion_queue.errors import HegelionError
from hegelion_queue.settings import Settings

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

    def __post_init__(self) -> None:  # a bad value stops here, not after the data is converted and the model loaded
        if self.lr_schedule not in ("constant", "cosine"):
            raise HegelionError(f"lr_schedule must be constant or cosine, not {self.lr_schedule!r}")
        if self.baseline not in (None, "plain"):
            raise HegelionError(f"baseline must be plain, not {self.baseline!r}")

    def lora_parameters(self) -> dict:
        return {"rank": self.lora_rank, "scale": self.lora_alpha / self.lora_rank, "dropout": self.lora_dropout}

    def controller(self) -> scu.ScuController:
        return scu.ScuController(
            target_s=self.target_s, kp=self.kp, ki=self.ki, deadband=self.deadband, lambda_init=self.lambda_init,
            lambda_min=self.lambda_min, lambda_max=self.lambda_max, ema_alpha=self.scu_ema, law=self.scu_law,
        )


def check_options(options: Any) -> None:
    """Every key of these trainer options (HEGELION_TRAIN_OPTIONS, an ablation's) names a TrainArgs field."""
    unknown = set(options) - {f.name for f in fields(TrainArgs)}
    if unknown:
        raise HegelionError(f"unknown training option(s): {', '.join(sorted(unknown))}")
