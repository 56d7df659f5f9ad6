"""What a run's teacher calls cost: input and output tokens from the usage the teachers reported, and money at the
prices in the settings (HEGELION_PRICE_INPUT_PER_MTOK / _OUTPUT_), when they are set. Pure."""

from __future__ import annotations

from typing import Any, Mapping

# Usage kinds by direction, as kimi-cli, Kimi Code and OpenAI-style APIs name them. A kind that is itself a total is
# not added (budget.py's rule); anything else unknown counts as input.
OUTPUT_KINDS = ("output", "completion_tokens", "output_tokens", "reasoning_tokens")
USAGE_FIELD = "usage_"  # a run's stats hash keeps each usage kind's total as usage_<kind> (queue/scripts.py)


def usage(stats: Mapping[str, Any]) -> dict[str, float]:
    """{kind: total} of the usage a run's stats hash (decoded) holds."""
    return {k[len(USAGE_FIELD):]: float(v) for k, v in stats.items() if k.startswith(USAGE_FIELD)}


def tokens(usage: Mapping[str, Any]) -> dict[str, int]:
    """{"input": …, "output": …} of a usage mapping (one call's, or a run's totals)."""
    out = {"input": 0, "output": 0}
    for kind, n in usage.items():
        if isinstance(n, (int, float)) and not isinstance(n, bool) and "total" not in kind:
            out["output" if kind in OUTPUT_KINDS else "input"] += int(n)
    return out


def money(counts: Mapping[str, int], settings: Any) -> float | None:
    """The cost of these token counts at the settings' prices; None when no price is set."""
    p_in, p_out = settings.price_input_per_mtok, settings.price_output_per_mtok
    if p_in is None and p_out is None:
        return None
    return round(counts["input"] / 1e6 * (p_in or 0) + counts["output"] / 1e6 * (p_out or 0), 6)


def line(counts: Mapping[str, int], cost: float | None, seconds: float) -> str:
    """One line for `status`: tokens in / out, teacher time, cost."""
    money_part = f", cost {cost:,.2f}" if cost is not None else ""
    return f"tokens {counts['input']:,} in / {counts['output']:,} out, teacher {seconds:,.0f} s{money_part}"
