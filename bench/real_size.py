"""`make bench BENCH_ARGS=--real-size`: what LoRA training of `make run`'s default model costs on this machine.

A model with DeepSeek-R1-Distill-Qwen-1.5B's exact architecture (its config.json values, written out below) and random
weights, built offline with mlx-lm's own qwen2 classes and saved in bf16 as the real one ships, is trained by the
trainer (`train.fit`, its defaults: LoRA rank 16 on the last 16 of 28 blocks, batch 4) on the demo's samples at the
demo's sequence lengths (max 512 tokens), in a child process: seconds per step and tokens/s after the compiling first
step, the child's own peak RSS (VmHWM), the trainer's measured ETA, and what the default 500 steps take. In the same
run, MLX's bf16 and float32 matmul at the model's MLP shape: why the trainer computes in float32 on a CPU.

    python -m bench.run --real-size            # ~10 min on 2 cores, ~15 GB of RAM, 3.6 GB of disk (a temp dir)
    python -m bench.real_size train MODEL_DIR STEPS OUT.json    # the child
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from bench.figure import Figure

# deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B's config.json (the values that shape the model and its cost)
DEEPSEEK_R1_DISTILL_QWEN_1_5B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
    "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
    "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 131072, "max_window_layers": 21,
    "rms_norm_eps": 1e-06, "rope_theta": 10000, "tie_word_embeddings": False, "use_sliding_window": False,
    "sliding_window": 4096, "attention_dropout": 0.0, "initializer_range": 0.02, "bos_token_id": 151643,
    "eos_token_id": 151643, "torch_dtype": "bfloat16", "use_cache": True,
}
DEMO_MAX_SEQ_LENGTH = 512  # hegelion_queue/ops/demo.py
DEMO_SAMPLES = 64


def build(out_dir: Path) -> Path:
    """The model directory: config.json, random bf16 weights, the tiny tokenizer (its ids all lie in the vocabulary)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models.qwen2 import Model, ModelArgs

    from tests.make_tiny_model import build_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out_dir)
    (out_dir / "config.json").write_text(json.dumps(DEEPSEEK_R1_DISTILL_QWEN_1_5B, indent=2))
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(DEEPSEEK_R1_DISTILL_QWEN_1_5B))  # lazy: nothing is computed yet
    model.set_dtype(mx.bfloat16)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights)  # evaluated one array at a time
    return out_dir


def parameters(config: dict) -> int:
    h, i, v, n = config["hidden_size"], config["intermediate_size"], config["vocab_size"], config["num_hidden_layers"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    per_layer = h * h + 2 * h * kv + h * h + (h + 2 * kv) + 3 * h * i + 2 * h
    return v * h * (1 if config["tie_word_embeddings"] else 2) + n * per_layer + h


def matmul_ratio(rows: int = 1200) -> dict:
    """bf16 / float32 time of one (rows × hidden) @ (hidden × intermediate) matmul, the MLP's shape at batch 4."""
    from hegelion_queue.training import blas

    blas.use_openblas()
    import mlx.core as mx

    h, i = DEEPSEEK_R1_DISTILL_QWEN_1_5B["hidden_size"], DEEPSEEK_R1_DISTILL_QWEN_1_5B["intermediate_size"]
    seconds = {}
    for name, dtype, reps in (("float32", mx.float32, 5), ("bfloat16", mx.bfloat16, 2)):
        a, b = mx.random.normal((rows, h)).astype(dtype), mx.random.normal((h, i)).astype(dtype)
        mx.eval(a, b, a @ b)  # warm
        t0 = time.perf_counter()
        for _ in range(reps):
            mx.eval(a @ b)
        seconds[name] = (time.perf_counter() - t0) / reps
    flops = 2 * rows * h * i
    return {"ratio": seconds["bfloat16"] / seconds["float32"], "float32_s": seconds["float32"],
            "bfloat16_s": seconds["bfloat16"], "float32_gflops": flops / seconds["float32"] / 1e9,
            "bfloat16_gflops": flops / seconds["bfloat16"] / 1e9}


def train(model_dir: Path, steps: int, out: Path) -> None:
    """The child: the trainer on the demo's samples, one metrics row per step, the figures into `out`."""
    import contextlib
    import io
    import tempfile

    from hegelion_queue.training import train as tr
    from tests.make_tiny_model import fake_teacher_rows

    work = Path(tempfile.mkdtemp(prefix="real-size-", dir=model_dir.parent))
    data = work / "run.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in fake_teacher_rows(DEMO_SAMPLES)))
    estimates = []
    args = tr.TrainArgs(model=str(model_dir), adapter_path=str(work / "adapter"), iters=steps, batch_size=4,
                        max_seq_length=DEMO_MAX_SEQ_LENGTH, valid_fraction=0.0, eval_prompts=0, steps_per_report=1,
                        save_every=10**6, resume=False)
    t0 = time.monotonic()
    with contextlib.redirect_stdout(io.StringIO()):
        result = tr.fit(data, args, on_estimate=estimates.append)
    rows = tr.read_metrics(args.adapter_path)
    step_s = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(rows, rows[1:])]  # steps 2…: the first compiles
    tokens = [r["tokens_per_s"] for r in rows[1:]]
    from hegelion_queue.training.eta import lines

    out.write_text(json.dumps({
        "s_per_step": statistics.median(step_s), "step_s": step_s, "tokens_per_s": statistics.median(tokens),
        "first_step_s": rows[0]["elapsed_s"], "trained_tokens": rows[-1]["trained_tokens"],
        "mean_tokens_per_step": rows[-1]["trained_tokens"] / len(rows), "device": result.summary["device"],
        "wall_s": time.monotonic() - t0, "estimate": estimates[0].as_dict() if estimates else None,
        "estimate_lines": lines(estimates[0]) if estimates else [],
        "lora": {"rank": args.lora_rank, "layers": args.num_layers, "batch": args.batch_size},
    }))


