"""Generator samples (JSONL) -> training data in the layout mlx-lm's `--data` expects.

Each valid sample becomes one conversation: system, user (instruction + input), assistant (output, the
`<thought>` block and the final answer). Written as `{"text": ...}` rendered with the target model's chat
template, or as `{"messages": [...]}` for mlx-lm's chat loader; split deterministically into
`train.jsonl` / `valid.jsonl`. Lines that are not valid samples are skipped and counted, never fatal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from hegelion_queue.dialectic import DialecticError, validate_sample
from hegelion_queue.errors import HegelionError

logger = logging.getLogger("hegelion_queue.convert")

Format = Literal["text", "messages"]
FORMATS = ("text", "messages")

# Placed as the assistant's content to find where the template puts it (see split_chat).
_SENTINEL = "HEGELIONASSISTANTCONTENT7f3a9c"
_THOUGHT_TAG = re.compile(r"<(/?)thought>", re.IGNORECASE)


@dataclass
class ConvertStats:
    read: int = 0  # non-blank lines read
    written: int = 0  # samples written (train + valid)
    train: int = 0
    valid: int = 0
    skipped_bad_json: int = 0
    skipped_missing_fields: int = 0
    skipped_invalid_dialectic: int = 0

    @property
    def skipped(self) -> int:
        return self.skipped_bad_json + self.skipped_missing_fields + self.skipped_invalid_dialectic

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def wants_think_tags(model_name: str, think_tags: bool | None = None) -> bool:
    """DeepSeek-R1-family models reason inside <think>; an explicit True/False wins over the name."""
    if think_tags is not None:
        return think_tags
    return "deepseek-r1" in (model_name or "").lower()


def to_think_tags(text: str) -> str:
    return _THOUGHT_TAG.sub(lambda m: f"<{m.group(1)}think>", text)


def sample_messages(sample: dict, think_tags: bool = False) -> list[dict[str, str]]:
    """system (when set), user = instruction (+ input), assistant = output."""
    user = sample["instruction"].strip()
    if (extra := (sample.get("input") or "").strip()):
        user = f"{user}\n\n{extra}"
    output = sample["output"].strip()
    if think_tags:
        output = to_think_tags(output)
    msgs = [{"role": "system", "content": sample["system"].strip()}] if (sample.get("system") or "").strip() else []
    return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def chatml(messages: list[dict[str, str]]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def has_chat_template(tokenizer: Any) -> bool:
    if tokenizer is None:
        return False
    flag = getattr(tokenizer, "has_chat_template", None)  # mlx-lm's TokenizerWrapper
    return bool(flag) if flag is not None else getattr(tokenizer, "chat_template", None) is not None


def split_chat(messages: list[dict[str, str]], tokenizer: Any = None) -> tuple[str, str]:
    """(prompt, completion) text of a conversation whose last message is the assistant's; prompt + completion
    is the whole rendered conversation, and only the completion should carry loss.

    The assistant content is spliced in verbatim rather than rendered by the template, because some
    templates rewrite it: DeepSeek-R1's keeps only what follows `</think>` in assistant turns, which would
    silently drop the whole dialectic from the training data.
    """
    *history, last = messages
    if last["role"] != "assistant":
        raise ValueError("the last message must be the assistant's")
    if not has_chat_template(tokenizer):
        return chatml(history) + "<|im_start|>assistant\n", last["content"] + "<|im_end|>\n"
    rendered = tokenizer.apply_chat_template(history + [{"role": "assistant", "content": _SENTINEL}], tokenize=False)
    if rendered.count(_SENTINEL) != 1:
        raise HegelionError("the model's chat template does not render the assistant's answer; use --format messages")
    prompt, suffix = rendered.split(_SENTINEL)
    return prompt, last["content"] + suffix


def render_text(messages: list[dict[str, str]], tokenizer: Any = None) -> str:
    prompt, completion = split_chat(messages, tokenizer)
    return prompt + completion


def read_samples(in_path: Path, stats: ConvertStats) -> Iterator[dict]:
    """Valid samples of a generator JSONL, counting what is skipped and why."""
    with open(in_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            stats.read += 1
            try:
                sample = json.loads(line)
            except json.JSONDecodeError:
                stats.skipped_bad_json += 1
                logger.debug("%s:%d: not JSON", in_path, lineno)
                continue
            if not _has_fields(sample):
                stats.skipped_missing_fields += 1
                logger.debug("%s:%d: missing instruction/output", in_path, lineno)
                continue
            try:
                validate_sample(sample)
            except DialecticError as e:
                stats.skipped_invalid_dialectic += 1
                logger.debug("%s:%d: %s", in_path, lineno, e)
                continue
            yield sample


def _has_fields(sample: Any) -> bool:
    if not isinstance(sample, dict):
        return False
    required_ok = all(isinstance(sample.get(k), str) and sample[k].strip() for k in ("instruction", "output"))
    optional_ok = all(sample.get(k) is None or isinstance(sample[k], str) for k in ("input", "system"))
    return required_ok and optional_ok


def split_indices(n: int, valid_fraction: float = 0.05, seed: int = 42) -> tuple[list[int], list[int]]:
    """Deterministic (train, valid) indices, each in input order; ≥1 valid and ≥1 train once n ≥ 2."""
    if not 0 <= valid_fraction < 1:
        raise ValueError("valid_fraction must be in [0, 1)")
    n_valid = round(n * valid_fraction)
    if valid_fraction > 0 and n >= 2:
        n_valid = min(max(n_valid, 1), n - 1)
    chosen = set(np.random.default_rng(seed).permutation(n)[:n_valid].tolist())
    return [i for i in range(n) if i not in chosen], sorted(chosen)


def record(sample: dict, fmt: Format, tokenizer: Any = None, think_tags: bool = False) -> dict:
    messages = sample_messages(sample, think_tags)
    if fmt == "messages":
        return {"messages": messages}
    return {"text": render_text(messages, tokenizer)}


def read_jsonl(path: Path) -> list[dict]:
    """Every row of a JSONL file (blank lines skipped); a line that is not JSON is an error naming it."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise HegelionError(f"{path}:{lineno} is not JSON ({e.msg})") from e
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        tmp.replace(path)  # a crash never leaves a half-written split behind
    except OSError as e:
        raise HegelionError(f"cannot write {path}: {e.strerror or e}") from e


