"""LoRA + SCU training through mlx-lm on a tiny random Qwen2 built offline (no download, ~30 steps a run).

MLX compiles its CPU kernels with g++ on first use and caches them under $TMPDIR/mlx:
the first run of this file pays ~15 s for that, later runs reuse the cache.
"""

from __future__ import annotations

import contextlib
import io
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

pytestmark = pytest.mark.train
mlx_lm = pytest.importorskip(
    "mlx_lm", reason="mlx-lm (with an MLX backend) is not importable: pip install -e '.[train]'", exc_type=ImportError
)

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from .make_tiny_model import sample_rows  # noqa: E402
from mlx_lm.tuner.datasets import CacheDataset  # noqa: E402
from mlx_lm.tuner.trainer import iterate_batches  # noqa: E402

from hegelion_queue.training import train as tr  # noqa: E402
from hegelion_queue.training.convert import sample_messages  # noqa: E402
from hegelion_queue.errors import HegelionError  # noqa: E402

BASE = dict(  # the mechanics, in 30 steps: a constant rate, no eval (tests/test_demo.py judges what is learned)
    iters=30, batch_size=4, learning_rate=5e-3, lr_schedule="constant", lora_rank=8, lora_alpha=16,
    max_seq_length=256, scu_update_every=5, steps_per_report=5, save_every=10, valid_fraction=0.1, resume=False,
    eval_prompts=0,
)


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "run.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for row in sample_rows(40):
            f.write(json.dumps(row) + "\n")
        f.write("{truncated line\n")
    return path


@pytest.fixture(scope="session")
def run(tiny_model, data_file, tmp_path_factory):
    """run(name, **overrides) -> (TrainResult, progress rows); each named run trains once per session."""
    done: dict = {}

    def _run(name: str, **kw):
        if name not in done:
            progress: list[dict] = []
            args = tr.TrainArgs(model=tiny_model, adapter_path=str(tmp_path_factory.mktemp(name)), **{**BASE, **kw})
            with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm's progress table
                result = tr.fit(data_file, args, on_progress=progress.append)
            done[name] = (result, progress)
        return done[name]

    return _run


def metrics(result) -> list[dict]:
    with open(os.path.join(result.summary["adapter_path"], tr.METRICS_FILE)) as f:
        return [json.loads(line) for line in f]


def test_loss_decreases_and_reports_are_written(run):
    result, progress = run("lambda0", force_lambda=0.0)
    rows = metrics(result)
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    assert result.summary["final_val_loss"] is not None  # 4 valid samples = one batch: validation ran
    assert progress == [{**r, "iters": 30} for r in rows]  # the on_progress hook sees every row
    for key in ("loss", "data_bpt", "param_bpt", "S", "lambda", "tokens_per_s"):
        assert rows[-1][key] is not None
    assert rows[-1]["data_bpt"] == pytest.approx(rows[-1]["loss"] / np.log(2))
    files = set(result.summary["files"])
    assert {"adapters.safetensors", "adapter_config.json", "metrics.jsonl", "training.png", "summary.json"} <= files
    assert result.summary["convert"]["skipped_bad_json"] == 1 and result.summary["steps"] == 30
    est = result.summary["estimate"]  # measured after steps 2-5 (step 1 compiles), on the device it names
    assert result.summary["device"] == est["device"] == "cpu" and est["step"] == 5 and est["s_per_step"] > 0
    assert 0 < est["remaining_s"] < 25 * est["s_per_step"] + est["val_left"] * est["val_s"] + 0.05  # rounded to 0.1 s


