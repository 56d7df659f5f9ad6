"""What the trainer and the eval share: loading a base model, conversations as (tokens, answer offset), the answer
mask. Both import this module; neither imports the other's internals (train.py imports evaluate.py, not back).

MLX itself is imported inside the functions, after OpenBLAS is loaded (blas.py): importing this module is cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hegelion_queue.training import blas
from hegelion_queue.training.convert import split_chat
from hegelion_queue.errors import HegelionError

blas.use_openblas()  # before anything imports mlx

ADAPTER_FILE = "adapters.safetensors"


class AssistantOnlyDataset:
    """`{"messages": [...]}` records -> (tokens, offset) as mlx-lm's ChatDataset with mask_prompt, except
    that the assistant turn is spliced in verbatim (convert.split_chat) and the prompt/answer boundary is
    exact because the two parts are tokenized separately. Wrap in CacheDataset."""

    def __init__(self, data: list[dict], tokenizer: Any):
        self._data, self.tokenizer = data, tokenizer

    def process(self, d: dict) -> tuple[list[int], int]:
        prompt, completion = split_chat(d["messages"], self.tokenizer)
        head = self.tokenizer.encode(prompt, add_special_tokens=False)
        tail = self.tokenizer.encode(completion, add_special_tokens=False)
        return head + tail, len(head)

    def __getitem__(self, idx: int) -> dict:
        return self._data[idx]

    def __len__(self) -> int:
        return len(self._data)


def loss_mask(lengths: Any, n_targets: int) -> Any:
    """(batch, n_targets) mask of the targets that carry loss: the answer, from `offset` to the last real token.

    Target k is token k+1 of the row. mlx-lm's default_loss uses `steps <= length` and so also trains each
    row to predict the padding id after its last token; `<` stops at the last real token.
    """
    import mlx.core as mx

    steps = mx.arange(1, n_targets + 1)
    return mx.logical_and(steps >= lengths[:, 0:1], steps < lengths[:, 1:])


def load_model(model: str) -> tuple[Any, Any]:
    """mlx_lm.load, with one actionable error when the model cannot be had (offline Hub, typo, bad dir)."""
    from mlx_lm import load

    try:
        return load(model)
    except Exception as e:  # noqa: BLE001 - huggingface_hub, OSError, ValueError…: all mean the same to a user
        where = "local directory" if Path(model).exists() else "Hub id (Hub unreachable or no such repo)"
        detail = (str(e).splitlines() or [""])[0]
        detail = detail if len(detail) <= 120 else detail[:119] + "…"
        raise HegelionError(
            f"cannot load model {model!r} as a {where} ({type(e).__name__}: {detail}); "
            "set HEGELION_TRAIN_MODEL to a local model directory or a reachable Hub id"
        ) from e


def device_kind() -> str:
    """Where MLX computes: cpu, cuda (an NVIDIA GPU, the mlx[cuda12|13] builds) or metal (Apple Silicon)."""
    import mlx.core as mx

    if mx.default_device().type == mx.cpu:
        return "cpu"
    return "cuda" if hasattr(mx, "cuda") and mx.cuda.is_available() else "metal"


def is_quantized(model: Any) -> bool:
    """Whether the base model has quantized layers (a 4-/8-bit MLX conversion)."""
    import mlx.nn as nn

    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())


def to_float32(model: Any) -> str | None:
    """Cast a bf16/fp16 model's floating weights to float32 (quantized weights stay packed); the dtype it had, or
    None when there was nothing to cast. On a CPU MLX multiplies bf16 ~40x slower than float32 (it has no bf16
    BLAS), so the trainer computes in float32 there."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    half = {str(v.dtype) for _, v in tree_flatten(model.parameters()) if v.dtype in (mx.bfloat16, mx.float16)}
    if not half:
        return None
    model.set_dtype(mx.float32, lambda dtype: dtype in (mx.bfloat16, mx.float16))
    return ", ".join(sorted(half)).replace("mlx.core.", "")
