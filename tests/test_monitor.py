"""`mismatch_cli.monitor`: a run's tokens fed step by step equal `report --json` and
`corrections --json` on a run of the same tokens; padded and packed inputs agree; bad input is
a clear error or a documented NaN; the drift detector's false-alarm rate and delay, measured."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mismatch_cli import corrections as C
from mismatch_cli.analysis import analyze
from mismatch_cli.monitor import DriftDetector, StepMonitor, TokenSampler, flatten
from mismatch_cli.synthetic import write_synthetic_run

from .conftest import run_cli

EPS = 0.3
# report metrics that depend on delta alone (not on p, which a trainer only has as exp(logp))
DELTA_METRICS = (
    "k1", "k2", "k3", "mean_abs_delta", "max_abs_delta", "p99_abs_delta", "chi2_token",
    "chi2_seq", "ess_token", "ess_seq", "is_seq_max", "frac_ratio_outside_0.5_2",
)  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_run(tmp_path_factory.mktemp("mon") / "run", num_sequences=40, eps=0.6)


def steps_of(run: Path, per_step: int = 7):
    """The run's sequences, `per_step` at a time, as right-padded [B, T] tensors + mask."""
    t = pd.read_parquet(run / "tokens.parquet").sort_values(["seq_id", "pos"])
    seqs = [g for _, g in t.groupby("seq_id", sort=True)]
    for i in range(0, len(seqs), per_step):
        group = seqs[i : i + per_step]
        T = max(len(g) for g in group)
        li = torch.zeros(len(group), T, dtype=torch.float64)
        lt = torch.zeros(len(group), T, dtype=torch.float64)
        mask = torch.zeros(len(group), T, dtype=torch.bool)
        for b, g in enumerate(group):
            n = len(g)
            li[b, :n] = torch.tensor(g["logp_infer"].to_numpy())
            lt[b, :n] = torch.tensor(g["logp_train"].to_numpy())
            mask[b, :n] = True
        yield li, lt, mask


def close(a: float | None, b: float | None, rel: float) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-15)