def test_adapter_reloads_with_identical_logits(run, tiny_model):
    result, _ = run("lambda0", force_lambda=0.0)
    model, tokenizer = mlx_lm.load(tiny_model, adapter_path=result.summary["adapter_path"])
    tokens = mx.array([tokenizer.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n")])
    result.model.eval()
    trained, reloaded = result.model(tokens), model(tokens)
    assert np.array_equal(np.array(trained), np.array(reloaded))
    base, _ = mlx_lm.load(tiny_model)
    assert not np.allclose(np.array(base(tokens)), np.array(reloaded), atol=1e-3)  # the adapter is really applied
    text = mlx_lm.generate(model, tokenizer, prompt="What is the capital of France?", max_tokens=5)
    assert isinstance(text, str)


def test_forced_large_lambda_shrinks_lora_weights(run):
    free, _ = run("lambda0", force_lambda=0.0)
    held, _ = run("lambda10", force_lambda=10.0)
    assert metrics(held)[-1]["sum_w2"] < 0.05 * metrics(free)[-1]["sum_w2"]
    assert all(r["lambda"] == 10.0 for r in metrics(held))


def test_controller_lambda_reaches_the_compiled_step(run):
    """Both runs compile their step with λ = 1e-4; only the controller's writes to the model state differ."""
    fixed, _ = run("fixed_small", force_lambda=1e-4, prior_sigma=0.01)
    steered, _ = run("controller", lambda_init=1e-4, target_s=1e-6, scu_law="reference", kp=0.8, ki=0.15,
                     prior_sigma=0.01)
    rows_fixed, rows_steered = metrics(fixed), metrics(steered)
    assert rows_steered[0]["S"] > 100 * 1e-6  # far above S* ...
    lams = [r["lambda"] for r in rows_steered]
    assert lams == sorted(lams) and lams[-1] > 100 * lams[0]  # ... so λ rises at every update
    assert rows_steered[0]["sum_w2"] == pytest.approx(rows_fixed[0]["sum_w2"])  # same path until λ moved
    assert rows_steered[-1]["sum_w2"] < 0.6 * rows_fixed[-1]["sum_w2"]
    assert steered.summary["final_lambda"] == pytest.approx(lams[-1])


def test_lambda_in_model_state_is_read_by_a_compiled_function():
    model = nn.Linear(2, 2)
    tr.attach_lambda(model, 1.0)
    from mlx.utils import tree_flatten

    trainable = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert trainable == ["weight", "bias"]  # λ is frozen: no gradient, not saved in the adapter

    @mx.compile
    def frozen_float(x, lam=tr.get_lambda(model)):
        return x * lam

    from functools import partial

    @partial(mx.compile, inputs=model.state)
    def from_state(x):
        return x * model.scu.lam

    x = mx.array(3.0)
    assert from_state(x).item() == 3.0
    tr.set_lambda(model, 5.0)
    assert from_state(x).item() == 15.0
    assert frozen_float(x).item() == 3.0  # what a Python float would have done


def test_prompt_tokens_carry_no_loss(tiny_model):
    _, tokenizer = mlx_lm.load(tiny_model)
    records = [{"messages": sample_messages(s)} for s in sample_rows(4)]
    data = CacheDataset(tr.AssistantOnlyDataset(records, tokenizer))
    tokens, offset = data[0]
    assert tokenizer.decode(tokens[:offset]).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(tokens[offset:]).startswith("<thought>\n**THESIS**")
    batch, lengths = next(iterate_batches(data, 4, 256))
    mask = np.array(tr.loss_mask(lengths, batch.shape[1] - 1))
    for row, (off, length) in zip(mask, np.array(lengths)):
        targets = np.nonzero(row)[0] + 1  # target k is token k + 1
        assert targets.min() == off and targets.max() == length - 1  # the answer, no prompt, no padding
        assert row.sum() == length - off
    assert tr.loss_tokens(data, 256) == int(mask.sum())

    class Probe(nn.Module):  # uniform logits: CE is log(vocab) on exactly the answer tokens
        def __init__(self):
            super().__init__()
            self.w = mx.zeros((1,))

        def __call__(self, x):
            return mx.zeros((*x.shape, 600)) + self.w

    probe = Probe()
    tr.attach_lambda(probe, 0.0)
    ce, ntoks = tr.make_scu_loss(1000, 0.01)(probe, batch, lengths)
    assert ntoks.item() == mask.sum() and ce.item() == pytest.approx(np.log(600), rel=1e-5)


def test_resume_after_a_crash_continues_the_step_count(tiny_model, data_file, tmp_path, monkeypatch):
    args = tr.TrainArgs(
        model=tiny_model, adapter_path=str(tmp_path / "ad"),
        **{**BASE, "resume": True, "lambda_init": 0.01, "target_s": 1e-4, "kp": 0.0, "ki": 0.5},  # S >> S*: λ rises
    )
    report = tr.ScuCallback.on_train_loss_report

    def crash_at_15(self, info):
        report(self, info)
        if info["iteration"] == 15:
            raise RuntimeError("worker killed")

    monkeypatch.setattr(tr.ScuCallback, "on_train_loss_report", crash_at_15)
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(RuntimeError, match="worker killed"):
        tr.fit(data_file, args)
    monkeypatch.undo()
    saved = tr.read_checkpoint(tmp_path / "ad")
    assert saved.step == 10
    with contextlib.redirect_stdout(io.StringIO()):
        summary = tr.run_training(data_file, args)
    assert summary["resumed_from"] == 10 and summary["steps"] == 30
    rows = tr.read_metrics(tmp_path / "ad")
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]  # the lost step-15 row is replaced, not doubled
    assert saved.lam == rows[1]["lambda"]
    # S stays far above S*, so λ keeps rising from the saved value; a controller restarted at
    # lambda_init would have dropped back to about 2.5 × 0.01
    assert rows[2]["lambda"] > rows[1]["lambda"] > 5 * args.lambda_init
    assert tr.read_checkpoint(tmp_path / "ad").step == 30
    other = tr.TrainArgs(**{**vars(args), "lora_rank": 4})
    with pytest.raises(HegelionError, match="different model or LoRA shape"):
        tr.run_training(data_file, other)


def test_a_failing_progress_hook_does_not_stop_training(tiny_model, data_file, tmp_path):
    calls = []

    def redis_down(row):
        calls.append(row["step"])
        raise ConnectionError("redis down")

    args = tr.TrainArgs(model=tiny_model, adapter_path=str(tmp_path / "ad"), **{**BASE, "iters": 10})
    with contextlib.redirect_stdout(io.StringIO()):
        summary = tr.run_training(data_file, args, on_progress=redis_down)
    assert calls == [5, 10] and summary["steps"] == 10


def test_early_stop_when_lambda_settles(tiny_model, data_file, tmp_path):
    args = tr.TrainArgs(model=tiny_model, adapter_path=str(tmp_path / "ad"),
                        **{**BASE, "scu_update_every": 2, "steps_per_report": 2, "early_stop": True,
                           "early_stop_window": 2, "early_stop_tol": 100.0})
    with contextlib.redirect_stdout(io.StringIO()):
        summary = tr.run_training(data_file, args)
    assert summary["early_stopped"] and summary["steps"] == 6
    assert tr.read_checkpoint(tmp_path / "ad").step == 6
    assert (tmp_path / "ad" / "adapters.safetensors").exists()


def test_unreachable_model_names_the_setting(data_file, tmp_path):
    args = tr.TrainArgs(model="hegelion-test/no-such-model", adapter_path=str(tmp_path / "ad"), **BASE)
    with pytest.raises(HegelionError, match="HEGELION_TRAIN_MODEL"):
        tr.run_training(data_file, args)


def test_text_records_are_refused_because_they_cannot_be_masked(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    args = tr.TrainArgs(model="unused", adapter_path=str(tmp_path / "ad"), **BASE)
    with pytest.raises(HegelionError, match="messages"):
        tr.run_training(tmp_path / "data", args)



def test_a_bf16_model_is_trained_in_float32_on_the_cpu(tiny_model, data_file, tmp_path, caplog):
    """MLX multiplies bf16 ~40x slower than float32 on a CPU: the trainer casts a bf16 base model (as the 1.5B
    ships) to float32 there, and says so; the adapter still loads onto the bf16 model."""
    import logging
    import shutil

    from mlx.utils import tree_flatten

    half = tmp_path / "bf16"
    shutil.copytree(tiny_model, half)
    model, _ = mlx_lm.load(str(half))
    model.set_dtype(mx.bfloat16)
    mx.save_safetensors(str(half / "model.safetensors"), dict(tree_flatten(model.parameters())))
    args = tr.TrainArgs(model=str(half), adapter_path=str(tmp_path / "ad"), **{**BASE, "iters": 6})
    with caplog.at_level(logging.INFO, logger="hegelion_queue.train"), contextlib.redirect_stdout(io.StringIO()):
        result = tr.fit(data_file, args)
    assert "ships in bfloat16: computing in float32 on the CPU" in caplog.text and "on cpu" in caplog.text
    assert {v.dtype for _, v in tree_flatten(result.model.parameters())} == {mx.float32}
    assert result.summary["final_loss"] < 10
    reloaded, _ = mlx_lm.load(str(half), adapter_path=str(tmp_path / "ad"))
    assert reloaded.layers[0].self_attn.q_proj.linear.weight.dtype == mx.bfloat16
    assert tr.to_float32(result.model) is None  # nothing left to cast


def test_the_plain_twin_is_in_summary_json_without_an_eval(tiny_model, data_file, tmp_path):
    """`train --baseline plain --eval-prompts 0`: the file says what the returned summary says."""
    args = tr.TrainArgs(model=tiny_model, adapter_path=str(tmp_path / "ad"),
                        **{**BASE, "iters": 6, "baseline": "plain"})
    with contextlib.redirect_stdout(io.StringIO()):
        summary = tr.run_training(data_file, args)
    on_disk = json.loads((tmp_path / "ad" / tr.SUMMARY_FILE).read_text())
    assert on_disk["baseline"]["plain"]["adapter_path"] == str(tmp_path / "ad" / tr.BASELINE_DIR)
    assert on_disk == summary and tr.SUMMARY_FILE in on_disk["files"]


def test_a_bad_schedule_baseline_or_option_stops_before_any_work(monkeypatch):
    from hegelion_queue.jobs.training_job import train_args
    from hegelion_queue.settings import get_settings

    with pytest.raises(HegelionError, match="lr_schedule must be constant or cosine, not 'linear'"):
        tr.TrainArgs(lr_schedule="linear")
    with pytest.raises(HegelionError, match="baseline must be plain, not 'fixed'"):
        tr.TrainArgs(baseline="fixed")
    monkeypatch.setenv("HEGELION_TRAIN_OPTIONS", '{"lr_schedule": "linear"}')
    get_settings.cache_clear()
    with pytest.raises(HegelionError, match="lr_schedule must be"):
        train_args(get_settings(), "r")
    monkeypatch.setenv("HEGELION_TRAIN_OPTIONS", '{"learning_rat": 1e-3}')
    get_settings.cache_clear()
    with pytest.raises(HegelionError, match="unknown training option.s.: learning_rat"):
        train_args(get_settings(), "r")
    get_settings.cache_clear()
