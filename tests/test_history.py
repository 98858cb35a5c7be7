"""`mismatch history`: each framework's log, written here from its documented format (the
sources in mismatch_cli/history.py, LOG_SOURCES), read back by step; the drift alarm on a
ramp; the figure; --json; --log-to; and one-line errors for bad input."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mismatch_cli.cli import app
from mismatch_cli.errors import MismatchError
from mismatch_cli.history import HISTORY_KEYS, detect_format, history, lookup, replay_metrics

N = 40  # steps: the alarm's 20-step baseline, then 20 more
RAMP = 25  # the step the mismatch starts to rise at


def _k3(step: int) -> float:
    """A flat k3 with a little noise, rising 15% a step from RAMP."""
    wiggle = 1 + 0.02 * math.sin(1.7 * step)
    return 1e-4 * wiggle * (1.15 ** max(0, step - RAMP))


def _abs(step: int) -> float:
    return 0.012 * (1 + 0.02 * math.cos(1.3 * step)) * (1.08 ** max(0, step - RAMP))


def write_trl(path: Path, prefix: str = "", steps: int = N) -> Path:
    """TRL's trainer_state.json: `log_history`, one dict per logging step (trl 1.16)."""
    hist = []
    for s in range(1, steps + 1):
        hist.append({
            "step": s, "epoch": s / steps, "loss": 0.1, "learning_rate": 1e-6,
            f"{prefix}sampling/sampling_logp_difference/mean": _abs(s),
            f"{prefix}sampling/sampling_logp_difference/max": 20 * _abs(s),
            f"{prefix}sampling/importance_sampling_ratio/min": 0.0,
            f"{prefix}sampling/importance_sampling_ratio/mean": 0.99,
            f"{prefix}sampling/importance_sampling_ratio/max": 3.0,
        })  # fmt: skip
    hist.append({"step": steps, "train_runtime": 12.5, "train_loss": 0.1})  # the closing entry
    path.write_text(json.dumps({"global_step": steps, "log_history": hist}))
    return path


def write_verl(path: Path) -> Path:
    """verl's file logger: `{"step": N, "data": {...}}` per line (tracking.py FileLogger)."""
    with path.open("w") as f:
        for s in range(1, N + 1):
            data = {
                "actor/ppo_kl": 1e-5,
                "rollout_corr/kl": -2e-5,
                "rollout_corr/k3_kl": _k3(s),
                "rollout_corr/chi2_token": 2 * _k3(s),
                "training/rollout_probs_diff_mean": 0.004,
                "critic/score/mean": 0.5,
            }
            f.write(json.dumps({"step": s, "data": data}) + "\n")
    return path


def write_prime_rl(path: Path) -> Path:
    """prime-rl's metrics.jsonl: flat lines, several per step (monitors/file.py)."""
    with path.open("w") as f:
        for s in range(N):
            f.write(json.dumps({"step": s, "time": 1.0, "optim/lr": 1e-6}) + "\n")
            f.write(json.dumps({"step": s, "time": 2.0, "mismatch_kl/all/mean": _k3(s),
                                "mismatch_kl/all/max": 50 * _k3(s), "mismatch_kl/gsm8k/mean": _k3(s),
                                "is_masked/mean": 0.001, "entropy/all/mean": 0.4}) + "\n")  # fmt: skip
    return path


def _series(r: dict, key: str) -> dict:
    return next(s for s in r["series"] if s["key"] == key)


@pytest.mark.parametrize("prefix", ["", "train/"])
def test_trl_trainer_state(tmp_path: Path, prefix: str) -> None:
    r = history(write_trl(tmp_path / "trainer_state.json", prefix))
    assert r["format"] == "trl" and r["num_steps"] == N
    s = _series(r, f"{prefix}sampling/sampling_logp_difference/mean")
    assert s["steps"] == list(range(1, N + 1))
    assert s["values"] == pytest.approx([_abs(i) for i in range(1, N + 1)])
    assert s["ours"] == "mean_abs_delta" and s["watch"] == "linear" and s["clip"] == "raw"
    assert {x["key"].removeprefix(prefix) for x in r["series"]} == {
        "sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max",
        "sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/mean",
        "sampling/importance_sampling_ratio/max",
    }  # fmt: skip
    # the alarm: mean |delta| rises from RAMP on
    al = r["alert"]
    assert al["enough_steps"] and al["first"] is not None
    assert RAMP < al["first"]["step"] <= N
    assert "sampling_logp_difference/mean rose from" in al["first"]["reason"]


def test_our_own_keys_in_a_trl_log_history(tmp_path: Path) -> None:
    """The TRL plug-in logs `mismatch/...` into log_history: read as the monitor's, watched
    as the monitor watches them (k3 on a log scale, the tail share)."""
    hist = [
        {"step": s, "mismatch/k3": _k3(s), "mismatch/tail_abs_delta_share": 0.3} for s in range(N)
    ]
    p = tmp_path / "trainer_state.json"
    p.write_text(json.dumps({"log_history": hist}))
    r = history(p)
    assert r["alert"]["watched"] == ["mismatch/k3", "mismatch/tail_abs_delta_share"]
    assert r["alert"]["first"]["step"] > RAMP
    assert "mismatch/k3" in dict(replay_metrics(r))[1]  # replayed under its own name