@pytest.fixture(scope="module")
def monitored(run: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("sampled") / "run"
    mon = StepMonitor(eps=EPS, sample=TokenSampler(out, fraction=1.0))
    per_step = [mon.update(li, lt, m, step=s) for s, (li, lt, m) in enumerate(steps_of(run))]
    mon.close()
    return mon, per_step, out


def test_the_run_so_far_equals_report_and_corrections_on_the_same_tokens(monitored) -> None:
    """The sampled run (every sequence) holds the monitor's tokens: `report --json --eps`
    and `corrections --json` on it, through the real CLI, equal the monitor's summary."""
    mon, _, out = monitored
    s = mon.summary()
    rep = json.loads(run_cli("report", str(out), "--json", "--eps", str(EPS), check=True).stdout)
    got = s["report"]
    for k, v in rep["metrics"].items():
        assert close(got["metrics"][k], v, 1e-9), k
    for k in ("num_tokens", "num_finite", "num_infinite", "num_sequences", "eps_needed_q99"):
        assert close(got[k], rep[k], 1e-9), k
    for a, b in zip(got["buckets"], rep["buckets"], strict=True):
        for k in ("count", "mean_abs_delta", "mean_delta", "p99_abs_delta", "frac_above_envelope"):
            assert close(a[k], b[k], 1e-9), (k, a["lo"])
    for k in ("token_share", "abs_delta_share", "mean_delta", "z", "z_diff"):
        assert close(got["tail"][k], rep["tail"][k], 1e-9), k
    assert close(
        got["envelope"]["exact"]["frac_above"], rep["envelope"]["exact"]["frac_above"], 1e-12
    )
    corr = json.loads(run_cli("corrections", str(out), "--json", check=True).stdout)
    rows = {r["name"]: r for r in s["corrections"]}
    compared = 0
    for r in corr["methods"]:
        if r["name"] not in rows:
            assert r["name"].startswith("dvp"), r["name"]
            continue
        for k, v in r.items():
            if isinstance(v, float):
                assert close(rows[r["name"]][k], v, 1e-9), (r["name"], k)
                compared += 1
    assert compared > 100


def test_delta_metrics_equal_report_on_the_original_run(run: Path, monitored) -> None:
    """Against the run the tokens came from (whose p columns come from float32 softmax, not
    exp(logp)): every metric of delta alone is equal, and the totals."""
    mon, _, _ = monitored
    rep = analyze(run, eps=EPS)
    got = mon.summary()["report"]
    for k in DELTA_METRICS:
        assert close(got["metrics"][k], rep["metrics"][k], 1e-9), k
    assert got["num_tokens"] == rep["num_tokens"] and got["num_sequences"] == rep["num_sequences"]


def test_each_step_equals_report_on_its_own_tokens(run: Path, monitored) -> None:
    _, per_step, _ = monitored
    li, lt, m = next(iter(steps_of(run)))
    tok = flatten(li, lt, m)
    df = pd.DataFrame(
        {
            "seq_id": tok.seq,
            "delta": tok.logp_infer - tok.logp_train,
            "p_train": np.exp(tok.logp_train),
            "p_infer": np.exp(tok.logp_infer),
        }
    )
    rep = analyze(df, eps=EPS)
    first = per_step[0]
    for k in ("k3", "mean_abs_delta", "p99_abs_delta", "ess_seq"):
        assert close(first[f"mismatch/{k}"], rep["metrics"][k], 1e-12), k
    assert first["mismatch/tail_abs_delta_share"] == pytest.approx(rep["tail"]["abs_delta_share"])
    assert first["mismatch/num_tokens"] == rep["num_tokens"]
    want = C.corrections(df)
    rows = {r["name"]: r for r in want["methods"]}
    for name in ("icepop", "seq-mask-geo", "tis-token"):
        for key in ("tokens_masked", "sequences_masked", "tokens_clipped"):
            assert close(first[f"mismatch/corrections/{name}/{key}"], rows[name][key], 1e-12)
    assert all(k.startswith("mismatch/") for k in first)
    assert any(k.startswith("mismatch/bucket/") for k in first)


def test_packed_input_equals_padded() -> None:
    rng = np.random.default_rng(0)
    lens = [5, 2, 7]
    lt = [np.log(rng.uniform(0.01, 1, n)) for n in lens]
    li = [x + rng.normal(0, 0.05, x.size) for x in lt]
    T = max(lens)
    pad_li, pad_lt, mask = np.zeros((3, T)), np.zeros((3, T)), np.zeros((3, T), bool)
    for b, n in enumerate(lens):
        pad_li[b, :n], pad_lt[b, :n], mask[b, :n] = li[b], lt[b], True
    a = StepMonitor(alert=None).update(pad_li, pad_lt, mask)
    p = StepMonitor(alert=None).update(np.concatenate(li), np.concatenate(lt), seq_lens=lens)
    assert a.keys() == p.keys()
    for k in a:
        assert close(a[k], p[k], 1e-12) or (math.isnan(a[k]) and math.isnan(p[k])), k


def test_bad_input_is_a_clear_error_or_a_documented_nan() -> None:
    mon = StepMonitor(alert=None)
    with pytest.raises(ValueError, match="logp_infer has shape"):
        mon.update(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="mask has shape"):
        mon.update(np.zeros((2, 3)), np.zeros((2, 3)), np.ones((3, 2)))
    with pytest.raises(ValueError, match="seq_lens sum to"):
        mon.update(np.zeros(5), np.zeros(5), seq_lens=[2, 2])
    empty = mon.update(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 3)))
    assert empty["mismatch/num_tokens"] == 0 and math.isnan(empty["mismatch/k3"])
    li = np.log(np.array([[0.5, 0.2, 0.9]]))
    lt = li.copy()
    lt[0, 1] = np.nan  # a NaN log-prob: an infinite delta, out of every mean
    li[0, 2] = 0.01  # a log-prob above 0: counted
    out = mon.update(li, lt)
    assert out["mismatch/num_infinite"] == 1 and out["mismatch/num_logp_above_0"] == 1
    assert math.isfinite(out["mismatch/k3"])
    assert mon.summary()["num_logp_above_0"] == 1


def test_dvp_pruned_mass_from_the_logits() -> None:
    from mismatch_cli.dvp import pruned_mass

    torch.manual_seed(0)
    z = torch.randn(2, 4, 50) * 3  # [B, T, V]
    logp = torch.log_softmax(z, -1)
    tok = torch.randint(0, 50, (2, 4))
    lt = logp.gather(-1, tok[..., None])[..., 0]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    out = StepMonitor(alert=None, rho=0.01).update(lt + 0.01, lt, mask, logits=z)
    keep = mask.bool()
    want = pruned_mass(z[keep], 0.01)
    assert out["mismatch/dvp/pruned_mass_mean"] == pytest.approx(float(want.mean()), rel=1e-6)
    p = logp.exp()[keep]
    outside = (lt.exp()[keep] < 0.01 * p.max(-1).values).float().mean()
    assert out["mismatch/dvp/tokens_outside"] == pytest.approx(float(outside))


