"""End to end: a finished run triggers exactly one training job, which a trainer worker process completes."""

from __future__ import annotations

import json

import orjson
import pytest

from .conftest import ULTRA

pytestmark = [pytest.mark.e2e, pytest.mark.train]

TRAIN_OPTIONS = {"iters": 10, "batch_size": 2, "max_seq_length": 256, "lora_rank": 4, "lora_alpha": 8,
                 "num_layers": -1, "steps_per_report": 5, "scu_update_every": 5, "save_every": 5,
                 "learning_rate": 1e-3}


def test_e2e_run_trains_one_adapter_through_the_trainer_worker(hq, env, tiny_model, redis_server, tmp_path):
    extra = {"HEGELION_AUTO_TRAIN": "1", "HEGELION_TRAIN_MODEL": tiny_model,
             "HEGELION_TRAIN_OPTIONS": json.dumps(TRAIN_OPTIONS)}
    p = hq("run", "--dataset", str(ULTRA), "--limit", "12", "--workers", "2", "--run", "trained",
           extra_env=extra, timeout=300)
    assert "12 done, 0 dead" in p.stdout and "adapter in artifacts/adapters/trained" in p.stdout, p.stderr
    assert "expected training time: about" in p.stderr and "measured on cpu over steps 2-5" in p.stderr  # make run
    adapter = tmp_path / "artifacts" / "adapters" / "trained"
    for name in ("adapters.safetensors", "adapter_config.json", "metrics.jsonl", "training.png", "summary.json",
                 "source.jsonl", "eval.json", "eval_samples.jsonl"):
        assert (adapter / name).exists(), name
    assert len((adapter / "source.jsonl").read_bytes().splitlines()) == 12  # exported from Redis
    rows = [json.loads(line) for line in (adapter / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 10 and {"loss", "S", "lambda", "param_bpt", "data_bpt", "tokens_per_s"} <= rows[-1].keys()
    r = redis_server.client()
    state = {k.decode(): v.decode() for k, v in r.hgetall("hegelion:run:trained:train").items()}
    assert state["state"] == "done" and state["step"] == "10" and state["device"] == "cpu"
    assert orjson.loads(state["estimate"])["iters"] == 10
    assert r.exists("arq:result:train:trained")  # one job, kept: a second trigger is refused
    again = hq("train", "--run", "trained", extra_env=extra).stdout
    assert "already queued, running or done" in again
    status = orjson.loads(hq("status", "--run", "trained", "--json").stdout)
    assert status["training"]["state"] == "done"
    ev = status["training"]["eval"]  # the eval ran at the end of training, and any host can read it
    assert ev == json.loads((adapter / "eval.json").read_text()) and ev["prompts"] >= 1
    assert "eval: held-out CE" in hq("status", "--run", "trained").stdout
    curves = [orjson.loads(x) for x in r.lrange("hegelion:run:trained:train:metrics", 0, -1)]
    assert [c["step"] for c in curves] == [5, 10] and curves == rows


def test_train_now_on_a_jsonl_without_redis(hq, env, tiny_model, tmp_path):
    from .make_tiny_model import sample_rows

    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sample_rows(12)))
    extra = {"HEGELION_REDIS_URL": "redis://127.0.0.1:1/0", "HEGELION_TRAIN_OPTIONS": json.dumps(TRAIN_OPTIONS)}
    p = hq("train", "--data", str(data), "--now", "--model", tiny_model, "--iters", "8", "--lr-schedule", "cosine",
           "--adapter-path", str(tmp_path / "ad"), extra_env=extra, timeout=300)
    assert "adapter in" in p.stdout and (tmp_path / "ad" / "adapters.safetensors").exists()
    assert "expected training time: about" in p.stderr and "3 of 8 steps left" in p.stderr
    assert json.loads((tmp_path / "ad" / "summary.json").read_text())["lr_schedule"] == "cosine"
    bad = hq("train", "--data", str(data), "--now", "--lr-schedule", "linear", check=False, extra_env=extra)
    assert bad.returncode == 1 and bad.stderr.strip() == "error: --lr-schedule takes constant or cosine"


def test_convert_cli_counts_what_it_skips(hq, env, tmp_path):
    from .make_tiny_model import sample_rows

    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sample_rows(20)) + "{broken\n" + '{"instruction": "x"}\n')
    out = hq("convert", str(data), str(tmp_path / "out"), "--format", "messages").stdout
    assert "20 samples" in out and "bad JSON 1" in out and "missing fields 1" in out
    assert (tmp_path / "out" / "train.jsonl").exists() and (tmp_path / "out" / "valid.jsonl").exists()
    # the old convert_for_scu.py IN OUT.jsonl form: one file with every sample, no directory
    one = hq("convert", str(data), str(tmp_path / "scu.jsonl")).stdout
    assert "20 samples" in one and (tmp_path / "scu.jsonl").is_file()
    lines = [json.loads(x) for x in (tmp_path / "scu.jsonl").read_text().splitlines()]
    assert len(lines) == 20 and all(x["text"].startswith("<|im_start|>system") for x in lines)
    clash = hq("convert", str(data), str(tmp_path / "scu.jsonl" / "x"), check=False)  # a path under a file
    assert clash.returncode != 0 and "Traceback" not in clash.stderr
    assert "--format" in hq("convert", "--help").stdout and ".jsonl" in hq("convert", "--help").stdout