def figures(bench) -> list:
    """The real-size figures, measured in one run (bench.run --real-size)."""
    import os
    import sys as _sys

    from hegelion_queue.training import blas

    blas.use_openblas()  # before build() imports mlx: the float32 matmul below must be the trainer's
    tmp = bench.tmp / "real-size"
    steps = 1 + bench.args.real_steps
    t0 = time.monotonic()
    model_dir = build(tmp / "deepseek-r1-distill-qwen-1.5b-architecture")
    build_s = time.monotonic() - t0
    out = tmp / "train.json"
    wall, kib = bench.run_timed([_sys.executable, "-m", "bench.real_size", "train", str(model_dir), str(steps),
                                 str(out)], bench.env())
    got = json.loads(out.read_text())
    mm = matmul_ratio(int(got["mean_tokens_per_step"]))
    n = parameters(DEEPSEEK_R1_DISTILL_QWEN_1_5B)
    what = (f"DeepSeek-R1-Distill-Qwen-1.5B architecture ({n / 1e9:.2f} B parameters, random bf16 weights), LoRA r16 on "
            f"16 of 28 blocks, batch 4, demo samples ({got['mean_tokens_per_step'] / 4:.0f} tokens a sequence), "
            f"{got['device']}, float32")
    step = Figure(f"real size: seconds per training step, {what}", "s", "report")
    step.values = got["step_s"]
    step.detail = [{"first_step_s": got["first_step_s"], "model_build_s": build_s, "child_wall_s": wall,
                    "estimate": got["estimate"], "estimate_lines": got["estimate_lines"],
                    "cores": os.cpu_count()}]
    tps = Figure("real size: tokens per second (training)", " tok/s", "report")
    tps.values = [got["tokens_per_s"]]
    rss = Figure("real size: peak RSS of the training process (its own VmHWM)", "MB", "report")
    rss.values = [kib / 1024]
    total = Figure("real size: the default 500-step training at that pace (make run)", " h", "report")
    total.values = [500 * got["s_per_step"] / 3600]
    ratio = Figure("real size: bf16 / float32 matmul time at the model's MLP shape (why CPU training casts to float32)",
                   "x", "report")
    ratio.values = [mm["ratio"]]
    ratio.detail = [mm]
    return [step, tps, rss, total, ratio]


if __name__ == "__main__":
    if sys.argv[1:2] == ["train"]:
        train(Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
    else:
        sys.exit(__doc__)
