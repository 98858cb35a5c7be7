"""`mismatch import`: every format reproduces a known run token by token (delta exactly, and
the report's metrics), the readers decode files written by the frameworks' own pickling
code, rescoring replays the training side, and every bad input is one clear line."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from mismatch_cli import aggregates as G
from mismatch_cli import analysis as A
from mismatch_cli.errors import MismatchError
from mismatch_cli.importers import FORMATS, get_format
from mismatch_cli.importers.ingest import (
    ImportOptions,
    discover,
    parse_steps,
    run_import,
    span_turns,
)
from mismatch_cli.importers.toolkit import ReadContext

from . import import_fixtures as F
from .conftest import assert_one_line_error
from .conftest import cli_in_process as cli

DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="module")
def known() -> F.Known:
    return F.known_run()


def _by_step(known: F.Known) -> list[int]:
    """Completion order of formats written one file per step."""
    steps = sorted({c.step for c in known.completions})
    return [j for s in steps for j, c in enumerate(known.completions) if c.step == s]


# case -> (format, writer(known, root) -> source, order(known) -> completion order, options)
CASES: dict[str, tuple[str, Any, Any, dict[str, Any]]] = {
    "prime-rl": ("prime-rl", lambda k, r: F.write_prime_rl(k, r / "out"), F.prime_rl_order, {}),
    "slime": ("slime", lambda k, r: F.write_slime(k, r)[0].parent, _by_step, {}),
    "skyrl": ("skyrl", lambda k, r: F.write_skyrl(k, r) and r, _by_step, {"trust_pickle": True}),
    "skyrl-old": (
        "skyrl",
        lambda k, r: F.write_skyrl(k, r, layout="old", pad_size=2) and r,
        _by_step,
        {"trust_pickle": True},
    ),
    "skyrl-enum": (
        "skyrl",
        lambda k, r: F.write_skyrl(k, r, layout="enum", pad_size=3) and r,
        _by_step,
        {"trust_pickle": True},
    ),
    "tokens-jsonl": (
        "tokens",
        lambda k, r: F.write_tokens_jsonl(k, r / "t.jsonl"),
        lambda k: list(range(len(k.completions))),
        {},
    ),
    "tokens-parquet": (
        "tokens",
        lambda k, r: F.write_tokens_parquet(k, r / "t.parquet", per_token_advantage=True),
        lambda k: list(range(len(k.completions))),
        {},
    ),
}
HAS_ENV = {"prime-rl", "tokens-jsonl", "tokens-parquet"}


def aligned(known: F.Known, run: Path, order: list[int]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(expected, imported) token tables, both sorted by (imported seq_id, pos)."""
    e = known.expected()
    e["seq_id"] = e["seq"].map({j: i for i, j in enumerate(order)})
    e = e.sort_values(["seq_id", "pos"]).reset_index(drop=True)
    tok = pd.read_parquet(run / "tokens.parquet").sort_values(["seq_id", "pos"])
    return e, tok.reset_index(drop=True)


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_reproduces_the_known_run(case: str, known: F.Known, tmp_path: Path) -> None:
    fmt, write, order_of, kw = CASES[case]
    src = write(known, tmp_path / "src")
    res = run_import(ImportOptions(fmt, [str(src)], tmp_path / "run", **kw))
    run = tmp_path / "run"
    e, tok = aligned(known, run, order_of(known))

    assert res["mode"] == "scored"
    assert res["num_tokens"] == len(e) == len(tok)
    assert res["num_sequences"] == len(known.completions)
    assert res["num_dropped_tokens"] == known.num_dropped() > 0  # the inserted tool tokens
    assert res["steps"] == [3, 4]
    assert not [w for w in res["warnings"] if "temperature" in w]  # no temperature trap
    assert res["checks"]["slope"]["slope"] == pytest.approx(1, abs=0.02)
    np.testing.assert_array_equal(tok["delta"].to_numpy(), e["delta"].to_numpy())  # exactly
    for col in ("pos", "token_id", "logp_infer", "logp_train", "step"):
        np.testing.assert_array_equal(tok[col].to_numpy(), e[col].to_numpy(), err_msg=col)
    if case in HAS_ENV:
        assert tok["env"].tolist() == e["env"].tolist()
    assert tok["eps_hat"].isna().all()  # no dump holds the inference top-K
    # masked tool tokens leave gaps in pos; the turn after them is 1
    gaps = tok.groupby("seq_id")["pos"].apply(lambda p: int(np.diff(p.to_numpy()).max(initial=1)))
    assert (gaps == 4).sum() == sum(1 for c in known.completions if (~c.mask).any())
    assert set(tok["turn"].unique()) == {0, 1}

    seqs = pd.read_parquet(run / "sequences.parquet").sort_values("seq_id")
    order = order_of(known)
    for sid, j in enumerate(order):
        row = seqs.iloc[sid]
        c = known.completions[j]
        np.testing.assert_array_equal(row["prompt_token_ids"], c.prompt)
        np.testing.assert_array_equal(row["response_token_ids"], c.tokens)
        assert row["num_dropped_tokens"] == int((~c.mask).sum())
        assert row["num_tokens"] == int(c.mask.sum())
    # the same prompt twice: one prompt_id, sample_idx 0 and 1
    assert seqs["sample_idx"].max() == 1

    meta = json.loads((run / "run.json").read_text())
    src_block = meta["source"]
    assert meta["status"] == "complete" and src_block["mode"] == "scored"
    assert src_block["format"] == fmt and "delta" in src_block["sign_convention"]
    for f in src_block["files"]:
        assert f["sha256"] == hashlib.sha256(Path(f["path"]).read_bytes()).hexdigest()
    assert src_block["num_dropped_tokens"] == known.num_dropped()
    assert not (run / "parts").exists()

    ref = A.analyze(known.write_reference(tmp_path / "ref"))
    got = A.analyze(run)
    for k, v in ref["metrics"].items():
        assert got["metrics"][k] == pytest.approx(v, rel=1e-12, abs=1e-15, nan_ok=True), k
    assert got["num_tokens"] == ref["num_tokens"]
    assert got["eps_estimator"] == G.NO_EPS_HAT_ESTIMATOR
    assert got["eps"] == pytest.approx(got["eps_needed_q99"])


