"""The training plot: loss (with the eval), S against its target band, and λ, against step."""

from __future__ import annotations

import math
from pathlib import Path

from hegelion_queue.training.args import TrainArgs

# --- reports ------------------------------------------------------------------------------------------


def plot(rows: list[dict], path: Path, args: TrainArgs, evaluation: dict | None = None) -> None:
    """Loss (and the held-out eval), S against its target band, λ; one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (ax_loss, ax_s, ax_lam) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    ax_loss.plot(steps, [r["loss"] for r in rows], label="train CE (nats)")
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if val:
        ax_loss.plot(*zip(*val), "o-", label="valid CE (nats)")
    if evaluation:
        base, tuned = evaluation["base"], evaluation["adapter"]
        ax_loss.axhline(base["ce_nats"], color="grey", ls=":", label=f"base model, held out: {base['ce_nats']:.2f}")
        ax_loss.axhline(tuned["ce_nats"], color="k", ls="--", label=f"adapter, held out: {tuned['ce_nats']:.3f}")
        n = evaluation["prompts"]
        text = f"dialectic format on {n} held-out prompts: base {base['format_ok']}/{n}, adapter {tuned['format_ok']}/{n}"
        for name, other in evaluation.get("baselines", {}).items():
            text += f"\n{name} LoRA twin: held-out CE {other['ce_nats']:.3f}, format {other['format_ok']}/{n}"
        ax_loss.set_title(text, fontsize=9)
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(fontsize=8)
    ax_s.plot(steps, [r["S"] for r in rows], alpha=0.5, label="S")
    smoothed = [(r["step"], r["s_hat"]) for r in rows if r.get("s_hat") is not None]
    if smoothed:
        ax_s.plot(*zip(*smoothed), label="S, smoothed (what the controller sees)")
    ax_s.axhline(args.target_s, color="k", lw=0.8, label="S*")
    lo, hi = target_band(args)
    ax_s.axhspan(lo, hi, color="green", alpha=0.2, label="deadband")
    if min(r["S"] for r in rows) > 0:
        ax_s.set_yscale("log")
    ax_s.set_ylabel("S")
    ax_s.legend(fontsize=8)
    lams = [r["lambda"] for r in rows]
    ax_lam.plot(steps, lams)
    if min(lams) > 0:  # a forced λ of 0 cannot go on a log axis
        ax_lam.set_yscale("log")
    ax_lam.set_ylabel("λ")
    ax_lam.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def target_band(args: TrainArgs) -> tuple[float, float]:
    """The S values within the controller's deadband around S*."""
    if args.scu_law == "pi":  # relative: |ln(S/S*)| <= deadband
        return args.target_s * math.exp(-args.deadband), args.target_s * math.exp(args.deadband)
    return args.target_s - args.deadband, args.target_s + args.deadband
