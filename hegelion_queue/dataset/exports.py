"""Other shapes of a run's samples: `scu` (the converter's text form) and `dpo` preference pairs.

DPO pairs use the dialectic itself: the synthesis and final answer are preferred over the thesis or the
antithesis alone (`prompt`, `chosen`, `rejected` strings, as TRL's DPOTrainer and mlx-lm DPO loaders read).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Literal

import orjson

from ..training.convert import record, wants_think_tags

Rejected = Literal["thesis", "antithesis", "both"]


def dpo_pairs(sample: dict[str, Any], rejected: Rejected = "thesis") -> Iterator[dict[str, str]]:
    tr = sample["hegelion_trace"]
    chosen = f"{tr['synthesis'].strip()}\n\n{tr['final_answer'].strip()}"
    for side in (("thesis", "antithesis") if rejected == "both" else (rejected,)):
        yield {"prompt": sample["instruction"], "chosen": chosen, "rejected": tr[side].strip()}


def transform(sft: Path, out: Path, fmt: str, *, rejected: Rejected = "thesis", tokenizer: Any = None,
              model_name: str = "") -> int:
    """Rewrite an exported (SFT) JSONL as `fmt`; returns the number of lines written."""
    think = wants_think_tags(model_name)
    n = 0
    with open(sft, "rb") as src, open(out, "wb") as dst:
        for line in src:
            sample = orjson.loads(line)
            rows = dpo_pairs(sample, rejected) if fmt == "dpo" else [record(sample, "text", tokenizer, think)]
            for row in rows:
                dst.write(orjson.dumps(row) + b"\n")
                n += 1
    return n