def test_small_parts_give_the_same_run(known: F.Known, tmp_path: Path) -> None:
    """Streaming: a sequence never straddles parts, and many small parts equal one."""
    src = F.write_prime_rl(known, tmp_path / "src")
    run_import(ImportOptions("prime-rl", [str(src)], tmp_path / "one"))
    run_import(ImportOptions("prime-rl", [str(src)], tmp_path / "many", part_tokens=20))
    a = pd.read_parquet(tmp_path / "one" / "tokens.parquet")
    b = pd.read_parquet(tmp_path / "many" / "tokens.parquet")
    pd.testing.assert_frame_equal(a, b)
    sa = pd.read_parquet(tmp_path / "one" / "sequences.parquet")
    sb = pd.read_parquet(tmp_path / "many" / "sequences.parquet")
    pd.testing.assert_frame_equal(sa, sb)


def test_prime_rl_nulls_unstable_steps_and_staleness(tmp_path: Path) -> None:
    known = F.known_run(nulls=2)
    src = F.write_prime_rl(known, tmp_path / "src")
    (src / "token_exports" / "step_4" / "STABLE").unlink()
    res = run_import(ImportOptions("prime-rl", [str(src)], tmp_path / "run"))
    assert res["steps"] == [3]  # step 4 is still being written: skipped
    assert any("no STABLE marker" in w for w in res["warnings"])
    assert any("asynchronously" in w and "staleness" in w for w in res["warnings"])
    step3 = [j for j, c in enumerate(known.completions) if c.step == 3]
    null3 = sum(1 for j, _ in known.nulls if j in step3)
    assert res["num_null_tokens"] == null3 > 0
    assert any("null log-prob" in w for w in res["warnings"])
    e = known.expected()
    assert res["num_tokens"] == int(e["seq"].isin(step3).sum())
    # a file named on the command line is imported, with a warning
    f = src / "token_exports" / "step_4" / "rank_2.jsonl"
    res = run_import(ImportOptions("prime-rl", [str(f)], tmp_path / "one"))
    assert res["steps"] == [4] and any("may be incomplete" in w for w in res["warnings"])


