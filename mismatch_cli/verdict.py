"""The verdict: the report's findings in plain words, one paragraph, from an analyze() result.

Nothing here computes a statistic; every number comes from the result dict and is formatted
by `formatting`.
"""

from __future__ import annotations

import math
from typing import Any

from .formatting import fmt, pct


def verdict(result: dict[str, Any]) -> str:
    """The plain-words paragraph: the bound, the tail, the accumulation, the RL metrics."""
    parts: list[str] = []
    n, ni = result["num_tokens"], result["num_infinite"]
    if ni:
        parts.append(
            f"{ni} of {n} tokens ({pct(ni / n)}) have an infinite delta (a token one side's "
            "truncation prunes) and are left out of every statistic below."
        )
    env, eps = result["envelope"], result["eps"]
    side = "p_train" if result["by"] == "train" else "p_infer"
    if eps is not None and math.isfinite(eps):
        hold = 1 - env["exact"]["frac_above"] if env["exact"]["frac_above"] is not None else None
        hold1 = (
            1 - env["first_order"]["frac_above"]
            if env["first_order"]["frac_above"] is not None
            else None
        )
        parts.append(
            f"The exact (1 - p) bound holds for {pct(hold)} of tokens with eps = {fmt(eps)} "
            f"({result['eps_estimator']}), the first-order 2 eps (1 - p) envelope for "
            f"{pct(hold1)}; covering 99% of tokens would need "
            f"eps = {fmt(result['eps_needed_q99'])}."
        )
    fit = result["fit"]
    parts.append(
        f"|delta| against (1 - p) through the origin: slope {fmt(fit['slope'])} nats, "
        f"R^2 = {fmt(fit['r2'])}."
    )
    tl = result["tail"]
    if tl["n"]:
        z = tl["z"]
        if z is None or not math.isfinite(z):
            sig = "too few tokens for a standard error"
        elif abs(z) < 2:
            sig = f"{abs(z):.1f} standard errors from zero: not distinguishable from zero"
        else:
            sig = f"{abs(z):.1f} standard errors {'above' if z > 0 else 'below'} zero"
        parts.append(
            f"Tokens with {side} < {tl['threshold']:g} are {pct(tl['token_share'])} of tokens "
            f"but carry {pct(tl['abs_delta_share'])} of total |delta|; their signed mean is "
            f"{fmt(tl['mean_delta'], sign=True)} nats ({sig}), against "
            f"{fmt(tl['head']['mean_delta'], sign=True)} for the other tokens."
        )
    else:
        parts.append(f"No token has {side} < {tl['threshold']:g}.")
    acc = result["accumulation"]
    vl, vx = acc["vs_length"], acc["vs_sum_one_minus_p"]
    if acc["num_sequences"] > 1 and vl["slope"] is not None:
        parts.append(
            f"Per sequence, sum delta drifts by {fmt(vl['slope'], sign=True)} nats per token "
            f"(correlation with length {fmt(vl['corr'])}, with sum (1 - p) {fmt(vx['corr'])})."
        )
    m = result["metrics"]
    parts.append(
        f"RL metrics: k3 = {fmt(m['k3'])}, mean |delta| = {fmt(m['mean_abs_delta'])} "
        f"(slime fails CI above 0.1), mean |delta p| = {fmt(m['mean_abs_dp'])} (verl: below "
        f"0.005 normal, above 0.01 suspicious); {pct(m['frac_token_above_cap_2'])} of tokens "
        f"and {pct(m['frac_seq_above_cap_2'])} of sequences have an importance ratio above 2."
    )
    return " ".join(parts)