def sample_key(sample: dict) -> str:
    """Samples are split in prompt-id order, not file order: workers commit in whatever order they finish, and the
    same run must give the same train/valid split on every host and every export."""
    trace = sample.get("hegelion_trace")
    if isinstance(trace, dict) and isinstance(trace.get("prompt_id"), str):
        return trace["prompt_id"]
    return hashlib.sha256((sample["instruction"] + "\n" + (sample.get("input") or "")).encode("utf-8")).hexdigest()


def convert(
    in_path: str | Path,
    out_dir: str | Path | None,
    *,
    fmt: Format = "text",
    tokenizer: Any = None,
    model_name: str = "",
    think_tags: bool | None = None,
    valid_fraction: float = 0.05,
    seed: int = 42,
    single_file: str | Path | None = None,
) -> ConvertStats:
    """Write `out_dir/train.jsonl` and `out_dir/valid.jsonl` (when out_dir is given) and every sample to
    `single_file` (when given)."""
    if fmt not in FORMATS:
        raise HegelionError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    in_path = Path(in_path)
    if not in_path.is_file():
        raise HegelionError(f"no such file: {in_path} (export the run first)")
    if fmt == "text" and tokenizer is not None and not has_chat_template(tokenizer):
        logger.warning("tokenizer has no chat template: rendering ChatML")
    tags = wants_think_tags(model_name, think_tags)
    stats = ConvertStats()
    samples = sorted(read_samples(in_path, stats), key=sample_key)
    rows = [record(s, fmt, tokenizer, tags) for s in samples]
    train_idx, valid_idx = split_indices(len(rows), valid_fraction, seed)
    if out_dir is not None:
        out_dir = Path(out_dir)
        _write_jsonl(out_dir / "train.jsonl", [rows[i] for i in train_idx])
        _write_jsonl(out_dir / "valid.jsonl", [rows[i] for i in valid_idx])
    if single_file is not None:
        _write_jsonl(Path(single_file), rows)
    stats.written, stats.train, stats.valid = len(rows), len(train_idx), len(valid_idx)
    logger.info(
        "converted %s: %d written (%d train, %d valid), %d skipped", in_path, stats.written, stats.train,
        stats.valid, stats.skipped,
    )
    return stats


def load_tokenizer(model: str) -> Any:
    """The target model's tokenizer (Hub id or local directory) for `--format text`."""
    try:
        from transformers import AutoTokenizer
    except ImportError as e:  # pragma: no cover - transformers comes with the train extra
        raise HegelionError("rendering a chat template needs the train extra: pip install -e '.[train]'") from e
    try:
        return AutoTokenizer.from_pretrained(model)
    except Exception as e:  # noqa: BLE001 - network, missing repo, bad directory: one actionable line
        raise HegelionError(
            f"cannot load the tokenizer of {model!r} ({type(e).__name__}): set HEGELION_TRAIN_MODEL to a reachable "
            "Hub id or a local model directory"
        ) from e
