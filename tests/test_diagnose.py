"""`diagnose` without models: the variant list, the ranking, sources and verdict from variant
runs on disk (synthetic), the figure, `mismatch plot DIR`, and bad input as one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mismatch_cli import plots as P
from mismatch_cli.diagnose import DEFAULT_VARIANTS, VARIANT_NAMES, parse_variants, summarize
from mismatch_cli.errors import MismatchError
from mismatch_cli.metrics import k3
from mismatch_cli.runs import read_sequences, read_tokens, token_frame, write_run
from mismatch_cli.schema import DIAGNOSE_JSON
from mismatch_cli.synthetic import synthetic_meta, write_synthetic_run

from .conftest import assert_one_line_error, cli_in_process

# synthetic stand-ins: a variant's perturbation size sets its mismatch
EPS = {"baseline": 0.1, "hf-bf16-vs-fp32": 0.15, "prefill-fp32": 0.01, "attention": 0.002}


@pytest.fixture(scope="module")
def diag_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("diag") / "d"
    for name, eps in EPS.items():
        write_synthetic_run(out / "variants" / name, num_sequences=12, eps=eps, seed=5)
    base = out / "variants" / "baseline"
    tok = read_tokens(base)
    cols = {c: tok[c].to_numpy() for c in tok.columns if c not in ("delta", "p_train", "p_infer")}
    cols["logp_infer"] = cols["logp_train"]  # the null check: the same numbers on both sides
    for c in ("eps_hat", "tv_coarse", "kl_qp_coarse", "kl_pq_coarse"):
        cols[c] = np.zeros(len(tok))
    write_run(out / "variants" / "null", token_frame(cols), read_sequences(base), synthetic_meta())
    names = ["baseline", "hf-bf16-vs-fp32", "prefill-fp32", "fp16-both", "attention", "null"]
    result = summarize(out, names, {"fp16-both": "vLLM could not start: float16 refused"}, {})
    (out / DIAGNOSE_JSON).write_text(json.dumps(result))
    return out


def test_parse_variants() -> None:
    assert parse_variants(None) == list(DEFAULT_VARIANTS)
    assert parse_variants("all") == list(VARIANT_NAMES)
    assert parse_variants("null, batch-shape") == ["baseline", "batch-shape", "null"]
    with pytest.raises(MismatchError, match="unknown variant 'fp8'"):
        parse_variants("null,fp8")


def test_rows_ranking_sources_and_verdict(diag_dir: Path) -> None:
    r = json.loads((diag_dir / DIAGNOSE_JSON).read_text())
    rows = {v["name"]: v for v in r["variants"]}
    assert list(rows) == ["baseline", "hf-bf16-vs-fp32", "prefill-fp32", "fp16-both",
                          "attention", "null"]  # fmt: skip
    for name in EPS:
        d = read_tokens(diag_dir / "variants" / name)["delta"].to_numpy()
        assert rows[name]["k3"] == pytest.approx(k3(d), rel=1e-12)
        assert rows[name]["p99_abs_delta"] == pytest.approx(np.quantile(np.abs(d), 0.99))
        for key in ("name", "isolates", "inference", "training", "run", "skipped",
                    "num_tokens", "mean_abs_delta", "max_abs_delta"):  # fmt: skip
            assert key in rows[name]
    assert r["ranking"] == ["hf-bf16-vs-fp32", "baseline", "prefill-fp32", "attention", "null"]
    assert rows["fp16-both"]["run"] is None and "float16" in rows["fp16-both"]["skipped"]
    assert rows["null"]["k3"] == 0 and rows["null"]["max_abs_delta"] == 0
    assert [s["source"] for s in r["sources"]] == ["hf-bf16-vs-fp32", "prefill-fp32", "attention"]
    v = r["verdict"]
    assert "largest single source of the baseline's mismatch is bf16 instead of fp32" in v
    assert "(far below it)" in v and "null check is exactly 0" in v
    assert "Skipped here: fp16-both" in v


def test_figure_bars_are_the_k3_values(diag_dir: Path, tmp_path: Path) -> None:
    r = json.loads((diag_dir / DIAGNOSE_JSON).read_text())
    runs = [v for v in r["variants"] if v["run"]]
    data = P.load_runs([v["run"] for v in runs], [v["name"] for v in runs])
    fig = P.figure("diagnose", data)
    bars = {p.get_gid(): p for ax in fig.axes for p in ax.patches if p.get_gid()}
    for v in runs:
        if v["k3"] > 0:
            b = bars[f"k3:{v['name']}"]
            assert b.get_x() + b.get_width() == pytest.approx(v["k3"], rel=1e-9)
    assert "k3:null" not in bars  # exactly 0: marked, not a bar on a log axis
    P.plt.close(fig)


def test_plot_of_a_diagnose_directory(diag_dir: Path) -> None:
    proc = cli_in_process("plot", str(diag_dir))
    assert proc.returncode == 0, proc.stderr
    assert (diag_dir / "figures" / "diagnose.png").is_file()
    assert not (diag_dir / "figures" / "bound.png").exists()


def test_bad_input_is_one_line(diag_dir: Path, tmp_path: Path) -> None:
    assert_one_line_error(cli_in_process("diagnose", "--variants", "null,fp8", "--out", str(tmp_path / "x")),
                          "unknown variant 'fp8'")  # fmt: skip
    assert_one_line_error(cli_in_process("diagnose", "--out", str(diag_dir)), "--overwrite")
    assert_one_line_error(
        cli_in_process("diagnose", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "x")),
        "not found",
    )
    synthetic = diag_dir / "variants" / "baseline"
    assert_one_line_error(
        cli_in_process("diagnose", "--run", str(synthetic), "--out", str(tmp_path / "x")),
        "is not a baseline",
    )
    assert not (tmp_path / "x").exists()


def test_batch_shape_verdict_handles_a_zero_gap(tmp_path: Path) -> None:
    """Whether bf16 kernels are batch invariant is the machine's property: a variant that
    agreed bit for bit is reported as such, one that did not with its k3."""
    out = tmp_path / "d"
    write_synthetic_run(out / "variants" / "baseline", num_sequences=8, eps=0.1, seed=3)
    base = out / "variants" / "baseline"
    tok = read_tokens(base)
    cols = {c: tok[c].to_numpy() for c in tok.columns if c not in ("delta", "p_train", "p_infer")}
    cols["logp_infer"] = cols["logp_train"]
    write_run(out / "variants" / "batch-shape", token_frame(cols), read_sequences(base),
              synthetic_meta())  # fmt: skip
    v = summarize(out, ["baseline", "batch-shape"], {}, {})["verdict"]
    assert "agreed bit for bit" in v and "not batch invariant" not in v
    write_synthetic_run(out / "variants" / "batch-shape", num_sequences=8, eps=0.05, seed=4)
    v = summarize(out, ["baseline", "batch-shape"], {}, {})["verdict"]
    assert "not batch invariant here" in v and "agreed bit for bit" not in v


def test_opt_in_rows_read_against_their_reference(tmp_path: Path) -> None:
    """An opt-in row carries `side`, `runs_on`, the row it is read against and its k3 ratio
    to it; the result lists what this machine cannot run; the verdict names the row."""
    out = tmp_path / "d"
    for name, eps in (("baseline", 0.1), ("train-bf16", 0.2), ("lm-head-fp32", 0.15)):
        write_synthetic_run(out / "variants" / name, num_sequences=8, eps=eps, seed=3)
    r = summarize(out, ["baseline", "train-bf16", "lm-head-fp32", "tp2"],
                  {"tp2": "cannot run here: needs 2 CUDA GPUs"}, {})  # fmt: skip
    rows = {v["name"]: v for v in r["variants"]}
    head, bf16 = rows["lm-head-fp32"], rows["train-bf16"]
    assert head["side"] == "training" and head["runs_on"] == "cpu"
    assert head["against"] == "train-bf16"
    assert head["k3_vs_against"] == pytest.approx(head["k3"] / bf16["k3"], rel=1e-12)
    assert "against" not in bf16  # a default row keeps its keys
    assert rows["tp2"]["run"] is None and rows["tp2"]["runs_on"] == ">=2 GPUs"
    assert "lm-head-fp32 (an fp32 LM head" in r["verdict"]
    assert "Skipped here: tp2" in r["verdict"]
    for m in r["not_runnable"]:
        assert set(m) == {"name", "runs_on", "reason"}
