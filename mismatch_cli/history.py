"""`mismatch history`: the mismatch metrics a trainer already logs, over its steps, read from
its own log (no token dump needed), with what each means in this project's terms and the
drift alarm (`monitor.DriftDetector`, the one definition) run over them.

Logs read (`LOG_FORMATS`; detected from the file, or named):
    trl          trainer_state.json (`log_history`: one dict per logging step, "step" in it)
    verl         the file logger's JSONL: one `{"step": N, "data": {...}}` per line
    prime-rl     the file monitor's metrics.jsonl: flat `{"step": N, "time": t, ...}` lines,
                 several per step (merged)
    csv          a W&B or other export: a step column (step, Step, _step, global_step) and one
                 column per metric (W&B's "RUN - key" headers and __MIN/__MAX columns handled;
                 TensorBoard's "Wall time,Step,Value" download named run-RUN-tag-TAG.csv)
    tensorboard  event files (a file or a directory of them), read with the tensorboard package

`HISTORY_KEYS` is the registry: one row per key a framework logs (and this project's own
`mismatch/...` keys, as the plug-ins log them into a TRL log_history or a tracker), with its meaning against
delta = logp_infer - logp_train (sign, clipped or raw, token or sequence level), the
monitor metric it corresponds to, and whether the alarm watches it. A leading `train/`
(the Hugging Face integrations' prefix) is dropped before lookup. A new key: one row here; a
new log format: a reader `_read_<name>(path) -> {step: {key: value}}`, one entry in
`LOG_FORMATS`, and a line in `detect_format`.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import MismatchError, first_line
from .monitor import DriftDetector

# Commits checked (docs/integrations.md, "Following a run: history and the trackers").
LOG_SOURCES = {
    "trl": "trl 1.16.0, trl/trainer/grpo_trainer.py (_generate_and_score_completions, log)",
    "verl": "volcengine/verl b178a3c: verl/utils/tracking.py (FileLogger), "
    "verl/trainer/ppo/rollout_corr_helper.py, verl/utils/debug/metrics.py, core_algos.py",
    "prime-rl": "PrimeIntellect-ai/prime-rl 559b447: src/prime_rl/monitors/file.py, "
    "trainer/rl/loss.py, trainer/rl/train.py, trainer/utils.py",
}


@dataclass(frozen=True)
class HistoryKey:
    """One logged key (`key` may hold a `*` wildcard: the first matching row wins)."""

    framework: str
    key: str
    meaning: str  # in this project's terms
    sign: str  # against delta = logp_infer - logp_train
    clip: str  # raw, or after which clip / mask
    level: str  # token, sequence, or the mode that decides
    ours: str | None  # the monitor/report metric it corresponds to (None: no equivalent)
    watch: str | None  # "log" (k3-like) / "linear" (mean |delta|-like): the alarm watches it
    panel: str  # the figure panel: abs, kl, ratio, share, prob


_TRL_IS = (
    "r = exp(logp_train - logp_infer) = exp(-delta) after TRL's correction: clamped to "
    "[clip_min, clip_max] (*_truncate) or set to 0 outside it (*_mask)"
)
_TRL_LEVEL = "token (token_*), sequence product (sequence_*; the default sequence_mask)"
_VERL_IS = "IS weight exp(logp_old - logp_rollout) = exp(-delta) (rollout_is: token or sequence)"
HISTORY_KEYS: tuple[HistoryKey, ...] = (
    # TRL: logged only with use_vllm and vllm_importance_sampling_correction
    HistoryKey("trl", "sampling/sampling_logp_difference/mean",
               "mean |delta| over the step's tokens (NaN tokens left out), averaged over processes and the logging window",
               "none (|delta|)", "raw", "token", "mean_abs_delta", "linear", "abs"),
    HistoryKey("trl", "sampling/sampling_logp_difference/max", "max |delta| over the step's tokens",
               "none (|delta|)", "raw", "token", "max_abs_delta", None, "abs"),
    HistoryKey("trl", "sampling/importance_sampling_ratio/min", f"min of {_TRL_IS}",
               "r = exp(-delta)", "after truncation / masking", _TRL_LEVEL, None, None, "ratio"),
    HistoryKey("trl", "sampling/importance_sampling_ratio/mean", f"mean of {_TRL_IS}",
               "r = exp(-delta)", "after truncation / masking", _TRL_LEVEL, None, None, "ratio"),
    HistoryKey("trl", "sampling/importance_sampling_ratio/max", f"max of {_TRL_IS}",
               "r = exp(-delta)", "after truncation / masking", _TRL_LEVEL, None, None, "ratio"),
    # verl: rollout_corr/* (compute_offpolicy_metrics, compute_is_metrics, rejection sampling)
    HistoryKey("verl", "rollout_corr/kl", "mean(logp_rollout - logp_old) = mean delta (k1)",
               "same as delta", "raw", "token", "mean_delta", None, "kl"),
    HistoryKey("verl", "rollout_corr/k3_kl", "mean(r - log r - 1), r = exp(-delta): k3",
               "none (>= 0)", "raw", "token", "k3", "log", "kl"),
    HistoryKey("verl", "rollout_corr/chi2_token", "mean(r^2) - 1, r = exp(-delta)",
               "none", "log r clamped to +-SAFETY_BOUND", "token", "chi2_token", None, "kl"),
    HistoryKey("verl", "rollout_corr/chi2_seq", "mean over sequences of (prod r)^2 - 1",
               "none", "log r sum clamped to +-SAFETY_BOUND", "sequence", None, None, "kl"),
    HistoryKey("verl", "rollout_corr/log_ppl_diff",
               "mean over sequences of mean_t(logp_rollout) - mean_t(logp_old) = mean_t delta",
               "same as delta", "raw", "sequence (per-sequence mean)", "log_ppl_gap_mean", None, "kl"),
    HistoryKey("verl", "rollout_corr/log_ppl_abs_diff", "mean over sequences of |mean_t delta|",
               "none (absolute)", "raw", "sequence (per-sequence mean)", None, None, "abs"),
    HistoryKey("verl", "rollout_corr/ppl_ratio", "mean over sequences of exp(mean_t delta)",
               "exp(+delta)", "raw", "sequence", None, None, "ratio"),
    HistoryKey("verl", "rollout_corr/rollout_is_mean", f"mean {_VERL_IS}",
               "r = exp(-delta)", "after truncation at rollout_is_threshold", "rollout_is", None, None, "ratio"),
    HistoryKey("verl", "rollout_corr/rollout_is_max", f"max {_VERL_IS}",
               "r = exp(-delta)", "raw (sequence level: from the unclamped log ratio)", "rollout_is", None, None, "ratio"),
    HistoryKey("verl", "rollout_corr/rollout_is_min", f"min {_VERL_IS}",
               "r = exp(-delta)", "raw (sequence level: from the unclamped log ratio)", "rollout_is", None, None, "ratio"),
    HistoryKey("verl", "rollout_corr/rollout_is_ratio_fraction_high", "share of weights above rollout_is_threshold",
               "r = exp(-delta)", "raw", "rollout_is", None, None, "share"),
    HistoryKey("verl", "rollout_corr/rollout_is_ratio_fraction_low", "share of weights below 1 / rollout_is_threshold",
               "r = exp(-delta)", "raw", "rollout_is", None, None, "share"),
    HistoryKey("verl", "rollout_corr/rollout_is_eff_sample_size", "effective sample size of the clamped weights",
               "r = exp(-delta)", "clamped to [1/threshold, threshold]", "rollout_is", None, None, "share"),
    HistoryKey("verl", "rollout_corr/rollout_rs_masked_fraction", "share of tokens rejection sampling masked",
               "-", "after rejection", "token", None, None, "share"),
    HistoryKey("verl", "rollout_corr/rollout_rs_seq_masked_fraction", "share of sequences with a masked token",
               "-", "after rejection", "sequence", None, None, "share"),
    # verl's debug metrics: on PROBABILITIES despite the name (calculate_log_prob_diff on exp(logp))
    HistoryKey("verl", "training/rollout_probs_diff_mean", "mean |p_train - p_infer| of the sampled token",
               "none (absolute)", "raw", "token", "mean_abs_dp", None, "prob"),
    HistoryKey("verl", "training/rollout_probs_diff_max", "max |p_train - p_infer|",
               "none (absolute)", "raw", "token", None, None, "prob"),
    HistoryKey("verl", "training/rollout_probs_diff_std", "std of |p_train - p_infer|",
               "none (absolute)", "raw", "token", None, None, "prob"),
    HistoryKey("verl", "training/rollout_actor_probs_pearson_corr", "Pearson correlation of p_train and p_infer",
               "-", "raw", "token", None, None, "share"),
    HistoryKey("verl", "actor/ppo_kl",
               "mean(logp_old - logp_new) over the update: policy change; the mismatch (mean delta, "
               "same sign) only in bypass mode, where logp_old is the rollout's",
               "same as delta (bypass mode)", "log ratio clamped to +-20", "token", None, None, "kl"),
    # prime-rl: per-token mismatch_kl = r - log r - 1, log r = logp_train - logp_infer
    HistoryKey("prime-rl", "mismatch_kl/all/mean", "mean of r - log r - 1, r = exp(-delta): k3",
               "none (>= 0)", "raw", "token", "k3", "log", "kl"),
    HistoryKey("prime-rl", "mismatch_kl/all/max", "max over tokens of r - log r - 1",
               "none (>= 0)", "raw", "token", None, None, "kl"),
    HistoryKey("prime-rl", "mismatch_kl/*/mean", "k3 of one environment's tokens",
               "none (>= 0)", "raw", "token", "k3", None, "kl"),
    HistoryKey("prime-rl", "masked_mismatch_kl/mean", "k3 of the tokens DPPO masked (mean over sequences)",
               "none (>= 0)", "raw", "sequence (per-sequence mean)", None, None, "kl"),
    HistoryKey("prime-rl", "unmasked_mismatch_kl/mean", "k3 of the tokens DPPO kept (mean over sequences)",
               "none (>= 0)", "raw", "sequence (per-sequence mean)", None, None, "kl"),
    # this project's own keys (the plug-ins, `--log-to`): a TRL log_history or a tracker export
    HistoryKey("mismatch", "mismatch/k3", "k3 = mean(r - 1 - log r), r = exp(-delta) (the monitor's)",
               "none (>= 0)", "raw", "token", "k3", "log", "kl"),
    HistoryKey("mismatch", "mismatch/mean_delta", "mean delta (the monitor's)",
               "same as delta", "raw", "token", "mean_delta", None, "kl"),
    HistoryKey("mismatch", "mismatch/mean_abs_delta", "mean |delta| (the monitor's)",
               "none (|delta|)", "raw", "token", "mean_abs_delta", None, "abs"),
    HistoryKey("mismatch", "mismatch/tail_abs_delta_share", "the tail's (p_train < 0.1) share of sum |delta|",
               "none", "raw", "token", "tail_abs_delta_share", "linear", "share"),
    HistoryKey("mismatch", "mismatch/frac_ratio_outside_0.5_2", "share of tokens with r outside [0.5, 2]",
               "r = exp(-delta)", "raw", "token", "frac_ratio_outside_0.5_2", None, "share"),
    HistoryKey("prime-rl", "is_masked/mean",
               "share of loss tokens DPPO masked (p_train - p_infer beyond dppo_mask_high / -low, by advantage sign)",
               "p_train - p_infer", "-", "token (per-sequence mean)", None, None, "share"),
)  # fmt: skip

# What a trainer's scalar log cannot say, and how to get it.
CANNOT_TELL: tuple[str, ...] = (
    "no per-token data: no probability buckets, no (1 - p) bound check, no tail share, "
    "no pruning sweep, no correction replay",
    "each value is the framework's own aggregate at its own clip and level (see the table): "
    "it is not comparable one to one with `mismatch report` on the same run",
    "for the full picture: dump the tokens and run `mismatch import` (verl, prime-rl, slime, "
    "SkyRL), or log `mismatch/...` from inside the trainer with the plug-ins (TRL, slime, "
    "SkyRL: docs/integrations.md)",
)

STEP_COLUMNS = ("step", "Step", "_step", "global_step", "train/global_step", "trainer/global_step")


def lookup(key: str) -> HistoryKey | None:
    """The registry row of a logged key (a leading `train/` dropped), or None. A key with
    its slashes turned into underscores (TensorBoard's CSV file names) matches too."""
    k = key.removeprefix("train/")
    for row in HISTORY_KEYS:
        if row.key == k or ("*" in row.key and fnmatch.fnmatchcase(k, row.key)):
            return row
    flat = key.replace("/", "_").removeprefix("train_")
    for row in HISTORY_KEYS:
        if "*" not in row.key and row.key.replace("/", "_") == flat:
            return row
    return None


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


Steps = dict[int, dict[str, float]]


def _add(steps: Steps, step: Any, row: dict[str, Any]) -> None:
    s = _number(step)
    if s is None:
        return
    d = steps.setdefault(int(s), {})
    for k, v in row.items():
        x = _number(v)
        if x is not None and isinstance(k, str):
            d[k] = x


def _jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise MismatchError(f"cannot read {path}: line {i} is not JSON ({e.msg})") from e
            if not isinstance(obj, dict):
                raise MismatchError(f"cannot read {path}: line {i} is not a JSON object")
            rows.append(obj)
    return rows


def _read_trl(path: Path) -> Steps:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MismatchError(f"cannot read {path}: not JSON ({e.msg} at line {e.lineno})") from e
    hist = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(hist, list):
        raise MismatchError(
            f"cannot read {path}: no `log_history` list (a TRL trainer_state.json has one)"
        )
    steps: Steps = {}
    for entry in hist:
        if isinstance(entry, dict):
            _add(
                steps,
                entry.get("step"),
                {k: v for k, v in entry.items() if not k.startswith("eval_")},
            )
    return steps


def _read_verl(path: Path) -> Steps:
    steps: Steps = {}
    for i, obj in enumerate(_jsonl(path), 1):
        if not isinstance(obj.get("data"), dict):
            raise MismatchError(
                f'cannot read {path}: line {i} has no `data` object (verl\'s file logger writes {{"step": N, "data": {{...}}}})'
            )
        _add(steps, obj.get("step"), obj["data"])
    return steps


def _read_prime_rl(path: Path) -> Steps:
    steps: Steps = {}
    for obj in _jsonl(path):
        _add(steps, obj.get("step"), {k: v for k, v in obj.items() if k not in ("step", "time")})
    return steps


def _csv_name(col: str) -> str | None:
    """A W&B export's column as its metric key ('RUN - train/x' -> 'train/x'); None for its
    __MIN / __MAX / __step companions."""
    if col.endswith(("__MIN", "__MAX", "__step")):
        return None
    return col.split(" - ", 1)[1] if " - " in col else col


def _read_csv(path: Path) -> Steps:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        step_col = next((c for c in STEP_COLUMNS if c in cols), None)
        if step_col is None:
            raise MismatchError(
                f"cannot read {path}: no step column (looked for {', '.join(STEP_COLUMNS)})"
            )
        names = {c: _csv_name(c) for c in cols if c != step_col and c != "Wall time"}
        if set(names) == {"Value"}:  # TensorBoard's CSV download: the tag is in the file name
            names = {"Value": path.stem.split("-tag-", 1)[-1]}
        steps: Steps = {}
        for row in reader:
            _add(
                steps,
                row.get(step_col),
                {n: row[c] for c, n in names.items() if n and row.get(c) not in (None, "")},
            )
    return steps


def _read_tensorboard(path: Path) -> Steps:
    try:
        from tensorboard.backend.event_processing import event_accumulator
    except ImportError as e:
        raise MismatchError(
            f"reading TensorBoard event files needs the tensorboard package: pip install 'mismatch-cli[tensorboard]' ({first_line(e)})"
        ) from e
    acc = event_accumulator.EventAccumulator(
        str(path), size_guidance={event_accumulator.SCALARS: 0}
    )
    try:
        acc.Reload()
    except Exception as e:  # a damaged event file
        raise MismatchError(f"cannot read {path}: {first_line(e)}") from e
    steps: Steps = {}
    for tag in acc.Tags().get("scalars", []):
        for ev in acc.Scalars(tag):
            _add(steps, ev.step, {tag: ev.value})
    return steps


LOG_FORMATS = {
    "trl": _read_trl,
    "verl": _read_verl,
    "prime-rl": _read_prime_rl,
    "csv": _read_csv,
    "tensorboard": _read_tensorboard,
}


def _resolve(path: Path) -> Path:
    """A directory stands for the log inside it (trainer_state.json, metrics.jsonl, event
    files; TRL's newest checkpoint-*/trainer_state.json)."""
    if not path.is_dir():
        return path
    for name in ("trainer_state.json", "metrics.jsonl"):
        if (path / name).is_file():
            return path / name
    if any(path.rglob("events.out.tfevents.*")):
        return path
    ckpts = sorted(
        path.glob("checkpoint-*/trainer_state.json"),
        key=lambda p: _number(p.parent.name.split("-")[-1]) or -1,
    )
    if ckpts:
        return ckpts[-1]
    raise MismatchError(
        f"{path}: no trainer log in this directory (looked for trainer_state.json, metrics.jsonl, events.out.tfevents.*, checkpoint-*/trainer_state.json)"
    )


def detect_format(path: Path) -> str:
    """The log format of a file, from its name and first record."""
    if path.is_dir() or "tfevents" in path.name:
        return "tensorboard"
    if path.suffix.lower() == ".csv":
        return "csv"
    if path.suffix.lower() == ".json":  # one JSON document: TRL's trainer_state.json
        return "trl"
    try:
        with path.open(encoding="utf-8") as f:
            head = f.read(1 << 16)
    except UnicodeDecodeError as e:
        raise MismatchError(f"cannot read {path}: not a text log ({e.reason})") from e
    first = head.lstrip()[:1]
    if first == "{":
        line = head.lstrip().splitlines()[0]
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = None  # a multi-line JSON document
        if isinstance(obj, dict) and "log_history" not in line:
            return "verl" if isinstance(obj.get("data"), dict) else "prime-rl"
        return "trl"
    if head.split("\n", 1)[0].count(",") >= 1:
        return "csv"
    raise MismatchError(
        f"cannot tell the format of {path}: not a trainer_state.json, JSONL, CSV or TensorBoard event file (name it with --format {{{','.join(LOG_FORMATS)}}})"
    )


def read_log(path: str | Path, fmt: str | None = None) -> tuple[str, Path, Steps]:
    """(format, the file read, {step: {key: value}}) of one log; one-line errors."""
    p = Path(path)
    if not p.exists():
        raise MismatchError(f"{p}: no such file or directory")
    if fmt is not None and fmt not in LOG_FORMATS:
        raise MismatchError(f"unknown log format {fmt!r}; choose from {', '.join(LOG_FORMATS)}")
    p = p if fmt == "tensorboard" else _resolve(p)
    fmt = fmt or detect_format(p)
    try:
        steps = LOG_FORMATS[fmt](p)
    except MismatchError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise MismatchError(f"cannot read {p} as {fmt}: {first_line(e)}") from e
    return fmt, p, steps


def _series(steps: Steps) -> list[dict[str, Any]]:
    keys: dict[str, HistoryKey] = {}
    for row in steps.values():
        for k in row:
            if k not in keys and (hk := lookup(k)) is not None:
                keys[k] = hk
    order = {r.key: i for i, r in enumerate(HISTORY_KEYS)}
    out = []
    for k, hk in sorted(keys.items(), key=lambda kv: (order[kv[1].key], kv[0])):
        pts = [(s, steps[s][k]) for s in sorted(steps) if k in steps[s]]
        vals = [v for _, v in pts]
        out.append(
            {
                "key": k,
                **{f: v for f, v in asdict(hk).items() if f != "key"},
                "registry_key": hk.key,
                "steps": [s for s, _ in pts],
                "values": vals,
                "first": vals[0],
                "last": vals[-1],
                "min": min(vals),
                "max": max(vals),
            }
        )
    return out


def run_alert(series: Sequence[dict[str, Any]], warmup: int = 20) -> dict[str, Any]:
    """The drift alarm (`DriftDetector`, its defaults) over the watched series, step by step:
    the first step it is raised at and why, the steps raised, the final CUSUMs."""
    watched = [s for s in series if s["watch"]]
    det = DriftDetector(
        keys=[s["key"] for s in watched],
        warmup=warmup,
        log_keys=[s["key"] for s in watched if s["watch"] == "log"],
    )
    by_step: dict[int, dict[str, float]] = {}
    for s in watched:
        for st, v in zip(s["steps"], s["values"], strict=True):
            by_step.setdefault(st, {})[s["key"]] = v
    raised: list[int] = []
    first: dict[str, Any] | None = None
    cusum: dict[int, dict[str, float]] = {}
    for st in sorted(by_step):
        if det.update(by_step[st]):
            raised.append(st)
            if first is None:
                first = {"step": st, "reason": det.reason}
        cusum[st] = dict(det.cusum)
    n = max((len(s["values"]) for s in watched), default=0)
    return {
        "watched": [s["key"] for s in watched],
        "warmup": warmup,
        "threshold": det.threshold,
        "enough_steps": n > warmup,
        "first": first,
        "raised_steps": raised,
        "cusum": {str(k): v for k, v in cusum.items()},
    }


def _label(p: Path) -> str:
    """A log's name: its file stem, or its directory's name for the frameworks' fixed file
    names (trainer_state.json, metrics.jsonl) and TensorBoard directories."""
    if p.is_dir() or p.name in ("trainer_state.json", "metrics.jsonl"):
        q = p if p.is_dir() else p.parent
        return q.name or str(q)
    return p.stem


def unique_labels(results: Sequence[dict[str, Any]]) -> None:
    """Make the logs' labels distinct in place ('run', 'run#2', ...): they name tracker runs
    and legend entries."""
    seen: dict[str, int] = {}
    for r in results:
        n = seen[r["label"]] = seen.get(r["label"], 0) + 1
        if n > 1:
            r["label"] = f"{r['label']}#{n}"


def history(path: str | Path, fmt: str | None = None, label: str | None = None) -> dict[str, Any]:
    """One log's mismatch series, their registry rows, the alarm and what the log cannot say.
    A log without any known mismatch key is a one-line error naming what was looked for."""
    fmt, p, steps = read_log(path, fmt)
    series = _series(steps)
    if not series:
        looked = ", ".join(dict.fromkeys(r.key for r in HISTORY_KEYS))
        found = len({k for row in steps.values() for k in row})
        raise MismatchError(
            f"{p}: no mismatch metric in this {fmt} log ({len(steps)} steps, {found} keys; looked for {looked}, with or without a train/ prefix)"
        )
    return {
        "path": str(p),
        "label": label or _label(p),
        "format": fmt,
        "source": LOG_SOURCES.get(fmt),
        "num_steps": len({s for x in series for s in x["steps"]}),
        "series": series,
        "alert": run_alert(series),
        "cannot_tell": list(CANNOT_TELL),
    }


def replay_metrics(result: dict[str, Any]) -> list[tuple[int, dict[str, float]]]:
    """(step, metrics) to replay into a tracker: each series as
    `mismatch/<framework>/<key>`, plus `mismatch/alert` and `mismatch/alert/cusum_<key>`."""
    out: dict[int, dict[str, float]] = {}
    for s in result["series"]:
        key = s["key"].removeprefix("train/")
        name = key if s["framework"] == "mismatch" else f"mismatch/{s['framework']}/{key}"
        for st, v in zip(s["steps"], s["values"], strict=True):
            out.setdefault(st, {})[name] = v
    al = result["alert"]
    raised = set(al["raised_steps"])
    for st_text, cs in al["cusum"].items():
        st = int(st_text)
        d = out.setdefault(st, {})
        d["mismatch/alert"] = 1.0 if st in raised else 0.0
        for k, v in cs.items():
            d[f"mismatch/alert/cusum_{k.removeprefix('train/').removeprefix('mismatch/')}"] = v
    return sorted(out.items())


def replay(results: Sequence[dict[str, Any]], specs: Sequence[str]) -> list[str]:
    """Each log's series into the trackers of `specs` (one tracker run per log, named by its
    label; with several logs a TensorBoard DIR gets one sub-directory per log). Returns what
    was written, one line per log."""
    from .trackers import log_all, open_trackers

    lines = []
    for r in results:
        these = [
            f"{s}/{r['label']}" if len(results) > 1 and s.startswith("tensorboard:") else s
            for s in specs
        ]
        rows = replay_metrics(r)
        with open_trackers(these, run_name=r["label"]) as ts:
            for st, m in rows:
                log_all(ts, m, st)
        lines.append(f"{r['label']}: {len(rows)} steps into {', '.join(these)}")
    return lines


__all__ = [
    "CANNOT_TELL",
    "HISTORY_KEYS",
    "LOG_FORMATS",
    "LOG_SOURCES",
    "HistoryKey",
    "detect_format",
    "history",
    "lookup",
    "read_log",
    "replay",
    "replay_metrics",
    "run_alert",
    "unique_labels",
]
