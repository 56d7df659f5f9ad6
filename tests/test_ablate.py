"""`hegelion-queue ablate`: arms × seeds × train sizes trained by the real trainer on a tiny model built offline,
ablation.json's statistics, the plot, one-line errors, and resuming an interrupted ablation."""

from __future__ import annotations

import json
import os

import pytest

from hegelion_queue.training import ablate
from hegelion_queue.training.ablate import AblationArgs, Run
from hegelion_queue.errors import HegelionError


def test_arms_and_plan_are_checked_before_anything_trains(tmp_path):
    assert ablate.arm_lambda("plain") == 0.0 and ablate.arm_lambda("scu") is None
    assert ablate.arm_lambda("fixed:0.1") == 0.1
    assert ablate.arm_lambda("scu:0.02") is None and ablate.arm_target("scu:0.02") == 0.02
    assert ablate.arm_target("scu") is None and ablate.arm_target("fixed:1") is None
    for bad in ("fixed", "fixed:0", "fixed:-1", "fixed:x", "scu2", "fixed:inf", "scu:0", "scu:x", "plain:1"):
        with pytest.raises(HegelionError, match="unknown arm"):
            ablate.arm_lambda(bad)
    args = AblationArgs(data="d", model="m", out=str(tmp_path), arms=["plain", "scu"], seeds=2,
                        train_sizes=["16", "all"])
    assert args.schedules == ["constant"]  # the trainer's default
    runs = ablate.plan(args)
    assert runs[:4] == [Run("16", "constant", "plain", 0), Run("16", "constant", "scu", 0),
                        Run("16", "constant", "plain", 1), Run("16", "constant", "scu", 1)]  # whole seeds first
    assert len(runs) == 8 and runs[0].folder(tmp_path) == tmp_path / "runs/16-constant/plain/seed0"
    for bad, match in ((dict(schedules=["linear"]), "schedule"), (dict(train_sizes=["2"]), "train size"),
                       (dict(arms=["plain", "plain"]), "twice"), (dict(seeds=0), "at least one arm")):
        with pytest.raises(HegelionError, match=match):
            ablate.plan(AblationArgs(**{**vars(args), **bad}))


def test_summary_pairs_each_arm_with_plain_and_each_schedule_with_cosine_seed_by_seed():
    args = AblationArgs(data="d", model="m", out="o", arms=["plain", "fixed:1"], seeds=3)
    plain = [5.0, 6.0, 7.0]  # seed noise far larger than the arm's effect ...
    fixed = [4.9, 5.92, 6.88]  # ... which is -0.1, -0.08, -0.12: the paired difference sees it anyway

    def record(arm, seed, ce, schedule="cosine"):
        return {"train_size": "all", "schedule": schedule, "arm": arm, "seed": seed, "held_out_ce": ce,
                "generalisation_gap": 0.1, "format_rate": 0.5, "train_ce": ce - 0.1, "final_lambda": 0.0,
                "final_S": 0.01, "train_samples": 100, "held_out_samples": 10}

    records = [record(arm, s, ce) for arm, ces in (("plain", plain), ("fixed:1", fixed)) for s, ce in enumerate(ces)]
    constant = [record("plain", s, ce + 0.5 + 0.01 * s, "constant") for s, ce in enumerate(plain)]  # an earlier run
    report = ablate.summarise(args, records + constant)
    assert [s["setting"] for s in report["settings"]] == ["all-cosine", "all-constant"]
    sched = report["constant_vs_cosine"]["all"]["plain"]["held_out_ce_diff"]
    assert sched["n"] == 3 and sched["mean"] == pytest.approx(0.51) and sched["ci"][0] > 0
    assert "fixed:1" not in report["constant_vs_cosine"]["all"]  # no constant run of it to pair with
    assert report["settings"][1]["arms"].keys() == {"plain"} and report["settings"][1]["versus_plain"] == {}
    st = report["settings"][0]
    ce = st["arms"]["fixed:1"]["held_out_ce"]
    assert ce["n"] == 3 and ce["mean"] == pytest.approx(5.9) and ce["ci"][0] < 5.0  # unpaired: noise
    d = st["versus_plain"]["fixed:1"]["held_out_ce_diff"]
    assert d["mean"] == pytest.approx(-0.1) and d["sd"] == pytest.approx(0.02)
    assert d["ci"] == pytest.approx([-0.1 - 4.3027 * 0.02 / 3**0.5, -0.1 + 4.3027 * 0.02 / 3**0.5], abs=1e-4)
    assert st["versus_plain"]["fixed:1"]["verdict"] == "lower CE" and st["best_arm"] == "fixed:1"
    text = ablate.table(report)
    assert "fixed:1    CE 5.900" in text and "train size all, plain: constant − cosine CE +0.510" in text


@pytest.fixture(scope="module")
def run_jsonl(tmp_path_factory):
    from .make_tiny_model import fake_teacher_rows

    path = tmp_path_factory.mktemp("ablate-data") / "run.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in fake_teacher_rows(48)))
    return path


OPTIONS = {"lora_rank": 4, "lora_alpha": 8, "save_every": 5}


