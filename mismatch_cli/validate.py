"""`sweep-threshold --validate`: measure a pruning threshold for real.

The sweep predicts, from an unpruned run, what pruning at rho would leave. Validation reruns
the same rollouts with vLLM's `min_p = rho` (the min-p safe set, renormalised, on the engine
side) and replays the same rule on the training side, then puts the observed kept-token
mismatch next to the prediction, with the tokens whose delta is infinite (sampled by vLLM
but outside the training side's safe set).

A run already at the validation path is reused (complete) or resumed (incomplete) only if
it was made with min_p = rho and the source run's prompts, model weights, seed and every
other setting; anything else is refused with one line.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import MismatchError
from .runs import RunDir, open_run
from .schema import STATUS_COMPLETE

COMPARED = ("kept_mean_abs_delta", "kept_mean_delta", "kept_k3", "kept_seq_mean_abs_sum_delta")
# Settings that may differ between the source run and its validation run (they do not change
# what is sampled or how it is scored).
_FREE = frozenset({"chunk_prompts", "rescore_batch_tokens", "device"})


def validation_row(result: dict[str, Any], rule: str) -> dict[str, Any]:
    """The sweep row `--validate` measures: the single --rho asked for, else the
    recommendation; one-line errors for the absolute rule (vLLM has no engine-side
    equivalent) and for a sweep that recommends nothing."""
    if rule != "min-p":
        raise MismatchError(
            "--validate supports --rule min-p only (vLLM's min_p); the absolute rule has no "
            "engine-side equivalent"
        )
    rows = result["rows"]
    if len(rows) == 1:
        return rows[0]
    rec = result["recommended"]["rho"]
    if rec is None:
        raise MismatchError("no recommended rho to validate; pass a single --rho")
    return next(r for r in rows if r["rho"] == rec)


def validation_out(run: Path, rho: float) -> Path:
    """Default directory of the validation run: beside the original run."""
    return run.parent / f"{run.name}-validate-minp-{rho:g}"


def validation_config(run: Path, rho: float) -> Any:
    """The original run's settings with `min_p = rho` (the rollouts a pruned RL run samples)."""
    from .config import MeasureConfig

    _, meta = open_run(run, allow_incomplete=False)
    if meta.command != "measure":
        raise MismatchError(
            f"run {run} was not made by `mismatch measure` ({meta.command}): "
            "--validate reruns its rollouts, which needs the original prompts and model"
        )
    cfg = MeasureConfig.from_dict(meta["config"])
    if cfg.min_p > 0:
        raise MismatchError(
            f"run {run} was already sampled with min_p={cfg.min_p:g}; validate against an unpruned run"
        )
    cfg.min_p = rho
    cfg.validate()
    return cfg


def check_reusable(source: Path, target: Path, cfg: Any) -> None:
    """Refuse a run at `target` that was not made with `cfg` (min_p = rho and the source
    run's prompts, model and seed): reusing or resuming it would compare the wrong run."""
    meta = RunDir(target).read_meta()
    src = RunDir(source).read_meta()
    have = meta.config
    want = cfg.to_dict()
    for key, value in want.items():
        if key in _FREE:
            continue
        if have.get(key) != value:
            raise MismatchError(
                f"{target} is not the validation run of {source} at min_p={cfg.min_p:g}: its "
                f"{key} is {have.get(key)!r}, expected {value!r}; pass another --validate-out"
            )
    for what, a, b in (
        ("prompt tokens", meta.get("prompt_ids_sha256"), src.get("prompt_ids_sha256")),
        ("model weights", meta.model.get("weights_sha256"), src.model.get("weights_sha256")),
    ):
        if a != b:
            raise MismatchError(
                f"{target} was made with other {what} than {source}; pass another --validate-out"
            )


def compare_prediction(
    predicted: dict[str, Any], observed_sweep: dict[str, Any], rho: float
) -> dict[str, Any]:
    """Prediction (the original run's sweep row at rho) against the validation run's numbers."""
    obs = observed_sweep["baseline"]  # the pruned run, no further pruning
    n = observed_sweep["num_tokens"]
    n_inf = observed_sweep["num_infinite"]
    return {
        "rho": rho,
        "rule": "min-p",
        "run": observed_sweep["run"],
        "predicted": {k: predicted.get(k) for k in COMPARED},
        "observed": {k: obs.get(k) for k in COMPARED},
        "num_tokens": n,
        "num_infinite": n_inf,
        "frac_infinite": n_inf / n if n else None,
        "note": (
            "predicted: original (unpruned) run, tokens outside S_rho dropped, unrenormalised "
            "log-probs; observed: rollouts sampled with vLLM min_p=rho, both sides renormalised "
            "over their own safe set; num_infinite: sampled by vLLM but outside the training "
            "side's safe set (infinite delta, excluded from the means)"
        ),
    }


def validate(
    run: Path,
    rho: float,
    predicted: dict[str, Any],
    out: Path | None,
    measure: Callable[..., Path],
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Run (or reuse / resume) the validation measurement and compare it with the prediction.

    `measure(cfg, out, resume=...)` runs the pipeline (the CLI passes one with progress bars).
    """
    from .sweep import sweep

    cfg = validation_config(run, rho)
    out = out or validation_out(run, rho)
    vrun = RunDir(out)
    if vrun.exists():
        check_reusable(run, out, cfg)
    if vrun.exists() and vrun.read_meta().get("status") == STATUS_COMPLETE:
        log(f"reusing the complete validation run {out}")
    else:
        log(f"validating rho={rho:g}: rerunning the rollouts with vLLM min_p={rho:g} into {out}")
        measure(cfg, out, resume=vrun.exists())
    return compare_prediction(predicted, sweep(out), rho)