def test_steps_filter(known: F.Known, tmp_path: Path) -> None:
    src = F.write_tokens_jsonl(known, tmp_path / "t.jsonl")
    res = run_import(ImportOptions("tokens", [str(src)], tmp_path / "run", steps="4"))
    assert res["steps"] == [4]
    assert res["num_sequences"] == sum(c.step == 4 for c in known.completions)
    assert parse_steps("10,20-22, 5") == {5, 10, 20, 21, 22}
    with pytest.raises(MismatchError, match="--steps"):
        parse_steps("1-")


def test_discovery_globs_and_folders(known: F.Known, tmp_path: Path) -> None:
    src = F.write_prime_rl(known, tmp_path / "out")
    a = discover([str(src)], ("rank_*.jsonl",), "prime-rl")
    b = discover([str(src / "token_exports" / "step_*")], ("rank_*.jsonl",), "prime-rl")
    c = discover([str(src / "token_exports" / "step_3"), str(src / "token_exports/step_4/*.jsonl")],
                 ("rank_*.jsonl",), "prime-rl")  # fmt: skip
    assert a == b == c and len(a) == 6
    assert [f.parent.name for f in a] == ["step_3"] * 3 + ["step_4"] * 3


def test_turns_are_runs_of_model_tokens() -> None:
    lens = np.array([5, 0, 3])
    mask = np.array([1, 1, 0, 0, 1, 0, 1, 1], dtype=bool)
    assert span_turns(lens, mask)[[0, 1, 4, 6, 7]].tolist() == [0, 0, 1, 0, 0]


def test_registry_names_every_format() -> None:
    for name in FORMATS:
        mod = get_format(name)
        assert mod.NAME == name and mod.SIDES in ("both", "infer", "either") and mod.SIGN
    with pytest.raises(MismatchError, match="unknown format"):
        get_format("trl")


# ----------------------------------------------------------------------------- golden files


def test_verl_file_written_by_tensordict_decodes() -> None:
    """tests/data/verl_gen_batch_tensordict.dp: DataProto (verl-project/verl @ 1dda039
    pickling code) of a consolidated TensorDict written by tensordict 0.15.3 / torch 2.14.1."""
    verl = get_format("verl")
    t, non_tensor = verl.load_data_proto(
        DATA / "verl_gen_batch_tensordict.dp", ReadContext(trust_pickle=True)
    )
    np.testing.assert_array_equal(t["prompts"], np.arange(8).reshape(2, 4))
    np.testing.assert_array_equal(t["m"], np.ones((2, 3), np.int64))
    assert t["rollout_log_probs"].dtype == np.float32 and t["rollout_log_probs"].shape == (2, 3)
    assert t["bf"].dtype == np.float32 and t["i16"].shape == (2, 5, 2)
    np.testing.assert_array_equal(t["i16"], np.ones((2, 5, 2), np.int16))
    assert list(non_tensor["uid"]) == ["a", "b"]


@pytest.mark.parametrize("name", ["skyrl_training_input_new.pkl", "skyrl_training_input_old.pkl"])
def test_skyrl_files_written_by_skyrl_decode(name: str) -> None:
    """Pickled by SkyRL's TrainingInputBatch classes (a956457, and the skyrl_train dict
    pickle of numpy entries of Feb 2026): two rows of hand-made right-aligned tensors
    (responses of lengths 2 and 3; that skyrl_train code itself wrote left-aligned
    tensors: the real layouts are in tests/data/skyrl/). The encodings are what is tested."""
    skyrl = get_format("skyrl")
    chunk = next(skyrl.read(DATA / name, ReadContext(trust_pickle=True)))
    assert chunk.lens.tolist() == [2, 3] and chunk.prompt_lens.tolist() == [2, 3]
    assert chunk.prompt_ids.tolist() == [5, 6, 3, 4, 5]
    assert chunk.token_ids.tolist() == [7, 8, 9, 10, 11]
    assert chunk.logp_infer.tolist() == [-0.5, -0.25, -1.0, -2.0, -0.125]
    assert chunk.logp_train.tolist() == [-0.75, -0.25, -1.5, -2.0, -0.0625]
    assert chunk.loss_mask.tolist() == [True, True, True, False, True]


