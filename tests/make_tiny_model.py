"""Build a tiny random Qwen2 model directory offline, loadable by `mlx_lm.load(path)`.

A byte-level BPE trained here on a small corpus (with the ChatML and <think> tokens), a ChatML chat
template, and random weights from mlx-lm's own `qwen2.Model`. Nothing is downloaded.

    python tests/make_tiny_model.py OUT_DIR [--corpus RUN.jsonl --vocab 1024]   # BPE also trained on RUN's samples
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK = ["<think>", "</think>"]  # added, not special: they must survive decoding, as in Qwen's tokenizers

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = [
    "You are a dialectical reasoning engine.",
    "**THESIS**: the strongest initial answer, with its reasons.",
    "**ANTITHESIS**: the strongest objections, counter-examples and alternative views.",
    "**SYNTHESIS**: a resolution that keeps what survives from both and corrects what does not.",
    "<thought> </thought> <think> </think> final answer",
    "What is the capital of France? Paris is the capital of France.",
    "Explain why the sky is blue. Light scatters off molecules in the air; blue scatters most.",
    "How many legs does a spider have? A spider has eight legs, an insect has six.",
    "Is water wet? Water makes other things wet; whether water itself is wet depends on the definition.",
    "Write a short poem about the sea. The sea is wide and grey and deep.",
    "the quick brown fox jumps over the lazy dog 0123456789 , . ; : ! ? ( ) - ' \"",
]


def build_tokenizer(out_dir: Path, vocab_size: int = 512, corpus: list[str] | None = None) -> int:
    """Train and save tokenizer.json + tokenizer_config.json; returns the vocabulary size. `corpus`: texts to train
    the BPE on besides the built-in lines (real text then takes fewer tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import ByteLevel as ByteLevelProcessor

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = ByteLevelProcessor(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20 + list(corpus or []), trainer=trainer)
    tok.add_tokens(THINK)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 4096,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "chat_template": CHATML_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tok.get_vocab_size()


def build_tiny_model(out_dir: str | Path, seed: int = 0, hidden_size: int = 128, vocab_size: int = 512,
                     corpus: list[str] | None = None) -> Path:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models.qwen2 import Model, ModelArgs

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out_dir, vocab_size, corpus)
    with open(out_dir / "tokenizer.json", encoding="utf-8") as f:
        eos_id = next(t["id"] for t in json.load(f)["added_tokens"] if t["content"] == "<|im_end|>")
    config = {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": hidden_size,
        "num_hidden_layers": 2,
        "intermediate_size": 2 * hidden_size,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    mx.save_safetensors(str(out_dir / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return out_dir


_TOPICS = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("Why is the sky blue?", "Air scatters blue light more than red light."),
    ("Is water wet?", "Water makes things wet; calling water itself wet is a matter of definition."),
    ("Write a short poem about the sea.", "The sea is wide and grey and deep."),
]


def sample_rows(n: int) -> list[dict]:
    """`n` valid generator samples (hegelion_queue.dialectic's format), short enough for the tiny model."""
    from hegelion_queue.dialectic import Dialectic, build_sample

    rows = []
    for i in range(n):
        question, answer = _TOPICS[i % len(_TOPICS)]
        d = Dialectic(
            thesis=f"the strongest initial answer {i}: {answer}",
            antithesis="the strongest objections and counter-examples.",
            synthesis="keep what survives from both and correct what does not.",
            final_answer=answer,
        )
        rows.append(build_sample(f"{question} ({i})", d, {"teacher": "fake", "prompt_id": f"id{i}"}))
    return rows


DEMO_PROMPTS = Path(__file__).parent / "fixtures" / "demo_prompts.txt"


def fake_teacher_rows(n: int) -> list[dict]:
    """Samples as the pipeline makes them from the first `n` demo prompts with the fake teacher (its answer to
    the framed prompt, parsed and built into a sample), without Redis or workers: the trainer's learning test."""
    import hashlib

    from hegelion_queue.dialectic import build_sample, frame, parse

    from .fake_kimi import dialectic

    prompts = DEMO_PROMPTS.read_text(encoding="utf-8").splitlines()[:n]
    return [build_sample(p, parse(dialectic(frame(p))), {"teacher": "fake", "prompt_id": hashlib.sha256(
        p.encode()).hexdigest()}) for p in prompts]


def corpus_of(jsonl: str | Path) -> list[str]:
    """The texts of a generator JSONL's samples (prompt and answer), to train the tokenizer on."""
    rows = [json.loads(line) for line in Path(jsonl).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [f"{r['instruction']}\n{r['output']}" for r in rows]


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Build a tiny random Qwen2 model directory offline.")
    p.add_argument("out", nargs="?", default="tiny-qwen2")
    p.add_argument("--corpus", help="a generator JSONL whose samples the BPE is also trained on")
    p.add_argument("--vocab", type=int, default=512, help="BPE vocabulary size")
    a = p.parse_args()
    path = build_tiny_model(a.out, vocab_size=a.vocab, corpus=corpus_of(a.corpus) if a.corpus else None)
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(path))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=False)
    print(path, "->", repr(mlx_lm.generate(model, tokenizer, prompt=prompt, max_tokens=8)))