def test_a_trl_output_directory_reads_its_newest_checkpoint(tmp_path: Path) -> None:
    for step in (10, 40):
        (tmp_path / f"checkpoint-{step}").mkdir()
        write_trl(tmp_path / f"checkpoint-{step}" / "trainer_state.json", steps=step)
    r = history(tmp_path)
    assert r["path"].endswith("checkpoint-40/trainer_state.json") and r["num_steps"] == 40


def test_verl_file_logger(tmp_path: Path) -> None:
    r = history(write_verl(tmp_path / "exp.jsonl"))
    assert r["format"] == "verl" and r["num_steps"] == N
    k3 = _series(r, "rollout_corr/k3_kl")
    assert k3["values"] == pytest.approx([_k3(s) for s in range(1, N + 1)])
    assert k3["ours"] == "k3" and k3["watch"] == "log"
    assert _series(r, "rollout_corr/kl")["sign"] == "same as delta"
    assert _series(r, "training/rollout_probs_diff_mean")["ours"] == "mean_abs_dp"
    assert "critic/score/mean" not in {s["key"] for s in r["series"]}
    assert r["alert"]["first"]["step"] > RAMP
    assert "rollout_corr/k3_kl rose from" in r["alert"]["first"]["reason"]


def test_prime_rl_metrics_merges_lines_of_a_step(tmp_path: Path) -> None:
    r = history(write_prime_rl(tmp_path / "metrics.jsonl"))
    assert r["format"] == "prime-rl" and r["num_steps"] == N
    s = _series(r, "mismatch_kl/all/mean")
    assert s["steps"] == list(range(N)) and s["ours"] == "k3"
    assert _series(r, "mismatch_kl/gsm8k/mean")["registry_key"] == "mismatch_kl/*/mean"
    assert r["alert"]["watched"] == ["mismatch_kl/all/mean"]  # the per-env one is not watched
    assert r["alert"]["first"]["step"] > RAMP


def test_wandb_csv_export(tmp_path: Path) -> None:
    p = tmp_path / "wandb_export.csv"
    key = "run-1 - train/sampling/sampling_logp_difference/mean"
    with p.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Step", key, f"{key}__MIN", f"{key}__MAX"])
        for s in range(5):
            w.writerow([s, _abs(s), 0, 1])
        w.writerow([5, "", "", ""])  # a step without the metric
    r = history(p)
    assert r["format"] == "csv"
    (s,) = r["series"]
    assert s["key"] == "train/sampling/sampling_logp_difference/mean"
    assert s["steps"] == [0, 1, 2, 3, 4]
    assert not r["alert"]["enough_steps"]  # 5 steps: no baseline for the alarm


def test_tensorboard_csv_download(tmp_path: Path) -> None:
    """TensorBoard's 'download CSV': Wall time,Step,Value; the tag, slashes as underscores,
    in the file name."""
    p = tmp_path / "run-exp-tag-rollout_corr_k3_kl.csv"
    p.write_text("Wall time,Step,Value\n" + "".join(f"1.0,{s},{_k3(s)}\n" for s in range(3)))
    r = history(p)
    (s,) = r["series"]
    assert s["key"] == "rollout_corr_k3_kl" and s["registry_key"] == "rollout_corr/k3_kl"
    assert s["values"] == pytest.approx([_k3(i) for i in range(3)])


def test_tensorboard_event_files(tmp_path: Path) -> None:
    if importlib.util.find_spec("tensorboard") is None:
        pytest.skip("tensorboard is not installed (pip install 'mismatch-cli[tensorboard]')")
    from mismatch_cli.trackers import open_trackers

    with open_trackers([f"tensorboard:{tmp_path / 'tb'}"]) as (tb,):
        for s in range(N):  # as verl's tensorboard logger writes: the raw keys as tags
            tb.log({"rollout_corr/k3_kl": _k3(s), "actor/pg_loss": 0.1}, s)
    r = history(tmp_path / "tb")
    assert r["format"] == "tensorboard"
    s = _series(r, "rollout_corr/k3_kl")
    assert s["steps"] == list(range(N))
    assert s["values"] == pytest.approx([_k3(i) for i in range(N)], rel=1e-6)  # float32


def test_detect_format(tmp_path: Path) -> None:
    assert detect_format(write_trl(tmp_path / "a.json")) == "trl"
    assert detect_format(write_verl(tmp_path / "b.jsonl")) == "verl"
    assert detect_format(write_prime_rl(tmp_path / "c.jsonl")) == "prime-rl"
    assert detect_format(tmp_path / "events.out.tfevents.1.host") == "tensorboard"