def test_restricted_unpickler_refuses_other_globals(tmp_path: Path) -> None:
    """A pickle that would call os.system is refused by name, never executed."""
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    p = tmp_path / "dumped_data" / "global_step_1_training_input.pkl"
    p.parent.mkdir()
    p.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(MismatchError, match=r"refusing to load (posix|os)\.system"):
        next(get_format("skyrl").read(p, ReadContext(trust_pickle=True)))
    assert not (tmp_path / "pwned").exists()


def test_verl_numpy_serialisation(known: F.Known, tmp_path: Path) -> None:
    verl = get_format("verl")
    a = next(verl.read(F.write_verl(known, tmp_path / "a")[0], ReadContext(trust_pickle=True)))
    b = next(verl.read(F.write_verl(known, tmp_path / "b", method="numpy")[0],
                       ReadContext(trust_pickle=True)))  # fmt: skip
    for f in ("prompt_lens", "prompt_ids", "lens", "token_ids", "logp_infer", "loss_mask"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    step3 = [c for c in known.completions if c.step == 3]
    assert a.lens.tolist() == [c.tokens.size for c in step3]
    assert a.seq_extra["env"].tolist() == [c.env for c in step3]


# ----------------------------------------------------------------------------- checks


def test_temperature_on_one_side_is_flagged(tmp_path: Path) -> None:
    """logp_infer at T = 0.7 against logp_train at T = 1: a systematic slope, warned."""
    rng = np.random.default_rng(1)
    rows = []
    for _ in range(40):
        z = rng.standard_normal((30, 50)) * 2.0  # [T, V] logits
        lq = z / 0.7 - np.log(np.exp(z / 0.7).sum(1, keepdims=True))
        lp = z - np.log(np.exp(z).sum(1, keepdims=True))
        a = np.array([rng.choice(50, p=np.exp(r)) for r in lq])
        i = np.arange(30)
        rows.append({"prompt_token_ids": [1, 2], "response_token_ids": a.tolist(),
                     "logprobs_infer": lq[i, a].tolist(), "logprobs_train": lp[i, a].tolist()})  # fmt: skip
    src = tmp_path / "t.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = run_import(ImportOptions("tokens", [str(src)], tmp_path / "run"))
    assert res["checks"]["slope"]["slope"] == pytest.approx(1 / 0.7, rel=0.1)  # T_train / T_infer
    assert any("temperature on one side" in w for w in res["warnings"])


# ----------------------------------------------------------------------------- rescoring


def _with_model_logprobs(known: F.Known, model_dir: Path, temperature: float) -> F.Known:
    """The known completions with logp_infer replaced by the tiny model's own log-probs at
    `temperature` (float32-rounded): a rescore at that temperature must reproduce them."""
    import torch

    from mismatch_cli.models import load_model
    from mismatch_cli.rescore import SeqInput, score_sequences
    from mismatch_cli.sampling import Sampling

    model, _ = load_model(str(model_dir), "float32", torch.device("cpu"))
    seqs = [SeqInput(c.prompt, c.tokens, np.zeros((c.tokens.size, 0), np.int32),
                     np.zeros((c.tokens.size, 0), np.float32), np.zeros(c.tokens.size))
            for c in known.completions]  # fmt: skip
    scored = score_sequences(model, seqs, Sampling(temperature), 3, torch.device("cpu"))
    for c, s in zip(known.completions, scored, strict=True):
        lp = s["logp_train"].astype(np.float32).astype(np.float64)
        c.logp_infer = np.where(c.mask, lp, np.nan)
        c.logp_train = np.full(c.tokens.size, np.nan)
    return known


@pytest.fixture(scope="module")
def verl_dump(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, F.Known]:
    known = _with_model_logprobs(F.known_run(), tiny_model_dir, temperature=0.9)
    root = tmp_path_factory.mktemp("verl")
    F.write_verl(known, root / "dump")
    return root / "dump", known


def test_verl_rescore_replays_the_training_side(
    verl_dump: tuple[Path, F.Known], tiny_model_dir: Path, tmp_path: Path
) -> None:
    src, known = verl_dump
    opts = ImportOptions("verl", [str(src)], tmp_path / "run", model=str(tiny_model_dir),
                         temperature=0.9, trust_pickle=True, device="cpu")  # fmt: skip
    res = run_import(opts)
    assert res["mode"] == "rescored" and res["steps"] == [3, 4]
    tok = pd.read_parquet(tmp_path / "run" / "tokens.parquet").sort_values(["seq_id", "pos"])
    e = known.expected()
    e["seq_id"] = e["seq"].map({j: i for i, j in enumerate(_by_step(known))})
    e = e.sort_values(["seq_id", "pos"])
    np.testing.assert_array_equal(tok["logp_infer"].to_numpy(), e["logp_infer"].to_numpy())
    np.testing.assert_array_equal(tok["pos"].to_numpy(), e["pos"].to_numpy())
    # same model, same temperature, tool tokens in the context: delta is float32 rounding
    assert np.abs(tok["delta"].to_numpy()).max() < 1e-5
    assert tok["eps_hat"].isna().all()
    assert tok["entropy_train"].notna().all() and tok["pruned_mass_minp"].notna().all()
    fit = res["checks"]["temperature_fit"]
    assert fit["fitted"] == pytest.approx(0.9, rel=0.01)
    assert not any("best explained by temperature" in w for w in res["warnings"])
    assert tok["env"].notna().all()

    from mismatch_cli.sweep import sweep

    assert sweep(tmp_path / "run")["rows"]  # rescored imports have the pruning grid


def test_rescore_with_the_wrong_temperature_warns(
    verl_dump: tuple[Path, F.Known], tiny_model_dir: Path, tmp_path: Path
) -> None:
    src, _ = verl_dump
    opts = ImportOptions("verl", [str(src)], tmp_path / "run", model=str(tiny_model_dir),
                         temperature=1.3, trust_pickle=True, device="cpu", steps="3")  # fmt: skip
    res = run_import(opts)
    assert res["checks"]["temperature_fit"]["fitted"] == pytest.approx(0.9, rel=0.02)
    assert any("best explained by temperature 0.9" in w for w in res["warnings"])


def test_slime_rollout_dump_is_rescored(
    verl_dump: tuple[Path, F.Known], tiny_model_dir: Path, tmp_path: Path
) -> None:
    _, known = verl_dump
    (paths := F.write_slime(known, tmp_path / "dump", kind="rollout"))
    res = run_import(ImportOptions("slime", [str(paths[0].parent)], tmp_path / "run",
                                   model=str(tiny_model_dir), temperature=0.9, device="cpu"))  # fmt: skip
    assert res["mode"] == "rescored"
    assert res["num_tokens"] == len(known.expected())
    tok = pd.read_parquet(tmp_path / "run" / "tokens.parquet")
    assert np.abs(tok["delta"].to_numpy()).max() < 1e-5


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def scored_run(known: F.Known, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scored")
    src = F.write_prime_rl(known, root / "out")
    proc = cli("import", "prime-rl", str(src), "--out", str(root / "run"), "--json", check=True)
    out = json.loads(proc.stdout)
    assert set(out) >= {"run", "format", "mode", "num_sequences", "num_tokens",
                        "num_dropped_tokens", "steps", "warnings"}  # fmt: skip
    assert out["mode"] == "scored" and out["steps"] == [3, 4]
    assert "warning: prime-rl trains asynchronously" in proc.stderr
    return root / "run"


def test_report_plot_and_sweep_on_a_scored_import(scored_run: Path, tmp_path: Path) -> None:
    rep = cli("report", str(scored_run), check=True)
    assert "q0.99 of the eps needed to cover |delta|" in rep.stdout.replace("\n", " ")
    proc = cli("plot", str(scored_run), "--out", str(tmp_path), check=True)
    assert (tmp_path / "drift.png").is_file() and (tmp_path / "bound.png").is_file()
    assert not (tmp_path / "sweep.png").exists()
    assert "note: sweep: skipped" in proc.stderr and "--rescore" in proc.stderr
    assert_one_line_error(cli("sweep-threshold", str(scored_run)), "--rescore", "error:")


def test_report_group_by(scored_run: Path) -> None:
    proc = cli("report", str(scored_run), "--group-by", "step", "--json", check=True)
    groups = json.loads(proc.stdout)["groups"]
    tok = pd.read_parquet(scored_run / "tokens.parquet")
    assert [g["step"] for g in groups] == [3, 4]
    for g in groups:
        t = tok[tok["step"] == g["step"]]
        d = t["delta"].to_numpy()
        assert g["num_tokens"] == len(t) and g["num_sequences"] == t["seq_id"].nunique()
        assert g["mean_abs_delta"] == pytest.approx(np.abs(d).mean(), rel=1e-12)
        assert g["mean_delta"] == pytest.approx(d.mean(), rel=1e-12, abs=1e-15)
        assert g["k3"] == pytest.approx(np.mean(np.exp(-d) - 1 + d), rel=1e-9)
        tail = t["p_train"].to_numpy() < 0.1
        assert g["tail_abs_delta_share"] == pytest.approx(np.abs(d[tail]).sum() / np.abs(d).sum())
        r = np.exp(-d)
        assert g["frac_ratio_outside_0.5_2"] == pytest.approx(np.mean((r < 0.5) | (r > 2)))
    env = cli("report", str(scored_run), "--group-by", "env", check=True)
    assert "Per env" in env.stdout and "chat" in env.stdout
    assert_one_line_error(cli("report", str(scored_run), "--group-by", "rank"), "--group-by")


def test_group_by_on_a_measured_run_is_one_line(tmp_path: Path) -> None:
    from mismatch_cli.synthetic import write_synthetic_run

    run = write_synthetic_run(tmp_path / "run", num_sequences=4, max_len=8)
    assert_one_line_error(cli("report", str(run), "--group-by", "step"), "no step column")


def test_drift_figure(scored_run: Path, known: F.Known, tmp_path: Path) -> None:
    from mismatch_cli.plots import figure, load_runs, plotted

    runs = load_runs([scored_run])
    fig = figure("drift", runs)
    groups = A.analyze_groups(scored_run, "step")
    np.testing.assert_allclose(plotted(fig, f"drift-k3:{runs[0].label}"), [g["k3"] for g in groups])
    np.testing.assert_allclose(
        plotted(fig, f"drift-frac_ratio_outside_0.5_2:{runs[0].label}"),
        [g["frac_ratio_outside_0.5_2"] for g in groups],
    )
    one = tmp_path / "one"
    run_import(ImportOptions("tokens", [str(F.write_tokens_jsonl(known, tmp_path / "t.jsonl"))],
                             one, steps="3"))  # fmt: skip
    with pytest.raises(MismatchError, match="one step only"):
        figure("drift", load_runs([one]))
    from mismatch_cli.synthetic import write_synthetic_run

    with pytest.raises(MismatchError, match="no step column"):
        figure("drift", load_runs([write_synthetic_run(tmp_path / "m", num_sequences=4)]))


# ----------------------------------------------------------------------------- bad input


def _bad_cases(
    tmp: Path, known: F.Known, model: Path
) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    prime = F.write_prime_rl(known, tmp / "prime")
    sky = F.write_skyrl(known, tmp / "sky")[0]
    jsonl = F.write_tokens_jsonl(known, tmp / "tok" / "t.jsonl")
    no_train = tmp / "no_train.jsonl"
    rows = [json.loads(ln) for ln in open(prime / "token_exports/step_3/rank_0.jsonl")]
    rows[0].pop("trainer_logprobs")
    no_train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    short = tmp / "short.jsonl"
    r = F.tokens_rows(known)[:3]
    r[2]["logprobs_infer"] = r[2]["logprobs_infer"][:-1]
    short.write_text("".join(json.dumps(x) + "\n" for x in r))
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    big = tmp / "big.jsonl"
    r = F.tokens_rows(known)[:2]
    r[1]["response_token_ids"][0] = 500  # beyond the tiny model's 97 ids
    for x in r:
        x.pop("logprobs_train")
    big.write_text("".join(json.dumps(x) + "\n" for x in r))
    import torch

    np_meta = tmp / "slime" / "0.pt"
    np_meta.parent.mkdir()
    torch.save({"rollout_id": 0, "samples": [{"tokens": [1, 2, 3], "response_length": 1,
                "rollout_log_probs": [-0.5], "metadata": {"n": np.int64(3)}}]}, np_meta)  # fmt: skip
    m = str(model)
    return {
        "unknown format": (["import", "trl", str(jsonl)], ("unknown format 'trl'", "prime-rl")),
        "file of another format": (
            ["import", "prime-rl", str(sky)],
            ("not readable as JSON lines",),
        ),
        "prime-rl as tokens": (
            ["import", "tokens", str(prime)],
            ("missing fields prompt_token_ids",),
        ),
        "missing field": (
            ["import", "prime-rl", str(no_train)],
            ("missing field trainer_logprobs",),
        ),
        "length mismatch": (["import", "tokens", str(short)], ("record 2", "length mismatch")),
        "empty dump": (["import", "tokens", str(empty)], ("empty dump",)),
        "pickle": (["import", "skyrl", str(sky)], ("--trust-pickle", "pickle")),
        "rescore without model": (
            ["import", "tokens", str(jsonl), "--rescore"],
            ("--rescore needs --model",),
        ),
        "no verl files": (["import", "verl", str(tmp), "--trust-pickle"], ("no verl files",)),
        "inference only": (["import", "tokens", str(big)], ("only inference log-probs", "--model")),
        "vocabulary": (["import", "tokens", str(big), "--model", m], ("token id 500", "97 ids")),
        "weights_only": (
            ["import", "slime", str(np_meta)],
            ("weights_only=True", "--trust-pickle"),
        ),
        "bad steps": (
            ["import", "tokens", str(jsonl), "--steps", "a-b"],
            ("--steps must look like",),
        ),
        "no such step": (
            ["import", "prime-rl", str(prime), "--steps", "9"],
            ("no prime-rl file has a step",),
        ),
        "no source": (["import", "tokens", str(tmp / "nope.jsonl")], ("source not found",)),
        "no files": (["import", "prime-rl", str(tmp / "tok")], ("no prime-rl files",)),
        "bad temperature": (
            ["import", "tokens", str(jsonl), "--temperature", "0"],
            ("--temperature",),
        ),
    }


def test_bad_input_is_one_line(known: F.Known, tiny_model_dir: Path, tmp_path: Path) -> None:
    cases = _bad_cases(tmp_path / "in", known, tiny_model_dir)
    for name, (args, words) in cases.items():
        out = tmp_path / "runs" / name.replace(" ", "_")
        proc = cli(*args, "--out", str(out))
        try:
            assert_one_line_error(proc, *words)
        except AssertionError as e:
            raise AssertionError(f"{name}: {proc.stderr}") from e
        assert not out.exists(), f"{name}: left {out} behind"
    assert_one_line_error(cli("import", "tokens", str(tmp_path / "in" / "tok")), "--out")


def test_verl_without_model_and_slime_trust_fallback(known: F.Known, tmp_path: Path) -> None:
    src = F.write_verl(known, tmp_path / "v")[0]
    assert_one_line_error(
        cli("import", "verl", str(src), "--trust-pickle", "--out", str(tmp_path / "r")),
        "only the inference side",
        "--model",
    )
    import torch

    p = tmp_path / "slime" / "0.pt"
    p.parent.mkdir()
    torch.save({"rollout_id": 0, "samples": [{"tokens": [1, 2, 3, 4], "response_length": 2,
                "rollout_log_probs": [-0.5, -0.25], "log_probs": [-0.5, -0.5],
                "metadata": {"n": np.int64(3)}}]}, p)  # fmt: skip
    res = run_import(ImportOptions("slime", [str(p)], tmp_path / "run", trust_pickle=True))
    assert res["num_tokens"] == 2
    assert any("restricted loader" in w and "numpy" in w for w in res["warnings"])


# ----------------------------------------------------------------------------- docs hooks


def test_openrlhf_hook_in_the_docs_writes_an_importable_tokens_file(
    known: F.Known, tmp_path: Path
) -> None:
    """docs/import.md's OpenRLHF hook, run on Experience-shaped tensors built from the known
    run (OpenRLHF's layout: right-padded sequences, per-token tensors shifted by one:
    index j describes token j + 1), then imported: delta is reproduced exactly."""
    import re
    from types import SimpleNamespace

    import torch

    doc = (Path(__file__).resolve().parent.parent / "docs" / "import.md").read_text()
    block = re.search(r"<!-- test: openrlhf-hook[^>]*-->\s*```python\n(.*?)\n```", doc, re.S)
    assert block is not None
    ns: dict[str, Any] = {}
    exec(compile(block.group(1), "docs/import.md", "exec"), ns)

    comps = known.completions
    T = max(c.prompt.size + c.tokens.size for c in comps)
    B = len(comps)
    seq = torch.zeros(B, T, dtype=torch.long)
    att = torch.zeros(B, T, dtype=torch.long)
    am = torch.zeros(B, T - 1, dtype=torch.bool)
    li = torch.zeros(B, T - 1)
    lt = torch.zeros(B, T - 1)
    adv = torch.zeros(B, T - 1)
    for b, c in enumerate(comps):
        P, n = c.prompt.size, c.prompt.size + c.tokens.size
        seq[b, :n] = torch.from_numpy(np.concatenate([c.prompt, c.tokens]))
        att[b, :n] = 1
        j = np.arange(P - 1, n - 1)  # actions of tokens P .. n - 1
        am[b, j] = torch.from_numpy(c.mask)
        li[b, j] = torch.from_numpy(np.nan_to_num(c.logp_infer)).float()
        lt[b, j] = torch.from_numpy(np.nan_to_num(c.logp_train)).float()
        adv[b, j] = c.advantage
    exp = SimpleNamespace(sequences=seq, attention_mask=att, action_mask=am,
                          rollout_log_probs=li, action_log_probs=lt, advantages=adv)  # fmt: skip
    ns["dump_experiences"]([exp], step=7, out_dir=str(tmp_path / "dump"))
    res = run_import(ImportOptions("tokens", [str(tmp_path / "dump")], tmp_path / "run"))
    assert res["steps"] == [7] and res["num_dropped_tokens"] == known.num_dropped()
    e, tok = aligned(known, tmp_path / "run", list(range(len(comps))))
    np.testing.assert_array_equal(tok["delta"].to_numpy(), e["delta"].to_numpy())
    np.testing.assert_array_equal(tok["pos"].to_numpy(), e["pos"].to_numpy())


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_module_fulfils_the_contract(name: str) -> None:
    """Each FORMATS module defines the `toolkit.Format` names with the types and signatures
    the Protocol gives, and the optional hooks with theirs (the contract is code, not prose)."""
    import inspect
    import typing

    from mismatch_cli.importers import toolkit

    mod = get_format(name)
    assert isinstance(mod, toolkit.Format)
    assert mod.NAME == name
    hints = typing.get_type_hints(toolkit.Format)
    for attr in ("NAME", "PATTERNS", "PICKLE", "SIDES", "SIGN"):
        assert attr in hints
        assert isinstance(getattr(mod, attr), (str, bool, tuple, list)), attr
    assert isinstance(mod.PICKLE, bool) and mod.SIDES in ("both", "infer", "either")
    assert mod.PATTERNS and all(isinstance(p, str) for p in mod.PATTERNS)

    def params(fn: typing.Any, drop_self: bool) -> list[str]:
        names = list(inspect.signature(fn).parameters)
        return names[1:] if drop_self else names

    hooks = {"step_of": toolkit.Format, "read": toolkit.Format,
             "select": toolkit.SelectsFiles, "warnings": toolkit.WarnsOnSteps}  # fmt: skip
    for fn, proto in hooks.items():
        if fn in ("select", "warnings") and not hasattr(mod, fn):
            continue
        assert params(getattr(mod, fn), False) == params(getattr(proto, fn), True), (name, fn)