def _stream(n: int, rng: np.random.Generator, ramp_from: int | None = None, rate: float = 0.0):
    """k3 around 1e-3 with 20% lognormal noise per step; from `ramp_from` on, k3 grows by
    `rate` per step (multiplicatively)."""
    for t in range(n):
        k3 = 1e-3 * math.exp(rng.normal(0, 0.2))
        if ramp_from is not None and t >= ramp_from:
            k3 *= (1 + rate) ** (t - ramp_from)
        yield {"k3": k3, "tail_abs_delta_share": 0.5 + rng.normal(0, 0.02)}


def test_drift_detector_false_alarms_and_delay() -> None:
    """Measured: on 20 stationary streams of 1,000 steps (k3 with 20% lognormal noise, the
    tail share with sd 0.02), the share of steps alarmed; on 20 streams whose k3 ramps up
    3% a step from step 100 (doubling in ~23 steps), the delay from the ramp's start to the
    first alarm, which must name k3. The numbers are in docs/integrations.md."""
    rng = np.random.default_rng(1)
    alarmed = total = 0
    for _ in range(20):
        d = DriftDetector()
        for m in _stream(1000, rng):
            alarmed += d.update(m)
            total += 1
    false_rate = alarmed / total
    delays = []
    for _ in range(20):
        d = DriftDetector()
        for t, m in enumerate(_stream(400, rng, ramp_from=100, rate=0.03)):
            if d.update(m):
                delays.append(t - 100)
                assert "k3 rose from" in (d.reason or "")
                break
    print(
        f"false-alarm rate {false_rate:.4%}; delay median {np.median(delays):.0f}, max {max(delays)}"
    )
    assert false_rate < 1e-3
    assert len(delays) == 20 and np.median(delays) < 20 and max(delays) < 30


def test_the_monitor_imports_no_engine() -> None:
    """A trainer imports the monitor beside its own stack: neither vLLM nor transformers,
    and no numba until a step is added (an in-process vLLM engine started after the import
    fails once llvmlite is loaded: `kernels` says why)."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from mismatch_cli.monitor import StepMonitor\n"
        "print(','.join(m for m in ('numba', 'llvmlite') if m in sys.modules))\n"
        "StepMonitor().update(np.log(np.full((2, 3), 0.5)), np.log(np.full((2, 3), 0.4)))\n"
        "print(','.join(m for m in ('vllm', 'transformers') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["", ""], proc.stdout


def test_dvp_chunks_equal_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """The DVP pass runs `DVP_CHUNK` logit values at a time: one row per chunk gives the
    numbers of one chunk holding every row, bit for bit, and those of `dvp.pruned_mass`."""
    from mismatch_cli import monitor
    from mismatch_cli.dvp import pruned_mass

    torch.manual_seed(1)
    z = torch.randn(3, 5, 50) * 3
    lt = torch.log_softmax(z, -1)[..., 7]
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    whole = StepMonitor(alert=None, rho=0.01).update(lt + 0.01, lt, mask, logits=z)
    monkeypatch.setattr(monitor, "DVP_CHUNK", 50)
    rows = StepMonitor(alert=None, rho=0.01).update(lt + 0.01, lt, mask, logits=z)
    for k in ("mismatch/dvp/pruned_mass_mean", "mismatch/dvp/tokens_outside"):
        assert rows[k] == whole[k], k
    want = pruned_mass(z[mask.bool()], 0.01).double().numpy().mean()
    assert whole["mismatch/dvp/pruned_mass_mean"] == float(want)


def test_history_is_bounded_and_alerts_are_all_kept() -> None:
    """The plug-ins call once per micro-batch for the life of a run: the per-step history
    keeps the last `history_limit` steps, while every step that raised the alert is kept."""
    rng = np.random.default_rng(1)
    mon = StepMonitor(history_limit=5)
    lt = np.log(rng.uniform(0.05, 0.95, size=(8, 64)))
    for s in range(60):
        scale = 0.01 if s < 30 else 0.01 * 1.5 ** (s - 29)  # a sustained rise from step 30
        mon.update(lt + rng.normal(0, scale, lt.shape), lt)
    assert len(mon.history) == 5 and [h["mismatch/step"] for h in mon.history] == [
        55,
        56,
        57,
        58,
        59,
    ]
    assert mon.alert_steps and min(mon.alert_steps) >= 30
    assert mon.summary()["alert_steps"] == mon.alert_steps
    with pytest.raises(ValueError, match="history_limit"):
        StepMonitor(history_limit=0)
