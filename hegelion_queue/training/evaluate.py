"""Did the adapter learn? Held-out masked cross-entropy and dialectic format adherence, base model vs adapter.

Scores the split the trainer held out (or any data given): the cross-entropy of the assistant's tokens only
(the training mask), in nats and bits per token, and greedy generations for held-out prompts rendered exactly
as in training, counted as adherent when `dialectic.parse` accepts them as a complete THESIS / ANTITHESIS /
SYNTHESIS + final answer. Works on adapters made by stock `mlx_lm.lora` too (messages or prompt/completion
data). Writes `eval.json` and `eval_samples.jsonl` into the adapter folder.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hegelion_queue.training import intervals, lm
from hegelion_queue.training.convert import (ConvertStats, read_jsonl, read_samples, sample_messages, split_chat,
                                             wants_think_tags)
from hegelion_queue.dialectic import DialecticError, parse
from hegelion_queue.errors import HegelionError
from hegelion_queue.training.eval_summary import summary_line  # noqa: F401 (the CLI's and status' line; pure)

logger = logging.getLogger("hegelion_queue.evaluate")

EVAL_FILE = "eval.json"
SAMPLES_FILE = "eval_samples.jsonl"


@dataclass
class EvalArgs:
    adapter_path: str
    model: str | None = None  # default: the model named in adapter_config.json
    data: str | None = None  # default: the split the trainer held out (<adapter>/data, or mlx-lm's "data")
    max_prompts: int = 50
    max_tokens: int | None = None  # default: 1.25 x the longest reference answer, at least 64
    train_samples: int = 100  # training samples scored for the generalisation gap
    batch_size: int = 8
    max_seq_length: int = 2048
    min_section_chars: int = 20


@dataclass
class Split:
    """Conversations (messages lists, the assistant's answer last) to score."""

    valid: list[list[dict]]
    train: list[list[dict]]
    source: str


# --- data ----------------------------------------------------------------------------------------------


def _conversation(record: dict, where: str, think_tags: bool = False) -> list[dict]:
    if isinstance(record.get("messages"), list) and record["messages"]:
        return record["messages"]
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    if isinstance(record.get("instruction"), str) and isinstance(record.get("output"), str):
        return sample_messages(record, think_tags)  # as the trainer renders it
    raise HegelionError(
        f"{where}: records need 'messages', 'prompt'/'completion' or the generator's fields; 'text' records cannot "
        "separate the prompt from the answer"
    )


def _read_dir(path: Path) -> Split:
    valid = [_conversation(r, str(path / "valid.jsonl")) for r in read_jsonl(path / "valid.jsonl")]
    train_file = path / "train.jsonl"
    train = [_conversation(r, str(train_file)) for r in read_jsonl(train_file)] if train_file.exists() else []
    return Split(valid, train, str(path))


def load_split(args: EvalArgs, config: dict) -> Split:
    """--data (a directory with valid.jsonl, or a JSONL that is all held out), else the trainer's held-out split."""
    adapter = Path(args.adapter_path)
    if args.data:
        path = Path(args.data)
        if path.is_dir() and (path / "valid.jsonl").exists():
            split = _read_dir(path)
        elif path.is_file():
            rows = read_jsonl(path)
            if rows and "instruction" in rows[0]:  # a generator JSONL: its valid samples, counted skips
                rows = list(read_samples(path, ConvertStats()))
            tags = wants_think_tags(args.model or config.get("model", ""), (config.get("scu") or {}).get("think_tags"))
            split = Split([_conversation(r, str(path), tags) for r in rows], [], str(path))
        else:
            raise HegelionError(f"no evaluation data at {path}: pass a generator JSONL or a directory with valid.jsonl")
    else:
        candidates = [adapter / "data", Path(str(config.get("data") or ""))]
        found = next((c for c in candidates if str(c) not in ("", ".") and (c / "valid.jsonl").exists()), None)
        if found is None:
            raise HegelionError(
                f"{adapter} has no held-out split (no data/valid.jsonl next to the adapter, and adapter_config.json "
                "names none): pass --data RUN_JSONL or a directory with valid.jsonl"
            )
        split = _read_dir(found)
    if not split.valid:
        raise HegelionError(f"{split.source} holds no held-out samples: pass --data with some")
    return split


# --- scoring -------------------------------------------------------------------------------------------


def sample_losses(model: Any, tokenizer: Any, conversations: list[list[dict]], max_seq_length: int,
                  batch_size: int) -> tuple[list[float], list[int]]:
    """Per conversation: the cross-entropy (nats) summed over the assistant's tokens (the training mask), and
    how many tokens that is."""
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    data = lm.AssistantOnlyDataset([{"messages": c} for c in conversations], tokenizer)
    losses: list[float] = []
    counts: list[int] = []
    for start in range(0, len(conversations), batch_size):
        items = [data.process(data[i]) for i in range(start, min(start + batch_size, len(conversations)))]
        lengths = [min(len(t), max_seq_length) for t, _ in items]
        batch = np.zeros((len(items), max(lengths)), np.int32)
        for row, ((tokens, _), n) in enumerate(zip(items, lengths)):
            batch[row, :n] = tokens[:n]
        batch = mx.array(batch)
        mask = lm.loss_mask(mx.array([[off, n] for (_, off), n in zip(items, lengths)]), batch.shape[1] - 1)
        ce = nn.losses.cross_entropy(model(batch[:, :-1]), batch[:, 1:]) * mask
        losses += ce.astype(mx.float32).sum(axis=1).tolist()
        counts += mask.sum(axis=1).tolist()
    return losses, counts


def mean_ce(losses: list[float], counts: list[int]) -> float:
    """Mean cross-entropy (nats) per scored token, from sample_losses (NaN when no token was scored)."""
    tokens = sum(counts)
    return sum(losses) / tokens if tokens else float("nan")


def generate(model: Any, tokenizer: Any, conversations: list[list[dict]], max_tokens: int) -> list[str]:
    """Greedy answers to each conversation's prompt, rendered as in training (mlx-lm's batch generation)."""
    from mlx_lm.generate import batch_generate

    prompts = [tokenizer.encode(split_chat(c, tokenizer)[0], add_special_tokens=False) for c in conversations]
    return batch_generate(model, tokenizer, prompts, max_tokens=max_tokens).texts


def adherence(text: str, min_section_chars: int) -> str | None:
    """None when `text` is a complete dialectic + final answer, else why not."""
    try:
        parse(text, min_section_chars)
    except DialecticError as e:
        return str(e)
    return None


@dataclass
class Scored:
    """One model's figures (eval.json), its generations and why each failed the format, and the per-sample
    held-out losses behind its CE (for paired comparisons; not written)."""

    figures: dict
    texts: list[str]
    errors: list[str | None]
    losses: list[float]
    tokens: list[int]


def score(model: Any, tokenizer: Any, split: Split, prompts: list[list[dict]], args: EvalArgs,
          max_tokens: int) -> Scored:
    """One model's figures: held-out CE (with its bootstrap interval) and train CE, generations and their format
    adherence (with its Wilson interval)."""
    model.eval()
    losses, counts = sample_losses(model, tokenizer, split.valid, args.max_seq_length, args.batch_size)
    tokens = sum(counts)
    ce = mean_ce(losses, counts)
    train = split.train[: args.train_samples]
    train_ce = mean_ce(*sample_losses(model, tokenizer, train, args.max_seq_length, args.batch_size)) if train else None
    t0 = time.monotonic()
    texts = generate(model, tokenizer, prompts, max_tokens) if prompts else []
    gen_s = time.monotonic() - t0
    errors = [adherence(t, args.min_section_chars) for t in texts]
    ok = sum(e is None for e in errors)
    answer_tokens = [len(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    figures = {
        "ce_nats": ce, "ce_ci95": intervals.bootstrap_ce(losses, counts), "bits_per_token": ce / math.log(2),
        "tokens": tokens, "train_ce_nats": train_ce,
        "generalisation_gap": ce - train_ce if train_ce is not None else None,
        "format_ok": ok, "format_rate": ok / len(texts) if texts else None,
        "format_ci95": intervals.wilson(ok, len(texts)),
        "mean_answer_chars": sum(map(len, texts)) / len(texts) if texts else None,
        "mean_answer_tokens": sum(answer_tokens) / len(texts) if texts else None,
        "generation_s_per_prompt": gen_s / len(texts) if texts else None,
    }
    return Scored(figures, texts, errors, losses, counts)


def answer_budget(tokenizer: Any, prompts: list[list[dict]]) -> int:
    """The default longest generation: 1.25x the longest reference answer, at least 64 tokens."""
    longest = max((len(tokenizer.encode(c[-1]["content"], add_special_tokens=False)) for c in prompts), default=0)
    return max(64, math.ceil(1.25 * longest))


def _adapter_config(adapter: Path) -> dict:
    config_file = adapter / "adapter_config.json"
    if not (config_file.exists() and (adapter / lm.ADAPTER_FILE).exists()):
        raise HegelionError(f"no adapter at {adapter}: it needs adapter_config.json and {lm.ADAPTER_FILE}")
    return json.loads(config_file.read_text())


def apply_adapter(model: Any, adapter: Path, model_name: str) -> None:
    """Load the adapter onto `model` (replacing one loaded before), with one line when it does not fit."""
    from mlx_lm.tuner.utils import load_adapters, remove_lora_layers

    remove_lora_layers(model)
    try:
        load_adapters(model, str(adapter))
    except (ValueError, KeyError) as e:
        trained_for = _adapter_config(adapter).get("model", "another model")
        raise HegelionError(
            f"the adapter in {adapter} does not fit {model_name!r} (it was trained for {trained_for!r}: "
            f"{str(e).splitlines()[-1].strip()}); pass --model with its base model"
        ) from e


def evaluate(args: EvalArgs, baselines: dict[str, str] | None = None) -> dict:
    """Base vs adapter (and any `baselines`: name -> adapter folder, scored the same way); writes the reports."""
    from mlx_lm.tuner.utils import remove_lora_layers

    adapter = Path(args.adapter_path)
    config = _adapter_config(adapter)
    model_name = args.model or config.get("model")
    if not model_name:
        raise HegelionError(f"{adapter}/adapter_config.json names no base model: pass --model")
    split = load_split(args, config)
    t0 = time.monotonic()
    model, tokenizer = lm.load_model(model_name)
    prompts = split.valid[: args.max_prompts]
    references = [c[-1]["content"] for c in prompts]
    max_tokens = args.max_tokens or answer_budget(tokenizer, prompts)

    apply_adapter(model, adapter, model_name)  # first: an adapter for another model fails before any work
    ours = score(model, tokenizer, split, prompts, args, max_tokens)
    tuned, texts, errors = ours.figures, ours.texts, ours.errors
    remove_lora_layers(model)
    base_scored = score(model, tokenizer, split, prompts, args, max_tokens)
    base, base_texts, base_errors = base_scored.figures, base_scored.texts, base_scored.errors
    others = {}
    for name, path in (baselines or {}).items():
        apply_adapter(model, Path(path), model_name)
        other = score(model, tokenizer, split, prompts, args, max_tokens)
        others[name] = {"adapter_path": str(path), **other.figures, "versus": versus(ours, other)}

    report = {
        "model": model_name, "adapter_path": str(adapter), "data": split.source,
        "held_out": len(split.valid), "train_scored": min(len(split.train), args.train_samples),
        "prompts": len(prompts), "max_tokens": max_tokens,
        "base": base, "adapter": tuned,
        "ce_ratio": tuned["ce_nats"] / base["ce_nats"] if base["ce_nats"] else None,
        "generalisation_gap": tuned["generalisation_gap"],
        "baselines": others,
        "seconds": round(time.monotonic() - t0, 3),
    }
    (adapter / EVAL_FILE).write_text(json.dumps(report, indent=2))
    with open(adapter / SAMPLES_FILE, "w", encoding="utf-8") as f:
        for conv, ref, b, be, a, ae in zip(prompts, references, base_texts, base_errors, texts, errors):
            prompt = next((m["content"] for m in reversed(conv[:-1]) if m["role"] == "user"), "")
            f.write(json.dumps({"prompt": prompt, "reference": ref, "base": b, "base_format_error": be,
                                "adapter": a, "adapter_format_error": ae}, ensure_ascii=False) + "\n")
    logger.info("evaluated %s: held-out CE %.3f -> %.3f nats, format %s -> %s", adapter, base["ce_nats"],
                tuned["ce_nats"], base["format_rate"], tuned["format_rate"])
    return report


def versus(ours: Scored, other: Scored) -> dict:
    """The adapter against another one (e.g. the plain-LoRA twin) on the same held-out samples: ratio of held-out
    CE, differences (ours − theirs), and the paired bootstrap interval of the CE difference."""
    a, b = ours.figures, other.figures
    diff = {f"{k}_diff": a[k] - b[k] for k in ("ce_nats", "generalisation_gap", "format_rate")
            if a.get(k) is not None and b.get(k) is not None}
    paired = intervals.bootstrap_ce_diff(ours.losses, other.losses, ours.tokens) if ours.tokens == other.tokens else None
    return {"ce_ratio": a["ce_nats"] / b["ce_nats"] if b["ce_nats"] else None, **diff, "ce_diff_ci95": paired}
