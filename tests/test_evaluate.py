"""`hegelion-queue eval`: on an adapter made by stock `mlx_lm.lora`, and one clear line for each bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hegelion_queue.training.blas import openblas_path
from hegelion_queue.training.convert import convert

pytestmark = pytest.mark.train
pytest.importorskip("mlx_lm", reason="mlx-lm is not importable: pip install -e '.[train]'", exc_type=ImportError)


@pytest.fixture(scope="module")
def stock_adapter(tiny_model, tmp_path_factory):
    """A LoRA adapter trained by stock `mlx_lm.lora --mask-prompt` on the fake teacher's samples (a real process)."""
    from .make_tiny_model import fake_teacher_rows

    root = tmp_path_factory.mktemp("stock")
    source = root / "run.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in fake_teacher_rows(60)))
    convert(source, root / "data", fmt="messages", valid_fraction=0.2, seed=0)
    subprocess.run(
        [sys.executable, "-m", "mlx_lm", "lora", "--model", tiny_model, "--train", "--data", str(root / "data"),
         "--mask-prompt", "--num-layers", "-1", "--iters", "20", "--batch-size", "4", "--learning-rate", "1e-3",
         "--steps-per-eval", "100", "--adapter-path", str(root / "adapter")],
        check=True, capture_output=True, timeout=300, env={**os.environ, "LD_PRELOAD": openblas_path() or ""},
    )
    return root


def test_eval_scores_a_stock_mlx_lm_adapter_on_the_data_its_config_names(hq, stock_adapter):
    out = hq("eval", "--adapter-path", str(stock_adapter / "adapter"), "--max-prompts", "4", "--max-tokens", "32",
             timeout=300).stdout
    assert "held-out CE" in out and "format" in out
    report = json.loads((stock_adapter / "adapter" / "eval.json").read_text())
    assert report["held_out"] == 12 and report["prompts"] == 4 and report["data"] == str(stock_adapter / "data")
    assert report["adapter"]["ce_nats"] < report["base"]["ce_nats"]  # 20 steps already move it
    for who in ("base", "adapter"):  # 95 % intervals: bootstrap over the 12 held-out samples, Wilson over 4 prompts
        fig = report[who]
        lo, hi = fig["ce_ci95"]
        assert lo < fig["ce_nats"] < hi and hi - lo < 0.5 * fig["ce_nats"]
        lo, hi = fig["format_ci95"]
        assert lo <= fig["format_rate"] <= hi and hi - lo > 0.3  # 4 prompts say little, and the interval shows it
    assert f"[{report['adapter']['ce_ci95'][0]:.3f}, {report['adapter']['ce_ci95'][1]:.3f}]" in out
    lines = (stock_adapter / "adapter" / "eval_samples.jsonl").read_text().splitlines()
    assert len(lines) == 4 and {"prompt", "reference", "base", "adapter"} <= json.loads(lines[0]).keys()


def test_eval_of_an_adapter_without_a_held_out_split_asks_for_data(hq, stock_adapter, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = json.loads((stock_adapter / "adapter" / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "data": str(tmp_path / "gone")}))
    (adapter / "adapters.safetensors").write_bytes((stock_adapter / "adapter" / "adapters.safetensors").read_bytes())
    p = hq("eval", "--adapter-path", str(adapter), check=False)
    assert p.returncode == 1 and "no held-out split" in p.stderr and "--data" in p.stderr
    assert "Traceback" not in p.stderr
    ok = hq("eval", "--adapter-path", str(adapter), "--data", str(stock_adapter / "run.jsonl"), "--max-prompts", "2",
            "--max-tokens", "16", timeout=300)
    assert json.loads((adapter / "eval.json").read_text())["held_out"] == 60, ok.stdout  # all of a generator JSONL


def test_eval_names_the_problem_in_one_line(hq, stock_adapter, tmp_path):
    from .make_tiny_model import build_tiny_model

    adapter = str(stock_adapter / "adapter")
    missing = hq("eval", "--adapter-path", str(tmp_path / "nothing"), check=False)
    assert missing.returncode == 1 and "no adapter at" in missing.stderr
    unloadable = hq("eval", "--adapter-path", adapter, "--model", "hegelion-test/no-such-model", check=False)
    assert unloadable.returncode == 1 and "HEGELION_TRAIN_MODEL" in unloadable.stderr  # the same line train gives
    other = build_tiny_model(tmp_path / "wider", hidden_size=192)
    mismatch = hq("eval", "--adapter-path", adapter, "--model", str(other), check=False, timeout=300)
    assert mismatch.returncode == 1 and "does not fit" in mismatch.stderr and "--model" in mismatch.stderr
    text = tmp_path / "text"
    text.mkdir()
    (text / "valid.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    texts = hq("eval", "--adapter-path", adapter, "--data", str(text), check=False)
    assert texts.returncode == 1 and "'text' records" in texts.stderr
    for p in (missing, unloadable, mismatch, texts):
        assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