@pytest.mark.train
@pytest.mark.e2e
def test_e2e_ablate_writes_every_arm_seed_and_interval_and_a_plot(hq, tiny_model, run_jsonl, tmp_path):
    out = tmp_path / "abl"
    p = hq("ablate", "--data", str(run_jsonl), "--model", tiny_model, "--out", str(out), "--arms", "plain,scu,fixed:1",
           "--seeds", "2", "--iters", "10", "--eval-every", "5", "--valid-fraction", "0.25", "--eval-prompts", "2",
           "--max-seq-length", "256", "--options", json.dumps(OPTIONS), timeout=600)
    report = json.loads((out / "ablation.json").read_text())
    runs = report["runs"]
    assert len(runs) == 3 * 2 and {(r["arm"], r["seed"]) for r in runs} == {
        (a, s) for a in ("plain", "scu", "fixed:1") for s in (0, 1)}
    assert {(r["held_out_samples"], r["train_samples"]) for r in runs} == {(12, 36)}  # one split for every run
    assert {r["final_lambda"] for r in runs if r["arm"] == "plain"} == {0.0}
    assert {r["final_lambda"] for r in runs if r["arm"] == "fixed:1"} == {1.0}
    for r in runs:
        assert r["steps"] == 10 and [c[0] for c in r["curve"]] == [0, 4, 9, 10] and r["curve"][-1][1] == r["held_out_ce"]
        assert r["held_out_ce"] < r["curve"][0][1]  # ten steps already lower the held-out CE
        lo, hi = r["held_out_ce_ci95"]
        assert lo < r["held_out_ce"] < hi and 0 <= r["format_ci95"][0] <= r["format_ci95"][1] <= 1
    for seed in (0, 1):  # a seed fixes the LoRA init: before the first step every arm of a seed scores the same
        assert len({r["curve"][0][1] for r in runs if r["seed"] == seed}) == 1
    for seed in (0, 1):  # ... and then λ alone parts them: SCU, while its λ stays at its initial 1, is fixed:1
        ce = {r["arm"]: (r["held_out_ce"], r["final_lambda"]) for r in runs if r["seed"] == seed}
        assert ce["plain"][0] != ce["fixed:1"][0]
        assert (ce["scu"][0] == ce["fixed:1"][0]) == (ce["scu"][1] == 1.0)
    (st,) = report["settings"]
    assert st["setting"] == "all-constant" and st["best_arm"] in ("plain", "scu", "fixed:1")
    for arm in ("plain", "scu", "fixed:1"):
        ce = st["arms"][arm]["held_out_ce"]
        assert ce["n"] == 2 and ce["sd"] > 0 and ce["ci"][0] < ce["mean"] < ce["ci"][1]
    for arm in ("scu", "fixed:1"):
        d = st["versus_plain"][arm]["held_out_ce_diff"]
        pairs = [next(r["held_out_ce"] for r in runs if r["arm"] == a and r["seed"] == s) for s in (0, 1)
                 for a in (arm, "plain")]
        assert d["n"] == 2 and d["mean"] == pytest.approx((pairs[0] - pairs[1] + pairs[2] - pairs[3]) / 2)
        assert d["ci"][0] < d["mean"] < d["ci"][1] and st["versus_plain"][arm]["verdict"]
    png = (out / "ablation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "all-constant: 36 training samples, 12 held out" in p.stdout and "vs plain" in p.stdout
    bad = hq("ablate", "--data", str(run_jsonl), "--model", tiny_model, "--out", str(out), "--arms", "plain,lasso",
             check=False)
    assert bad.returncode == 1 and "unknown arm 'lasso'" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert "--train-sizes" in hq("ablate", "--help").stdout


@pytest.mark.train
def test_an_interrupted_ablation_resumes_where_it_stopped(tiny_model, run_jsonl, tmp_path):
    """A small train size (the same 12 of the 36 training samples for every run) that is killed in its third run."""
    args = AblationArgs(data=str(run_jsonl), model=tiny_model, out=str(tmp_path / "abl"), arms=["plain", "fixed:1"],
                        seeds=2, iters=20, eval_every=10, train_sizes=["12"], valid_fraction=0.25, eval_prompts=1,
                        max_seq_length=256, options=OPTIONS)

    def killed_in_the_third_run(done, total, what):
        if done >= 2 * 20 + 12:  # past the third run's checkpoint at step 10
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ablate.run_ablation(args, killed_in_the_third_run)
    runs = ablate.plan(args)
    folders = [r.folder(tmp_path / "abl") for r in runs]
    assert [(f / ablate.RUN_FILE).exists() for f in folders] == [True, True, False, False]
    assert json.loads((folders[2] / "scu_state.json").read_text())["step"] == 10
    stamps = [os.stat(f / ablate.RUN_FILE).st_mtime_ns for f in folders[:2]]

    seen = []
    report = ablate.run_ablation(args, lambda done, total, what: seen.append((done, what)))
    assert seen[0] == (40, "run 3/4: 12-constant plain seed 1")  # runs 1 and 2 were not trained again
    assert [os.stat(f / ablate.RUN_FILE).st_mtime_ns for f in folders[:2]] == stamps
    third = json.loads((folders[2] / ablate.RUN_FILE).read_text())
    assert third["resumed_from"] == 10 and third["steps"] == 20  # the trainer resumed from its checkpoint
    assert len(report["runs"]) == 4 and (tmp_path / "abl" / "ablation.png").exists()
    assert {(r["train_samples"], r["held_out_samples"]) for r in report["runs"]} == {(12, 12)}
    subset = (tmp_path / "abl" / "data" / "train-12" / "train.jsonl").read_text().splitlines()
    assert len(subset) == 12 and set(subset) <= set((tmp_path / "abl" / "data" / "train.jsonl").read_text().splitlines())
    assert report["settings"][0]["versus_plain"]["fixed:1"]["held_out_ce_diff"]["n"] == 2

    calls = []
    fewer = ablate.run_ablation(AblationArgs(**{**vars(args), "arms": ["plain"], "seeds": 1}),
                                lambda *a: calls.append(a))
    assert len(fewer["runs"]) == 4 and calls == []  # nothing to train; the report covers every run in the folder
    with pytest.raises(HegelionError, match="other options.*iters"):  # another ablation into the same folder
        ablate.run_ablation(AblationArgs(**{**vars(args), "iters": 30}))
