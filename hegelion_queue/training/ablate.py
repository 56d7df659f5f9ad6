"""`hegelion-queue ablate`: is the Shannon Control Unit worth having — against plain LoRA and a fixed λ, by more
than seed noise?

Every arm × seed × train size × schedule is trained by the trainer itself (`train.fit`, the same loss, callback,
checkpoints) on one split: the held-out samples are the same for every run, a smaller train size is the same subset
for every arm and seed, and a seed fixes the LoRA initialisation and the batch order, so arms of one seed differ only
in λ. Arms: `plain` (λ = 0), `scu` (the controller), `scu:S*` (the controller with another target), `fixed:X` (λ held
at X).

Each run is then scored like the eval does (held-out CE over the assistant's tokens, the generalisation gap to the
training samples, dialectic format adherence of greedy answers to held-out prompts) and its result is saved in its
own folder as soon as it finishes: a crashed ablation run again with the same options skips the finished runs, and
the run it was in resumes from its last checkpoint. Runs may be added later (more seeds, arms, sizes or schedules)
into the same folder; the shared options (model, data, steps, rate, …) must stay the same.

Output: `DIR/ablation.json` (every finished run in the folder; per setting and arm the mean, sd and 95 % t-interval
over seeds; each arm against plain, and constant against cosine, the paired per-seed difference of held-out CE with its
t-interval) and `DIR/ablation.png` (held-out CE against step, per arm the mean over seeds with its 95 % band).

Importing this module is light (the CLI reads AblationArgs' help): MLX and the trainer load when a run trains.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from hegelion_queue.training import intervals
from hegelion_queue.training.args import check_options
from hegelion_queue.errors import HegelionError

logger = logging.getLogger("hegelion_queue.ablate")

RESULT_FILE = "ablation.json"
PLOT_FILE = "ablation.png"
CONFIG_FILE = "ablation-config.json"  # the shared options of the runs in this folder
RUN_FILE = "run.json"  # one finished run's result, next to its adapter
DEFAULT_ARMS = ("plain", "scu", "fixed:0.1", "fixed:1", "fixed:10")
METRICS = ("held_out_ce", "generalisation_gap", "format_rate", "train_ce", "final_lambda", "final_S")

Progress = Callable[[int, int, str], None]  # (steps done, steps in all runs, what is running)


@dataclass
class AblationArgs:
    data: str = field(metadata={"help": "Generator JSONL (split here) or a directory with train.jsonl/valid.jsonl."})
    model: str = field(metadata={"help": "Base model: Hub id or local directory."})
    out: str = field(metadata={"help": "Output folder (ablation.json, ablation.png, runs/); reused to resume."})
    arms: list[str] = field(default_factory=lambda: list(DEFAULT_ARMS),
                            metadata={"help": "plain (λ = 0), scu (the controller), scu:S* (with another target "
                                              "S*), fixed:X (λ held at X)."})
    seeds: int = field(default=3, metadata={"help": "Seeds per arm (0, 1, …): LoRA init and batch order."})
    iters: int = field(default=200, metadata={"help": "Training steps of every run."})
    train_sizes: list[str] = field(default_factory=lambda: ["all"],
                                   metadata={"help": "Training samples per setting: numbers and/or all."})
    schedules: list[str] = field(default_factory=lambda: ["constant"],
                                 metadata={"help": "constant (the trainer's default) and/or cosine."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak Adam learning rate of every run (1e-3 suits a "
                                                                 "tiny model from scratch, 1e-4 a pretrained one)."})
    batch_size: int = field(default=4, metadata={"help": "Sequences per step."})
    max_seq_length: int = field(default=512, metadata={"help": "Longer sequences are truncated."})
    valid_fraction: float = field(default=0.1, metadata={"help": "Share held out when --data is a JSONL."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the held-out split and of the train subsets."})
    eval_every: int = field(default=0, metadata={"help": "Steps between held-out CE points of the curves "
                                                         "(0: iters / 10)."})
    eval_prompts: int = field(default=20, metadata={"help": "Held-out prompts answered per run for format adherence."})
    options: dict = field(default_factory=dict, metadata={"help": "Other TrainArgs fields for every run (JSON)."})

    def every(self) -> int:
        return self.eval_every or max(1, self.iters // 10)

    def shared(self) -> dict:
        """What every run in one folder must have in common (arms, seeds, sizes and schedules may grow)."""
        keep = {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("out", "arms", "seeds", "train_sizes", "schedules")}
        return {**keep, "data": str(Path(self.data).resolve()) if Path(self.data).exists() else self.data}


def arm_lambda(arm: str) -> float | None:
    """The fixed λ of an arm (None: the SCU controller); a bad arm is one line."""
    name, _, value = arm.partition(":")
    if arm == "plain":
        return 0.0
    try:
        x = float(value) if value else (None if name == "scu" else -1.0)
    except ValueError:
        x = -1.0
    if name not in ("scu", "fixed") or (x is not None and not (0 < x < math.inf)):
        raise HegelionError(f"unknown arm {arm!r}: use plain, scu, scu:S* (another target S*) or fixed:X with X > 0 "
                            "(e.g. fixed:1)")
    return x if name == "fixed" else None


def arm_target(arm: str) -> float | None:
    """The S* of an `scu:S*` arm (None: the trainer's)."""
    name, _, value = arm.partition(":")
    return float(value) if name == "scu" and value else None


def parse_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


@dataclass(frozen=True)
class Run:
    train_size: str  # a number or "all"
    schedule: str
    arm: str
    seed: int

    @property
    def setting(self) -> str:
        return f"{self.train_size}-{self.schedule}"

    def folder(self, out: Path) -> Path:
        return out / "runs" / self.setting / self.arm.replace(":", "-") / f"seed{self.seed}"


def plan(args: AblationArgs) -> list[Run]:
    """Every run, checked: per setting, seeds outermost, so an interrupted ablation has whole seeds of every arm."""
    if not args.arms or args.seeds < 1 or args.iters < 1:
        raise HegelionError("an ablation needs at least one arm, --seeds >= 1 and --iters >= 1")
    for arm in args.arms:
        arm_lambda(arm)
    for s in args.schedules:
        if s not in ("cosine", "constant"):
            raise HegelionError(f"unknown schedule {s!r}: use cosine and/or constant")
    for size in args.train_sizes:
        if size != "all" and not (size.isdigit() and int(size) >= args.batch_size):
            raise HegelionError(f"train size {size!r} must be all or a number >= the batch size {args.batch_size}")
    if len(set(args.arms)) != len(args.arms):
        raise HegelionError("an arm is listed twice")
    return [Run(size, sched, arm, seed) for size in args.train_sizes for sched in args.schedules
            for seed in range(args.seeds) for arm in args.arms]


# --- data -----------------------------------------------------------------------------------------------


def _read(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def prepare(args: AblationArgs, out: Path) -> dict[str, Path]:
    """The split (converted once into out/data when --data is a JSONL) and one train subset per train size: the
    first k of a permutation fixed by split_seed, the same held-out samples. Returns size -> data directory."""
    import numpy as np

    from hegelion_queue.training.convert import convert

    src = Path(args.data)
    if src.is_dir():
        base = src
        if not (base / "train.jsonl").exists() or not (base / "valid.jsonl").exists():
            raise HegelionError(f"{src} needs train.jsonl and valid.jsonl (or pass the run's JSONL)")
    elif src.is_file():
        base = out / "data"
        if not (base / "valid.jsonl").exists():
            convert(src, base, fmt="messages", model_name=args.model, valid_fraction=args.valid_fraction,
                    seed=args.split_seed)
    else:
        raise HegelionError(f"no data at {src}: pass a generator JSONL or a directory with train.jsonl/valid.jsonl")
    train, valid = _read(base / "train.jsonl"), _read(base / "valid.jsonl")
    if len(valid) < args.batch_size:
        raise HegelionError(f"{len(valid)} held-out samples is fewer than the batch size {args.batch_size}: "
                            "raise --valid-fraction or use more data")
    order = np.random.default_rng(args.split_seed).permutation(len(train))
    dirs = {}
    for size in args.train_sizes:
        if size == "all" or int(size) >= len(train):
            dirs[size] = base
            continue
        sub = out / "data" / f"train-{size}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / "train.jsonl").write_text("".join(train[i] + "\n" for i in sorted(order[: int(size)])), "utf-8")
        shutil.copyfile(base / "valid.jsonl", sub / "valid.jsonl")
        dirs[size] = sub
    return dirs


def _fingerprint(data_dir: Path) -> str:
    h = hashlib.sha256()
    for name in ("train.jsonl", "valid.jsonl"):
        h.update((data_dir / name).read_bytes())
    return h.hexdigest()[:16]


def _check_config(args: AblationArgs, out: Path, data: dict[str, Path]) -> None:
    """The folder's shared options: written by the first ablation into it, compared by every later one."""
    config = {**args.shared(), "data_sha256": {k: _fingerprint(v) for k, v in data.items()}}
    path = out / CONFIG_FILE
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in config if k != "data_sha256" and old.get(k) != config[k])
        diff += [f"data of train size {k}" for k, v in config["data_sha256"].items()
                 if old.get("data_sha256", {}).get(k, v) != v]
        if diff:
            raise HegelionError(f"{out} holds an ablation with other options ({', '.join(diff)}): pass another --out, "
                                "or delete it to start over")
        config["data_sha256"] = {**old.get("data_sha256", {}), **config["data_sha256"]}
    path.write_text(json.dumps(config, indent=2))


# --- one run --------------------------------------------------------------------------------------------


def train_args(args: AblationArgs, run: Run, folder: Path) -> Any:
    """The trainer's TrainArgs of one run."""
    from hegelion_queue.training import train as tr

    check_options(args.options)
    every = args.every()
    # a metrics row carries the last held-out CE measured since the row before: the rows must come more often than
    # the measurements (mlx-lm measures before step 1 and before every `every`-th step), or a point of the curve is lost
    report = max(d for d in range(1, min(10, max(every - 1, 1)) + 1) if every % d == 0)
    base = {"steps_per_report": report, **args.options}
    return tr.TrainArgs(**{
        **base, "model": args.model, "adapter_path": str(folder), "iters": args.iters, "seed": run.seed,
        "learning_rate": args.learning_rate, "lr_schedule": run.schedule, "batch_size": args.batch_size,
        "max_seq_length": args.max_seq_length, "force_lambda": arm_lambda(run.arm), "baseline": None,
        **({"target_s": arm_target(run.arm)} if arm_target(run.arm) else {}),
        "eval_prompts": 0, "resume": True, "steps_per_eval": every, "val_batches": -1,
    })


def train_one(args: AblationArgs, run: Run, data_dir: Path, folder: Path,
              on_step: Callable[[int], None] | None = None) -> dict:
    """Train one run with the trainer (resuming its checkpoint, if any), score it, save its result."""
    from hegelion_queue.training import evaluate
    from hegelion_queue.training import train as tr

    targs = train_args(args, run, folder)
    with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm's own table: the trainer logs it to mlx_lm.log
        result = tr.fit(data_dir, targs, on_progress=on_step and (lambda row: on_step(row["step"])))
    eargs = evaluate.EvalArgs(adapter_path=str(folder), data=str(data_dir), max_prompts=args.eval_prompts,
                              max_seq_length=args.max_seq_length)
    split = evaluate.load_split(eargs, {})
    prompts = split.valid[: args.eval_prompts]
    scored = evaluate.score(result.model, result.tokenizer, split, prompts, eargs,
                            evaluate.answer_budget(result.tokenizer, prompts))
    fig, summary = scored.figures, result.summary
    curve = [[r["val_step"], r["val_loss"]] for r in tr.read_metrics(folder)
             if r.get("val_loss") is not None and r.get("val_step") is not None]
    curve.append([summary["steps"], fig["ce_nats"]])  # mlx-lm's last check comes before the last step
    record = {
        **asdict(run), "setting": run.setting, "adapter_path": str(folder), "train_samples": summary["train_samples"],
        "held_out_samples": len(split.valid), "held_out_ce": fig["ce_nats"], "held_out_ce_ci95": fig["ce_ci95"],
        "train_ce": fig["train_ce_nats"], "generalisation_gap": fig["generalisation_gap"],
        "format_ok": fig["format_ok"], "prompts": len(prompts), "format_rate": fig["format_rate"],
        "format_ci95": fig["format_ci95"], "final_lambda": summary["final_lambda"], "final_S": summary["final_S"],
        "steps": summary["steps"], "resumed_from": summary["resumed_from"], "seconds": summary["seconds"],
        "curve": curve,
    }
    tmp = folder / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(folder / RUN_FILE)  # the run counts as finished only once this file is whole
    return record


def finished(run: Run, folder: Path) -> dict | None:
    path = folder / RUN_FILE
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return record if all(record.get(k) == v for k, v in asdict(run).items()) else None


# --- the ablation ---------------------------------------------------------------------------------------


def run_ablation(args: AblationArgs, progress: Progress | None = None) -> dict:
    """Train and score every run not finished yet, then write ablation.json and ablation.png; the report."""
    t0 = time.monotonic()
    runs = plan(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare(args, out)
    _check_config(args, out, data)
    records: dict[Run, dict] = {r: rec for r in runs if (rec := finished(r, r.folder(out)))}
    total = len(runs) * args.iters
    done = len(records) * args.iters
    if records:
        logger.info("resuming %s: %d of %d runs already finished", out, len(records), len(runs))
    for i, run in enumerate(runs, 1):
        if run in records:
            continue
        what = f"run {i}/{len(runs)}: {run.setting} {run.arm} seed {run.seed}"
        if progress:
            progress(done, total, what)
        records[run] = train_one(args, run, data[run.train_size], run.folder(out),
                                 progress and (lambda step, d=done, w=what: progress(d + step, total, w)))
        done += args.iters
        if progress:
            progress(done, total, what)
    others = [rec for path in sorted((out / "runs").glob(f"*/*/*/{RUN_FILE}"))  # runs of earlier ablations here
              if (rec := json.loads(path.read_text())) and Run(**{f.name: rec[f.name] for f in fields(Run)})
              not in records]
    report = summarise(args, [records[r] for r in runs] + others)
    report["seconds"] = round(time.monotonic() - t0, 1)
    (out / RESULT_FILE).write_text(json.dumps(report, indent=1))
    plot(report, out / PLOT_FILE)
    return report


def _stats(values: list[float | None]) -> dict:
    return intervals.mean_interval([v for v in values if v is not None])


def arm_order(arm: str) -> tuple:
    """plain, then scu, scu:S* by S*, then fixed:X by X: one order in every table and plot."""
    name, _, value = arm.partition(":")
    return ({"plain": 0, "scu": 1, "fixed": 2}.get(name, 3), float(value) if value else 0.0)


def _paired(pairs: list[tuple[dict, dict]]) -> dict:
    """Per-seed differences a − b of held-out CE, gap and format rate: mean, sd, t-interval; and what the CE's says."""
    diffs = {f"{m}_diff": _stats([a[m] - b[m] for a, b in pairs if a[m] is not None and b[m] is not None])
             for m in ("held_out_ce", "generalisation_gap", "format_rate")}
    ci = diffs["held_out_ce_diff"]["ci"]
    diffs["verdict"] = ("lower CE" if ci and ci[1] < 0 else "higher CE" if ci and ci[0] > 0
                        else "no difference in CE beyond seed noise")
    return diffs


def summarise(args: AblationArgs, records: list[dict]) -> dict:
    """Every finished run in the folder (this ablation's and earlier ones'), per setting (train size, schedule):
    each arm's mean, sd and 95 % t-interval over seeds; each arm against plain, and for each train size and arm
    constant against cosine, as paired per-seed differences with their t-intervals."""
    sizes = sorted({r["train_size"] for r in records}, key=lambda x: (x == "all", int(x) if x.isdigit() else 0))
    schedules = sorted({r["schedule"] for r in records}, key=("cosine", "constant").index)
    arms_all = sorted({r["arm"] for r in records}, key=arm_order)
    by = {(r["train_size"], r["schedule"], r["arm"], r["seed"]): r for r in records}
    settings = []
    for size in sizes:
        for sched in schedules:
            rows = [r for r in records if r["train_size"] == size and r["schedule"] == sched]
            if not rows:
                continue
            arms = {arm: {m: _stats([r[m] for r in rows if r["arm"] == arm]) for m in METRICS}
                    for arm in arms_all if any(r["arm"] == arm for r in rows)}
            versus = {}
            for arm in arms:
                pairs = [(r, by[(size, sched, "plain", r["seed"])]) for r in rows
                         if r["arm"] == arm != "plain" and (size, sched, "plain", r["seed"]) in by]
                if pairs:
                    versus[arm] = _paired(pairs)
            means = {arm: a["held_out_ce"]["mean"] for arm, a in arms.items()}
            settings.append({
                "setting": f"{size}-{sched}", "train_size": size, "schedule": sched,
                "train_samples": rows[0]["train_samples"], "held_out_samples": rows[0]["held_out_samples"],
                "arms": arms, "versus_plain": versus, "best_arm": min(means, key=means.get),
            })
    schedule_effect = {}
    if "cosine" in schedules and "constant" in schedules:
        for size in sizes:
            for arm in arms_all:
                pairs = [(r, by[(size, "cosine", arm, r["seed"])]) for r in records
                         if (r["train_size"], r["schedule"], r["arm"]) == (size, "constant", arm)
                         and (size, "cosine", arm, r["seed"]) in by]
                if pairs:
                    schedule_effect.setdefault(size, {})[arm] = _paired(pairs)
    return {"config": {**asdict(args)}, "level": intervals.LEVEL, "settings": settings,
            "constant_vs_cosine": schedule_effect, "runs": records}


def curves(records: list[dict], arm: str) -> tuple[list[int], list[dict]]:
    """The held-out CE curve of an arm: steps measured by every seed, the mean and t-interval at each."""
    points: dict[int, list[float]] = {}
    for r in records:
        if r["arm"] == arm:
            for step, ce in r["curve"]:
                points.setdefault(step, []).append(ce)
    n = max((len(v) for v in points.values()), default=0)
    steps = sorted(s for s, v in points.items() if len(v) == n)
    return steps, [intervals.mean_interval(points[s]) for s in steps]


def plot(report: dict, path: Path) -> None:
    """One panel per setting: held-out CE against step, per arm the mean over seeds and its 95 % band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = report["settings"]
    arms = sorted({arm for st in settings for arm in st["arms"]}, key=arm_order)
    colour = {arm: f"C{i % 10}" for i, arm in enumerate(arms)}  # an arm has one colour in every panel
    cols = min(2, len(settings))
    rows = math.ceil(len(settings) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.2 * rows), squeeze=False)
    for ax, st in zip(axes.flat, settings):
        records = [r for r in report["runs"] if r["setting"] == st["setting"]]
        for arm in st["arms"]:
            steps, stats = curves(records, arm)
            if not steps:
                continue
            mean = [s["mean"] for s in stats]
            ax.plot(steps, mean, label=arm, color=colour[arm])
            lo = [s["ci"][0] if s["ci"] else s["mean"] for s in stats]
            hi = [s["ci"][1] if s["ci"] else s["mean"] for s in stats]
            ax.fill_between(steps, lo, hi, color=colour[arm], alpha=0.12)
        ax.set_title(f"{st['train_samples']} training samples, {st['schedule']} rate", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("held-out CE (nats)")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(settings):]:
        ax.axis("off")
    fig.suptitle("held-out CE per arm: mean over seeds, band = 95 % t-interval", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(report: dict) -> str:
    """The report as text: per setting, each arm's held-out CE and its difference to plain, with intervals."""
    def ci(s: dict, fmt: str = "{:.3f}") -> str:
        return f"[{fmt.format(s['ci'][0])}, {fmt.format(s['ci'][1])}]" if s.get("ci") else ""

    lines = []
    for st in report["settings"]:
        lines.append(f"{st['setting']}: {st['train_samples']} training samples, {st['held_out_samples']} held out")
        for arm, a in st["arms"].items():
            ce = a["held_out_ce"]
            if ce["mean"] is None:
                continue
            line = f"  {arm:10} CE {ce['mean']:.3f} {ci(ce)}  gap {a['generalisation_gap']['mean']:+.3f}"
            if a["format_rate"]["mean"] is not None:
                line += f"  format {100 * a['format_rate']['mean']:.0f}%"
            if arm in st["versus_plain"]:
                d = st["versus_plain"][arm]["held_out_ce_diff"]
                line += f"  vs plain {d['mean']:+.3f} {ci(d, '{:+.3f}')}"
            lines.append(line)
    for size, arms in report.get("constant_vs_cosine", {}).items():
        for arm, d in arms.items():
            ce = d["held_out_ce_diff"]
            lines.append(f"train size {size}, {arm}: constant − cosine CE {ce['mean']:+.3f} {ci(ce, '{:+.3f}')}")
    return "\n".join(lines)
