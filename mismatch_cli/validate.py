"""`sweep-threshold --validate`: measure a pruning threshold for real.

The sweep predicts, from an unpruned run, what pruning at rho would leave. Validation reruns
the same rollouts with vLLM's `min_p = rho` (the min-p safe set, renormalised, on the engine
side) and replays the same rule on the training side, then puts the observed kept-token
mismatch next to the prediction, with the rate at which the two sides' safe sets disagree
about the sampled token (tokens vLLM kept and sampled but the training side prunes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import MismatchError
from .runs import RunDir, open_run
from .schema import STATUS_COMPLETE

COMPARED = ("kept_mean_abs_delta", "kept_mean_delta", "kept_k3", "kept_seq_mean_abs_sum_delta")


def validation_out(run: Path, rho: float) -> Path:
    """Default directory of the validation run: beside the original run."""
    return run.parent / f"{run.name}-validate-minp-{rho:g}"


def validation_config(run: Path, rho: float) -> Any:
    """The original run's settings with `min_p = rho` (the rollouts a pruned RL run samples)."""
    from .config import MeasureConfig

    _, meta = open_run(run, allow_incomplete=False)
    cfg = MeasureConfig.from_dict(meta["config"])
    if cfg.min_p > 0:
        raise MismatchError(
            f"run {run} was already sampled with min_p={cfg.min_p:g}; validate against an unpruned run"
        )
    cfg.min_p = rho
    cfg.validate()
    return cfg


def compare(
    predicted: dict[str, Any], observed_sweep: dict[str, Any], rho: float
) -> dict[str, Any]:
    """Prediction (the original run's sweep row at rho) against the validation run's numbers."""
    obs = observed_sweep["baseline"]  # the pruned run, no further pruning
    n = observed_sweep["num_tokens"]
    dis = observed_sweep["kept_set_disagreements"]
    return {
        "rho": rho,
        "rule": "min-p",
        "run": observed_sweep["run"],
        "predicted": {k: predicted.get(k) for k in COMPARED},
        "observed": {k: obs.get(k) for k in COMPARED},
        "num_tokens": n,
        "safe_set_disagreements": dis,
        "safe_set_disagreement_rate": dis / n if n else None,
        "note": (
            "predicted: original (unpruned) run, tokens outside S_rho dropped, unrenormalised "
            "log-probs; observed: rollouts sampled with vLLM min_p=rho, both sides renormalised "
            "over their own safe set; disagreements: sampled by vLLM but outside the training "
            "side's safe set (infinite delta, excluded from the means)"
        ),
    }


def validate(
    run: Path, rho: float, predicted: dict[str, Any], out: Path | None, console: Any
) -> dict[str, Any]:
    """Run (or reuse / resume) the validation measurement and compare it with the prediction."""
    from .commands.measure import measure_with_progress
    from .sweep import sweep

    cfg = validation_config(run, rho)
    out = out or validation_out(run, rho)
    vrun = RunDir(out)
    if vrun.exists() and vrun.read_meta().get("status") == STATUS_COMPLETE:
        console.print(f"reusing the complete validation run {out}", highlight=False)
    else:
        console.print(
            f"validating rho={rho:g}: rerunning the rollouts with vLLM min_p={rho:g} into {out}"
        )
        measure_with_progress(cfg, out, resume=vrun.exists(), overwrite=False, console=console)
    return compare(predicted, sweep(out), rho)
