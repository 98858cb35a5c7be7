"""The two classic import traps, checked on every import (docs/import.md, "Checks").

Temperature. Both sides must be log-probs of the same sampling distribution. A temperature
applied on one side only (raw against processed log-probs, or a trainer that forgets to
divide its logits) scales one side's logits by 1/T:
  - scored runs: per position, log q_a = (T_train / T_infer) log p_a + c (c depends on the
    position), so over the sampled tokens the least-squares line logp_infer ~ a + b
    logp_train has slope b close to T_train / T_infer (synthetic checks, tests/test_import:
    b = 0.71-0.73 for a ratio of 0.7, 1.09-1.10 for 1/0.9); a run whose sides agree has
    b = 1 up to the numerical mismatch. Warn when |b - 1| > SLOPE_TOLERANCE. (A fit through
    the origin is no detector: the head and the tail of the distribution pull it in
    opposite directions and it stays near 1 at T_infer = 0.7.)
  - rescored runs: fit the temperature T* whose replay on the model's logits best explains
    logp_infer (least squares over a sample of tokens), and warn when it differs from the
    replayed --temperature by more than TEMPERATURE_TOLERANCE (relative).

Staleness is format knowledge (prime-rl's asynchronous trainer): the format module says it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

SLOPE_TOLERANCE = 0.05
TEMPERATURE_TOLERANCE = 0.05
MIN_SLOPE_TOKENS = 100
FIT_TOKENS = 1024  # tokens sampled for the temperature fit
T_RANGE = (0.1, 10.0)


def slope_check(sums: dict[str, float]) -> tuple[dict[str, Any], str | None]:
    """Least-squares slope of logp_infer (y) against logp_train (x), with intercept, from
    streamed sums n, x, y, xx, xy (`SlopeSums`), and the warning, if any."""
    n = sums["n"]
    sxx = sums["xx"] - sums["x"] ** 2 / n if n else 0.0
    sxy = sums["xy"] - sums["x"] * sums["y"] / n if n else 0.0
    slope = sxy / sxx if sxx > 0 else math.nan
    info = {"slope": slope, "num_tokens": int(n), "tolerance": SLOPE_TOLERANCE}
    if n < MIN_SLOPE_TOKENS or not math.isfinite(slope) or abs(slope - 1) <= SLOPE_TOLERANCE:
        return info, None
    return info, (
        f"logp_infer rises {slope:.3f} times as fast as logp_train (least-squares slope over "
        f"{int(n):,} tokens; 1 when both sides score the same distribution): the sign of a "
        f"temperature on one side only, about T_train / T_infer = {slope:.2f} (e.g. raw "
        "engine log-probs against temperature-scaled trainer log-probs); check both sides' "
        "temperature"
    )


class SlopeSums:
    """Streamed sums for `slope_check`: n, sum x, sum y, sum x^2, sum x y (finite pairs)."""

    def __init__(self) -> None:
        self.sums = {"n": 0.0, "x": 0.0, "y": 0.0, "xx": 0.0, "xy": 0.0}

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        ok = np.isfinite(x) & np.isfinite(y)
        x, y = x[ok], y[ok]
        s = self.sums
        s["n"] += x.size
        s["x"] += float(x.sum())
        s["y"] += float(y.sum())
        s["xx"] += float(np.dot(x, x))
        s["xy"] += float(np.dot(x, y))


def fit_temperature(
    model: Any,
    rollouts: Any,
    sampling: Any,
    device: Any,
    max_tokens: int = FIT_TOKENS,
    batch_tokens: int = 4096,
) -> dict[str, Any] | None:
    """The temperature T* whose replay (with the run's top-p / top-k / min-p) on the model's
    logits best explains logp_infer, on up to `max_tokens` loss-masked tokens of the rollout
    frame `rollouts` (a rollout part). Least squares over tokens finite at every T tried:
    a log-spaced grid over T_RANGE, then golden-section search in the best bracket.
    Returns {fitted, replayed, num_tokens, rms_at_fitted, rms_at_replayed} or None."""
    import torch

    from ..rescore import SeqInput, forward_logits, make_batches
    from ..sampling import Sampling, processed_logits

    seqs: list[SeqInput] = []
    masks: list[np.ndarray] = []
    n = 0
    for r in rollouts.itertuples(index=False):
        m = np.asarray(r.loss_mask, dtype=bool) & np.isfinite(np.asarray(r.logp_infer, float))
        if not m.any():
            continue
        T = len(r.response_token_ids)
        seqs.append(
            SeqInput(r.prompt_token_ids, r.response_token_ids, np.zeros((T, 0), np.int32),
                     np.zeros((T, 0), np.float32), np.asarray(r.logp_infer, np.float64))
        )  # fmt: skip
        masks.append(m)
        n += int(m.sum())
        if n >= max_tokens:
            break
    if n == 0:
        return None
    logits, tokens, target = [], [], []
    for batch in make_batches(
        [(len(s.prompt_token_ids), len(s.response_token_ids)) for s in seqs], batch_tokens
    ):
        z, slices = forward_logits(model, [seqs[i] for i in batch], device)  # [N, V]
        for j, i in enumerate(batch):
            m = torch.from_numpy(masks[i])
            logits.append(z[slices[j]][m.to(z.device)].float().cpu())
            tokens.append(torch.from_numpy(np.array(seqs[i].response_token_ids))[m])
            target.append(torch.from_numpy(np.array(seqs[i].logp_infer))[m])
    Z = torch.cat(logits)  # [n, V]
    tok = torch.cat(tokens).long()  # [n]
    y = torch.cat(target).double()  # [n]

    def logp_at(t: float) -> torch.Tensor:  # [n] replayed log-prob of the sampled token
        s = Sampling(t, sampling.top_p, sampling.top_k, sampling.min_p)
        out = []
        for a in range(0, Z.shape[0], 256):
            lp = torch.log_softmax(processed_logits(Z[a : a + 256], s), dim=-1)
            out.append(lp.gather(1, tok[a : a + 256, None]).squeeze(1))
        return torch.cat(out).double()

    grid = np.geomspace(*T_RANGE, 25)
    cache: dict[float, torch.Tensor] = {t: logp_at(float(t)) for t in grid}
    ok = torch.stack([torch.isfinite(v) for v in cache.values()]).all(dim=0) & torch.isfinite(y)
    if not bool(ok.any()):
        return None

    def rms(t: float) -> float:
        v = cache.get(t)
        if v is None:
            v = cache[t] = logp_at(t)
        d = (v - y)[ok & torch.isfinite(v)]
        return float(torch.sqrt(torch.mean(d * d))) if d.numel() else math.inf

    losses = [rms(float(t)) for t in grid]
    k = int(np.argmin(losses))
    lo, hi = float(grid[max(k - 1, 0)]), float(grid[min(k + 1, len(grid) - 1)])
    t_best = _golden(rms, lo, hi)
    return {
        "fitted": t_best,
        "replayed": float(sampling.temperature),
        "num_tokens": int(ok.sum()),
        "rms_at_fitted": rms(t_best),
        "rms_at_replayed": rms(float(sampling.temperature)),
        "tolerance": TEMPERATURE_TOLERANCE,
    }


def _golden(f: Any, lo: float, hi: float, iters: int = 15) -> float:
    """Minimum of a unimodal f on [lo, hi] by golden-section search (in log T)."""
    g = (math.sqrt(5) - 1) / 2
    a, b = math.log(lo), math.log(hi)
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(math.exp(c)), f(math.exp(d))
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(math.exp(d))
    return math.exp((a + b) / 2)


def temperature_warning(fit: dict[str, Any] | None) -> str | None:
    """The warning for a fitted temperature off the replayed one by > TEMPERATURE_TOLERANCE."""
    if fit is None:
        return None
    t, t0 = fit["fitted"], fit["replayed"]
    if abs(t / t0 - 1) <= TEMPERATURE_TOLERANCE:
        return None
    return (
        f"the inference log-probs are best explained by temperature {t:.3g} (fit on "
        f"{fit['num_tokens']:,} tokens), not the replayed --temperature {t0:g}: pass the "
        "temperature the run sampled with, or check that the dump holds processed (not raw) "
        "log-probs"
    )


def vocab_size(model_path: str) -> int:
    """Rows of the model's embedding (config.vocab_size): every token id must be below it."""
    from transformers import AutoConfig

    from ..errors import MismatchError, first_line

    try:
        return int(AutoConfig.from_pretrained(model_path).vocab_size)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise MismatchError(
            f"cannot read the vocabulary size of {model_path}: {first_line(e)}"
        ) from e