def test_every_registry_row_is_complete() -> None:
    keys = [r.key for r in HISTORY_KEYS]
    assert len(keys) == len(set(keys))
    for r in HISTORY_KEYS:
        assert r.framework in ("trl", "verl", "prime-rl", "mismatch")
        assert r.panel in ("abs", "kl", "ratio", "share", "prob")
        assert r.watch in (None, "log", "linear")
        assert lookup(r.key.replace("*", "env")) is not None
    assert lookup("train/sampling/sampling_logp_difference/mean").framework == "trl"
    assert lookup("loss") is None


def test_replay_metrics_names(tmp_path: Path) -> None:
    r = history(write_verl(tmp_path / "exp.jsonl"))
    rows = dict(replay_metrics(r))
    assert rows[1]["mismatch/verl/rollout_corr/k3_kl"] == pytest.approx(_k3(1))
    assert rows[N]["mismatch/alert"] == 1.0 and rows[1]["mismatch/alert"] == 0.0
    assert "mismatch/alert/cusum_rollout_corr/k3_kl" in rows[N]


runner = CliRunner()


def test_cli_tables_figure_and_json(tmp_path: Path) -> None:
    log = write_verl(tmp_path / "exp.jsonl")
    res = runner.invoke(app, ["history", str(log), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "rollout_corr/k3_kl" in res.output and "alert from step" in res.output
    assert "no per-token data" in res.output
    assert (tmp_path / "out" / "history.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "out" / "history.json").read_text())
    res = runner.invoke(app, ["history", str(log), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data == saved
    (r,) = data["logs"]
    assert r["alert"]["first"]["step"] > RAMP and r["cannot_tell"]


def test_cli_two_logs_one_figure(tmp_path: Path) -> None:
    a = write_trl(tmp_path / "trainer_state.json")
    b = write_prime_rl(tmp_path / "metrics.jsonl")
    res = runner.invoke(app, ["history", str(a), str(b), "--out", str(tmp_path / "o"), "--json"])
    assert res.exit_code == 0, res.output
    assert [r["format"] for r in json.loads(res.stdout)["logs"]] == ["trl", "prime-rl"]
    from matplotlib.image import imread

    assert imread(tmp_path / "o" / "history.png").shape[0] > 500


def test_cli_log_to_tensorboard(tmp_path: Path) -> None:
    if importlib.util.find_spec("tensorboard") is None:
        pytest.skip("tensorboard is not installed (pip install 'mismatch-cli[tensorboard]')")
    from tensorboard.backend.event_processing import event_accumulator

    log = write_prime_rl(tmp_path / "metrics.jsonl")
    res = runner.invoke(
        app, ["history", str(log), "--json", "--log-to", f"tensorboard:{tmp_path / 'tb'}"]
    )
    assert res.exit_code == 0, res.output
    json.loads(res.stdout)  # stdout holds the JSON only
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    ev = acc.Scalars("mismatch/prime-rl/mismatch_kl/all/mean")
    assert [e.step for e in ev] == list(range(N))
    assert ev[3].value == pytest.approx(_k3(3), rel=1e-6)
    alert = acc.Scalars("mismatch/alert")
    assert alert[-1].value == 1.0 and alert[0].value == 0.0


# ----------------------------------------------------------------------------- bad input


def _error(args: list[str]) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code != 0
    assert isinstance(res.exception, MismatchError), res.output
    msg = str(res.exception)
    assert "\n" not in msg
    return msg


def test_a_log_without_a_mismatch_metric_names_what_was_looked_for(tmp_path: Path) -> None:
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n')
    msg = _error(["history", str(p)])
    assert "no mismatch metric" in msg and "2 steps" in msg
    assert "sampling/sampling_logp_difference/mean" in msg and "rollout_corr/k3_kl" in msg
    assert "mismatch_kl/all/mean" in msg


@pytest.mark.parametrize(
    ("name", "text", "want"),
    [
        (
            "exp.jsonl",
            '{"step": 1, "data": {"rollout_corr/kl": 1}}\n{"step": 2, "da',
            "line 2 is not JSON",
        ),
        ("trainer_state.json", '{"log_history": [', "not JSON"),
        ("trainer_state.json", '{"global_step": 3}', "no `log_history` list"),
        ("export.csv", "a,b\n1,2\n", "no step column"),
        ("blob.bin", "\x00\x01binary", "cannot tell the format"),
    ],
)
def test_a_malformed_log_is_one_line(tmp_path: Path, name: str, text: str, want: str) -> None:
    p = tmp_path / name
    p.write_text(text)
    assert want in _error(["history", str(p)])


def test_a_missing_log_and_an_unknown_format(tmp_path: Path) -> None:
    assert "no such file" in _error(["history", str(tmp_path / "nope.jsonl")])
    p = write_verl(tmp_path / "exp.jsonl")
    assert "unknown log format 'mlflow'" in _error(["history", str(p), "--format", "mlflow"])


def test_unknown_tracker_and_missing_package_on_history(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = write_verl(tmp_path / "exp.jsonl")
    msg = _error(["history", str(p), "--log-to", "comet:x", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()  # checked before any work
    assert "unknown tracker 'comet'" in msg and "tensorboard:DIR" in msg
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)
    msg = _error(["history", str(p), "--log-to", "wandb:proj"])
    assert "pip install 'mismatch-cli[wandb]'" in msg
